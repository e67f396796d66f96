//! The key-value namespaces in redb (`<dir>/kv.redb`, since weir-log/4): one table per
//! namespace, keys and values as bytes.
//!
//! Why not sled, which holds the log's index beside it: the plugin store writes and deletes
//! keys every batch (outbox entries, state deltas, message ids), and sled 0.34 never gives the
//! space of deleted values back — its file grew at about the write rate, ~4 MB/s in the soak.
//! redb is a copy-on-write B-tree that reuses the pages a commit freed, so its file stays the
//! size of what it holds plus what a few commits touch (BENCHMARKS.md, "Plugin store on
//! redb").
//!
//! Durability: every write commits with [`Durability::None`] — visible at once, kept only in
//! memory — and [`RedbKv::sync`] commits an empty transaction with [`Durability::Immediate`],
//! which makes every commit before it durable (one fsync). A crash loses the commits after the
//! last durable one, as a suffix: redb reopens at its last durable commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::LogError;

/// The file, in the data directory.
pub(super) const FILE: &str = "kv.redb";

/// The table of redb's own bookkeeping: [`MOVED_FROM_SLED`] once the namespaces of an older
/// store were copied in (`kv.rs`). A namespace is never named so: namespaces are `plugins`
/// and `plugin/<name>` and the cluster's, none starting with `weir:`.
const META: &str = "weir:meta";
/// Set in [`META`] by the commit that copied sled's namespaces in (or created a fresh store).
pub(super) const MOVED_FROM_SLED: &[u8] = b"moved-from-sled";

fn table(namespace: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
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
    db: Database,
    path: PathBuf,
    /// A commit was made since the last durable one.
    dirty: AtomicBool,
}

impl RedbKv {
    /// Opens (or creates) `<dir>/kv.redb`. A database closed a moment ago in this process
    /// (a restart of the local runtime, a test) may hold its lock briefly: waited for up to
    /// 2 s, like sled's.
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
            db,
            path,
            dirty: AtomicBool::new(false),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> LogError {
        failed(&self.path, e)
    }

    pub(super) fn get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = match tx.open_table(table(namespace)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
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
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = match tx.open_table(table(namespace)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
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
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let synced = self.commit(Durability::Immediate, |_| Ok(()));
        if synced.is_err() {
            self.dirty.store(true, Ordering::SeqCst);
        }
        synced
    }

    /// Whether the older store's namespaces were copied in already.
    pub(super) fn moved_from_sled(&self) -> Result<bool, LogError> {
        Ok(self.get(META, MOVED_FROM_SLED)?.is_some())
    }

    /// Writes `namespaces` (name, entries) and the [`MOVED_FROM_SLED`] mark in one durable
    /// commit.
    pub(super) fn move_in(
        &self,
        namespaces: &[(String, Vec<(Vec<u8>, Vec<u8>)>)],
    ) -> Result<(), LogError> {
        self.commit(Durability::Immediate, |tx| {
            for (namespace, entries) in namespaces {
                let mut t = tx.open_table(table(namespace)).map_err(|e| self.err(e))?;
                for (k, v) in entries {
                    t.insert(k.as_slice(), v.as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            let mut meta = tx.open_table(table(META)).map_err(|e| self.err(e))?;
            meta.insert(MOVED_FROM_SLED, b"1".as_slice())
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn commit(
        &self,
        durability: Durability,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(durability).map_err(|e| self.err(e))?;
        if let Err(e) = write(&tx) {
            let _aborted = tx.abort();
            return Err(e);
        }
        tx.commit().map_err(|e| self.err(e))?;
        if matches!(durability, Durability::None) {
            self.dirty.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}
