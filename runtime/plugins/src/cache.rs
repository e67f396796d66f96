//! The committed-state cache of a plugin, within a byte budget.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use parking_lot::RwLock;
use weir_log::LogError;
use weir_wasm::ReadStamp;

use crate::store::PluginStore;

/// A committed state entry: the value and its version, `None` when absent.
pub(crate) type Entry = Option<(Vec<u8>, u64)>;

/// Committed state of recently used keys, within a byte budget.
///
/// Commits [`insert_all`](StateCache::insert_all) every key they write (under the plugin's commit
/// lock, after the store write); readers only [`fill`](StateCache::fill) missing keys, and
/// only if nothing was evicted since they began their store read — an entry evicted and then
/// re-filled from an older read could otherwise be older than the store. So an entry is never
/// older than the store, and the commit's check of what a batch read can trust it.
///
/// Eviction is generational: new entries go to `hot`; when `hot` holds half the budget it
/// becomes `cold` and the previous `cold` is dropped (an approximation of LRU with O(1)
/// work and no bookkeeping on reads). A generation holding a commit whose state delta is not
/// yet folded into the per-key entries is kept until the compactor has folded it: the store's
/// entry for such a key is older than the cache's, so dropping it would un-commit a write.
pub(crate) struct StateCache {
    inner: RwLock<Generations>,
    budget: usize,
}

/// Keys hashed with foldhash, seeded at random per process: SipHash was a tenth of the
/// host's time per state call (perf, points); foldhash claims only minimal resistance to chosen
/// colliding keys, which the random seed gives.
type Map = HashMap<Vec<u8>, Entry, RandomState>;

#[derive(Default)]
struct Generations {
    hot: Map,
    cold: Map,
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
    pub(crate) fn new(budget: usize) -> Self {
        StateCache {
            inner: RwLock::default(),
            budget: budget.max(1024),
        }
    }

    /// The cached entry of a key (`None`: not cached).
    pub(crate) fn get(&self, key: &[u8]) -> Option<Entry> {
        let g = self.inner.read();
        g.hot.get(key).or_else(|| g.cold.get(key)).cloned()
    }

    /// The cached entry's [`ReadStamp`], without copying its value (`None`: not cached).
    pub(crate) fn stamp(&self, key: &[u8]) -> Option<ReadStamp> {
        let g = self.inner.read();
        let entry = g.hot.get(key).or_else(|| g.cold.get(key))?;
        Some(ReadStamp::of(entry.as_ref()))
    }

    /// How many evictions happened so far; take it before a store read meant for [`fill`].
    pub(crate) fn evictions(&self) -> u64 {
        self.inner.read().evictions
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        let g = self.inner.read();
        g.hot_bytes + g.cold_bytes
    }

    /// Caches what a reader found in the store, unless the key is cached already (a commit's
    /// value is newer) or something was evicted since `evictions_before` (the read may be
    /// older than an evicted commit). Returns the entry to use.
    pub(crate) fn fill(&self, key: &[u8], found: Entry, evictions_before: u64) -> Entry {
        let mut g = self.inner.write();
        if let Some(hit) = g.hot.get(key).or_else(|| g.cold.get(key)) {
            return hit.clone();
        }
        if g.evictions == evictions_before {
            self.put(&mut g, key.to_vec(), found.clone(), false);
        }
        found
    }

    /// Records a value committed with state delta `seq` (overwrites).
    #[cfg(test)]
    pub(crate) fn insert(&self, key: Vec<u8>, entry: Entry, seq: u64) {
        self.insert_all([(key, entry)], seq);
    }

    /// Records the values one commit wrote, as state delta `seq` (overwrites), under one lock.
    pub(crate) fn insert_all(&self, writes: impl IntoIterator<Item = (Vec<u8>, Entry)>, seq: u64) {
        let mut g = self.inner.write();
        for (key, entry) in writes {
            // Before the put (a rotation it makes carries the sequence into `cold`) and after
            // it (the new `hot` may hold this commit's key).
            g.hot_seq = g.hot_seq.max(seq + 1);
            self.put(&mut g, key, entry, true);
            g.hot_seq = g.hot_seq.max(seq + 1);
        }
    }

    /// Every delta below `seq` is folded into the per-key entries.
    pub(crate) fn compacted_below(&self, seq: u64) {
        let mut g = self.inner.write();
        g.compacted = g.compacted.max(seq);
    }

    /// Puts an entry in `hot`, rotating the generations when `hot` would hold more than half
    /// the budget. A key is in one generation at most: in `hot` it is replaced where it is,
    /// else it leaves `cold` (`from_cold`; a reader's fill knows it is in neither).
    fn put(&self, g: &mut Generations, key: Vec<u8>, entry: Entry, from_cold: bool) {
        let size = entry_bytes(&key, &entry);
        if let Some(slot) = g.hot.get_mut(&key) {
            // Replaced in place (no remove and insert: most commits rewrite keys already hot).
            let old = std::mem::replace(slot, entry);
            g.hot_bytes = g.hot_bytes - entry_bytes(&key, &old) + size;
            if g.hot_bytes > self.budget / 2 {
                self.rotate(g); // the entry moves to `cold` with the rest, still cached
            }
            return;
        }
        if from_cold {
            if let Some(old) = g.cold.remove(&key) {
                g.cold_bytes -= entry_bytes(&key, &old);
            }
        }
        if g.hot_bytes + size > self.budget / 2 && !g.hot.is_empty() {
            self.rotate(g);
        }
        g.hot.insert(key, entry);
        g.hot_bytes += size;
    }

    /// `hot` becomes `cold` and the previous `cold` is dropped, unless it holds a commit not
    /// yet folded into the per-key entries.
    fn rotate(&self, g: &mut Generations) {
        if g.cold_seq > g.compacted {
            return;
        }
        g.cold = std::mem::take(&mut g.hot);
        g.cold_bytes = std::mem::take(&mut g.hot_bytes);
        g.cold_seq = std::mem::replace(&mut g.hot_seq, 0);
        g.evictions += 1;
    }
}

/// The [`ReadStamp`] of a key's committed state, as [`read_through`] finds it.
pub(crate) fn stamp_through(
    cache: &StateCache,
    store: &dyn PluginStore,
    plugin: &str,
    key: &[u8],
) -> Result<ReadStamp, LogError> {
    match cache.stamp(key) {
        Some(stamp) => Ok(stamp),
        None => Ok(ReadStamp::of(
            read_through(cache, store, plugin, key)?.as_ref(),
        )),
    }
}

/// Committed state of a key: from the cache, else from the store (then cached if still
/// absent from the cache and nothing was evicted meanwhile). Nothing is cached from a failed
/// read.
pub(crate) fn read_through(
    cache: &StateCache,
    store: &dyn PluginStore,
    plugin: &str,
    key: &[u8],
) -> Result<Entry, LogError> {
    if let Some(hit) = cache.get(key) {
        return Ok(hit);
    }
    let evictions = cache.evictions();
    let stored = store.state(plugin, key)?;
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
        assert_eq!(
            cache.stamp(b"j"),
            Some(ReadStamp::of(None)),
            "cached as absent"
        );
        cache.insert(b"j".to_vec(), Some((b"new".to_vec(), 1)), 0);
        assert_eq!(cache.fill(b"j", None, now), Some((b"new".to_vec(), 1)));
        let new = (b"new".to_vec(), 1);
        assert_eq!(cache.stamp(b"j"), Some(ReadStamp::of(Some(&new))));
        assert_ne!(
            ReadStamp::of(Some(&new)),
            ReadStamp::of(Some(&(b"old".to_vec(), 1))),
            "one version, two values: two stamps"
        );
        assert_eq!(cache.stamp(b"k"), None, "not cached");
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

    #[test]
    fn a_commit_whose_writes_straddle_a_rotation_keeps_every_key_until_compacted() {
        let cache = StateCache::new(4096);
        cache.compacted_below(1);
        for i in 0..20u32 {
            cache.insert(i.to_be_bytes().to_vec(), Some((vec![0; 10], 1)), 0);
        }
        // Delta 3 rewrites a hot key with a value that fills `hot` (an in-place replacement
        // that rotates) and writes new keys after the rotation: all of it stays cached, through
        // any number of later commits, until delta 3 is compacted.
        let big = (0u32.to_be_bytes().to_vec(), Some((vec![1; 2100], 2)));
        let writes: Vec<_> = std::iter::once(big.clone())
            .chain((100..140u32).map(|i| (i.to_be_bytes().to_vec(), Some((vec![3; 10], 1)))))
            .collect();
        cache.insert_all(writes.clone(), 3);
        for i in 0..2000u32 {
            cache.insert((i + 5000).to_be_bytes().to_vec(), Some((vec![0; 10], 1)), 0);
        }
        for (key, entry) in &writes {
            assert_eq!(
                cache.get(key),
                Some(entry.clone()),
                "key {key:?} of delta 3"
            );
        }
        cache.compacted_below(4);
        for i in 0..2000u32 {
            cache.insert((i + 9000).to_be_bytes().to_vec(), Some((vec![0; 10], 1)), 0);
        }
        assert_eq!(cache.get(&big.0), None, "evicted once compacted");
    }
}
