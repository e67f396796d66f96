//! [`SplitStore`]: the log on one backend, the key-value namespaces on another — the
//! broker's log on a replicated engine while the plugin store stays in the node's sled.

use std::sync::Arc;

use bytes::Bytes;
use weir_core::{TopicConfig, TopicPartition};

use crate::{
    Durable, EncodedChunk, GroupEntry, KvStore, Log, LogError, RecoveredPartition, StoredProducers,
};

/// A [`Log`] and a [`KvStore`] on different backends behind one [`crate::Store`]. `sync`
/// syncs both (a replicated log's own sync is a no-op: its writes are durable when
/// acknowledged).
pub struct SplitStore {
    log: Arc<dyn Log>,
    kv: Arc<dyn KvStore>,
}

impl SplitStore {
    /// The log on `log`, the namespaces on `kv`.
    pub fn new(log: Arc<dyn Log>, kv: Arc<dyn KvStore>) -> Self {
        SplitStore { log, kv }
    }
}

impl Durable for SplitStore {
    fn sync(&self) -> Result<(), LogError> {
        self.log.sync()?;
        self.kv.sync()
    }
}

impl Log for SplitStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>, LogError> {
        self.log.load_topics()
    }
    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.log.put_topic(config)
    }
    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.log.delete_topic(config)
    }
    fn recover_partition(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError> {
        self.log.recover_partition(tp)
    }
    fn append(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producers: &[(u64, &[u8])],
    ) -> Result<(), LogError> {
        self.log.append(tp, base_offset, chunks, producers)
    }
    fn read_chunk(&self, tp: &TopicPartition, base_offset: u64) -> Result<Option<Bytes>, LogError> {
        self.log.read_chunk(tp, base_offset)
    }
    fn trim(&self, tp: &TopicPartition, bases: &[u64], new_start: u64) -> Result<(), LogError> {
        self.log.trim(tp, bases, new_start)
    }
    fn remove_producers(&self, tp: &TopicPartition, ids: &[u64]) -> Result<(), LogError> {
        self.log.remove_producers(tp, ids)
    }
    fn load_producers(&self) -> Result<StoredProducers, LogError> {
        self.log.load_producers()
    }
    fn put_producer(&self, producer_id: u64, record: &[u8], next_id: u64) -> Result<(), LogError> {
        self.log.put_producer(producer_id, record, next_id)
    }
    fn issue_producer(
        &self,
        producer_id: u64,
        record: &[u8],
        next_id: u64,
    ) -> Result<(), LogError> {
        self.log.issue_producer(producer_id, record, next_id)
    }
    fn replace_producer(
        &self,
        producer_id: u64,
        previous: &[u8],
        record: &[u8],
        next_id: u64,
    ) -> Result<(), LogError> {
        self.log
            .replace_producer(producer_id, previous, record, next_id)
    }
    fn delete_producers(&self, ids: &[u64]) -> Result<(), LogError> {
        self.log.delete_producers(ids)
    }
    fn put_group_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
        at_ms: i64,
    ) -> Result<(), LogError> {
        self.log.put_group_offsets(group, topic, offsets, at_ms)
    }
    fn group_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError> {
        self.log.group_offsets(group, topic)
    }
    fn list_groups(&self) -> Result<Vec<GroupEntry>, LogError> {
        self.log.list_groups()
    }
    fn delete_group(&self, group: &str, topic: &str) -> Result<(), LogError> {
        self.log.delete_group(group, topic)
    }
    fn shared(&self) -> Option<&dyn crate::SharedLog> {
        self.log.shared()
    }
    fn chunk_target_bytes(&self) -> usize {
        self.log.chunk_target_bytes()
    }
    fn check_append(&self, chunks: &[EncodedChunk], producers: usize) -> Result<(), LogError> {
        self.log.check_append(chunks, producers)
    }
}

impl KvStore for SplitStore {
    fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        self.kv.kv_get(namespace, key)
    }
    fn kv_scan_first(
        &self,
        namespace: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        self.kv.kv_scan_first(namespace, prefix, limit)
    }
    fn kv_apply(
        &self,
        namespace: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError> {
        self.kv.kv_apply(namespace, writes)
    }
    fn kv_drop(&self, namespace: &str) -> Result<(), LogError> {
        self.kv.kv_drop(namespace)
    }
}
