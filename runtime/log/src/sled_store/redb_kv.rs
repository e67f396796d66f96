//! The key-value namespaces in redb (`<dir>/kv.redb`, since weir-log/4): one table per
//! namespace, keys and values as bytes.
//!
//! Why not sled, which holds the log's index beside it: the plugin store writes and deletes
//! keys every batch (outbox entries, state deltas, message ids), and sled 0.34 never gives the
//! space of deleted values back — its file grew at about the write rate, ~4 MB/s in the soak.
//! redb is a copy-on-write B-tree that reuses the pages a commit freed, so its file stays the
//! size of what it holds plus what a few commits touch (BENCHMARKS.md, "The plugins' store in
//! redb: one hour").
//!
//! Durability: every write commits with [`Durability::None`] — visible at once, kept only in
//! memory — and [`RedbKv::sync`] commits an empty transaction with [`Durability::Immediate`],
//! which makes every commit before it durable (one fsync). A crash loses the commits after the
//! last durable one, as a suffix: redb reopens at its last durable commit (after a crash it
//! first walks the file to rebuild its allocator state). [`RedbKv::sync_around`] holds redb's
//! one writer across a sync of the log, so that nothing written after the log's sync is made
//! durable with it (`mod.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError,
    WriteTransaction,
};

use crate::LogError;

/// The file, in the data directory.
pub(super) const FILE: &str = "kv.redb";

/// The table of redb's own bookkeeping: [`MOVED_FROM_SLED`] once the namespaces of an older
/// store were copied in (`kv.rs`). A namespace is never named so: namespaces are `plugins`
/// and `plugin/<name>` and the cluster's, none starting with `weir:`.
const META: &str = "weir:meta";
/// Set in [`META`] by the commit that copied sled's namespaces in (or created a fresh store).
const MOVED_FROM_SLED: &[u8] = b"moved-from-sled";

/// Keys and values as bytes.
type Raw = &'static [u8];

fn table(namespace: &str) -> TableDefinition<'_, Raw, Raw> {
    TableDefinition::new(namespace)
}

/// An error of redb's as a store error.
fn failed(path: &Path, e: impl std::fmt::Display) -> LogError {
    LogError::Kv {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The key-value namespaces of a data directory.
pub(super) struct RedbKv {
    /// Closed by [`Drop`] unless `poisoned`: redb's close makes pending non-durable commits
    /// durable, which must not happen after the log's sync failed under them.
    db: Option<Database>,
    /// A log sync under [`RedbKv::sync_around`] failed: the commits waiting for it may point
    /// past records a crash or the failure took back, so none of them may become durable —
    /// not even by the close (the server is stopping; the next open goes back to the last
    /// durable commit).
    poisoned: AtomicBool,
    path: PathBuf,
    /// A commit was made since the last durable one, or a commit failed (the next sync then
    /// meets redb's refusal and the server stops, instead of every write failing for good).
    dirty: AtomicBool,
    /// One sync at a time: a second one must not find `dirty` cleared by a first whose
    /// durable commit has not ended.
    sync_lock: Mutex<()>,
}

impl RedbKv {
    /// Opens (or creates) `<dir>/kv.redb` (the caller syncs the directory's entry). A database
    /// closed a moment ago in this process (a restart of the local runtime, a test) may hold
    /// its lock briefly: waited for up to 2 s, like sled's.
    pub(super) fn open(dir: &Path, cache_bytes: u64) -> Result<RedbKv, LogError> {
        let path = dir.join(FILE);
        let deadline = Instant::now() + Duration::from_secs(2);
        let db = loop {
            match Database::builder()
                .set_cache_size(cache_bytes as usize)
                .create(&path)
            {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(LogError::Open {
                        path,
                        reason: "the key-value file is open in another process (is another `weir serve` using this directory?)".into(),
                    })
                }
                Err(e) => return Err(failed(&path, e)),
            }
        };
        Ok(RedbKv {
            db: Some(db),
            poisoned: AtomicBool::new(false),
            path,
            dirty: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
        })
    }

    fn db(&self) -> &Database {
        self.db.as_ref().expect("open until dropped")
    }

    fn err(&self, e: impl std::fmt::Display) -> LogError {
        failed(&self.path, e)
    }

    /// A namespace's table as of now; `None` when nothing was ever written to it.
    fn read_table(
        &self,
        namespace: &str,
    ) -> Result<Option<redb::ReadOnlyTable<Raw, Raw>>, LogError> {
        let tx = self.db().begin_read().map_err(|e| self.err(e))?;
        match tx.open_table(table(namespace)) {
            Ok(t) => Ok(Some(t)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    pub(super) fn get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        let Some(t) = self.read_table(namespace)? else {
            return Ok(None);
        };
        let value = t.get(key).map_err(|e| self.err(e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(v.value())))
    }

    pub(super) fn scan_first(
        &self,
        namespace: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        let Some(t) = self.read_table(namespace)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(|e| self.err(e))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((
                Bytes::copy_from_slice(k.value()),
                Bytes::copy_from_slice(v.value()),
            ));
        }
        Ok(out)
    }

    /// Applies `writes` to `namespace` in one commit, not yet durable.
    pub(super) fn apply(
        &self,
        namespace: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError> {
        self.commit(Durability::None, |tx| {
            let mut t = tx.open_table(table(namespace)).map_err(|e| self.err(e))?;
            for (key, value) in writes {
                match value {
                    Some(v) => t.insert(key.as_slice(), v.as_slice()).map(|_| ()),
                    None => t.remove(key.as_slice()).map(|_| ()),
                }
                .map_err(|e| self.err(e))?;
            }
            Ok(())
        })
    }

    /// Removes a namespace, not yet durable.
    pub(super) fn drop_namespace(&self, namespace: &str) -> Result<(), LogError> {
        self.commit(Durability::None, |tx| {
            tx.delete_table(table(namespace))
                .map(|_| ())
                .map_err(|e| self.err(e))
        })
    }

    /// Makes every commit made before this call durable; nothing to do when none was.
    pub(super) fn sync(&self) -> Result<(), LogError> {
        self.sync_around(|| Ok(()))
    }

    /// Runs `log_sync` and then makes every commit made before this call durable, holding
    /// redb's one writer from before `log_sync` to the durable commit: writes made meanwhile
    /// wait, so none is made durable by a sync of the log that did not cover what it points
    /// at. Without a commit to make durable, only `log_sync` runs.
    pub(super) fn sync_around(
        &self,
        log_sync: impl FnOnce() -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let _one = self.sync_lock.lock();
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return log_sync();
        }
        // `commit` marks the store dirty again if this fails.
        self.commit(Durability::Immediate, |_| {
            log_sync().inspect_err(|_| self.poisoned.store(true, Ordering::SeqCst))
        })
    }

    /// Whether the older store's namespaces were copied in already.
    pub(super) fn moved_from_sled(&self) -> Result<bool, LogError> {
        Ok(self.get(META, MOVED_FROM_SLED)?.is_some())
    }

    /// Writes every entry `fill` hands over (namespace, key, value; one namespace's entries
    /// together) and the [`MOVED_FROM_SLED`] mark in one durable commit.
    pub(super) fn move_in(
        &self,
        fill: impl FnOnce(
            &mut dyn FnMut(&str, &[u8], &[u8]) -> Result<(), LogError>,
        ) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        self.commit(Durability::Immediate, |tx| {
            let mut open: Option<(String, redb::Table<'_, Raw, Raw>)> = None;
            fill(&mut |namespace, key, value| {
                if open.as_ref().is_none_or(|(name, _)| name != namespace) {
                    open = None; // one table open at a time
                    let t = tx.open_table(table(namespace)).map_err(|e| self.err(e))?;
                    open = Some((namespace.to_string(), t));
                }
                let (_, t) = open.as_mut().expect("opened above");
                t.insert(key, value).map(|_| ()).map_err(|e| self.err(e))
            })?;
            drop(open);
            let mut meta = tx.open_table(table(META)).map_err(|e| self.err(e))?;
            meta.insert(MOVED_FROM_SLED, b"1".as_slice())
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn begin(&self, durability: Durability) -> Result<WriteTransaction, LogError> {
        let mut tx = self.db().begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(durability).map_err(|e| self.err(e))?;
        Ok(tx)
    }

    fn commit(
        &self,
        durability: Durability,
        write: impl FnOnce(&WriteTransaction) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let committed = self.begin(durability).and_then(|tx| {
            if let Err(e) = write(&tx) {
                let _aborted = tx.abort();
                return Err(e);
            }
            tx.commit().map_err(|e| self.err(e))
        });
        // A failed commit marks the store dirty too: redb refuses every write after an I/O
        // failure, and the next sync must meet that refusal (and stop the server).
        if committed.is_err() || matches!(durability, Durability::None) {
            self.dirty.store(true, Ordering::SeqCst);
        }
        committed
    }
}

impl Drop for RedbKv {
    fn drop(&mut self) {
        if self.poisoned.load(Ordering::SeqCst) {
            tracing::warn!(message = "The key-value store is left unclosed: the log's sync failed under commits not yet durable, and closing would make them durable. The next open goes back to its last durable commit.", path = %self.path.display());
            // Leaked with its lock, unclosed: the process is stopping.
            std::mem::forget(self.db.take());
        }
    }
}
