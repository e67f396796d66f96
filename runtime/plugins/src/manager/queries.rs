//! What the plugin manager answers about its plugins: specs, status, logs, state, pending
//! outputs. Reads only.

use super::{blocking, PluginManager};
use crate::request::{ManagerError, PluginInfo};
use crate::spec::PluginSpec;

impl PluginManager {
    /// The principal that deployed a plugin.
    ///
    /// # Errors
    /// Unknown plugin.
    pub fn owner(&self, name: &str) -> Result<Option<String>, ManagerError> {
        Ok(self.runtime(name)?.spec.owner.clone())
    }

    /// A running plugin's spec, paused as it is now.
    pub(super) fn spec(&self, name: &str) -> Result<PluginSpec, ManagerError> {
        let runtime = self.runtime(name)?;
        let mut spec = runtime.spec.clone();
        spec.paused = *runtime.paused.borrow();
        Ok(spec)
    }

    /// One plugin's spec and partition status.
    ///
    /// # Errors
    /// Unknown plugin.
    pub fn info(&self, name: &str) -> Result<PluginInfo, ManagerError> {
        let (spec, runtime) = (self.spec(name)?, self.runtime(name)?);
        let partitions = runtime.status.lock().clone();
        let node = match &self.seams.cluster {
            None => None,
            Some(m) if self.is_active(name) => Some(format!("{} ({})", m.node, m.addr)),
            Some(_) => self.view.lock().describe_holder(name),
        };
        Ok(PluginInfo {
            spec,
            partitions,
            state_cache_bytes: runtime.committer.cache.bytes() as u64,
            node,
        })
    }

    /// The input offset below which a plugin has committed every record of `partition`
    /// (`None`: it has no such partition). Where it runs, from its running state; on a node
    /// that does not run it, read from the changelog's tail rather than from the view
    /// refreshed every second, so `--after` through any node stops answering pending as soon
    /// as the commit landed.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub async fn committed(&self, name: &str, partition: u32) -> Result<Option<u64>, ManagerError> {
        let runtime = self.runtime(name)?;
        let Some(known) = runtime
            .status
            .lock()
            .get(partition as usize)
            .map(|s| s.committed)
        else {
            return Ok(None);
        };
        if self.serves_from_memory(name).await? {
            return Ok(Some(known));
        }
        let cursor =
            blocking(move || Ok(runtime.seams.store.cursor(&runtime.spec.name, partition)?))
                .await?;
        // The tail is authoritative (the view may still be of a deployment since removed).
        Ok(Some(cursor.next))
    }

    /// Whether this node may answer for `name` from what it runs: it runs the plugin and, in
    /// cluster mode, still holds its changelog as of its end. A node paused past its lease
    /// (a zombie that has not noticed yet) would answer from a state another node has moved
    /// on from; it reads the changelog's tail instead (and stops holding the plugin).
    async fn serves_from_memory(&self, name: &str) -> Result<bool, ManagerError> {
        if !self.is_active(name) {
            return Ok(false);
        }
        if self.seams.cluster.is_none() {
            return Ok(true);
        }
        let (store, owned) = (self.seams.store.clone(), name.to_string());
        blocking(move || Ok(store.confirm_held(&owned)?)).await
    }

    /// Cluster mode: whether no live node has run `name` for longer than the lease time-out
    /// (as this node's last look at the cluster saw it); a live node takes it over.
    pub fn unowned(&self, name: &str) -> bool {
        self.seams.cluster.as_ref().is_some_and(|m| m.unowned(name))
    }

    /// Every plugin.
    pub fn list(&self) -> Vec<PluginInfo> {
        let names: Vec<String> = self.plugins.lock().keys().cloned().collect();
        names.iter().filter_map(|n| self.info(n).ok()).collect()
    }

    /// A plugin's log lines, oldest first.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub async fn logs(&self, name: &str) -> Result<Vec<String>, ManagerError> {
        let runtime = self.runtime(name)?;
        blocking(move || Ok(runtime.log_lines()?)).await
    }

    /// Every committed state entry of a plugin: (key, value, version), in key order.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub async fn state_entries(
        &self,
        name: &str,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>, u64)>, ManagerError> {
        let runtime = self.runtime(name)?;
        blocking(move || Ok(runtime.seams.store.state_entries(&runtime.spec.name)?)).await
    }

    /// Outbox entries (batches of outputs) committed but not yet forwarded.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub async fn pending_outputs(&self, name: &str) -> Result<usize, ManagerError> {
        let runtime = self.runtime(name)?;
        blocking(move || Ok(runtime.seams.store.pending_outputs(&runtime.spec.name)?)).await
    }

    /// A committed state value and its version.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub async fn state_get(
        &self,
        name: &str,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, u64)>, ManagerError> {
        let (runtime, key) = (self.runtime(name)?, key.to_vec());
        if !self.serves_from_memory(name).await? || self.seams.cluster.is_some() {
            // Another node runs it: read what it committed (this node's cache of it may be
            // behind; the store reads the changelog's tail first). Or this node runs it in
            // cluster mode: its memory runs ahead of the changelog by the commits queued to
            // land (group commit), and an answer shows only what landed.
            return blocking(move || {
                Ok(runtime.seams.store.state_now(&runtime.spec.name, &key)?)
            })
            .await;
        }
        blocking(move || {
            Ok(runtime
                .committer
                .state(&*runtime.seams.store, &runtime.spec.name, &key)?)
        })
        .await
    }
}
