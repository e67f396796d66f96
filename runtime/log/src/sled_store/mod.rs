//! The embedded store: the log's index in sled 0.34.7, its records in segment files, the
//! key-value namespaces in redb (`<dir>/kv.redb`, `redb_kv.rs`).
//!
//! sled layout: tree `meta` (`format` → `weir-log/<version>`, `topic/<name>` → JSON config,
//! `producer/<id>` → the broker's producer record (epoch, owner), `producer-next` → the next
//! id), tree `groups` (topic \0 group \0 partition → next offset and commit time), and one
//! tree per partition
//! `part/<topic>/<partition>` holding, so that one `apply_batch` covers an append atomically:
//! - `i` + base offset (u64 BE) → where the chunk is in the partition's segment files
//!   (`segments.rs`: segment, position, length, record count, newest timestamp)
//! - `p` + producer id (u64 BE) → that producer's sequence state
//! - `s` → first offset still stored (written by retention)
//! - `c` + base offset (u64 BE) + fragment (u16 BE) → chunk bytes, in stores written by
//!   weir-log/1 and /2: read as they are until retention removes them; nothing new is
//!   written there.
//!
//! The records' bytes are in segment files under `<dir>/segments`, written once; sled holds
//! only the index, so a byte of payload is written once (plus sled's share of a 32-byte entry
//! per 32 KiB chunk) instead of once per B-tree leaf rewrite.
//!
//! Durability: `Db::flush` only calls `sync_file_range`; [`Durable::sync`] follows it with
//! `fdatasync` of `<dir>/db`, the one file sled writes records to. Before that it fdatasyncs
//! the segment files written since the last sync and only then writes the index entries of
//! those appends into sled (`pending.rs`), so a durable index entry never points at bytes
//! that are not. Last it makes redb's commits durable: after sled, so that a plugin's cursor
//! is never durable past input records a crash took back (under `interval` and `never` a
//! plugin reads records before any sync). The directory and `conf` are synced once at open,
//! because sled never does.
//!
//! sled writes any *page* (a whole B-tree leaf, not a single value) larger than a quarter of
//! its segment size to a separate blob file that it never fsyncs. A leaf splits only past 16
//! entries, so with 32 KiB chunks a leaf reaches ~560 KiB: with sled's default 512 KiB
//! segments (128 KiB threshold) most consolidated leaves became blob files — unsynced, and
//! one file create + delete per page write. [`SEGMENT_BYTES`] puts the threshold at 2 MiB,
//! above any leaf weir can build, so `<dir>/db` holds everything and one fdatasync covers it.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Durable, LogError};
pub use format::FORMAT_VERSION;
use pending::Pending;
use redb_kv::RedbKv;
use segments::Segments;
use weir_core::TopicPartition;

const TOPIC_PREFIX: &str = "topic/";
const PRODUCER_PREFIX: &[u8] = b"producer/";
/// The next producer id to issue (ids stay unique after expired producers are deleted).
const PRODUCER_NEXT: &[u8] = b"producer-next";
/// sled segment size: blob threshold = a quarter of it = 2 MiB (see the module docs).
pub const SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// The largest log segment file (a topic with retention rolls at a quarter of its retention, at most this).
pub const LOG_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Options for opening a [`SledStore`].
#[derive(Clone, Debug)]
pub struct SledOptions {
    /// The page caches' size in bytes: a quarter for sled's (the log's index), the rest for
    /// redb's (the key-value namespaces).
    pub cache_bytes: u64,
    /// sled's own background flush interval; `None` when weir drives every flush itself.
    pub background_flush_ms: Option<u64>,
    /// Write an append's index entries into sled only once a sync has made its segment bytes
    /// durable (`pending.rs`): `--fsync always`. Under `interval` and `never` records are
    /// acknowledged and read before any sync, so their index goes to sled at once, in sled's
    /// order with the group offsets and plugin cursors that point past them.
    pub index_after_sync: bool,
    /// The largest log segment file.
    pub segment_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: 512 * 1024 * 1024,
            background_flush_ms: None,
            index_after_sync: true,
            segment_bytes: LOG_SEGMENT_BYTES,
        }
    }
}

/// A [`Log`](crate::Log) and [`KvStore`](crate::KvStore) on an embedded sled database.
pub struct SledStore {
    /// Under `--fsync never`, the thread that writes the namespaces out; stopped and joined
    /// first when the store drops (fields drop in order).
    _kv_flusher: Option<kv::KvFlusher>,
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    groups: sled::Tree,
    /// Open handle on `<dir>/db` for `fdatasync` (fsync acts on the inode; any fd will do).
    data_file: File,
    /// Partition trees, opened once: `Db::open_tree` takes a lock and allocates a name.
    parts: RwLock<HashMap<TopicPartition, sled::Tree>>,
    /// The key-value namespaces. Declared after the sled handles: fields drop in order, and
    /// redb's close makes its pending commits durable, so sled's close (its last flush) goes
    /// first — the namespaces never durable ahead of the log.
    kv: Arc<RedbKv>,
    /// The records' bytes.
    segments: Segments,
    /// Appends whose index entries wait for the next sync (when `index_after_sync`).
    pending: Pending,
    index_after_sync: bool,
    /// One sync at a time, and no retention or topic change in the middle of one: a sync
    /// writes the pending entries it took into sled in order.
    sync_lock: Mutex<()>,
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
            .cache_capacity(options.cache_bytes / 4)
            .flush_every_ms(options.background_flush_ms)
            .segment_size(SEGMENT_BYTES)
            .mode(sled::Mode::HighThroughput);
        // sled 0.34 can panic on some corrupt files instead of returning an error.
        let open = || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        let locked = |e: &sled::Error| {
            let reason = e.to_string();
            reason.contains("lock")
                || reason.contains("WouldBlock")
                || reason.contains("temporarily unavailable")
        };
        // The file lock of a store closed a moment ago in this process is released when
        // sled's flusher thread lets go of the database, which can lag the close: a reopen
        // (a restart of the local runtime, a test) waits briefly for it. Another process
        // holding the directory is still refused, after the wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut opened = open();
        while matches!(&opened, Ok(Err(e)) if locked(e)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            opened = open();
        }
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) if e.to_string().contains("io buffer size") => {
                return Err(LogError::ForeignDirectory {
                    path: dir.to_path_buf(),
                    reason: format!("a sled database with another segment size than weir's {SEGMENT_BYTES} bytes ({e})"),
                });
            }
            Ok(Err(e)) => {
                let reason = if locked(&e) {
                    let reason = e.to_string();
                    format!("{reason} (is another `weir serve` using this directory?)")
                } else {
                    e.to_string()
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
        let kv = Arc::new(format::open_kv(
            dir,
            &db,
            &meta,
            options.cache_bytes - options.cache_bytes / 4,
        )?);
        let kv_flusher = options
            .background_flush_ms
            .map(|ms| kv::KvFlusher::start(&db, &kv, ms));
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
            _kv_flusher: kv_flusher,
            kv,
            segments: Segments::new(dir, options.segment_bytes),
            pending: Pending::default(),
            index_after_sync: options.index_after_sync,
            sync_lock: Mutex::new(()),
        };
        store.remove_orphan_segments()?;
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

    /// Deletes the segment directories of topics that no longer exist (a crash in the middle
    /// of a topic's deletion, or an append in flight during it).
    fn remove_orphan_segments(&self) -> Result<(), LogError> {
        let root = self.dir.join("segments");
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(LogError::Io { path: root, source }),
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.meta.get(format!("{TOPIC_PREFIX}{name}"))?.is_none() {
                self.segments.drop_topic(&name)?;
            }
        }
        Ok(())
    }

    pub(super) fn tree_name(tp: &TopicPartition) -> String {
        format!("part/{}/{}", tp.topic, tp.partition)
    }

    /// Deletes every consumer group's offsets of a topic.
    pub(super) fn delete_group_offsets(&self, topic: &str) -> Result<(), LogError> {
        let mut batch = sled::Batch::default();
        for item in self
            .groups
            .scan_prefix(crate::GroupKeys::topic_prefix(topic))
        {
            batch.remove(item?.0);
        }
        self.groups.apply_batch(batch)?;
        Ok(())
    }

    pub(super) fn part(&self, tp: &TopicPartition) -> Result<sled::Tree, LogError> {
        if let Some(tree) = self.parts.read().get(tp) {
            return Ok(tree.clone());
        }
        let tree = self.db.open_tree(Self::tree_name(tp))?;
        self.parts.write().insert(tp.clone(), tree.clone());
        Ok(tree)
    }
}

pub(super) fn chunk_key(base: u64, fragment: u16) -> [u8; 11] {
    let mut key = [0u8; 11];
    key[0] = b'c';
    key[1..9].copy_from_slice(&base.to_be_bytes());
    key[9..11].copy_from_slice(&fragment.to_be_bytes());
    key
}

pub(super) fn index_key(base: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'i';
    key[1..9].copy_from_slice(&base.to_be_bytes());
    key
}

pub(super) fn producer_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'p';
    key[1..9].copy_from_slice(&id.to_be_bytes());
    key
}

pub(super) fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

impl SledStore {
    /// Makes everything written to sled durable.
    fn sync_sled(&self) -> Result<(), LogError> {
        self.db.flush()?;
        self.data_file.sync_data().map_err(|source| LogError::Io {
            path: self.dir.join("db"),
            source,
        })
    }
}

impl Durable for SledStore {
    /// The segment files first, then the index entries of the appends they hold into sled,
    /// then sled: see the module docs.
    fn sync(&self) -> Result<(), LogError> {
        weir_core::blocking::check("sync");
        let _one = self.sync_lock.lock();
        self.sync_locked()
    }
}

impl SledStore {
    /// [`Durable::sync`] for a caller holding `sync_lock`.
    fn sync_locked(&self) -> Result<(), LogError> {
        let log = || {
            let taken = self.pending.take();
            self.segments.sync_dirty()?;
            self.write_index(&taken)?;
            self.pending.applied(&taken);
            self.sync_sled()
        };
        if self.index_after_sync {
            // `always`: plugins read only synced records, so no cursor written meanwhile can
            // point past the log's sync, and writes need not wait for it.
            log()?;
            self.kv.sync()
        } else {
            self.kv.sync_around(log)
        }
    }
}

mod format;
mod helpers;
mod kv;
mod log;
mod pending;
mod redb_kv;
mod segment;
mod segments;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_segments;
