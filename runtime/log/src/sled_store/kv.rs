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
pub(super) const KV_FRAGMENT_PREFIX: u8 = 0xFF;

pub(super) fn fragment_key(key: &[u8], i: u32) -> Vec<u8> {
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

impl SledStore {
    /// Moves the namespaces of a store written before weir-log/4 from sled into `kv` (see the
    /// module docs); on any store, drops namespace trees a crash left after the move.
    pub(super) fn move_namespaces(db: &sled::Db, kv: &RedbKv) -> Result<(), LogError> {
        let trees: Vec<(String, sled::IVec)> = db
            .tree_names()
            .into_iter()
            .filter_map(|name| {
                let namespace = std::str::from_utf8(&name)
                    .ok()?
                    .strip_prefix(SLED_KV_PREFIX)?
                    .to_string();
                Some((namespace, name))
            })
            .collect();
        if !kv.moved_from_sled()? {
            let mut namespaces = Vec::with_capacity(trees.len());
            for (namespace, name) in &trees {
                let tree = db.open_tree(name)?;
                let mut entries = Vec::new();
                for item in tree.iter() {
                    let (key, stored) = item?;
                    if key.first() == Some(&KV_FRAGMENT_PREFIX) {
                        continue;
                    }
                    let value = kv_value(&tree, &key, stored)?;
                    entries.push((key.to_vec(), value.to_vec()));
                }
                namespaces.push((namespace.clone(), entries));
            }
            kv.move_in(&namespaces)?;
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
