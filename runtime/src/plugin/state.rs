//! Plugin state in the store: a commit writes its state changes as one delta (`l/<seq>`); a
//! compactor folds deltas into per-key entries (`s/<key>`), atomically with deleting them, and
//! on open before anything runs. Reads go through a cache of committed state that commits
//! insert into and readers only fill, so it is never older than the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use super::executor::PluginRuntime;
use super::spec::{decode_state, encode_state, state_key};
use crate::log::{LogError, LogStore};

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
            let writes = decode_delta(value).ok_or_else(|| crate::log::LogError::Malformed {
                what: format!("state delta {}", String::from_utf8_lossy(key)),
                reason: "truncated or not a delta".into(),
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
        if let Some(seq) = deltas
            .last()
            .and_then(|(k, _)| k.get(2..10))
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
        {
            self.cache.compacted_below(seq + 1);
        }
        Ok(deltas.len())
    }

    /// Compacts state deltas and writes buffered log lines every 200 ms until cancelled.
    pub(crate) async fn run_compactor(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = cancel.cancelled() => break,
            }
            let this = self.clone();
            match crate::blocking::run(move || this.compact()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(message = "State compaction failed; will retry.", plugin = %self.spec.name, error = %e)
                }
                Err(e) => {
                    tracing::warn!(message = "State compaction panicked; will retry.", plugin = %self.spec.name, error = %e)
                }
            }
            self.flush_logs().await;
        }
        self.flush_logs().await;
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

    /// A committed state value and its version, as the plugin would read it. Blocking.
    ///
    /// # Errors
    /// The store could not be read.
    pub(crate) fn state(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, LogError> {
        read_through(&self.cache, &*self.store, &self.namespace, key)
    }
}

/// A committed state entry: the value and its version, `None` when absent.
pub(super) type Entry = Option<(Vec<u8>, u64)>;

/// Committed state of recently used keys, within a byte budget.
///
/// Commits [`insert`](StateCache::insert) every key they write (under the plugin's commit
/// lock, after the store write); readers only [`fill`](StateCache::fill) missing keys, and
/// only if nothing was evicted since they began their store read — an entry evicted and then
/// re-filled from an older read could otherwise be older than the store. So an entry is never
/// older than the store, and the commit's version check can trust it.
///
/// Eviction is generational: new entries go to `hot`; when `hot` holds half the budget it
/// becomes `cold` and the previous `cold` is dropped (an approximation of LRU with O(1)
/// work and no bookkeeping on reads). A generation holding a commit whose state delta is not
/// yet folded into the per-key entries is kept until the compactor has folded it: the store's
/// entry for such a key is older than the cache's, so dropping it would un-commit a write.
pub(super) struct StateCache {
    inner: RwLock<Generations>,
    budget: usize,
}

#[derive(Default)]
struct Generations {
    hot: HashMap<Vec<u8>, Entry>,
    cold: HashMap<Vec<u8>, Entry>,
    hot_bytes: usize,
    cold_bytes: usize,
    /// Newest state-delta sequence (+1) of a commit inserted into each generation.
    hot_seq: u64,
    cold_seq: u64,
    /// Deltas below this sequence are folded into the per-key entries.
    compacted: u64,
    /// Bumped whenever entries are dropped.
    evictions: u64,
}

/// What an entry costs: key, value and the maps' own overhead.
fn entry_bytes(key: &[u8], entry: &Entry) -> usize {
    key.len() + entry.as_ref().map_or(0, |(v, _)| v.len()) + 64
}

impl StateCache {
    /// An empty cache holding at most about `budget` bytes.
    pub(super) fn new(budget: usize) -> Self {
        StateCache {
            inner: RwLock::default(),
            budget: budget.max(1024),
        }
    }

    /// The cached entry of a key (`None`: not cached).
    pub(super) fn get(&self, key: &[u8]) -> Option<Entry> {
        let g = self.inner.read();
        g.hot.get(key).or_else(|| g.cold.get(key)).cloned()
    }

    /// How many evictions happened so far; take it before a store read meant for [`fill`].
    pub(super) fn evictions(&self) -> u64 {
        self.inner.read().evictions
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        let g = self.inner.read();
        g.hot_bytes + g.cold_bytes
    }

    /// Caches what a reader found in the store, unless the key is cached already (a commit's
    /// value is newer) or something was evicted since `evictions_before` (the read may be
    /// older than an evicted commit). Returns the entry to use.
    pub(super) fn fill(&self, key: &[u8], found: Entry, evictions_before: u64) -> Entry {
        let mut g = self.inner.write();
        if let Some(hit) = g.hot.get(key).or_else(|| g.cold.get(key)) {
            return hit.clone();
        }
        if g.evictions == evictions_before {
            self.put(&mut g, key.to_vec(), found.clone());
        }
        found
    }

    /// Records a value committed with state delta `seq` (overwrites).
    pub(super) fn insert(&self, key: Vec<u8>, entry: Entry, seq: u64) {
        let mut g = self.inner.write();
        if let Some(old) = g.cold.remove(&key) {
            g.cold_bytes -= entry_bytes(&key, &old);
        }
        g.hot_seq = g.hot_seq.max(seq + 1);
        self.put(&mut g, key, entry);
    }

    /// Every delta below `seq` is folded into the per-key entries.
    pub(super) fn compacted_below(&self, seq: u64) {
        let mut g = self.inner.write();
        g.compacted = g.compacted.max(seq);
    }

    fn put(&self, g: &mut Generations, key: Vec<u8>, entry: Entry) {
        let size = entry_bytes(&key, &entry);
        if let Some(old) = g.hot.remove(&key) {
            g.hot_bytes -= entry_bytes(&key, &old);
        }
        if g.hot_bytes + size > self.budget / 2 && !g.hot.is_empty() && g.cold_seq <= g.compacted {
            g.cold = std::mem::take(&mut g.hot);
            g.cold_bytes = std::mem::take(&mut g.hot_bytes);
            g.cold_seq = std::mem::replace(&mut g.hot_seq, 0);
            g.evictions += 1;
        }
        g.hot.insert(key, entry);
        g.hot_bytes += size;
    }
}

/// Committed state of a key: from the cache, else from the store (then cached if still
/// absent from the cache and nothing was evicted meanwhile). Nothing is cached from a failed
/// read.
pub(super) fn read_through(
    cache: &StateCache,
    store: &dyn LogStore,
    namespace: &str,
    key: &[u8],
) -> Result<Entry, LogError> {
    if let Some(hit) = cache.get(key) {
        return Ok(hit);
    }
    let evictions = cache.evictions();
    let stored = match store.kv_get(namespace, &state_key(key))? {
        None => None,
        Some(v) => Some(decode_state(&v).ok_or_else(|| LogError::Malformed {
            what: format!("state value of key {}", String::from_utf8_lossy(key)),
            reason: "shorter than its version".into(),
        })?),
    };
    Ok(cache.fill(key, stored, evictions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_within_its_budget_and_never_caches_a_read_older_than_an_eviction() {
        let cache = StateCache::new(4096);
        cache.compacted_below(1); // delta 0, which every insert below names, is folded
        for i in 0..1000u32 {
            cache.insert(i.to_be_bytes().to_vec(), Some((vec![0; 10], 1)), 0);
            assert!(cache.bytes() <= 4096, "{} bytes", cache.bytes());
        }
        // A reader read version 1 from the store; meanwhile a commit wrote version 2 and the
        // cache evicted it: the reader's value must not be cached.
        let before = cache.evictions();
        cache.insert(b"k".to_vec(), Some((b"v2".to_vec(), 2)), 0);
        for i in 0..1000u32 {
            cache.insert((i + 5000).to_be_bytes().to_vec(), Some((vec![0; 10], 1)), 0);
        }
        assert_eq!(cache.get(b"k"), None, "evicted");
        let used = cache.fill(b"k", Some((b"v1".to_vec(), 1)), before);
        assert_eq!(used, Some((b"v1".to_vec(), 1)));
        assert_eq!(
            cache.get(b"k"),
            None,
            "a read older than an eviction is not cached"
        );
        // Without an eviction in between it is cached; a commit's value is never replaced.
        let now = cache.evictions();
        cache.fill(b"j", None, now);
        assert_eq!(cache.get(b"j"), Some(None));
        cache.insert(b"j".to_vec(), Some((b"new".to_vec(), 1)), 0);
        assert_eq!(cache.fill(b"j", None, now), Some((b"new".to_vec(), 1)));
    }

    #[test]
    fn commits_not_yet_compacted_are_never_evicted() {
        let cache = StateCache::new(4096);
        // Delta 7 holds key "k": until it is compacted, "k" stays whatever else comes.
        cache.insert(b"k".to_vec(), Some((b"v".to_vec(), 3)), 7);
        for i in 0..1000u32 {
            cache.insert(i.to_be_bytes().to_vec(), Some((vec![0; 10], 1)), 7);
        }
        assert_eq!(cache.get(b"k"), Some(Some((b"v".to_vec(), 3))));
        cache.compacted_below(8);
        for i in 0..1000u32 {
            cache.insert((i + 5000).to_be_bytes().to_vec(), Some((vec![0; 10], 1)), 0);
        }
        assert_eq!(cache.get(b"k"), None, "evicted once compacted");
        assert!(cache.bytes() <= 4096, "{} bytes", cache.bytes());
    }
}
