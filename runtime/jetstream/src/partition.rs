//! A partition's messages: an append as one fenced atomic batch, the walk over its tail,
//! reading a chunk back (fragments included); recovering a whole partition is in recover.rs.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use weir_core::TopicPartition;
use weir_log::{ChunkMeta, EncodedChunk, LogError};

use crate::{engine, JetStreamLog, Loc, Names, PartState};

/// Chunks of one publish are packed to about this size: JetStream's throughput grows with
/// the message size up to ~100 KB, its default `max_payload` is 1 MB, and an atomic batch holds
/// at most 1,000 messages (a 64 MiB request of records just over half this size needs ~500).
pub const CHUNK_TARGET_BYTES: usize = 256 * 1024;
/// A chunk larger than this (one big record) is stored as several messages of the batch.
pub const FRAGMENT_BYTES: usize = 512 * 1024;
/// JetStream's limit on messages in one atomic batch.
pub(crate) const MAX_BATCH_MESSAGES: usize = 1000;

pub(crate) const H_BASE: &str = "Weir-Base";
const H_COUNT: &str = "Weir-Count";
const H_BYTES: &str = "Weir-Bytes";
const H_MAX_TS: &str = "Weir-Max-Ts";
const H_FRAGS: &str = "Weir-Frags";
/// On a chunk subject, in place of a chunk: the topic's deletion closed the partition.
pub(crate) const H_CLOSED: &str = "Weir-Closed";

pub(crate) fn header<T: std::str::FromStr>(h: &HeaderMap, name: &str) -> Option<T> {
    h.get(name)?.as_str().parse().ok()
}

/// Refuses an append that needs more messages than one atomic batch holds.
pub(crate) fn check_batch(chunks: &[EncodedChunk], producers: usize) -> Result<(), LogError> {
    let messages: usize = chunks
        .iter()
        .map(|c| c.bytes.len().div_ceil(FRAGMENT_BYTES).max(1))
        .sum::<usize>()
        + producers;
    if messages > MAX_BATCH_MESSAGES {
        return Err(LogError::TooLarge {
            reason: format!(
                "a partition's share of the publish needs {messages} messages, more than the {MAX_BATCH_MESSAGES} of one JetStream atomic batch; send fewer records per request"
            ),
        });
    }
    Ok(())
}

/// A message read back from a partition's subjects.
pub(crate) enum Walked {
    /// The first message of a chunk.
    Chunk {
        base: u64,
        loc: Loc,
        meta: ChunkMeta,
    },
    /// A later fragment of a chunk, or a chunk message without weir's headers.
    ChunkPart,
    /// A producer's sequence state.
    Producer { id: u64, state: Bytes },
    /// The mark a topic's deletion leaves on each partition before anything is removed.
    Closed,
}

fn classify(m: &async_nats::jetstream::message::StreamMessage) -> Walked {
    classify_parts(m.subject.as_str(), m.sequence, Some(&m.headers), &m.payload)
}

pub(crate) fn classify_parts(
    subject: &str,
    seq: u64,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Walked {
    if let Some(id) = Names::producer_of(subject) {
        return Walked::Producer {
            id,
            state: payload.clone(),
        };
    }
    let Some(h) = headers else {
        return Walked::ChunkPart;
    };
    if h.get(H_CLOSED).is_some() {
        return Walked::Closed;
    }
    match (
        header::<u64>(h, H_BASE),
        header::<u32>(h, H_COUNT),
        header::<u32>(h, H_BYTES),
        header::<i64>(h, H_MAX_TS),
    ) {
        (Some(base), Some(count), Some(bytes), Some(max_timestamp_ms)) => Walked::Chunk {
            base,
            loc: Loc {
                seq,
                frags: header(h, H_FRAGS).unwrap_or(1),
            },
            meta: ChunkMeta {
                count,
                bytes,
                max_timestamp_ms,
            },
        },
        _ => Walked::ChunkPart,
    }
}

/// Moves a partition's position past one message read back; `false` when it is a chunk this
/// node already has (its own append).
pub(crate) fn advance(st: &mut PartState, walked: &Walked, seq: u64) -> bool {
    st.walked_seq = seq;
    if !matches!(walked, Walked::Producer { .. }) {
        st.last_chunk_seq = seq;
    }
    match walked {
        Walked::Closed => st.closed = true,
        Walked::Producer { id, .. } => {
            st.producer_seqs.insert(*id, seq);
        }
        _ => {}
    }
    if let Walked::Chunk { base, loc, meta } = walked {
        if *base < st.next && !st.index.is_empty() {
            return false; // known (this node appended it)
        }
        // A base past the end means the chunks between were removed by another node's
        // retention before this one read them: the caller rebuilds its view.
        st.index.insert(*base, *loc);
        st.next = base + u64::from(meta.count);
    }
    true
}

impl JetStreamLog {
    /// Reads every message of a partition after `st.walked_seq`, applying chunks that
    /// continue the partition to `st` and handing each to `seen`. It reads in batches from
    /// any replica where the stream allows it (direct.rs), one message per request from the
    /// leader otherwise, and ends only when the leader has nothing after what it read: a
    /// lagging follower can slow a walk, never shorten it.
    pub(crate) async fn walk(
        &self,
        tp: &TopicPartition,
        st: &mut PartState,
        mut seen: impl FnMut(Walked),
    ) -> Result<(), LogError> {
        st.walk_complete = false;
        let stream = self.stream(&tp.topic).await?;
        let filter = self.names.partition_subjects(&tp.topic, tp.partition);
        let direct = stream.cached_info().config.allow_direct;
        let name = stream.cached_info().config.name.clone();
        // Batches first, from whichever replica answers, and the leader only once they run
        // dry: under load the leader's one-message answers are the slow part (asking it first
        // brought the ~10 s chase back in half the runs, BENCHMARKS.md).
        loop {
            if direct {
                let batch = self
                    .try_direct_batch(&name, &filter, st.walked_seq + 1)
                    .await;
                if let Some(batch) = batch.filter(|b| !b.messages.is_empty()) {
                    for m in batch.messages {
                        let walked =
                            classify_parts(&m.subject, m.seq, Some(&m.headers), &m.payload);
                        if advance(st, &walked, m.seq) {
                            seen(walked);
                        }
                    }
                    continue;
                }
            }
            let seq = st.walked_seq + 1;
            let what = format!("read the tail of {tp}");
            let read = self.patiently(&what, || {
                stream
                    .raw_message_builder()
                    .sequence(seq)
                    .next_by_subject(filter.clone())
                    .send()
            });
            let Some(m) = read.await? else {
                st.walk_complete = true;
                return Ok(());
            };
            let walked = classify(&m);
            if advance(st, &walked, m.sequence) {
                seen(walked);
            }
        }
    }

    /// Sends one batch (a single message needs no batch headers) and waits for its ack.
    pub(crate) async fn send_batch(
        &self,
        what: &dyn std::fmt::Display,
        messages: &[(String, HeaderMap, Bytes, Option<usize>)],
    ) -> Result<Result<PublishAck, PublishError>, LogError> {
        let n = messages.len();
        let batch_id = (n > 1).then(|| format!("w{:016x}{:08x}", rand_id(), n));
        let mut commit = None;
        for (i, (subj, mut h, payload, _)) in messages.iter().cloned().enumerate() {
            if let Some(id) = &batch_id {
                h.insert("Nats-Batch-Id", id.as_str());
                h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                if i + 1 == n {
                    h.insert("Nats-Batch-Commit", "1");
                }
            }
            if i + 1 < n {
                self.client
                    .publish_with_headers(subj, h, payload)
                    .await
                    .map_err(|e| engine(&format!("append to {what}"), e))?;
            } else {
                commit = Some(
                    self.js
                        .publish_with_headers(subj, h, payload)
                        .await
                        .map_err(|e| engine(&format!("append to {what}"), e))?,
                );
            }
        }
        Ok(commit.expect("a batch has a last message").await)
    }

    /// Sends one batch whose first message carries a fence, again while a new stream has no
    /// responders yet ("no responders" stores nothing; a new batch id each time). `None`: the
    /// fence refused it (10071 the subject moved on, 10164 another conditional write to it is
    /// in flight). An ack that does not cover the whole batch is an error, never a position.
    pub(crate) async fn send_fenced(
        &self,
        what: &dyn std::fmt::Display,
        messages: &[(String, HeaderMap, Bytes, Option<usize>)],
    ) -> Result<Option<PublishAck>, LogError> {
        let mut tries = 0;
        let ack = loop {
            match self.send_batch(what, messages).await? {
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound && tries < 30 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => break other,
            }
        };
        let ack = match ack {
            Ok(ack) => ack,
            Err(e) => {
                let text = e.to_string();
                let lost_race = e.kind() == PublishErrorKind::WrongLastSequence
                    || text.contains("10071")
                    || text.contains("10164")
                    || text.contains("wrong last sequence");
                return match lost_race {
                    true => Ok(None),
                    false => Err(engine(&format!("append to {what}"), e)),
                };
            }
        };
        let n = messages.len();
        if n > 1 && ack.batch_size.is_some_and(|c| c != n as u64) {
            // Not what was sent: the caller's view stays as it was; its next append is
            // fenced and reads the tail.
            return Err(engine(
                &format!("append to {what}"),
                format!(
                    "the batch of {n} messages was acknowledged with {:?}",
                    ack.batch_size
                ),
            ));
        }
        Ok(Some(ack))
    }

    pub(crate) async fn append_async(
        &self,
        tp: &TopicPartition,
        st: &mut PartState,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producers: &[(u64, &[u8])],
    ) -> Result<(), LogError> {
        // A partition that never held a chunk may begin past 0: a log moved from a single node
        // whose retention had trimmed it (`weir migrate`). The fence still applies.
        if st.closed {
            return Err(LogError::Closed {
                topic: tp.topic.clone(),
            });
        }
        let never_written =
            st.index.is_empty() && st.last_chunk_seq == 0 && st.next == 0 && st.walk_complete;
        if base_offset != st.next && !never_written {
            return Err(LogError::Fenced {
                tp: tp.clone(),
                expected: base_offset,
                actual: st.next,
            });
        }
        let subject = self.names.chunk_subject(&tp.topic, tp.partition);
        // (subject, headers, payload, index of the chunk whose first fragment it is)
        let mut messages: Vec<(String, HeaderMap, Bytes, Option<usize>)> = Vec::new();
        let mut offset = base_offset;
        for (i, chunk) in chunks.iter().enumerate() {
            let frags = chunk.bytes.len().div_ceil(FRAGMENT_BYTES).max(1);
            for f in 0..frags {
                let mut h = HeaderMap::new();
                if f == 0 {
                    h.insert(H_BASE, offset.to_string().as_str());
                    h.insert(H_COUNT, chunk.header.count.to_string().as_str());
                    h.insert(H_BYTES, chunk.bytes.len().to_string().as_str());
                    h.insert(H_MAX_TS, chunk.header.max_timestamp_ms.to_string().as_str());
                    if frags > 1 {
                        h.insert(H_FRAGS, frags.to_string().as_str());
                    }
                }
                let end = ((f + 1) * FRAGMENT_BYTES).min(chunk.bytes.len());
                let payload = chunk.bytes.slice(f * FRAGMENT_BYTES..end);
                messages.push((subject.clone(), h, payload, (f == 0).then_some(i)));
            }
            offset += u64::from(chunk.header.count);
        }
        for &(id, state) in producers {
            let mut h = HeaderMap::new();
            h.insert("Nats-Rollup", "sub");
            messages.push((
                self.names
                    .producer_state_subject(&tp.topic, tp.partition, id),
                h,
                Bytes::copy_from_slice(state),
                None,
            ));
        }
        check_batch(chunks, producers.len())?;
        messages[0].1.insert(
            "Nats-Expected-Last-Subject-Sequence",
            st.last_chunk_seq.to_string().as_str(),
        );
        // Only into this topic's stream: an append that lands late after the topic was
        // deleted and created again (a new stream, the same subjects) is refused.
        let stream = self.stream_name(&tp.topic).await?;
        messages[0]
            .1
            .insert("Nats-Expected-Stream", stream.as_str());
        let n = messages.len();
        let last_chunk_message = messages.iter().rposition(|m| m.0 == subject).unwrap_or(0);
        let Some(ack) = self.send_fenced(tp, &messages).await? else {
            return Err(LogError::Fenced {
                tp: tp.clone(),
                expected: base_offset,
                actual: st.next,
            });
        };
        // The batch's messages have consecutive sequences ending at the ack's.
        let first = ack.sequence + 1 - n as u64;
        let mut offset = base_offset;
        for (i, (_, _, _, chunk)) in messages.iter().enumerate() {
            if let Some(c) = chunk {
                let frags = chunks[*c].bytes.len().div_ceil(FRAGMENT_BYTES).max(1) as u32;
                st.index.insert(
                    offset,
                    Loc {
                        seq: first + i as u64,
                        frags,
                    },
                );
                offset += u64::from(chunks[*c].header.count);
            }
        }
        st.next = offset;
        st.last_chunk_seq = first + last_chunk_message as u64;
        // A producer's state is the message it was given in the batch (after the chunks).
        for (i, &(id, _)) in producers.iter().enumerate() {
            st.producer_seqs
                .insert(id, ack.sequence + 1 + i as u64 - producers.len() as u64);
        }
        // The fence proved no other batch reached the partition since the last chunk this
        // node knows; if its last walk also read everything up to there (the producer states
        // after that chunk included), the walk may continue after this batch.
        if st.walk_complete {
            st.walked_seq = ack.sequence;
        }
        Ok(())
    }

    pub(crate) async fn read_chunk_async(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        loc: Loc,
    ) -> Result<Option<Bytes>, LogError> {
        let stream = self.stream(&tp.topic).await?;
        let subject = self.names.chunk_subject(&tp.topic, tp.partition);
        let mut seq = loc.seq;
        let mut out = BytesMut::new();
        for f in 0..loc.frags {
            let what = format!("read {tp} at offset {base_offset}");
            let got = self.patiently(&what, || {
                let ask = stream.raw_message_builder().sequence(seq);
                if f == 0 {
                    ask.send()
                } else {
                    ask.next_by_subject(subject.clone()).send()
                }
            });
            let Some(m) = got.await? else {
                return Ok(None);
            };
            if f == 0 && header::<u64>(&m.headers, H_BASE) != Some(base_offset) {
                return Err(LogError::Malformed {
                    what: format!("chunk of {tp} at stream sequence {seq}"),
                    reason: format!("it is not the chunk at offset {base_offset}"),
                });
            }
            if loc.frags == 1 {
                return Ok(Some(m.payload));
            }
            out.extend_from_slice(&m.payload);
            seq = m.sequence + 1;
        }
        Ok(Some(out.freeze()))
    }
}

pub(crate) fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_core::Record;

    #[test]
    fn a_share_needing_more_messages_than_a_batch_holds_is_refused_up_front() {
        let records: Vec<Record> = (0..1001).map(|_| Record::from_value("x")).collect();
        // A 1-byte target puts every record in a chunk (a message) of its own.
        let chunks = weir_log::codec::encode_chunks(&records, 1, 1);
        assert_eq!(chunks.len(), 1001);
        let e = check_batch(&chunks, 0).unwrap_err();
        assert!(matches!(e, LogError::TooLarge { .. }), "{e}");
        assert!(
            e.to_string().contains("send fewer records per request"),
            "{e}"
        );
        assert!(check_batch(&chunks[..999], 1).is_ok());
        assert!(check_batch(&chunks[..1000], 1).is_err());
    }
}
