//! The [`Log`] seam on JetStream: fenced atomic-batch appends, leader reads, retention by
//! purge, producers and groups in the metadata stream.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::{context::PublishErrorKind, stream::LastRawMessageErrorKind};
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use weir_core::{TopicConfig, TopicPartition};
use weir_log::{
    ChunkMeta, Durable, EncodedChunk, GroupEntry, Log, LogError, RecoveredPartition,
    StoredProducers, Tail,
};

use crate::{engine, JetStreamLog, Loc, Names, PartState};

/// Chunks of one publish are packed to about this size: JetStream's throughput grows with
/// the message size up to ~100 KB and its default `max_payload` is 1 MB.
pub const CHUNK_TARGET_BYTES: usize = 128 * 1024;
/// A chunk larger than this (one big record) is stored as several messages of the batch.
pub const FRAGMENT_BYTES: usize = 512 * 1024;
/// JetStream's limit on messages in one atomic batch.
const MAX_BATCH_MESSAGES: usize = 1000;

const H_BASE: &str = "Weir-Base";
const H_COUNT: &str = "Weir-Count";
const H_BYTES: &str = "Weir-Bytes";
const H_MAX_TS: &str = "Weir-Max-Ts";
const H_FRAGS: &str = "Weir-Frags";

fn header<T: std::str::FromStr>(h: &HeaderMap, name: &str) -> Option<T> {
    h.get(name)?.as_str().parse().ok()
}

/// A message read back from a partition's subjects.
enum Walked {
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
}

fn classify(m: &async_nats::jetstream::message::StreamMessage) -> Walked {
    let subject = m.subject.as_str();
    if let Some(id) = Names::producer_of(subject) {
        return Walked::Producer {
            id,
            state: m.payload.clone(),
        };
    }
    let h = &m.headers;
    match (
        header::<u64>(h, H_BASE),
        header::<u32>(h, H_COUNT),
        header::<u32>(h, H_BYTES),
        header::<i64>(h, H_MAX_TS),
    ) {
        (Some(base), Some(count), Some(bytes), Some(max_timestamp_ms)) => Walked::Chunk {
            base,
            loc: Loc {
                seq: m.sequence,
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

#[derive(serde::Serialize, serde::Deserialize)]
struct GroupValue {
    group: String,
    topic: String,
    offset: u64,
    at_ms: i64,
}

impl JetStreamLog {
    /// Reads every message of a partition after `st.walked_seq`, from the stream leader,
    /// applying chunks that continue the partition to `st` and handing each to `seen`.
    async fn walk(
        &self,
        tp: &TopicPartition,
        st: &mut PartState,
        mut seen: impl FnMut(Walked),
    ) -> Result<(), LogError> {
        let stream = self.stream(&tp.topic).await?;
        let filter = self.names.partition_subjects(&tp.topic, tp.partition);
        loop {
            let got = stream
                .raw_message_builder()
                .sequence(st.walked_seq + 1)
                .next_by_subject(filter.clone())
                .send()
                .await;
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(()),
                Err(e) => return Err(engine(&format!("read the tail of {tp}"), e)),
            };
            st.walked_seq = m.sequence;
            let walked = classify(&m);
            if !matches!(walked, Walked::Producer { .. }) {
                st.last_chunk_seq = m.sequence;
            }
            if let Walked::Chunk { base, loc, meta } = &walked {
                if *base < st.next && !st.index.is_empty() {
                    continue; // known (this node appended it)
                }
                if *base != st.next && !st.index.is_empty() {
                    return Err(LogError::Malformed {
                        what: format!("chunk of {tp} at stream sequence {}", m.sequence),
                        reason: format!(
                            "it starts at offset {base}, the partition ends at {}",
                            st.next
                        ),
                    });
                }
                st.index.insert(*base, *loc);
                st.next = base + u64::from(meta.count);
            }
            seen(walked);
        }
    }

    async fn append_async(
        &self,
        tp: &TopicPartition,
        st: &mut PartState,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producer: Option<(u64, &[u8])>,
    ) -> Result<(), LogError> {
        if base_offset != st.next {
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
        if let Some((id, state)) = producer {
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
        if messages.len() > MAX_BATCH_MESSAGES {
            return Err(engine(
                &format!("append to {tp}"),
                format!(
                    "the publish needs {} messages, more than the {MAX_BATCH_MESSAGES} of one atomic batch; send fewer or smaller records per request",
                    messages.len()
                ),
            ));
        }
        messages[0].1.insert(
            "Nats-Expected-Last-Subject-Sequence",
            st.last_chunk_seq.to_string().as_str(),
        );
        let n = messages.len();
        let last_chunk_message = messages.iter().rposition(|m| m.0 == subject).unwrap_or(0);
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
                    .map_err(|e| engine(&format!("append to {tp}"), e))?;
            } else {
                commit = Some(
                    self.js
                        .publish_with_headers(subj, h, payload)
                        .await
                        .map_err(|e| engine(&format!("append to {tp}"), e))?,
                );
            }
        }
        let ack = commit.expect("a batch has a last message").await;
        let ack = match ack {
            Ok(ack) => ack,
            Err(e) => {
                let text = e.to_string();
                let lost_race = e.kind() == PublishErrorKind::WrongLastSequence
                    || text.contains("10071")
                    || text.contains("10164")
                    || text.contains("wrong last sequence");
                return Err(if lost_race {
                    LogError::Fenced {
                        tp: tp.clone(),
                        expected: base_offset,
                        actual: st.next,
                    }
                } else {
                    engine(&format!("append to {tp}"), e)
                });
            }
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
        // The fence proved nothing else was appended to the partition since the last walk.
        st.walked_seq = ack.sequence;
        Ok(())
    }

    async fn read_chunk_async(
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
            let got = if f == 0 {
                stream.raw_message_builder().sequence(seq).send().await
            } else {
                stream
                    .raw_message_builder()
                    .sequence(seq)
                    .next_by_subject(subject.clone())
                    .send()
                    .await
            };
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(e) => return Err(engine(&format!("read {tp} at offset {base_offset}"), e)),
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

fn rand_id() -> u64 {
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

impl Durable for JetStreamLog {
    /// Nothing to do: a write is durable (replicated) when JetStream acknowledges it.
    fn sync(&self) -> Result<(), LogError> {
        Ok(())
    }
}

impl Log for JetStreamLog {
    fn load_topics(&self) -> Result<Vec<TopicConfig>, LogError> {
        self.block_on(async {
            let mut topics = Vec::new();
            for (subject, bytes) in self.meta_list(&self.names.topic_keys()).await? {
                let config: TopicConfig =
                    serde_json::from_slice(&bytes).map_err(|e| LogError::Malformed {
                        what: subject,
                        reason: e.to_string(),
                    })?;
                topics.push(config);
            }
            topics.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(topics)
        })
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        let json = serde_json::to_vec(config).expect("topic config serialises");
        self.block_on(async {
            // Created only if absent: of two nodes creating a topic, one wins.
            self.meta_put(&self.names.topic_key(&config.name), json.into(), Some(0))
                .await?;
            self.stream(&config.name).await.map(|_| ())
        })
    }

    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.block_on(async {
            let name = self.names.topic_stream(&config.name);
            self.streams.lock().remove(&config.name);
            match self.js.delete_stream(&name).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(engine(&format!("delete stream {name}"), e)),
            }
            self.meta_purge(&self.names.topic_group_keys(&config.name))
                .await?;
            self.meta_purge(&self.names.topic_key(&config.name)).await?;
            self.parts.lock().retain(|tp, _| tp.topic != config.name);
            Ok(())
        })
    }

    fn recover_partition(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError> {
        // A stream electing a leader (5-8 s after its leader died) does not answer for a
        // while: a starting node waits rather than exits.
        let mut tries = 0;
        loop {
            match self.recover_once(tp) {
                Err(LogError::Engine { .. }) if tries < 6 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    fn append(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producer: Option<(u64, &[u8])>,
    ) -> Result<(), LogError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let part = self.part(tp)?;
        let mut st = part.lock();
        self.block_on(self.append_async(tp, &mut st, base_offset, chunks, producer))
    }

    fn read_chunk(&self, tp: &TopicPartition, base_offset: u64) -> Result<Option<Bytes>, LogError> {
        let loc = {
            let part = self.part(tp)?;
            let st = part.lock();
            match st.index.get(&base_offset) {
                Some(loc) => *loc,
                None => return Ok(None),
            }
        };
        self.block_on(self.read_chunk_async(tp, base_offset, loc))
    }

    fn trim(&self, tp: &TopicPartition, bases: &[u64], new_start: u64) -> Result<(), LogError> {
        let part = self.part(tp)?;
        let mut st = part.lock();
        // The newest chunk always stays: its message carries the fence's sequence.
        let keep = st
            .index
            .range(new_start..)
            .next()
            .or_else(|| st.index.iter().next_back())
            .map(|(_, loc)| loc.seq);
        let Some(keep) = keep else { return Ok(()) };
        let subject = self.names.chunk_subject(&tp.topic, tp.partition);
        self.block_on(async {
            let stream = self.stream(&tp.topic).await?;
            stream
                .purge()
                .filter(subject)
                .sequence(keep)
                .await
                .map_err(|e| engine(&format!("trim {tp}"), e))
        })?;
        for base in bases {
            if st.index.get(base).is_some_and(|loc| loc.seq < keep) {
                st.index.remove(base);
            }
        }
        Ok(())
    }

    fn remove_producers(&self, tp: &TopicPartition, ids: &[u64]) -> Result<(), LogError> {
        self.block_on(async {
            let stream = self.stream(&tp.topic).await?;
            for id in ids {
                let subject = self
                    .names
                    .producer_state_subject(&tp.topic, tp.partition, *id);
                stream
                    .purge()
                    .filter(subject)
                    .await
                    .map_err(|e| engine(&format!("forget producer {id} in {tp}"), e))?;
            }
            Ok(())
        })
    }

    fn load_producers(&self) -> Result<StoredProducers, LogError> {
        self.block_on(async {
            let mut producers = Vec::new();
            for (subject, bytes) in self.meta_list(&self.names.producer_keys()).await? {
                if let Some(id) = subject.rsplit('.').next().and_then(|s| s.parse().ok()) {
                    producers.push((id, bytes));
                }
            }
            producers.sort_by_key(|(id, _)| *id);
            let next_id = self.next_producer().await?.map_or(1, |(_, n)| n);
            Ok(StoredProducers { producers, next_id })
        })
    }

    fn put_producer(&self, producer_id: u64, record: &[u8], _next_id: u64) -> Result<(), LogError> {
        let record = Bytes::copy_from_slice(record);
        self.block_on(async {
            self.meta_put(&self.names.producer_key(producer_id), record, None)
                .await
                .map(|_| ())
        })
    }

    fn issue_producer(
        &self,
        producer_id: u64,
        record: &[u8],
        next_id: u64,
    ) -> Result<(), LogError> {
        let record = Bytes::copy_from_slice(record);
        self.block_on(async {
            let key = self.names.next_producer_key();
            let (seq, stored_next) = self.next_producer().await?.unwrap_or((0, 1));
            if producer_id < stored_next {
                return Err(LogError::Conflict {
                    what: format!("producer id {producer_id}"),
                });
            }
            self.meta_put(&key, next_id.to_be_bytes().to_vec().into(), Some(seq))
                .await?;
            self.meta_put(&self.names.producer_key(producer_id), record, None)
                .await
                .map(|_| ())
        })
    }

    fn delete_producers(&self, ids: &[u64]) -> Result<(), LogError> {
        self.block_on(async {
            for id in ids {
                self.meta_purge(&self.names.producer_key(*id)).await?;
            }
            Ok(())
        })
    }

    fn put_group_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
        at_ms: i64,
    ) -> Result<(), LogError> {
        self.block_on(async {
            let mut acks = Vec::with_capacity(offsets.len());
            for (partition, offset) in offsets {
                let value = GroupValue {
                    group: group.into(),
                    topic: topic.into(),
                    offset: *offset,
                    at_ms,
                };
                let subject = self.names.group_key(topic, group, *partition);
                let json = serde_json::to_vec(&value).expect("group offsets serialise");
                acks.push(
                    self.js
                        .publish(subject, json.into())
                        .await
                        .map_err(|e| engine("commit group offsets", e))?,
                );
            }
            for ack in acks {
                ack.await.map_err(|e| engine("commit group offsets", e))?;
            }
            Ok(())
        })
    }

    fn group_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError> {
        self.block_on(async {
            let mut out = Vec::new();
            for (subject, bytes) in self.meta_list(&self.names.group_keys(topic, group)).await? {
                let v: GroupValue =
                    serde_json::from_slice(&bytes).map_err(|e| LogError::Malformed {
                        what: subject.clone(),
                        reason: e.to_string(),
                    })?;
                if let Some(p) = subject.rsplit('.').next().and_then(|s| s.parse().ok()) {
                    out.push((p, v.offset));
                }
            }
            out.sort_unstable();
            Ok(out)
        })
    }

    fn list_groups(&self) -> Result<Vec<GroupEntry>, LogError> {
        self.block_on(async {
            let mut latest: HashMap<(String, String), i64> = HashMap::new();
            for (subject, bytes) in self.meta_list(&self.names.all_group_keys()).await? {
                let v: GroupValue =
                    serde_json::from_slice(&bytes).map_err(|e| LogError::Malformed {
                        what: subject,
                        reason: e.to_string(),
                    })?;
                let at = latest.entry((v.group, v.topic)).or_insert(v.at_ms);
                *at = (*at).max(v.at_ms);
            }
            let mut out: Vec<GroupEntry> = latest
                .into_iter()
                .map(|((group, topic), last_commit_ms)| GroupEntry {
                    group,
                    topic,
                    last_commit_ms,
                })
                .collect();
            out.sort_by(|a, b| (&a.topic, &a.group).cmp(&(&b.topic, &b.group)));
            Ok(out)
        })
    }

    fn delete_group(&self, group: &str, topic: &str) -> Result<(), LogError> {
        self.block_on(self.meta_purge(&self.names.group_keys(topic, group)))
    }

    fn shared(&self) -> bool {
        true
    }

    fn chunk_target_bytes(&self) -> usize {
        CHUNK_TARGET_BYTES
    }

    fn tail(&self, tp: &TopicPartition) -> Result<Tail, LogError> {
        let part = self.part(tp)?;
        let mut st = part.lock();
        let mut tail = Tail::default();
        let walked = self.block_on(self.walk(tp, &mut st, |w| match w {
            Walked::Chunk { base, meta, .. } => tail.chunks.push((base, meta)),
            Walked::Producer { id, state } => tail.producers.push((id, state)),
            Walked::ChunkPart => {}
        }));
        match walked {
            Ok(()) => Ok(tail),
            // What was read before the failure has moved this partition's position: it
            // must reach the caller, or the next look would start after it.
            Err(e) if !(tail.chunks.is_empty() && tail.producers.is_empty()) => {
                tracing::debug!(message = "Reading the tail stopped early.", partition = %tp, error = %e);
                Ok(tail)
            }
            Err(e) => Err(e),
        }
    }

    fn first_offset(&self, tp: &TopicPartition) -> Result<Option<u64>, LogError> {
        let subject = self.names.chunk_subject(&tp.topic, tp.partition);
        let first = self.block_on(async {
            let stream = self.stream(&tp.topic).await?;
            match stream
                .raw_message_builder()
                .sequence(1)
                .next_by_subject(subject)
                .send()
                .await
            {
                Ok(m) => Ok(header::<u64>(&m.headers, H_BASE)),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(engine(&format!("read the start of {tp}"), e)),
            }
        })?;
        if let (Some(first), Ok(part)) = (first, self.part(tp)) {
            let mut st = part.lock();
            st.index.retain(|base, _| *base >= first);
        }
        Ok(first)
    }

    fn load_producer(&self, producer_id: u64) -> Result<Option<Bytes>, LogError> {
        self.block_on(async {
            Ok(self
                .meta_get(&self.names.producer_key(producer_id))
                .await?
                .map(|v| v.bytes))
        })
    }
}

impl JetStreamLog {
    /// The stored next producer id and the sequence it was written at.
    async fn next_producer(&self) -> Result<Option<(u64, u64)>, LogError> {
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

impl JetStreamLog {
    fn recover_once(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError> {
        let mut st = PartState::default();
        let mut chunks = Vec::new();
        let mut producers: HashMap<u64, Bytes> = HashMap::new();
        self.block_on(self.walk(tp, &mut st, |w| match w {
            Walked::Chunk { base, meta, .. } => chunks.push((base, meta)),
            Walked::Producer { id, state } => {
                producers.insert(id, state);
            }
            Walked::ChunkPart => {}
        }))?;
        let start_offset = chunks.first().map(|(b, _)| *b).unwrap_or(st.next);
        self.parts
            .lock()
            .insert(tp.clone(), Arc::new(Mutex::new(st)));
        Ok(RecoveredPartition {
            start_offset,
            chunks,
            producers: producers.into_iter().collect(),
        })
    }
}
