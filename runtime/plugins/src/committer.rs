//! A plugin's shared commit state: the commit lock, the committed-state cache, the message
//! ids within the dedup window, the next state-delta sequence. One per plugin, shared by its
//! partitions (see `commit` for how a batch uses it).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::Mutex;
use weir_log::LogError;
use weir_wasm::StateReader;

use crate::cache::{read_through, StateCache};
use crate::dedup::DedupIndex;
use crate::store::{DedupKey, PluginStore};

/// A plugin's shared commit state: the lock, the state cache, the message ids, the next
/// state-delta sequence.
pub(crate) struct Committer {
    pub(crate) lock: Mutex<()>,
    pub(crate) cache: Arc<StateCache>,
    pub(crate) dedup: Mutex<DedupIndex>,
    pub(crate) next_delta: AtomicU64,
    /// Cluster mode: why a commit queued for the changelog did not land, once one did not.
    /// Memory (the cache, cursors, ids) ran ahead of the changelog on it, so no later commit
    /// of this runtime may be made; the plugin runs again from the changelog after a takeover.
    pub(crate) lost: Mutex<Option<String>>,
}

impl Committer {
    pub(crate) fn new(
        cache_bytes: usize,
        next_delta: u64,
        stored_ids: Vec<(DedupKey, i64, Vec<u64>)>,
    ) -> Self {
        let mut dedup = DedupIndex::default();
        for (key, newest, ids) in stored_ids {
            dedup.insert(key, newest, ids);
        }
        Committer {
            lock: Mutex::new(()),
            cache: Arc::new(StateCache::new(cache_bytes)),
            dedup: Mutex::new(dedup),
            next_delta: AtomicU64::new(next_delta),
            lost: Mutex::new(None),
        }
    }

    /// Reads `plugin`'s committed state for its instances.
    pub(crate) fn reader(&self, store: &Arc<dyn PluginStore>, plugin: &str) -> StateReader {
        let (store, plugin, cache) = (store.clone(), plugin.to_string(), self.cache.clone());
        Arc::new(move |key: &[u8]| {
            read_through(&cache, &*store, &plugin, key).map_err(|e| e.to_string())
        })
    }

    /// Committed state of a key of `plugin`. Blocking.
    pub(crate) fn state(
        &self,
        store: &dyn PluginStore,
        plugin: &str,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, u64)>, LogError> {
        read_through(&self.cache, store, plugin, key)
    }
}
