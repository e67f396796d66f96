//! A [`Store`] wrapper that fails on command, for fault-injection tests: a disk that
//! returns I/O errors for a while (`EIO`), a sync that fails, a store call that panics.
//! Production code never builds one.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::{
    Durable, EncodedChunk, GroupEntry, KvStore, Log, LogError, RecoveredPartition, SharedLog,
    Store, StoredProducers,
};
use weir_core::{TopicConfig, TopicPartition};

/// Switches shared between a test and its [`FaultyStore`].
#[derive(Debug, Default)]
pub struct Faults {
    /// Every write fails with EIO.
    pub writes: AtomicBool,
    /// Every read fails with EIO.
    pub reads: AtomicBool,
    /// `sync` fails with EIO.
    pub sync: AtomicBool,
    /// Key-value reads and writes (plugins' state, commits, outboxes) fail with EIO; the log
    /// itself keeps working.
    pub kv: AtomicBool,
    /// The next this-many `kv_apply` calls panic (a bug in the store).
    pub panics: AtomicU32,
    /// Calls that failed so far.
    pub failed: std::sync::atomic::AtomicU64,
}

impl Faults {
    /// Turns write and read failures on or off together (a disk outage).
    pub fn outage(&self, on: bool) {
        self.writes.store(on, Ordering::SeqCst);
        self.reads.store(on, Ordering::SeqCst);
    }
}

/// A store that fails when its [`Faults`] say so, and otherwise is `inner`.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    faults: Arc<Faults>,
}

impl FaultyStore {
    /// Wraps `inner`; the returned switches control it.
    pub fn wrap(inner: Arc<dyn Store>) -> (Arc<FaultyStore>, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            Arc::new(FaultyStore {
                inner,
                faults: faults.clone(),
            }),
            faults,
        )
    }

    fn check(&self, switch: &AtomicBool) -> Result<(), LogError> {
        if switch.load(Ordering::SeqCst) {
            self.faults.failed.fetch_add(1, Ordering::Relaxed);
            return Err(LogError::Io {
                path: "injected".into(),
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        Ok(())
    }

    fn write(&self) -> Result<(), LogError> {
        self.check(&self.faults.writes)
    }

    fn read(&self) -> Result<(), LogError> {
        self.check(&self.faults.reads)
    }
}

impl Durable for FaultyStore {
    fn sync(&self) -> Result<(), LogError> {
        self.check(&self.faults.sync)?;
        self.inner.sync()
    }
}

impl Log for FaultyStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>, LogError> {
        self.read()?;
        self.inner.load_topics()
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.write()?;
        self.inner.put_topic(config)
    }

    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.write()?;
        self.inner.delete_topic(config)
    }

    fn recover_partition(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError> {
        self.read()?;
        self.inner.recover_partition(tp)
    }

    fn append(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producers: &[(u64, &[u8])],
    ) -> Result<(), LogError> {
        self.write()?;
        self.inner.append(tp, base_offset, chunks, producers)
    }

    fn read_chunk(&self, tp: &TopicPartition, base_offset: u64) -> Result<Option<Bytes>, LogError> {
        self.read()?;
        self.inner.read_chunk(tp, base_offset)
    }

    fn trim(&self, tp: &TopicPartition, bases: &[u64], new_start: u64) -> Result<(), LogError> {
        self.write()?;
        self.inner.trim(tp, bases, new_start)
    }

    fn remove_producers(&self, tp: &TopicPartition, ids: &[u64]) -> Result<(), LogError> {
        self.write()?;
        self.inner.remove_producers(tp, ids)
    }

    fn load_producers(&self) -> Result<StoredProducers, LogError> {
        self.read()?;
        self.inner.load_producers()
    }

    fn put_producer(&self, producer_id: u64, record: &[u8], next_id: u64) -> Result<(), LogError> {
        self.write()?;
        self.inner.put_producer(producer_id, record, next_id)
    }

    fn delete_producers(&self, ids: &[u64]) -> Result<(), LogError> {
        self.write()?;
        self.inner.delete_producers(ids)
    }

    fn put_group_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
        at_ms: i64,
    ) -> Result<(), LogError> {
        self.write()?;
        self.inner.put_group_offsets(group, topic, offsets, at_ms)
    }

    fn group_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError> {
        self.read()?;
        self.inner.group_offsets(group, topic)
    }

    fn list_groups(&self) -> Result<Vec<GroupEntry>, LogError> {
        self.read()?;
        self.inner.list_groups()
    }

    fn delete_group(&self, group: &str, topic: &str) -> Result<(), LogError> {
        self.write()?;
        self.inner.delete_group(group, topic)
    }

    /// The inner log's: a shared log wrapped in faults stays shared (its writes
    /// compare-and-set, its tail is followed).
    fn shared(&self) -> Option<&dyn SharedLog> {
        self.inner.shared()
    }

    fn chunk_target_bytes(&self) -> usize {
        self.inner.chunk_target_bytes()
    }

    fn check_append(&self, chunks: &[EncodedChunk], producers: usize) -> Result<(), LogError> {
        self.inner.check_append(chunks, producers)
    }
}

impl KvStore for FaultyStore {
    fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        self.read()?;
        self.check(&self.faults.kv)?;
        self.inner.kv_get(namespace, key)
    }

    fn kv_scan_first(
        &self,
        namespace: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        self.read()?;
        self.check(&self.faults.kv)?;
        self.inner.kv_scan_first(namespace, prefix, limit)
    }

    fn kv_apply(
        &self,
        namespace: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError> {
        let panics = &self.faults.panics;
        if panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("injected store panic in kv_apply");
        }
        self.write()?;
        self.check(&self.faults.kv)?;
        self.inner.kv_apply(namespace, writes)
    }

    fn kv_drop(&self, namespace: &str) -> Result<(), LogError> {
        self.write()?;
        self.inner.kv_drop(namespace)
    }
}
