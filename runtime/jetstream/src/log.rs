//! The [`Log`] seam on JetStream: fenced atomic-batch appends, leader reads, retention by
//! purge, producers and groups in the metadata stream.

use std::collections::HashMap;

use bytes::Bytes;
use weir_core::{TopicConfig, TopicPartition};
use weir_log::{
    Durable, EncodedChunk, GroupEntry, Log, LogError, RecoveredPartition, SharedLog,
    StoredProducers, Tail,
};

use crate::partition::{header, Walked, CHUNK_TARGET_BYTES, H_BASE};
use crate::{engine, JetStreamLog};

#[derive(serde::Serialize, serde::Deserialize)]
struct GroupValue {
    group: String,
    topic: String,
    offset: u64,
    at_ms: i64,
}

impl Durable for JetStreamLog {
    /// Nothing to do: a write is durable (replicated) when JetStream acknowledges it.
    fn sync(&self) -> Result<(), LogError> {
        Ok(())
    }
}

impl Log for JetStreamLog {
    fn load_topics(&self) -> Result<Vec<TopicConfig>, LogError> {
        self.block_on(self.load_topics_async())
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.block_on(self.put_topic_async(config))
    }

    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.block_on(self.delete_topic_async(config))
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
        producers: &[(u64, &[u8])],
    ) -> Result<(), LogError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let part = self.part(tp)?;
        let mut st = part.lock();
        self.block_on(self.append_async(tp, &mut st, base_offset, chunks, producers))
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
        let part = self.part(tp)?;
        self.block_on(async {
            let stream = self.stream(&tp.topic).await?;
            for id in ids {
                // Bounded by the newest state this node read or wrote: a state written after
                // (the producer came back through another node) survives a purge that lands
                // late.
                let Some(seq) = part.lock().producer_seqs.get(id).copied() else {
                    continue;
                };
                let subject = self
                    .names
                    .producer_state_subject(&tp.topic, tp.partition, *id);
                stream
                    .purge()
                    .filter(subject)
                    .sequence(seq + 1)
                    .await
                    .map_err(|e| engine(&format!("forget producer {id} in {tp}"), e))?;
                part.lock().producer_seqs.remove(id);
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

    fn put_producer(&self, producer_id: u64, record: &[u8], next_id: u64) -> Result<(), LogError> {
        let record = Bytes::copy_from_slice(record);
        self.block_on(async {
            // The next id only ever rises (`weir migrate` moves ids issued elsewhere).
            let key = self.names.next_producer_key();
            loop {
                let (seq, stored_next) = self.next_producer().await?.unwrap_or((0, 1));
                if stored_next >= next_id {
                    break;
                }
                match self
                    .meta_put(&key, next_id.to_be_bytes().to_vec().into(), Some(seq))
                    .await
                {
                    Err(LogError::Conflict { .. }) => continue,
                    other => {
                        other?;
                        break;
                    }
                }
            }
            // Fenced on the record read just before (`weir migrate` moving a node's producers):
            // a write that lands late never replaces one made after it.
            let key = self.names.producer_key(producer_id);
            let seen = self.meta_get(&key).await?.map_or(0, |v| v.seq);
            self.meta_put(&key, record, Some(seen)).await.map(|_| ())
        })
    }

    fn delete_producers(&self, ids: &[u64]) -> Result<(), LogError> {
        self.block_on(async {
            for id in ids {
                // An empty value fenced on the record read, not a purge: an epoch bump that
                // lands after the read is kept (a late deletion would undo it).
                self.tombstone_current(&self.names.producer_key(*id))
                    .await?;
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
            let writes = offsets.iter().map(|(partition, offset)| {
                let value = GroupValue {
                    group: group.into(),
                    topic: topic.into(),
                    offset: *offset,
                    at_ms,
                };
                let subject = self.names.group_key(topic, group, *partition);
                let json = serde_json::to_vec(&value).expect("group offsets serialise");
                // A commit that started later (by the committing nodes' clocks) is kept.
                let later = move |stored: &Bytes| {
                    serde_json::from_slice::<GroupValue>(stored).is_ok_and(|v| v.at_ms > at_ms)
                };
                self.meta_put_over(subject, json.into(), later)
            });
            futures::future::try_join_all(writes)
                .await
                .map_err(|e| match e {
                    LogError::Engine { reason, .. } => engine("commit group offsets", reason),
                    other => other,
                })?;
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
        self.block_on(async {
            // An empty value fenced on the commit it read (never a purge, which a late
            // landing would apply over a commit made after it): a commit that lands in
            // between keeps the group.
            for (subject, seq) in self.meta_seqs(&self.names.group_keys(topic, group)).await? {
                match self.tombstone(&subject, seq).await {
                    Ok(_) | Err(LogError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    fn shared(&self) -> Option<&dyn SharedLog> {
        Some(self)
    }

    fn check_append(&self, chunks: &[EncodedChunk], producers: usize) -> Result<(), LogError> {
        crate::partition::check_batch(chunks, producers)
    }

    fn chunk_target_bytes(&self) -> usize {
        CHUNK_TARGET_BYTES
    }
}

impl SharedLog for JetStreamLog {
    fn tail(&self, tp: &TopicPartition) -> Result<Tail, LogError> {
        let part = self.part(tp)?;
        let mut st = part.lock();
        let mut tail = Tail::default();
        let walked = self.block_on(self.walk(tp, &mut st, |w| match w {
            Walked::Chunk { base, meta, .. } => tail.chunks.push((base, meta)),
            Walked::Producer { id, state } => tail.producers.push((id, state)),
            Walked::ChunkPart | Walked::Closed => {}
        }));
        match walked {
            Ok(()) => Ok(tail),
            // What was read before the failure has moved this partition's position: it
            // must reach the caller, or the next look would start after it.
            Err(e) if !(tail.chunks.is_empty() && tail.producers.is_empty()) => {
                tracing::debug!(message = "Reading the tail stopped early.", partition = %tp, error = %e);
                tail.partial = true;
                Ok(tail)
            }
            Err(e) => Err(e),
        }
    }

    fn first_offset(&self, tp: &TopicPartition) -> Result<Option<u64>, LogError> {
        let subject = self.names.chunk_subject(&tp.topic, tp.partition);
        let first = self.block_on(async {
            let stream = self.stream(&tp.topic).await?;
            let what = format!("read the start of {tp}");
            let first = self.patiently(&what, || {
                stream
                    .raw_message_builder()
                    .sequence(1)
                    .next_by_subject(subject.clone())
                    .send()
            });
            Ok::<_, LogError>(first.await?.and_then(|m| header::<u64>(&m.headers, H_BASE)))
        })?;
        if let (Some(first), Ok(part)) = (first, self.part(tp)) {
            let mut st = part.lock();
            st.index.retain(|base, _| *base >= first);
        }
        Ok(first)
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
            // The id was never written (ids only rise): fenced on that, so a late copy cannot
            // replace an epoch bumped since.
            self.meta_put(&self.names.producer_key(producer_id), record, Some(0))
                .await
                .map(|_| ())
        })
    }

    fn replace_producer(
        &self,
        producer_id: u64,
        previous: &[u8],
        record: &[u8],
    ) -> Result<(), LogError> {
        let record = Bytes::copy_from_slice(record);
        self.block_on(async {
            let key = self.names.producer_key(producer_id);
            let conflict = || LogError::Conflict {
                what: format!("producer {producer_id}"),
            };
            let stored = self.meta_get(&key).await?.ok_or_else(conflict)?;
            if stored.bytes.as_ref() != previous {
                return Err(conflict());
            }
            self.meta_put(&key, record, Some(stored.seq))
                .await
                .map(|_| ())
        })
    }

    fn incarnation(&self, topic: &str) -> Option<String> {
        self.topic_streams.lock().get(topic).cloned()
    }

    fn load_producer(&self, producer_id: u64) -> Result<Option<Bytes>, LogError> {
        self.block_on(async {
            Ok(self
                .meta_get(&self.names.producer_key(producer_id))
                .await?
                .map(|v| v.bytes)
                .filter(|b| !b.is_empty()))
        })
    }
}
