//! The metadata stream: the newest value of each subject (max one message per subject), read
//! from the stream leader, written with an optional compare-and-set on the subject's last
//! sequence.

use std::time::Duration;

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::TryStreamExt;
use weir_log::LogError;

use crate::{engine, JetStreamLog, Names};

pub(crate) async fn ensure_meta_stream(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<jetstream::stream::Stream, LogError> {
    let config = jetstream::stream::Config {
        name: names.meta_stream(),
        subjects: vec![names.meta_subjects()],
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        max_messages_per_subject: 1,
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    };
    ensure_stream(
        js,
        config,
        "open its metadata stream (is JetStream enabled on these servers?)",
        Duration::from_secs(30),
        |_| true,
    )
    .await
}

/// Whether a stream request failed for a moment only: no meta leader yet (an election), a
/// server that did not answer in time, or one reported offline while it is busy or
/// restarting ("no suitable peers for placement, peer offline").
pub(crate) fn transient(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    [
        "timed out",
        "no responders",
        "peer offline",
        "leader",
        "temporarily",
        "unavailable",
    ]
    .iter()
    .any(|t| e.contains(t))
}

/// Gets or creates a stream, retrying for `patience` the errors `retry` accepts: the first
/// request after the servers start may meet a cluster still electing its meta leader;
/// several weir nodes starting together create the same stream at once; a busy or
/// restarting server is reported offline for a few seconds.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
    what: &str,
    patience: Duration,
    retry: fn(&str) -> bool,
) -> Result<jetstream::stream::Stream, LogError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() < deadline && retry(&e.to_string()) => {
                tracing::debug!(message = "JetStream cannot create the stream yet.", stream = %config.name, error = %e);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(engine(what, e)),
        }
    }
}

/// How many times [`JetStreamLog::meta_put_over`] re-reads after losing a race.
const MAX_PUT_OVER_TRIES: usize = 20;

/// A stored value and the stream sequence it was written at (the compare-and-set token).
pub(crate) struct Value {
    pub(crate) seq: u64,
    pub(crate) bytes: Bytes,
}

impl JetStreamLog {
    pub(crate) async fn meta_get(&self, subject: &str) -> Result<Option<Value>, LogError> {
        match self
            .meta
            .raw_message_builder()
            .last_by_subject(subject.to_string())
            .send()
            .await
        {
            Ok(m) => Ok(Some(Value {
                seq: m.sequence,
                bytes: m.payload,
            })),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(engine(&format!("read {subject}"), e)),
        }
    }

    /// Writes a value; with `expect`, only if the subject's last write is still at that
    /// sequence (0: the subject must be empty), else [`LogError::Conflict`].
    pub(crate) async fn meta_put(
        &self,
        subject: &str,
        bytes: Bytes,
        expect: Option<u64>,
    ) -> Result<u64, LogError> {
        let mut headers = HeaderMap::new();
        if let Some(seq) = expect {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq.to_string().as_str(),
            );
        }
        let message = [(subject.to_string(), headers, bytes, None)];
        match self.send_fenced(&subject, &message).await? {
            Some(ack) => Ok(ack.sequence),
            None => Err(LogError::Conflict {
                what: subject.to_string(),
            }),
        }
    }

    /// Replaces a subject's value unless a later write is already there, with a
    /// compare-and-set on the sequence this node last knew for it (its own last write, or a
    /// fresh read). A write that failed or timed out and lands late is refused by the engine
    /// if anything was written after the value it replaced; a conflict re-reads, and the value
    /// read (or this node's own last write, when it is the compare-and-set) is written over only
    /// if `later` says it is not a later write than this one
    /// (consumer-group commits compare their commit times). So a request that outlived a later
    /// acknowledged write of the subject — its fenced write waited in a frozen server, then
    /// lost the race and read again — never undoes it. A write found superseded is answered
    /// `Ok`: it is ordered just before the later one, as if it landed and was written over.
    pub(crate) async fn meta_put_over(
        &self,
        subject: String,
        bytes: Bytes,
        later: impl Fn(&Bytes) -> bool,
    ) -> Result<(), LogError> {
        let mut known = self.meta_seqs_known.lock().get(&subject).cloned();
        for _ in 0..MAX_PUT_OVER_TRIES {
            // What is stored (as this node last wrote it, or as read now), unless it is later.
            let current = match known.take() {
                Some(k) => Some(k),
                None => self.meta_get(&subject).await?.map(|v| (v.seq, v.bytes)),
            };
            if let Some((_, stored)) = &current {
                if !stored.is_empty() && later(stored) {
                    tracing::debug!(
                        message = "A later write is already stored; this one is superseded.",
                        subject
                    );
                    return Ok(());
                }
            }
            let expect = current.map_or(0, |(seq, _)| seq);
            match self.meta_put(&subject, bytes.clone(), Some(expect)).await {
                Ok(seq) => {
                    self.meta_seqs_known.lock().insert(subject, (seq, bytes));
                    return Ok(());
                }
                // Written since: read it (the next try checks it is not later).
                Err(LogError::Conflict { .. }) => {}
                Err(e) => {
                    // Whether it landed is unknown: the next write reads first.
                    self.meta_seqs_known.lock().remove(&subject);
                    return Err(e);
                }
            }
        }
        Err(LogError::Engine {
            op: format!("write {subject}"),
            reason: format!(
                "other writers changed it {MAX_PUT_OVER_TRIES} times while this node tried; retry the request"
            ),
        })
    }

    /// Every subject matching a filter with the sequence of its value.
    pub(crate) async fn meta_seqs(&self, filter: &str) -> Result<Vec<(String, u64)>, LogError> {
        Ok(self
            .meta_values(filter)
            .await?
            .into_iter()
            .map(|(subject, v)| (subject, v.seq))
            .collect())
    }

    /// Every (subject, value) matching a filter, in subject order.
    pub(crate) async fn meta_list(&self, filter: &str) -> Result<Vec<(String, Bytes)>, LogError> {
        let mut out: Vec<(String, Bytes)> = self
            .meta_values(filter)
            .await?
            .into_iter()
            .map(|(subject, v)| (subject, v.bytes))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Every subject matching a filter with its value, leaving out empty values (a deletion
    /// written over a value, see topics.rs).
    async fn meta_values(&self, filter: &str) -> Result<Vec<(String, Value)>, LogError> {
        let subjects: Vec<(String, usize)> = self
            .meta
            .info_with_subjects(filter.to_string())
            .await
            .map_err(|e| engine(&format!("list {filter}"), e))?
            .try_collect()
            .await
            .map_err(|e| engine(&format!("list {filter}"), e))?;
        let mut out = Vec::with_capacity(subjects.len());
        for (subject, _) in subjects {
            if let Some(v) = self.meta_get(&subject).await? {
                if !v.bytes.is_empty() {
                    out.push((subject, v));
                }
            }
        }
        Ok(out)
    }
}

impl JetStreamLog {
    /// The stored next producer id and the sequence it was written at.
    pub(crate) async fn next_producer(&self) -> Result<Option<(u64, u64)>, LogError> {
        let Some(v) = self.meta_get(&self.names.next_producer_key()).await? else {
            return Ok(None);
        };
        let next = <[u8; 8]>::try_from(v.bytes.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| LogError::Malformed {
                what: "next producer id".into(),
                reason: format!("{} bytes", v.bytes.len()),
            })?;
        Ok(Some((v.seq, next)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_passing_failures_are_retried() {
        for passing in [
            "jetstream error: no suitable peers for placement, peer offline (code 400, error code 10005)",
            "timed out: didn't receive ack in time",
            "jetstream error: JetStream system temporarily unavailable (code 503, error code 10008)",
            "no responders",
        ] {
            assert!(super::transient(passing), "{passing}");
        }
        for lasting in [
            "jetstream error: replicas > 1 not supported in non-clustered mode (code 500, error code 10074)",
            "jetstream error: insufficient resources (code 503, error code 10023)",
            "jetstream error: jetstream not enabled for account (code 503, error code 10039)",
        ] {
            assert!(!super::transient(lasting), "{lasting}");
        }
    }
}
