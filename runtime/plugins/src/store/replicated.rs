//! The plugin store of cluster mode ([`ReplicatedPluginStore`]): several nodes write the
//! registry, and a plugin's namespace is written only by the node holding it
//! ([`ReplicatedKv`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use weir_log::{KvStore, Landing, LogError, ReplicatedKv};

use super::codec::Cursor;
use super::keys::{namespace, REGISTRY};
use super::kv::{KvPluginStore, Namespaces, Writes};
use super::PluginStore;
use crate::spec::PluginSpec;

/// The cluster's namespaces: the replicated changelogs every node shares.
pub struct Shared(Arc<ReplicatedKv>);

/// The plugin store of cluster mode.
pub type ReplicatedPluginStore = KvPluginStore<Shared>;

impl KvPluginStore<Shared> {
    /// The store on changelogs shared by every node (the registry shared, each plugin's
    /// namespace owned by the node running it).
    pub fn replicated(kv: Arc<ReplicatedKv>) -> Self {
        KvPluginStore::on(Shared(kv))
    }

    /// The namespaces a node must acquire before writing them ([`ReplicatedKv::new`]).
    pub const OWNED_PREFIX: &'static str = "plugin/";
}

impl Namespaces for Shared {
    fn kv(&self) -> &dyn KvStore {
        &*self.0
    }

    fn read_at_once<T>(
        &self,
        ns: &str,
        read: impl FnOnce(&dyn KvStore) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        self.0.read_at_once(ns, read)
    }

    fn replace_spec(
        store: &KvPluginStore<Self>,
        spec: &PluginSpec,
        previous: &PluginSpec,
    ) -> Result<(), LogError> {
        replace_spec(&store.namespaces.0, spec, previous)
    }

    fn create(
        store: &KvPluginStore<Self>,
        spec: &PluginSpec,
        cursors: &[Cursor],
    ) -> Result<(), LogError> {
        create(store, &store.namespaces.0, spec, cursors)
    }

    fn drop_removed(&self, plugin: &str) -> Result<(), LogError> {
        drop_removed(&self.0, plugin)
    }

    fn acquire(&self, plugin: &str) -> Result<(), LogError> {
        self.0.acquire(&namespace(plugin))
    }

    fn release(&self, plugin: &str) {
        self.0.release(&namespace(plugin))
    }

    fn confirm_held(&self, plugin: &str) -> Result<bool, LogError> {
        self.0.confirm_held(&namespace(plugin))
    }

    fn held(&self, plugin: &str) -> bool {
        self.0.held(&namespace(plugin))
    }

    fn after_compaction(&self, plugin: &str) -> Result<(), LogError> {
        let ns = namespace(plugin);
        // A node that lost the plugin has nothing to snapshot (its commits are refused too).
        if !self.0.held(&ns) {
            return Ok(());
        }
        self.0.snapshot_if_due(&ns).map(|_| ())
    }

    fn commit_writes(&self, ns: &str, writes: Writes) -> Result<Option<Landing>, LogError> {
        self.0.begin(ns, writes)
    }

    fn land(&self, landing: &Landing) -> Result<(), LogError> {
        self.0.land(landing)
    }

    fn queues_commits(&self) -> bool {
        true
    }
}

fn stored_spec(now: &BTreeMap<Vec<u8>, Bytes>, name: &str) -> Option<PluginSpec> {
    now.get(name.as_bytes())
        .and_then(|v| serde_json::from_slice(v).ok())
}

/// [`PluginStore::replace_spec`]: a compare-and-set on the registry.
fn replace_spec(
    r: &ReplicatedKv,
    spec: &PluginSpec,
    previous: &PluginSpec,
) -> Result<(), LogError> {
    let json = serde_json::to_vec(spec).expect("spec serialises");
    let written = r.update(REGISTRY, |now| {
        stored_spec(now, &spec.name)
            .filter(|s| {
                // The same deployment (its producer ids), version, code, pause and restart
                // count as the node saw.
                (
                    s.version,
                    &s.wasm_sha256,
                    s.paused,
                    s.restarts,
                    &s.producer_ids,
                ) == (
                    previous.version,
                    &previous.wasm_sha256,
                    previous.paused,
                    previous.restarts,
                    &previous.producer_ids,
                )
            })
            .map(|_| vec![(spec.name.as_bytes().to_vec(), Some(json.clone()))])
    })?;
    match written {
        true => Ok(()),
        false => Err(LogError::Conflict {
            what: format!("plugin {}", spec.name),
        }),
    }
}

/// [`PluginStore::create`] for a caller that acquired the plugin's namespace.
///
/// A remove of an earlier plugin of the name, through a node not running it, drops the
/// namespace unless the registry has the name (`drop_unless`), and the spec is written after
/// the reset: the drop may land before the reset or between it and the spec. An empty entry
/// fenced on the reset, after the spec, says it did not; if it did (the hold is lost), the
/// namespace is acquired and reset again (the registry has the name now, so a remove still
/// under way leaves it alone). If it cannot be completed, the spec is taken back: never a
/// spec without its starting cursors.
fn create(
    store: &ReplicatedPluginStore,
    r: &ReplicatedKv,
    spec: &PluginSpec,
    cursors: &[Cursor],
) -> Result<(), LogError> {
    let ns = namespace(&spec.name);
    let mut spec_tried = false;
    let mut result = Ok(());
    for _ in 0..10 {
        result = store.reset(&spec.name, cursors).and_then(|()| {
            if !spec_tried {
                spec_tried = true;
                store.put_spec(spec)?;
            }
            r.kv_apply(&ns, &[])
        });
        if !matches!(result, Err(LogError::NotHeld { .. })) {
            break;
        }
        if let Err(e) = r.acquire(&ns) {
            result = Err(e);
            break;
        }
    }
    if result.is_err() && spec_tried {
        take_back(r, spec);
    }
    result
}

/// Deletes the spec of a deployment that could not be completed, if the registry still has
/// this deployment (its producer ids). Best effort.
fn take_back(r: &ReplicatedKv, spec: &PluginSpec) {
    let key = spec.name.as_bytes().to_vec();
    let undone = r.update(REGISTRY, |now| {
        stored_spec(now, &spec.name)
            .is_some_and(|s| s.producer_ids == spec.producer_ids)
            .then(|| vec![(key.clone(), None)])
    });
    if let Err(e) = undone {
        tracing::warn!(message = "A failed deployment's spec could not be taken back; remove the plugin.", plugin = %spec.name, error = %e);
    }
}

/// Drops a removed plugin's namespace (its spec is already deleted). Through a node that
/// does not run it, the drop is fenced on what this node read and skipped when the name has
/// been deployed again meanwhile (that deployment's reset must not be wiped); if it cannot
/// land, the namespace is left to the next deployment of the name, which resets it.
fn drop_removed(r: &ReplicatedKv, plugin: &str) -> Result<(), LogError> {
    let ns = namespace(plugin);
    if r.held(&ns) {
        return r.kv_drop(&ns);
    }
    let name = plugin.as_bytes();
    if let Err(e) = r.drop_unless(&ns, || Ok(r.kv_get(REGISTRY, name)?.is_some())) {
        tracing::warn!(message = "A removed plugin's state could not be dropped; the next deployment of the name resets it.", plugin = %plugin, error = %e);
    }
    Ok(())
}
