//! The partitioned log: records in segment files (`segments.rs`), a tree per partition in
//! sled (chunk index, producer states, log start), topic and producer records in `meta`,
//! group offsets in `groups`.

use bytes::Bytes;
use std::collections::BTreeMap;
use weir_core::{TopicConfig, TopicPartition};

use super::pending::PendingAppend;
use super::segment::Loc;
use super::{
    be_u64, chunk_key, index_key, producer_key, SledStore, PRODUCER_NEXT, PRODUCER_PREFIX,
    TOPIC_PREFIX,
};
use crate::{
    codec, decode_group_offset, encode_group_offset, ChunkMeta, EncodedChunk, GroupEntry,
    GroupKeys, Log, LogError, RecoveredPartition, SharedLog, StoredProducers, CHUNK_TARGET_BYTES,
    FRAGMENT_MAX_BYTES,
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
            self.segments.configure(&config);
            topics.push(config);
        }
        Ok(topics)
    }

    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        weir_core::blocking::check("put_topic");
        let _sync = self.sync_lock.lock();
        // What a deleted topic of this name left (a crash half-way through the delete, a
        // publish in flight during it) is dropped, never read back into the new topic.
        self.pending.forget_topic(&config.name);
        self.segments.drop_topic(&config.name)?;
        self.segments.configure(config);
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
        let _sync = self.sync_lock.lock();
        self.pending.forget_topic(&config.name);
        // Metadata first: a crash half-way leaves orphan trees (harmless: `put_topic` drops
        // them on re-create) rather than a topic whose partitions are gone.
        self.meta.remove(format!("{TOPIC_PREFIX}{}", config.name))?;
        for partition in 0..config.partitions {
            let tp = TopicPartition::new(config.name.clone(), partition);
            self.parts.write().remove(&tp);
            self.db.drop_tree(Self::tree_name(&tp))?;
        }
        self.delete_group_offsets(&config.name)?;
        self.segments.drop_topic(&config.name)
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
        self.recover_indexed(tp, &tree, &mut out)?;
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
        let chunks = self.segments.append(tp, base_offset, chunks)?;
        let append = PendingAppend {
            tp: tp.clone(),
            chunks,
            producers: producers
                .iter()
                .map(|&(id, state)| (id, Bytes::copy_from_slice(state)))
                .collect(),
        };
        if self.index_after_sync {
            self.pending.push(append);
            Ok(())
        } else {
            self.write_index(std::slice::from_ref(&append))
        }
    }

    fn read_chunk(&self, tp: &TopicPartition, base_offset: u64) -> Result<Option<Bytes>, LogError> {
        weir_core::blocking::check("read_chunk");
        let generation = self.segments.generation(&tp.topic);
        let tree = self.part(tp)?;
        // sled's index first (every acknowledged chunk is there under `always`), then the
        // pending entries, then sled again: a sync moves an entry into sled before it leaves
        // the pending ones, so one of the three looks finds it.
        let indexed = || -> Result<Option<Loc>, LogError> {
            match tree.get(index_key(base_offset))? {
                Some(value) => Ok(Some(decode_loc(tp, base_offset, &value)?)),
                None => Ok(None),
            }
        };
        let loc = match indexed()? {
            Some(loc) => Some(loc),
            None => match self.pending.loc(tp, base_offset) {
                Some(loc) => Some(loc),
                None => indexed()?,
            },
        };
        if let Some(loc) = loc {
            return self.segments.read(tp, &loc, generation);
        }
        // A chunk stored by weir-log/1 or /2, inside sled.
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
        let _sync = self.sync_lock.lock();
        self.pending.forget_chunks(tp, bases);
        let tree = self.part(tp)?;
        let mut batch = sled::Batch::default();
        for &base in bases {
            batch.remove(&index_key(base));
            for item in tree.range(chunk_key(base, 0)..=chunk_key(base, u16::MAX)) {
                batch.remove(item?.0);
            }
        }
        batch.insert(b"s", &new_start.to_be_bytes());
        tree.apply_batch(batch)?;
        // When a segment goes, the trim is durable first: a crash never leaves index entries
        // of a deleted segment above the partition's start. A whole sync (pending entries
        // included), so nothing in sled becomes durable ahead of the records it points past.
        // A trim that deletes no segment waits for the next sync like any write.
        let freed = self
            .segments
            .delete_below(tp, new_start, || self.sync_locked())?;
        if freed > 0 {
            tracing::debug!(message = "Retention deleted segments.", partition = %tp, bytes = freed);
        }
        Ok(())
    }

    fn remove_producers(&self, tp: &TopicPartition, ids: &[u64]) -> Result<(), LogError> {
        weir_core::blocking::check("remove_producers");
        let _sync = self.sync_lock.lock();
        self.pending.forget_producers(tp, ids);
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

    /// One writer: this process.
    fn shared(&self) -> Option<&dyn SharedLog> {
        None
    }

    fn chunk_target_bytes(&self) -> usize {
        CHUNK_TARGET_BYTES
    }

    /// No limit but the disk: sled takes values of any size.
    fn check_append(&self, _chunks: &[EncodedChunk], _producers: usize) -> Result<(), LogError> {
        Ok(())
    }
}

fn decode_loc(tp: &TopicPartition, base: u64, value: &[u8]) -> Result<Loc, LogError> {
    Loc::decode(value).ok_or_else(|| LogError::Malformed {
        what: format!("index entry of {tp} at offset {base}"),
        reason: format!("{} bytes, expected {}", value.len(), Loc::ENCODED_LEN),
    })
}

impl SledStore {
    /// Writes appends' index entries and producer states into sled, in order, one batch per
    /// partition (a later state of a producer replaces an earlier one in the batch).
    pub(super) fn write_index(&self, appends: &[PendingAppend]) -> Result<(), LogError> {
        let mut batches: Vec<(&TopicPartition, sled::Batch)> = Vec::new();
        for append in appends {
            let i = match batches.iter().position(|(tp, _)| *tp == &append.tp) {
                Some(i) => i,
                None => {
                    batches.push((&append.tp, sled::Batch::default()));
                    batches.len() - 1
                }
            };
            let batch = &mut batches[i].1;
            for (base, loc) in &append.chunks {
                batch.insert(&index_key(*base), &loc.encode());
            }
            for (id, state) in &append.producers {
                batch.insert(&producer_key(*id), state.as_ref());
            }
        }
        for (tp, batch) in batches {
            self.part(tp)?.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Reads a partition's chunks in segment files into `out` and makes the files agree with
    /// the index: an entry whose bytes are not all in its segment (possible only under
    /// `--fsync interval` or `never` after a power cut, or a damaged directory) ends it there —
    /// it and every later entry are dropped, with a warning; unindexed bytes at a segment's
    /// end (written, never committed) are cut off.
    fn recover_indexed(
        &self,
        tp: &TopicPartition,
        tree: &sled::Tree,
        out: &mut RecoveredPartition,
    ) -> Result<(), LogError> {
        let mut ends: BTreeMap<u64, u64> = BTreeMap::new();
        let mut dropped: Vec<sled::IVec> = Vec::new();
        let mut broken = false;
        for item in tree.scan_prefix(b"i") {
            let (key, value) = item?;
            if broken {
                dropped.push(key);
                continue;
            }
            let base = be_u64(&key[1..]).ok_or_else(|| LogError::Malformed {
                what: format!("index key in {tp}"),
                reason: format!("{} bytes, expected 9", key.len()),
            })?;
            let loc = decode_loc(tp, base, &value)?;
            match self.segments.length_of(tp, loc.segment)? {
                Some(len) if loc.end() <= len => {
                    out.chunks.push((
                        base,
                        ChunkMeta {
                            count: loc.count,
                            bytes: loc.len,
                            max_timestamp_ms: loc.max_timestamp_ms,
                        },
                    ));
                    let end = ends.entry(loc.segment).or_default();
                    *end = (*end).max(loc.end());
                    self.segments
                        .set_next_offset(tp, loc.segment, base + u64::from(loc.count));
                }
                None if out.chunks.is_empty() => {
                    // Retention deleted the segment; its trim was durable first, so this is
                    // an entry a crash kept from being removed with it.
                    out.start_offset = out.start_offset.max(base + u64::from(loc.count));
                    dropped.push(key);
                }
                found => {
                    tracing::warn!(message = "A chunk's bytes are missing from its segment: the partition ends before it (only `--fsync interval` or `never` after a power cut loses them).", partition = %tp, offset = base, segment = loc.segment, needed = loc.end(), segment_bytes = ?found);
                    broken = true;
                    dropped.push(key);
                }
            }
        }
        if self.pending.holds(tp) {
            // A partition already being written (not a restart): nothing to reconcile.
            return Ok(());
        }
        if !dropped.is_empty() {
            let mut batch = sled::Batch::default();
            for key in dropped {
                batch.remove(key);
            }
            // A start moved past entries whose segment is gone is stored with their removal.
            batch.insert(b"s", &out.start_offset.to_be_bytes());
            tree.apply_batch(batch)?;
            self.sync_sled()?;
        }
        self.segments.reconcile(tp, &ends)
    }
}
