//! An in-memory [`Log`] and [`KvStore`] for unit tests: the same contract as sled, no files.
//!
//! It also models a power cut: writes are volatile until [`Durable::sync`], and
//! [`MemoryStore::power_cut`] returns a store holding only what was synced. This lets tests
//! prove that the broker acknowledges nothing before it is synced, which a `kill -9` test
//! cannot see (the page cache survives a process kill).

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use super::{
    codec, decode_group_offset, encode_group_offset, ChunkMeta, Durable, EncodedChunk, GroupEntry,
    GroupKeys, KvStore, Log, LogError, RecoveredPartition, SharedLog, StoredProducers,
    CHUNK_TARGET_BYTES,
};
use weir_core::{TopicConfig, TopicPartition};

/// A store that keeps everything in memory; `sync` is a no-op.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// What the last `sync` made durable.
    synced: Mutex<Inner>,
}

#[derive(Clone, Default)]
struct Inner {
    topics: BTreeMap<String, TopicConfig>,
    parts: HashMap<TopicPartition, Part>,
    producers: BTreeMap<u64, Bytes>,
    next_producer: u64,
    groups: BTreeMap<Vec<u8>, [u8; 16]>,
    kvs: HashMap<String, BTreeMap<Vec<u8>, Bytes>>,
}

#[derive(Clone, Default)]
struct Part {
    start: u64,
    chunks: BTreeMap<u64, Bytes>,
    producers: BTreeMap<u64, Bytes>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding only what was synced, as after a power cut.
    pub fn power_cut(&self) -> MemoryStore {
        let synced = self.synced.lock().clone();
        MemoryStore {
            inner: Mutex::new(synced.clone()),
            synced: Mutex::new(synced),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock())
    }
}

impl Durable for MemoryStore {
    fn sync(&self) -> Result<(), LogError> {
        weir_core::blocking::check("sync");
        let snapshot = self.with(|s| s.clone());
        *self.synced.lock() = snapshot;
        Ok(())
    }
}

impl Log for MemoryStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>, LogError> {
        weir_core::blocking::check("load_topics");
        Ok(self.with(|s| s.topics.values().cloned().collect()))
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        weir_core::blocking::check("put_topic");
        self.with(|s| s.topics.insert(config.name.clone(), config.clone()));
        Ok(())
    }

    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        weir_core::blocking::check("delete_topic");
        self.with(|s| {
            s.topics.remove(&config.name);
            s.parts.retain(|tp, _| tp.topic != config.name);
            let prefix = GroupKeys::topic_prefix(&config.name);
            s.groups.retain(|k, _| !k.starts_with(&prefix));
        });
        Ok(())
    }

    fn recover_partition(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError> {
        weir_core::blocking::check("recover_partition");
        self.with(|s| {
            let Some(part) = s.parts.get(tp) else {
                return Ok(RecoveredPartition::default());
            };
            let mut chunks = Vec::with_capacity(part.chunks.len());
            for (&base, bytes) in &part.chunks {
                let header = codec::read_header(bytes).map_err(|source| LogError::Corrupt {
                    tp: tp.clone(),
                    base_offset: base,
                    source,
                })?;
                chunks.push((
                    base,
                    ChunkMeta {
                        count: header.count,
                        bytes: bytes.len() as u32,
                        max_timestamp_ms: header.max_timestamp_ms,
                    },
                ));
            }
            Ok(RecoveredPartition {
                start_offset: part.start,
                chunks,
                producers: part
                    .producers
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect(),
            })
        })
    }

    fn append(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producers: &[(u64, &[u8])],
    ) -> Result<(), LogError> {
        weir_core::blocking::check("append");
        self.with(|s| {
            let part = s.parts.entry(tp.clone()).or_default();
            let mut base = base_offset;
            for chunk in chunks {
                part.chunks.insert(base, chunk.bytes.clone());
                base += u64::from(chunk.header.count);
            }
            for &(id, state) in producers {
                part.producers.insert(id, Bytes::copy_from_slice(state));
            }
        });
        Ok(())
    }

    fn read_chunk(&self, tp: &TopicPartition, base_offset: u64) -> Result<Option<Bytes>, LogError> {
        weir_core::blocking::check("read_chunk");
        Ok(self.with(|s| {
            s.parts
                .get(tp)
                .and_then(|p| p.chunks.get(&base_offset).cloned())
        }))
    }

    fn trim(&self, tp: &TopicPartition, bases: &[u64], new_start: u64) -> Result<(), LogError> {
        weir_core::blocking::check("trim");
        self.with(|s| {
            let part = s.parts.entry(tp.clone()).or_default();
            for base in bases {
                part.chunks.remove(base);
            }
            part.start = new_start;
        });
        Ok(())
    }

    fn remove_producers(&self, tp: &TopicPartition, ids: &[u64]) -> Result<(), LogError> {
        weir_core::blocking::check("remove_producers");
        self.with(|s| {
            if let Some(part) = s.parts.get_mut(tp) {
                for id in ids {
                    part.producers.remove(id);
                }
            }
        });
        Ok(())
    }

    fn load_producers(&self) -> Result<StoredProducers, LogError> {
        weir_core::blocking::check("load_producers");
        Ok(self.with(|s| StoredProducers {
            producers: s.producers.iter().map(|(k, v)| (*k, v.clone())).collect(),
            next_id: s
                .next_producer
                .max(s.producers.keys().max().map_or(1, |m| m + 1)),
        }))
    }

    fn put_producer(&self, producer_id: u64, record: &[u8], next_id: u64) -> Result<(), LogError> {
        weir_core::blocking::check("put_producer");
        self.with(|s| {
            s.producers
                .insert(producer_id, Bytes::copy_from_slice(record));
            s.next_producer = next_id;
        });
        Ok(())
    }

    fn delete_producers(&self, ids: &[u64]) -> Result<(), LogError> {
        weir_core::blocking::check("delete_producers");
        self.with(|s| {
            for id in ids {
                s.producers.remove(id);
            }
        });
        Ok(())
    }

    fn put_group_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
        at_ms: i64,
    ) -> Result<(), LogError> {
        weir_core::blocking::check("put_group_offsets");
        let keys = GroupKeys::new(topic, group);
        self.with(|s| {
            for (partition, offset) in offsets {
                s.groups
                    .insert(keys.key(*partition), encode_group_offset(*offset, at_ms));
            }
        });
        Ok(())
    }

    fn group_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError> {
        weir_core::blocking::check("group_offsets");
        let keys = GroupKeys::new(topic, group);
        Ok(self.with(|s| {
            s.groups
                .range(keys.prefix.clone()..)
                .map_while(|(k, v)| keys.partition(k).zip(decode_group_offset(v)))
                .map(|(p, (offset, _))| (p, offset))
                .collect()
        }))
    }

    fn list_groups(&self) -> Result<Vec<GroupEntry>, LogError> {
        weir_core::blocking::check("list_groups");
        Ok(self.with(|s| {
            let mut out: Vec<GroupEntry> = Vec::new();
            for (k, v) in &s.groups {
                let (Some((group, topic)), Some((_, at))) =
                    (GroupKeys::parse(k), decode_group_offset(v))
                else {
                    continue;
                };
                match out.last_mut() {
                    Some(last) if last.group == group && last.topic == topic => {
                        last.last_commit_ms = last.last_commit_ms.max(at)
                    }
                    _ => out.push(GroupEntry {
                        group,
                        topic,
                        last_commit_ms: at,
                    }),
                }
            }
            out
        }))
    }

    fn delete_group(&self, group: &str, topic: &str) -> Result<(), LogError> {
        weir_core::blocking::check("delete_group");
        let keys = GroupKeys::new(topic, group);
        self.with(|s| s.groups.retain(|k, _| !k.starts_with(&keys.prefix)));
        Ok(())
    }

    /// One writer: this process.
    fn shared(&self) -> Option<&dyn SharedLog> {
        None
    }

    fn chunk_target_bytes(&self) -> usize {
        CHUNK_TARGET_BYTES
    }

    /// No limit but memory, as sled has none but the disk.
    fn check_append(&self, _chunks: &[EncodedChunk], _producers: usize) -> Result<(), LogError> {
        Ok(())
    }
}

impl KvStore for MemoryStore {
    fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        weir_core::blocking::check("kv_get");
        Ok(self.with(|s| s.kvs.get(namespace).and_then(|kv| kv.get(key).cloned())))
    }

    fn kv_scan_first(
        &self,
        namespace: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        weir_core::blocking::check("kv_scan");
        Ok(self.with(|s| {
            s.kvs.get(namespace).map_or_else(Vec::new, |kv| {
                kv.range(prefix.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .take(limit)
                    .map(|(k, v)| (Bytes::copy_from_slice(k), v.clone()))
                    .collect()
            })
        }))
    }

    fn kv_apply(
        &self,
        namespace: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError> {
        weir_core::blocking::check("kv_apply");
        self.with(|s| {
            let kv = s.kvs.entry(namespace.to_string()).or_default();
            for (key, value) in writes {
                match value {
                    Some(v) => kv.insert(key.clone(), Bytes::copy_from_slice(v)),
                    None => kv.remove(key),
                };
            }
        });
        Ok(())
    }

    fn kv_drop(&self, namespace: &str) -> Result<(), LogError> {
        weir_core::blocking::check("kv_drop");
        self.with(|s| s.kvs.remove(namespace));
        Ok(())
    }
}
