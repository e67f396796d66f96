//! The key-value namespaces: in redb since weir-log/4 (`redb_kv.rs`), and the move of an
//! older store's namespaces out of sled.
//!
//! Before weir-log/4 each namespace was a sled tree `kv/<namespace>`, its values tagged
//! inline or split into fragments of at most [`FRAGMENT_MAX_BYTES`] stored in the same tree
//! under `0xFF | key length u32 BE | key | fragment u32 BE`. Opening such a store copies every
//! namespace into redb in one durable commit that also marks the move done, then drops the
//! trees ([`SledStore::move_namespaces`]): a crash before the commit copies again, one after
//! it only drops what is left.

use bytes::Bytes;

use super::redb_kv::RedbKv;
use super::SledStore;
#[cfg(test)]
use crate::FRAGMENT_MAX_BYTES;
use crate::{KvStore, LogError};

/// The prefix of a namespace's tree in a store before weir-log/4.
const SLED_KV_PREFIX: &str = "kv/";
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

/// The value of an entry of a sled namespace tree (reassembled when fragmented).
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

/// Whether `key` of a sled namespace tree is a fragment of a large value (not an entry): a
/// namespace's own keys may start with 0xFF too (the cluster cache's `\xff\xffapplied`).
fn is_fragment_key(key: &[u8]) -> bool {
    key.len() >= 9
        && key[0] == KV_FRAGMENT_PREFIX
        && key[1..5]
            .try_into()
            .map(u32::from_be_bytes)
            .is_ok_and(|n| n as usize + 9 == key.len())
}

/// The namespace trees of a store before weir-log/4: (namespace, tree name).
fn sled_namespaces(db: &sled::Db) -> Vec<(String, sled::IVec)> {
    db.tree_names()
        .into_iter()
        .filter_map(|name| {
            let namespace = std::str::from_utf8(&name)
                .ok()?
                .strip_prefix(SLED_KV_PREFIX)?
                .to_string();
            Some((namespace, name))
        })
        .collect()
}

/// Whether sled still holds namespace trees (a store before weir-log/4, or one whose move
/// a crash cut short before the trees were dropped).
pub(super) fn has_sled_namespaces(db: &sled::Db) -> bool {
    !sled_namespaces(db).is_empty()
}

/// Moves the namespaces of a store written before weir-log/4 from sled into `kv` (see the
/// module docs); on any store, drops namespace trees a crash left after the move.
pub(super) fn move_namespaces(db: &sled::Db, kv: &RedbKv) -> Result<(), LogError> {
    let trees = sled_namespaces(db);
    if !kv.moved_from_sled()? {
        kv.move_in(|insert| {
            for (namespace, name) in &trees {
                let tree = db.open_tree(name)?;
                for item in tree.iter() {
                    let (key, stored) = item?;
                    if is_fragment_key(&key) {
                        continue;
                    }
                    let value = kv_value(&tree, &key, stored)?;
                    insert(namespace, &key, &value)?;
                }
            }
            Ok(())
        })?;
        if !trees.is_empty() {
            tracing::info!(
                message = "Key-value namespaces moved from sled to redb.",
                namespaces = trees.len()
            );
        }
    }
    for (_, name) in &trees {
        db.drop_tree(name)?;
    }
    Ok(())
}

/// Under sled's own write-back (`--fsync never`) a thread makes the namespaces' commits
/// durable every interval, as weir's syncer does under the other policies: holding redb's
/// writer across sled's write-back, so no commit is made durable ahead of the log it points
/// into (`redb_kv.rs`, [`RedbKv::sync_around`]). Dropping it stops and joins the thread.
pub(super) struct KvFlusher {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KvFlusher {
    pub(super) fn start(db: &sled::Db, kv: &std::sync::Arc<RedbKv>, ms: u64) -> KvFlusher {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (db, kv) = (db.clone(), kv.clone());
        let every = std::time::Duration::from_millis(ms);
        let thread = std::thread::Builder::new()
            .name("weir-kv-flush".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    let flush = || db.flush().map(|_| ()).map_err(LogError::from);
                    if let Err(e) = kv.sync_around(flush) {
                        tracing::error!(message = "Writing the key-value namespaces out failed; tried again in a moment, and at shutdown.", error = %e);
                    }
                }
            });
        match thread {
            Ok(thread) => KvFlusher {
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(e) => {
                tracing::error!(message = "Could not start the key-value write-back thread; plugins' state is written out at shutdown only.", error = %e);
                KvFlusher {
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

impl Drop for KvFlusher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _joined = thread.join();
        }
    }
}

/// Writes `writes` into namespace `namespace` the way a store before weir-log/4 did (large
/// values in fragments): for tests of the move.
#[cfg(test)]
pub(super) fn write_sled_namespace(
    db: &sled::Db,
    namespace: &str,
    writes: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), LogError> {
    let tree = db.open_tree(format!("{SLED_KV_PREFIX}{namespace}"))?;
    let mut batch = sled::Batch::default();
    for (key, v) in writes {
        if v.len() < FRAGMENT_MAX_BYTES {
            let mut stored = vec![KV_INLINE];
            stored.extend_from_slice(v);
            batch.insert(key.as_slice(), stored);
        } else {
            let mut head = vec![KV_FRAGMENTED];
            let count = v.len().div_ceil(FRAGMENT_MAX_BYTES) as u32;
            head.extend_from_slice(&count.to_be_bytes());
            batch.insert(key.as_slice(), head);
            for (i, fragment) in v.chunks(FRAGMENT_MAX_BYTES).enumerate() {
                batch.insert(fragment_key(key, i as u32), fragment);
            }
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

impl KvStore for SledStore {
    fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        weir_core::blocking::check("kv_get");
        self.kv.get(namespace, key)
    }

    fn kv_scan_first(
        &self,
        namespace: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        weir_core::blocking::check("kv_scan");
        self.kv.scan_first(namespace, prefix, limit)
    }

    fn kv_apply(
        &self,
        namespace: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError> {
        weir_core::blocking::check("kv_apply");
        self.kv.apply(namespace, writes)
    }

    fn kv_drop(&self, namespace: &str) -> Result<(), LogError> {
        weir_core::blocking::check("kv_drop");
        self.kv.drop_namespace(namespace)
    }
}
