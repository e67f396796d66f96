//! The key-value namespaces on sled: a tree per namespace; values above the fragment size
//! are split into fragments written in the same atomic batch.

use bytes::Bytes;

use super::SledStore;
use crate::{KvStore, LogError, FRAGMENT_MAX_BYTES};

/// Key-value values carry a tag byte: inline, or split into fragments of at most
/// [`FRAGMENT_MAX_BYTES`] stored in the same tree (so a write stays one atomic batch) under
/// `0xFF | key length u32 BE | key | fragment u32 BE`. No stored value — hence no sled page —
/// grows past the blob threshold, whatever a plugin's outputs or state weigh.
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

impl KvStore for SledStore {
    fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        weir_core::blocking::check("kv_get");
        let tree = self.kv(namespace)?;
        match tree.get(key)? {
            Some(stored) => Ok(Some(kv_value(&tree, key, stored)?)),
            None => Ok(None),
        }
    }

    fn kv_scan_first(
        &self,
        namespace: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        weir_core::blocking::check("kv_scan");
        let tree = self.kv(namespace)?;
        let mut out = Vec::new();
        for item in tree.scan_prefix(prefix) {
            if out.len() >= limit {
                break;
            }
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
