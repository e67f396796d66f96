//! Moving a plugin from a node's store into a cluster's (`weir migrate`).

use weir_log::{KvStore, LogError, ReplicatedKv};

use super::keys::{namespace, REGISTRY};
use crate::spec::PluginSpec;

/// Copies a plugin — everything its namespace holds (cursors, state, deltas, message ids,
/// outbox, output sequences, log), then its spec — from a node's store into the replicated
/// store of a cluster (`weir migrate`). The namespace is written after a takeover, as a reset
/// followed by entries of at most ~4 MiB; the spec last, so nodes see the plugin once its
/// state is there. Returns the keys copied. Blocking.
///
/// # Errors
/// Either store failed.
pub fn copy_plugin(
    from: &dyn KvStore,
    to: &ReplicatedKv,
    spec: &PluginSpec,
) -> Result<usize, LogError> {
    let ns = namespace(&spec.name);
    let entries = from.kv_scan(&ns, b"")?;
    to.acquire(&ns)?;
    to.kv_drop(&ns)?;
    let mut batch: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut bytes = 0;
    for (k, v) in &entries {
        bytes += k.len() + v.len();
        batch.push((k.to_vec(), Some(v.to_vec())));
        if bytes >= 4 << 20 {
            to.kv_apply(&ns, &std::mem::take(&mut batch))?;
            bytes = 0;
        }
    }
    if !batch.is_empty() {
        to.kv_apply(&ns, &batch)?;
    }
    to.release(&ns);
    let json = serde_json::to_vec(spec).expect("spec serialises");
    to.kv_apply(REGISTRY, &[(spec.name.as_bytes().to_vec(), Some(json))])?;
    Ok(entries.len())
}
