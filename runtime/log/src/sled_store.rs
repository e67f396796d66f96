//! The embedded store on sled 0.34.7.
//!
//! Layout: tree `meta` (format marker, `topic/<name>` → JSON config, `producer/<id>` → epoch),
//! tree `groups` (topic \0 group \0 partition → next offset), and one tree per partition
//! `part/<topic>/<partition>` holding, so that one `apply_batch` covers an append atomically:
//! - `c` + base offset (u64 BE) + fragment (u16 BE) → chunk bytes
//! - `p` + producer id (u64 BE) → that producer's sequence state
//! - `s` → first offset still stored (written by retention)
//!
//! Durability: `Db::flush` only calls `sync_file_range`; [`LogStore::sync`] follows it with
//! `fdatasync` of `<dir>/db`, the one file sled writes records to. The directory and `conf`
//! are synced once at open, because sled never does.
//!
//! sled writes any *page* (a whole B-tree leaf, not a single value) larger than a quarter of
//! its segment size to a separate blob file that it never fsyncs. A leaf splits only past 16
//! entries, so with 32 KiB chunks a leaf reaches ~560 KiB: with sled's default 512 KiB
//! segments (128 KiB threshold) most consolidated leaves became blob files — unsynced, and
//! one file create + delete per page write. [`SEGMENT_BYTES`] puts the threshold at 2 MiB,
//! above any leaf weir can build, so `<dir>/db` holds everything and one fdatasync covers it.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{
    codec, decode_group_offset, encode_group_offset, ChunkMeta, Durable, EncodedChunk, GroupEntry,
    GroupKeys, KvStore, Log, LogError, RecoveredPartition, StoredProducers, FRAGMENT_MAX_BYTES,
};
use weir_core::{TopicConfig, TopicPartition};

const FORMAT_KEY: &[u8] = b"format";
/// The layout version this weir writes. Version 1 (weir before producer ownership and expiry)
/// is migrated at open; a later version is refused: this weir would misread it.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_PREFIX: &str = "weir-log/";

/// What a data directory's format marker says.
fn format_version(marker: &[u8]) -> Option<u32> {
    std::str::from_utf8(marker)
        .ok()?
        .strip_prefix(FORMAT_PREFIX)?
        .parse()
        .ok()
}
const TOPIC_PREFIX: &str = "topic/";
const PRODUCER_PREFIX: &[u8] = b"producer/";
/// The next producer id to issue (ids stay unique after expired producers are deleted).
const PRODUCER_NEXT: &[u8] = b"producer-next";
/// sled segment size: blob threshold = a quarter of it = 2 MiB (see the module docs).
pub const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

/// Options for opening a [`SledStore`].
#[derive(Clone, Debug)]
pub struct SledOptions {
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
    /// sled's own background flush interval; `None` when weir drives every flush itself.
    pub background_flush_ms: Option<u64>,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: 512 * 1024 * 1024,
            background_flush_ms: None,
        }
    }
}

/// A [`LogStore`] on an embedded sled database.
pub struct SledStore {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    groups: sled::Tree,
    /// Open handle on `<dir>/db` for `fdatasync` (fsync acts on the inode; any fd will do).
    data_file: File,
    /// Partition trees, opened once: `Db::open_tree` takes a lock and allocates a name.
    parts: RwLock<HashMap<TopicPartition, sled::Tree>>,
    /// Key-value namespace trees (`kv/<namespace>`), opened once.
    kvs: RwLock<HashMap<String, sled::Tree>>,
}

impl SledStore {
    /// Opens (or creates) a store in `dir`.
    ///
    /// # Errors
    /// [`LogError::ForeignDirectory`] when `dir` holds files that are not a weir store,
    /// [`LogError::Open`] when sled cannot open it (locked by another process, corrupt).
    pub fn open(dir: &Path, options: &SledOptions) -> Result<Self, LogError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LogError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let existing: Vec<String> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let fresh = existing.is_empty();
        if !fresh && !existing.iter().any(|n| n == "db") {
            return Err(LogError::ForeignDirectory {
                path: dir.to_path_buf(),
                reason: format!(
                    "it holds {} without a sled `db` file; point --data-dir at an empty or weir directory",
                    existing.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(options.background_flush_ms)
            .segment_size(SEGMENT_BYTES)
            .mode(sled::Mode::HighThroughput);
        // sled 0.34 can panic on some corrupt files instead of returning an error.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) if e.to_string().contains("io buffer size") => {
                return Err(LogError::ForeignDirectory {
                    path: dir.to_path_buf(),
                    reason: format!("a sled database with another segment size than weir's {SEGMENT_BYTES} bytes ({e})"),
                });
            }
            Ok(Err(e)) => {
                let reason = e.to_string();
                let reason = if reason.contains("lock")
                    || reason.contains("WouldBlock")
                    || reason.contains("temporarily unavailable")
                {
                    format!("{reason} (is another `weir serve` using this directory?)")
                } else {
                    reason
                };
                return Err(LogError::Open {
                    path: dir.to_path_buf(),
                    reason,
                });
            }
            Err(_) => {
                return Err(LogError::Open {
                    path: dir.to_path_buf(),
                    reason: "sled panicked reading the files: the store is corrupt".into(),
                })
            }
        };
        let meta = db.open_tree("meta")?;
        let current = format!("{FORMAT_PREFIX}{FORMAT_VERSION}");
        match meta.get(FORMAT_KEY)? {
            Some(v) => match format_version(&v) {
                Some(FORMAT_VERSION) => {}
                Some(1) => {
                    // Version 1 values all read as they are: producer records without an
                    // owner (usable by anyone), cursors without counters (0), group offsets
                    // without a commit time (counted from now) and producer states without
                    // an append time. The marker moves on so that an older weir, which would
                    // misread version 2 values, refuses the directory.
                    meta.insert(FORMAT_KEY, current.as_bytes())?;
                    tracing::info!(message = "Store migrated.", from = "weir-log/1", to = %current, dir = %dir.display());
                }
                Some(newer) if newer > FORMAT_VERSION => {
                    return Err(LogError::ForeignDirectory {
                        path: dir.to_path_buf(),
                        reason: format!(
                            "it was written by a newer weir (format weir-log/{newer}; this weir \
                             reads weir-log/1 to {current}): run that weir, or a newer one"
                        ),
                    })
                }
                _ => {
                    return Err(LogError::ForeignDirectory {
                        path: dir.to_path_buf(),
                        reason: format!(
                            "format marker {:?}, this weir reads weir-log/1 to {current}",
                            String::from_utf8_lossy(&v),
                        ),
                    })
                }
            },
            None if db.tree_names().len() > 2 || !db.is_empty() => {
                return Err(LogError::ForeignDirectory {
                    path: dir.to_path_buf(),
                    reason: "a sled database without weir's format marker".into(),
                })
            }
            None => {
                meta.insert(FORMAT_KEY, current.as_bytes())?;
            }
        }
        let groups = db.open_tree("groups")?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(io(&data_path))?;
        let store = SledStore {
            dir: dir.to_path_buf(),
            db,
            meta,
            groups,
            data_file,
            parts: RwLock::new(HashMap::new()),
            kvs: RwLock::new(HashMap::new()),
        };
        store.sync()?;
        // sled never syncs its `conf` nor the directory entries: a new store could vanish on
        // power loss even after a synced write.
        for path in [dir.join("conf"), dir.to_path_buf()] {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
        Ok(store)
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn tree_name(tp: &TopicPartition) -> String {
        format!("part/{}/{}", tp.topic, tp.partition)
    }

    fn kv(&self, namespace: &str) -> Result<sled::Tree, LogError> {
        if let Some(tree) = self.kvs.read().get(namespace) {
            return Ok(tree.clone());
        }
        let tree = self.db.open_tree(format!("kv/{namespace}"))?;
        self.kvs.write().insert(namespace.to_string(), tree.clone());
        Ok(tree)
    }

    fn part(&self, tp: &TopicPartition) -> Result<sled::Tree, LogError> {
        if let Some(tree) = self.parts.read().get(tp) {
            return Ok(tree.clone());
        }
        let tree = self.db.open_tree(Self::tree_name(tp))?;
        self.parts.write().insert(tp.clone(), tree.clone());
        Ok(tree)
    }
}

/// Key-value values carry a tag byte: inline, or split into fragments of at most
/// [`FRAGMENT_MAX_BYTES`] stored in the same tree (so a write stays one atomic batch) under
/// `0xFF | key length u32 BE | key | fragment u32 BE`. No stored value — hence no sled page —
/// grows past the blob threshold, whatever a plugin's outputs or state weigh.
const KV_INLINE: u8 = 0;
const KV_FRAGMENTED: u8 = 1;
const KV_FRAGMENT_PREFIX: u8 = 0xFF;

fn fragment_key(key: &[u8], i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 9);
    k.push(KV_FRAGMENT_PREFIX);
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key);
    k.extend_from_slice(&i.to_be_bytes());
    k
}

fn fragment_count(stored: &[u8]) -> u32 {
    stored
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

/// The value of a stored key-value entry (reassembled when fragmented).
fn kv_value(tree: &sled::Tree, key: &[u8], stored: sled::IVec) -> Result<Bytes, LogError> {
    match stored.first() {
        Some(&KV_INLINE) => Ok(Bytes::from_owner(stored).slice(1..)),
        Some(&KV_FRAGMENTED) => {
            let mut whole = Vec::new();
            for i in 0..fragment_count(&stored) {
                let fragment =
                    tree.get(fragment_key(key, i))?
                        .ok_or_else(|| LogError::Malformed {
                            what: format!("value of key {}", String::from_utf8_lossy(key)),
                            reason: format!("its fragment {i} is missing"),
                        })?;
                whole.extend_from_slice(&fragment);
            }
            Ok(Bytes::from(whole))
        }
        _ => Err(LogError::Malformed {
            what: format!("value of key {}", String::from_utf8_lossy(key)),
            reason: "unknown value tag".into(),
        }),
    }
}

fn chunk_key(base: u64, fragment: u16) -> [u8; 11] {
    let mut key = [0u8; 11];
    key[0] = b'c';
    key[1..9].copy_from_slice(&base.to_be_bytes());
    key[9..11].copy_from_slice(&fragment.to_be_bytes());
    key
}

fn producer_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'p';
    key[1..9].copy_from_slice(&id.to_be_bytes());
    key
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

impl Durable for SledStore {
    fn sync(&self) -> Result<(), LogError> {
        weir_core::blocking::check("sync");
        self.db.flush()?;
        self.data_file.sync_data().map_err(|source| LogError::Io {
            path: self.dir.join("db"),
            source,
        })
    }
}

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
        let json = serde_json::to_vec(config).expect("topic config serialises");
        self.meta
            .insert(format!("{TOPIC_PREFIX}{}", config.name), json)?;
        Ok(())
    }

    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        weir_core::blocking::check("delete_topic");
        // Metadata first: a crash half-way leaves orphan trees (harmless, dropped on re-create)
        // rather than a topic whose partitions are gone.
        self.meta.remove(format!("{TOPIC_PREFIX}{}", config.name))?;
        for partition in 0..config.partitions {
            let tp = TopicPartition::new(config.name.clone(), partition);
            self.parts.write().remove(&tp);
            self.db.drop_tree(Self::tree_name(&tp))?;
        }
        let mut batch = sled::Batch::default();
        for item in self
            .groups
            .scan_prefix(GroupKeys::topic_prefix(&config.name))
        {
            batch.remove(item?.0);
        }
        self.groups.apply_batch(batch)?;
        Ok(())
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
        producer: Option<(u64, &[u8])>,
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
        if let Some((id, state)) = producer {
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

impl KvStore for SledStore {
    fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        weir_core::blocking::check("kv_get");
        let tree = self.kv(namespace)?;
        match tree.get(key)? {
            Some(stored) => Ok(Some(kv_value(&tree, key, stored)?)),
            None => Ok(None),
        }
    }

    fn kv_scan(&self, namespace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        weir_core::blocking::check("kv_scan");
        let tree = self.kv(namespace)?;
        let mut out = Vec::new();
        for item in tree.scan_prefix(prefix) {
            let (k, v) = item?;
            if k.first() == Some(&KV_FRAGMENT_PREFIX) {
                continue;
            }
            let value = kv_value(&tree, &k, v)?;
            out.push((Bytes::from_owner(k), value));
        }
        Ok(out)
    }

    fn kv_apply(
        &self,
        namespace: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError> {
        weir_core::blocking::check("kv_apply");
        let tree = self.kv(namespace)?;
        let mut batch = sled::Batch::default();
        for (key, value) in writes {
            // Remove the fragments of a large value being replaced or deleted.
            if let Some(old) = tree.get(key)? {
                if old.first() == Some(&KV_FRAGMENTED) {
                    for i in 0..fragment_count(&old) {
                        batch.remove(fragment_key(key, i));
                    }
                }
            }
            match value {
                None => batch.remove(key.as_slice()),
                Some(v) if v.len() < FRAGMENT_MAX_BYTES => {
                    let mut stored = Vec::with_capacity(v.len() + 1);
                    stored.push(KV_INLINE);
                    stored.extend_from_slice(v);
                    batch.insert(key.as_slice(), stored);
                }
                Some(v) => {
                    let mut head = vec![KV_FRAGMENTED];
                    let count = v.len().div_ceil(FRAGMENT_MAX_BYTES) as u32;
                    head.extend_from_slice(&count.to_be_bytes());
                    batch.insert(key.as_slice(), head);
                    for (i, fragment) in v.chunks(FRAGMENT_MAX_BYTES).enumerate() {
                        batch.insert(fragment_key(key, i as u32), fragment);
                    }
                }
            }
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    fn kv_drop(&self, namespace: &str) -> Result<(), LogError> {
        weir_core::blocking::check("kv_drop");
        self.kvs.write().remove(namespace);
        self.db.drop_tree(format!("kv/{namespace}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_values_of_any_size_round_trip_and_stay_out_of_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [
            0usize,
            1,
            FRAGMENT_MAX_BYTES - 1,
            FRAGMENT_MAX_BYTES,
            100_000,
            3_000_000,
        ];
        let value = |n: usize, seed: u8| {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect::<Vec<u8>>()
        };
        {
            let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
            let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = sizes
                .iter()
                .map(|&n| (format!("o/{n:08}").into_bytes(), Some(value(n, 1))))
                .collect();
            store.kv_apply("plugin/p", &writes).unwrap();
            // Replace a large value by a small one and delete another large one: no fragment stays.
            store
                .kv_apply(
                    "plugin/p",
                    &[
                        (b"o/00100000".to_vec(), Some(b"small".to_vec())),
                        (b"o/03000000".to_vec(), None),
                    ],
                )
                .unwrap();
            store.sync().unwrap();
        }
        let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
        let scanned = store.kv_scan("plugin/p", b"o/").unwrap();
        assert_eq!(scanned.len(), sizes.len() - 1);
        for (key, got) in &scanned {
            let n: usize = std::str::from_utf8(&key[2..]).unwrap().parse().unwrap();
            let want = if n == 100_000 {
                b"small".to_vec()
            } else {
                value(n, 1)
            };
            assert_eq!(got.as_ref(), &want[..], "value of {n} bytes");
            assert_eq!(store.kv_get("plugin/p", key).unwrap().unwrap(), *got);
        }
        let tree = store.kv("plugin/p").unwrap();
        let fragments = tree.scan_prefix([KV_FRAGMENT_PREFIX]).count();
        // Only the 32 KiB value's own fragment: the replaced and deleted values left none.
        assert_eq!(fragments, 1);
        assert!(tree
            .iter()
            .values()
            .all(|v| v.unwrap().len() <= FRAGMENT_MAX_BYTES + 1));
        drop(store);
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(blobs, 0, "no blob files");
    }

    #[test]
    fn foreign_corrupt_and_newer_directories_are_clear_errors_and_version_1_migrates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        let err = SledStore::open(dir.path(), &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("not a weir store") && err.contains("notes.txt"),
            "{err}"
        );

        let other = tempfile::tempdir().unwrap();
        {
            let db = sled::open(other.path()).unwrap();
            db.insert("someone", "else").unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(other.path(), &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("is not a weir store: a sled database with another segment size"),
            "{err}"
        );
        let marked = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new()
                .path(marked.path())
                .segment_size(SEGMENT_BYTES)
                .open()
                .unwrap();
            db.insert("someone", "else").unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(marked.path(), &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("without weir's format marker"), "{err}");

        let corrupt = tempfile::tempdir().unwrap();
        drop(SledStore::open(corrupt.path(), &Default::default()).unwrap());
        std::fs::write(corrupt.path().join("conf"), b"\xff\xfe garbage").unwrap();
        let err = SledStore::open(corrupt.path(), &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot open the store"), "{err}");

        // A store written by weir before the format version 2 opens and is marked version 2;
        // one written by a newer weir is refused, saying so.
        let v1 = tempfile::tempdir().unwrap();
        drop(SledStore::open(v1.path(), &Default::default()).unwrap());
        {
            let db = sled::Config::new()
                .path(v1.path())
                .segment_size(SEGMENT_BYTES)
                .open()
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(FORMAT_KEY, "weir-log/1")
                .unwrap();
            db.flush().unwrap();
        }
        drop(SledStore::open(v1.path(), &Default::default()).unwrap());
        {
            let db = sled::Config::new()
                .path(v1.path())
                .segment_size(SEGMENT_BYTES)
                .open()
                .unwrap();
            let meta = db.open_tree("meta").unwrap();
            assert_eq!(
                meta.get(FORMAT_KEY).unwrap().unwrap().as_ref(),
                b"weir-log/2"
            );
            meta.insert(FORMAT_KEY, "weir-log/9").unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(v1.path(), &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("written by a newer weir (format weir-log/9"),
            "{err}"
        );
    }
}
