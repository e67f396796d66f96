//! [`Changelog`] on JetStream: one stream `{prefix}-kv` (created on first use), a subject per
//! changelog and per blob. An entry is one atomic batch of ≤ 512 KiB fragments whose first
//! message carries `Nats-Expected-Last-Subject-Sequence` (the fence) and, for a rollup,
//! `Nats-Rollup: sub` — both allowed on a subject's first message in a batch (nats-server
//! checks the expectation before the rollup purges). An entry's position is the stream
//! sequence of its last fragment, which is what the next append expects.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use weir_log::changelog::{Changelog, Entry};
use weir_log::LogError;

use crate::partition::header;
use crate::{engine, JetStreamLog, FRAGMENT_BYTES};

const H_FRAGS: &str = "Weir-Frags";
const H_PREV: &str = "Weir-Prev";
const H_ROLLUP: &str = "Weir-Rollup";

impl JetStreamLog {
    async fn kv_stream(&self) -> Result<async_nats::jetstream::stream::Stream, LogError> {
        if let Some(s) = self.kv.lock().as_ref() {
            return Ok(s.clone());
        }
        let config = async_nats::jetstream::stream::Config {
            name: self.names.kv_stream(),
            subjects: vec![self.names.kv_subjects()],
            num_replicas: self.options.replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            allow_rollup: true,
            allow_atomic_publish: true,
            duplicate_window: std::time::Duration::from_secs(1),
            max_message_size: -1,
            ..Default::default()
        };
        let stream = crate::meta::ensure_stream(
            &self.js,
            config,
            "open the plugin-state stream (is JetStream enabled on these servers?)",
            std::time::Duration::from_secs(30),
            |_| true,
        )
        .await?;
        *self.kv.lock() = Some(stream.clone());
        Ok(stream)
    }

    async fn put_entry(
        &self,
        subject: String,
        expect: Option<u64>,
        payload: &[u8],
        rollup: bool,
    ) -> Result<u64, LogError> {
        self.kv_stream().await?;
        let payload = Bytes::copy_from_slice(payload);
        let frags = payload.len().div_ceil(FRAGMENT_BYTES).max(1);
        let messages: Vec<(String, HeaderMap, Bytes, Option<usize>)> = (0..frags)
            .map(|f| {
                let mut h = HeaderMap::new();
                if f == 0 {
                    h.insert(H_FRAGS, frags.to_string().as_str());
                    if let Some(seq) = expect {
                        h.insert(
                            "Nats-Expected-Last-Subject-Sequence",
                            seq.to_string().as_str(),
                        );
                        h.insert(H_PREV, seq.to_string().as_str());
                    }
                    if rollup {
                        h.insert("Nats-Rollup", "sub");
                        h.insert(H_ROLLUP, "1");
                    }
                }
                let end = ((f + 1) * FRAGMENT_BYTES).min(payload.len());
                (
                    subject.clone(),
                    h,
                    payload.slice(f * FRAGMENT_BYTES..end),
                    None,
                )
            })
            .collect();
        match self.send_fenced(&subject, &messages).await? {
            Some(ack) => Ok(ack.sequence),
            None => Err(LogError::Conflict { what: subject }),
        }
    }

    async fn next_message(
        &self,
        subject: &str,
        from: u64,
    ) -> Result<Option<StreamMessage>, LogError> {
        let stream = self.kv_stream().await?;
        match stream
            .raw_message_builder()
            .sequence(from)
            .next_by_subject(subject.to_string())
            .send()
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(engine(&format!("read {subject}"), e)),
        }
    }

    /// The entry whose first fragment is `first`, reassembled.
    async fn entry_from(&self, subject: &str, first: StreamMessage) -> Result<Entry, LogError> {
        let h = first.headers.clone();
        let frags: u64 = header(&h, H_FRAGS).unwrap_or(1);
        let mut payload = BytesMut::from(first.payload.as_ref());
        let mut seq = first.sequence;
        for _ in 1..frags {
            let next = self
                .next_message(subject, seq + 1)
                .await?
                .filter(|m| m.sequence == seq + 1)
                .ok_or_else(|| {
                    // Rolled up while it was read: the caller reads again from its position.
                    engine(&format!("read {subject}"), "an entry's fragments are gone")
                })?;
            payload.extend_from_slice(&next.payload);
            seq = next.sequence;
        }
        Ok(Entry {
            seq,
            prev: header(&h, H_PREV),
            rollup: h.get(H_ROLLUP).is_some(),
            payload: payload.freeze(),
        })
    }
}

impl Changelog for JetStreamLog {
    fn append_entry(
        &self,
        log: &str,
        expect: Option<u64>,
        payload: &[u8],
        rollup: bool,
    ) -> Result<u64, LogError> {
        self.block_on(self.put_entry(self.names.changelog_subject(log), expect, payload, rollup))
    }

    fn last_position(&self, log: &str) -> Result<u64, LogError> {
        let subject = self.names.changelog_subject(log);
        self.block_on(async {
            let stream = self.kv_stream().await?;
            match stream
                .raw_message_builder()
                .last_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(m) => Ok(m.sequence),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
                Err(e) => Err(engine(&format!("read {subject}"), e)),
            }
        })
    }

    fn read_entries(&self, log: &str, after: u64, limit: usize) -> Result<Vec<Entry>, LogError> {
        let subject = self.names.changelog_subject(log);
        self.block_on(async {
            let mut out = Vec::new();
            let mut from = after + 1;
            while out.len() < limit {
                let Some(m) = self.next_message(&subject, from).await? else {
                    break;
                };
                let entry = self.entry_from(&subject, m).await?;
                from = entry.seq + 1;
                out.push(entry);
            }
            Ok(out)
        })
    }

    fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), LogError> {
        self.block_on(self.put_entry(self.names.blob_subject(name), None, bytes, true))
            .map(|_| ())
    }

    fn get_blob(&self, name: &str) -> Result<Option<Bytes>, LogError> {
        let subject = self.names.blob_subject(name);
        self.block_on(async {
            // The subject holds one blob: each put rolls up the one before.
            let Some(first) = self.next_message(&subject, 1).await? else {
                return Ok(None);
            };
            Ok(Some(self.entry_from(&subject, first).await?.payload))
        })
    }
}
