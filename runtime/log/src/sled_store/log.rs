//! The partitioned log on sled: a tree per partition (chunks, producer states, log start),
//! topic and producer records in `meta`, group offsets in `groups`.

use bytes::Bytes;
use weir_core::{TopicConfig, TopicPartition};

use super::{
    be_u64, chunk_key, producer_key, SledStore, PRODUCER_NEXT, PRODUCER_PREFIX, TOPIC_PREFIX,
};
use crate::{
    codec, decode_group_offset, encode_group_offset, ChunkMeta, EncodedChunk, GroupEntry,
    GroupKeys, Log, LogError, RecoveredPartition, StoredProducers, FRAGMENT_MAX_BYTES,
};

impl Log for SledStore {
    fn load_topics(&self) -> Result<Vec<TopicConfig>, LogError> {
        weir_core::blocking::check("load_topics");
        let mut topics = Vec::new();
        for item in self.meta.scan_prefix(TOPIC_PREFIX) {
            let (key, value) = item?;
            let config: TopicConfig =
                serde_json::from_slice(&value).map_err(|e| LogError::Malformed {
                    what: format!("topic metadata {}", String::from_utf8_lossy(&key)),
                    reason: e.to_string(),
                })?;
            topics.push(config);
        }
        Ok(topics)
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        weir_core::blocking::check("put_topic");
        // What a deleted topic of this name left (a crash half-way through the delete, a
        // publish in flight during it) is dropped, never read back into the new topic.
        let prefix = format!("part/{}/", config.name);
        for name in self.db.tree_names() {
            if name.starts_with(prefix.as_bytes()) {
                self.db.drop_tree(&name)?;
            }
        }
        self.parts.write().retain(|tp, _| tp.topic != config.name);
        self.delete_group_offsets(&config.name)?;
        let json = serde_json::to_vec(config).expect("topic config serialises");
        self.meta
            .insert(format!("{TOPIC_PREFIX}{}", config.name), json)?;
        Ok(())
    }

    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        weir_core::blocking::check("delete_topic");
        // Metadata first: a crash half-way leaves orphan trees (harmless: `put_topic` drops
        // them on re-create) rather than a topic whose partitions are gone.
        self.meta.remove(format!("{TOPIC_PREFIX}{}", config.name))?;
        for partition in 0..config.partitions {
            let tp = TopicPartition::new(config.name.clone(), partition);
            self.parts.write().remove(&tp);
            self.db.drop_tree(Self::tree_name(&tp))?;
        }
        self.delete_group_offsets(&config.name)
    }

    fn recover_partition(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError> {
        weir_core::blocking::check("recover_partition");
        let tree = self.part(tp)?;
        let mut out = RecoveredPartition {
            start_offset: tree.get(b"s")?.and_then(|v| be_u64(&v)).unwrap_or(0),
            ..RecoveredPartition::default()
        };
        for item in tree.scan_prefix(b"c") {
            let (key, value) = item?;
            let base = be_u64(&key[1..9]).ok_or_else(|| LogError::Malformed {
                what: format!("chunk key in {tp}"),
                reason: format!("{} bytes, expected 11", key.len()),
            })?;
            if key[9..11] == [0, 0] {
                let header = codec::read_header(&value).map_err(|source| LogError::Corrupt {
                    tp: tp.clone(),
                    base_offset: base,
                    source,
                })?;
                out.chunks.push((
                    base,
                    ChunkMeta {
                        count: header.count,
                        bytes: value.len() as u32,
                        max_timestamp_ms: header.max_timestamp_ms,
                    },
                ));
            } else if let Some((last_base, meta)) = out.chunks.last_mut() {
                if *last_base == base {
                    meta.bytes += value.len() as u32;
                }
            }
        }
        for item in tree.scan_prefix(b"p") {
            let (key, value) = item?;
            if let Some(id) = be_u64(&key[1..]) {
                out.producers.push((id, Bytes::copy_from_slice(&value)));
            }
        }
        Ok(out)
    }

    fn append(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producers: &[(u64, &[u8])],
    ) -> Result<(), LogError> {
        weir_core::blocking::check("append");
        let tree = self.part(tp)?;
        let mut batch = sled::Batch::default();
        let mut base = base_offset;
        for chunk in chunks {
            for (i, fragment) in chunk.bytes.chunks(FRAGMENT_MAX_BYTES).enumerate() {
                batch.insert(&chunk_key(base, i as u16), fragment);
            }
            base += u64::from(chunk.header.count);
        }
        for &(id, state) in producers {
            batch.insert(&producer_key(id), state);
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    fn read_chunk(&self, tp: &TopicPartition, base_offset: u64) -> Result<Option<Bytes>, LogError> {
        weir_core::blocking::check("read_chunk");
        let tree = self.part(tp)?;
        let Some(first) = tree.get(chunk_key(base_offset, 0))? else {
            return Ok(None);
        };
        if first.len() < FRAGMENT_MAX_BYTES {
            // The common case: one fragment, handed out without copying.
            return Ok(Some(Bytes::from_owner(first)));
        }
        let mut whole = first.to_vec();
        for item in tree.range(chunk_key(base_offset, 1)..=chunk_key(base_offset, u16::MAX)) {
            whole.extend_from_slice(&item?.1);
        }
        Ok(Some(Bytes::from(whole)))
    }

    fn trim(&self, tp: &TopicPartition, bases: &[u64], new_start: u64) -> Result<(), LogError> {
        weir_core::blocking::check("trim");
        let tree = self.part(tp)?;
        let mut batch = sled::Batch::default();
        for &base in bases {
            for item in tree.range(chunk_key(base, 0)..=chunk_key(base, u16::MAX)) {
                batch.remove(item?.0);
            }
        }
        batch.insert(b"s", &new_start.to_be_bytes());
        tree.apply_batch(batch)?;
        Ok(())
    }

    fn remove_producers(&self, tp: &TopicPartition, ids: &[u64]) -> Result<(), LogError> {
        weir_core::blocking::check("remove_producers");
        let tree = self.part(tp)?;
        let mut batch = sled::Batch::default();
        for &id in ids {
            batch.remove(&producer_key(id));
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    fn load_producers(&self) -> Result<StoredProducers, LogError> {
        weir_core::blocking::check("load_producers");
        let mut out = StoredProducers::default();
        for item in self.meta.scan_prefix(PRODUCER_PREFIX) {
            let (key, value) = item?;
            if let Some(id) = be_u64(&key[PRODUCER_PREFIX.len()..]) {
                out.producers.push((id, Bytes::copy_from_slice(&value)));
            }
        }
        let largest = out.producers.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let stored_next = self
            .meta
            .get(PRODUCER_NEXT)?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0);
        out.next_id = stored_next.max(largest + 1);
        Ok(out)
    }

    fn put_producer(&self, producer_id: u64, record: &[u8], next_id: u64) -> Result<(), LogError> {
        weir_core::blocking::check("put_producer");
        let mut key = PRODUCER_PREFIX.to_vec();
        key.extend_from_slice(&producer_id.to_be_bytes());
        let mut batch = sled::Batch::default();
        batch.insert(key, record);
        batch.insert(PRODUCER_NEXT, &next_id.to_be_bytes());
        self.meta.apply_batch(batch)?;
        Ok(())
    }

    fn delete_producers(&self, ids: &[u64]) -> Result<(), LogError> {
        weir_core::blocking::check("delete_producers");
        let mut batch = sled::Batch::default();
        for id in ids {
            let mut key = PRODUCER_PREFIX.to_vec();
            key.extend_from_slice(&id.to_be_bytes());
            batch.remove(key);
        }
        self.meta.apply_batch(batch)?;
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
        let mut batch = sled::Batch::default();
        for (partition, offset) in offsets {
            batch.insert(keys.key(*partition), &encode_group_offset(*offset, at_ms));
        }
        self.groups.apply_batch(batch)?;
        Ok(())
    }

    fn group_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError> {
        weir_core::blocking::check("group_offsets");
        let keys = GroupKeys::new(topic, group);
        let mut out = Vec::new();
        for item in self.groups.scan_prefix(&keys.prefix) {
            let (key, value) = item?;
            if let (Some(partition), Some((offset, _))) =
                (keys.partition(&key), decode_group_offset(&value))
            {
                out.push((partition, offset));
            }
        }
        Ok(out)
    }

    fn list_groups(&self) -> Result<Vec<GroupEntry>, LogError> {
        weir_core::blocking::check("list_groups");
        let mut out: Vec<GroupEntry> = Vec::new();
        for item in self.groups.iter() {
            let (key, value) = item?;
            let (Some((group, topic)), Some((_, at))) =
                (GroupKeys::parse(&key), decode_group_offset(&value))
            else {
                continue;
            };
            match out.last_mut() {
                Some(last) if last.group == group && last.topic == topic => {
                    last.last_commit_ms = last.last_commit_ms.max(at);
                }
                _ => out.push(GroupEntry {
                    group,
                    topic,
                    last_commit_ms: at,
                }),
            }
        }
        Ok(out)
    }

    fn delete_group(&self, group: &str, topic: &str) -> Result<(), LogError> {
        weir_core::blocking::check("delete_group");
        let keys = GroupKeys::new(topic, group);
        let mut batch = sled::Batch::default();
        for item in self.groups.scan_prefix(&keys.prefix) {
            batch.remove(item?.0);
        }
        self.groups.apply_batch(batch)?;
        Ok(())
    }
}
