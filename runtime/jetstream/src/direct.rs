//! Reading many messages of a stream per round trip: JetStream's batched direct get
//! (`$JS.API.DIRECT.GET.<stream>` with `batch`, nats-server 2.11 and later).
//!
//! Any replica of a stream that allows direct gets may answer, and a follower may lag the
//! leader: what a batch returns is committed and in order, but a short or empty answer does
//! not mean the stream ends there. The walk (partition.rs) therefore only ever ends on the
//! leader's "no message" — a batch speeds up the reading, never decides where it stops.

use std::time::{Duration, Instant};

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use weir_log::LogError;

use crate::{engine, JetStreamLog};

/// Messages asked for per batch.
const BATCH_MESSAGES: usize = 256;
/// Bytes asked for per batch: the server stops after the message that passes it (a message
/// is at most a 512 KiB fragment plus its headers, so a batch stays under ~4.6 MiB).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How long a batch may take to begin and between its messages. A replica answers at once
/// when it is alive; one frozen or cut off (its server's routes not yet timed out) never
/// does, and a walk must not wait the whole request timeout for it.
const PATIENCE: Duration = Duration::from_secs(1);
/// How long a stream's tail is read from its leader only after a direct get failed.
const BENCHED_FOR: Duration = Duration::from_secs(30);

/// What one batch read.
pub(crate) struct Batch {
    /// In stream order, with no message of the filter missing between them.
    pub(crate) messages: Vec<DirectMessage>,
}

/// One message of a batch.
pub(crate) struct DirectMessage {
    pub(crate) subject: String,
    pub(crate) seq: u64,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

impl JetStreamLog {
    /// A batch as [`Self::direct_batch`] reads it; `None` when direct gets of `stream` failed
    /// in the last [`BENCHED_FOR`] (this one included): the caller reads from the leader.
    pub(crate) async fn try_direct_batch(
        &self,
        stream: &str,
        filter: &str,
        from: u64,
    ) -> Option<Batch> {
        {
            let mut benched = self.direct_benched.lock();
            match benched.get(stream) {
                Some(until) if Instant::now() < *until => return None,
                Some(_) => {
                    benched.remove(stream);
                }
                None => {}
            }
        }
        match self.direct_batch(stream, filter, from).await {
            Ok(batch) => Some(batch),
            Err(e) => {
                tracing::warn!(message = "Reading a stream's tail by direct get failed; reading it from its leader for a while.", stream, error = %e, seconds = BENCHED_FOR.as_secs());
                self.direct_benched
                    .lock()
                    .insert(stream.to_string(), Instant::now() + BENCHED_FOR);
                None
            }
        }
    }

    /// The messages of `filter` from sequence `from` on, as many as one batch holds, from
    /// whichever replica of `stream` answers (see the module's note on lagging followers).
    /// Empty when that replica has none, or when no replica answers direct gets right now
    /// (a stream between leaders).
    pub(crate) async fn direct_batch(
        &self,
        stream: &str,
        filter: &str,
        from: u64,
    ) -> Result<Batch, LogError> {
        let what = format!("read {filter} from sequence {from} (direct get)");
        let failed = |e: &dyn std::fmt::Display| engine(&what, e);
        let request = serde_json::json!({
            "seq": from,
            "next_by_subj": filter,
            "batch": BATCH_MESSAGES,
            "max_bytes": BATCH_BYTES,
        });
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| failed(&e))?;
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                inbox,
                Bytes::from(request.to_string()),
            )
            .await
            .map_err(|e| failed(&e))?;
        let mut out: Vec<DirectMessage> = Vec::new();
        loop {
            let patience = PATIENCE.min(self.options.request_timeout);
            let reply = tokio::time::timeout(patience, replies.next())
                .await
                .map_err(|_| failed(&format!("no answer within {patience:?}")))?
                .ok_or_else(|| failed(&"the connection closed"))?;
            // Each answer names the sequence of the one before it (0 for the first): a
            // message lost on the way would otherwise be a message the walk skips.
            let previous = out.last().map_or(0, |m| m.seq);
            match reply.status {
                None => {
                    let m = direct_message(reply).map_err(|e| failed(&e))?;
                    chained(&m.headers, previous).map_err(|e| failed(&e))?;
                    out.push(m);
                }
                Some(s) if s.as_u16() == 204 => {
                    let h = reply.headers.unwrap_or_default();
                    chained(&h, previous).map_err(|e| failed(&e))?;
                    return Ok(Batch { messages: out });
                }
                // Nothing from `from` on; no replica answers direct gets at the moment.
                Some(s) if s == StatusCode::NOT_FOUND || s == StatusCode::NO_RESPONDERS => {
                    return Ok(Batch { messages: out })
                }
                Some(s) => {
                    return Err(failed(&format!(
                        "status {} {}",
                        s.as_u16(),
                        reply.description.unwrap_or_default()
                    )))
                }
            }
            // Older servers ignore `batch` and answer one message without the batch's end.
            if out.len() == 1 && number::<u64>(&out[0].headers, "Nats-Num-Pending").is_none() {
                return Ok(Batch { messages: out });
            }
        }
    }
}

/// A message of a batch, from the headers the server adds to it.
fn direct_message(m: async_nats::Message) -> Result<DirectMessage, String> {
    let headers = m.headers.ok_or("a direct get answer without headers")?;
    let subject = headers
        .get("Nats-Subject")
        .ok_or("a direct get answer without Nats-Subject")?
        .to_string();
    let seq = headers
        .get("Nats-Sequence")
        .and_then(|v| v.as_str().parse().ok())
        .ok_or("a direct get answer without a Nats-Sequence")?;
    Ok(DirectMessage {
        subject,
        seq,
        headers,
        payload: m.payload,
    })
}

fn number<T: std::str::FromStr>(h: &HeaderMap, name: &str) -> Option<T> {
    h.get(name)?.as_str().parse().ok()
}

/// Checks that a batch's answer follows the message before it (`Nats-Last-Sequence`).
fn chained(h: &HeaderMap, previous: u64) -> Result<(), String> {
    match number::<u64>(h, "Nats-Last-Sequence") {
        Some(last) if last != previous => Err(format!(
            "a direct get batch lost a message: an answer follows sequence {last}, the last one received was {previous}"
        )),
        _ => Ok(()),
    }
}
