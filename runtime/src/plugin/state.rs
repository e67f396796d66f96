//! Plugin state in the store: a commit writes its state changes as one delta (`l/<seq>`); a
//! compactor folds deltas into per-key entries (`s/<key>`), atomically with deleting them, and
//! on open before anything runs. Reads go through a cache of committed state that commits
//! insert into and readers only fill, so it is never older than the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::executor::PluginRuntime;
use super::spec::{decode_state, encode_state, state_key};
use crate::log::LogStore;

pub(super) fn log_key(seq: u64) -> Vec<u8> {
    let mut k = b"l/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A batch's state writes: count u32, then per key: key_len u32, key, present u8,
/// [version u64, value_len u32, value].
pub(super) fn encode_delta(writes: &BTreeMap<Vec<u8>, Option<(Vec<u8>, u64)>>) -> Vec<u8> {
    let mut out = (writes.len() as u32).to_le_bytes().to_vec();
    for (key, value) in writes {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        match value {
            None => out.push(0),
            Some((v, version)) => {
                out.push(1);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

type StateWrite = (Vec<u8>, Option<(Vec<u8>, u64)>);

fn decode_delta(b: &[u8]) -> Option<Vec<StateWrite>> {
    let mut r = weir_codec::Reader::new(b);
    let n = r.u32().ok()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let key = r.bytes32().ok()?.to_vec();
        let value = match r.u8().ok()? {
            0 => None,
            _ => {
                let version = r.u64().ok()?;
                Some((r.bytes32().ok()?.to_vec(), version))
            }
        };
        out.push((key, value));
    }
    r.done().ok()?;
    Some(out)
}

impl PluginRuntime {
    /// Folds every state delta into the per-key state entries, atomically with deleting the
    /// deltas. Returns the number of deltas folded.
    pub(crate) fn compact(&self) -> Result<usize, crate::log::LogError> {
        let deltas = self.store.kv_scan(&self.namespace, b"l/")?;
        if deltas.is_empty() {
            return Ok(0);
        }
        let mut latest: BTreeMap<Vec<u8>, Option<(Vec<u8>, u64)>> = BTreeMap::new();
        for (key, value) in &deltas {
            let writes = decode_delta(value).ok_or_else(|| {
                crate::log::LogError::Storage(format!(
                    "unreadable state delta {}",
                    String::from_utf8_lossy(key)
                ))
            })?;
            latest.extend(writes);
        }
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = latest
            .into_iter()
            .map(|(k, v)| {
                (
                    state_key(&k),
                    v.map(|(v, version)| encode_state(&v, version)),
                )
            })
            .collect();
        writes.extend(deltas.iter().map(|(k, _)| (k.to_vec(), None)));
        self.store.kv_apply(&self.namespace, &writes)?;
        Ok(deltas.len())
    }

    /// Compacts state deltas every 200 ms until cancelled.
    pub(crate) async fn run_compactor(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = cancel.cancelled() => return,
            }
            let this = self.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || this.compact()).await {
                tracing::warn!(message = "State compaction failed; will retry.", plugin = %self.spec.name, error = %e);
            }
        }
    }

    /// Every committed state entry (after folding pending deltas), in key order.
    pub(crate) fn state_entries(
        &self,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>, u64)>, crate::log::LogError> {
        self.compact()?;
        let entries = self.store.kv_scan(&self.namespace, b"s/")?;
        Ok(entries
            .into_iter()
            .filter_map(|(k, v)| {
                decode_state(&v).map(|(value, version)| (k[2..].to_vec(), value, version))
            })
            .collect())
    }

    /// Outbox entries not yet forwarded.
    pub(crate) fn pending_outputs(&self) -> Result<usize, crate::log::LogError> {
        Ok(self.store.kv_scan(&self.namespace, b"o/")?.len())
    }

    /// A committed state value and its version, as the plugin would read it.
    pub(crate) fn state(&self, key: &[u8]) -> Option<(Vec<u8>, u64)> {
        read_through(&self.cache, &*self.store, &self.namespace, key)
    }
}

pub(super) type StateCache =
    std::sync::RwLock<std::collections::HashMap<Vec<u8>, Option<(Vec<u8>, u64)>>>;

/// Committed state of a key: from the cache, else from the store (then cached if still absent).
pub(super) fn read_through(
    cache: &StateCache,
    store: &dyn LogStore,
    namespace: &str,
    key: &[u8],
) -> Option<(Vec<u8>, u64)> {
    if let Some(hit) = cache.read().expect("state cache lock").get(key) {
        return hit.clone();
    }
    let stored = store
        .kv_get(namespace, &state_key(key))
        .ok()
        .flatten()
        .and_then(|v| decode_state(&v));
    // Never overwrite: a commit may have inserted a newer value since the store read.
    cache
        .write()
        .expect("state cache lock")
        .entry(key.to_vec())
        .or_insert(stored)
        .clone()
}
