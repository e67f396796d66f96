//! Cluster mode: every node knows every plugin (the registry is replicated) and runs the
//! ones whose lease it holds. Once a second each node brings its plugins in line with the
//! registry (deployed, upgraded, paused, resumed or removed through another node), writes its
//! heartbeat, takes the leases of plugins whose node died, and starts or stops what changed.
//! A node that held a plugin for a while gives it back when a joining node is preferred, so
//! plugins spread again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{blocking, PluginManager};
use crate::request::ManagerError;
use crate::runtime::PartitionState;

/// How often a node looks at the cluster.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// A node keeps a plugin at least this long before giving it to a preferred node (no
/// ping-pong while nodes come and go).
const MIN_HOLD: Duration = Duration::from_secs(10);

impl PluginManager {
    /// Cluster mode: follows the registry and the leases until `shutdown` (a no-op on a
    /// single node).
    pub async fn run_cluster(self: Arc<Self>, shutdown: CancellationToken) {
        if self.seams.cluster.is_none() {
            return;
        }
        loop {
            if let Err(e) = self.reconcile().await {
                tracing::warn!(message = "Following the cluster's plugins failed; retrying.", error = %e);
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One look at the cluster: the registry, then the leases.
    pub(crate) async fn reconcile(&self) -> Result<(), ManagerError> {
        let Some(membership) = self.seams.cluster.clone() else {
            return Ok(());
        };
        let _admin = self.admin.lock().await;
        let store = self.seams.store.clone();
        let specs = blocking(move || Ok(store.specs()?)).await?;
        let known: Vec<String> = self.plugins.lock().keys().cloned().collect();
        for name in &known {
            if !specs.iter().any(|s| &s.name == name) {
                tracing::info!(message = "Plugin removed through another node.", plugin = %name);
                self.stop(name).await;
                self.active.lock().remove(name);
                self.seams.store.release(name);
            }
        }
        for spec in &specs {
            let local = self.spec(&spec.name).ok();
            match local {
                None => {
                    let compiled = self.load_compiled(spec).await?;
                    self.start(spec.clone(), Arc::new(compiled)).await?;
                }
                Some(l) if l.version != spec.version || l.wasm_sha256 != spec.wasm_sha256 => {
                    tracing::info!(message = "Plugin upgraded through another node.", plugin = %spec.name, version = spec.version);
                    let compiled = self.load_compiled(spec).await?;
                    self.stop(&spec.name).await;
                    self.start(spec.clone(), Arc::new(compiled)).await?;
                }
                Some(l) if l.paused != spec.paused => {
                    if let Ok(rt) = self.runtime(&spec.name) {
                        rt.paused.send_replace(spec.paused);
                    }
                }
                Some(_) => {}
            }
        }

        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let release: Vec<String> = {
            let view = self.view.lock();
            self.active
                .lock()
                .iter()
                .filter(|(name, since)| {
                    since.elapsed() >= MIN_HOLD
                        && view
                            .preferred(name)
                            .is_some_and(|p| p != membership.node.as_str())
                })
                .map(|(name, _)| name.clone())
                .collect()
        };
        let (m, n, r) = (membership.clone(), names.clone(), release.clone());
        let view = blocking(move || Ok(m.tick(&n, &r)?)).await?;
        *self.view.lock() = view.clone();

        for name in &names {
            let mine = view.leases.get(name) == Some(&membership.node);
            let active = self.active.lock().contains_key(name);
            if mine && !(active && self.seams.store.held(name)) {
                self.activate(name).await?;
            } else if !mine && active {
                match view.describe_holder(name) {
                    Some(node) if release.contains(name) => {
                        tracing::info!(message = "Plugin handed over to the node preferred for it.", plugin = %name, node)
                    }
                    Some(node) => {
                        tracing::warn!(message = "Another node runs this plugin now (this node was paused or cut off past its lease); what it had not committed is dropped.", plugin = %name, node)
                    }
                    None if release.contains(name) => {
                        tracing::info!(message = "Plugin handed over to the node preferred for it.", plugin = %name)
                    }
                    None => {
                        tracing::warn!(message = "This node lost its lease of a plugin; another node will take it.", plugin = %name)
                    }
                }
                self.deactivate(name).await?;
            } else if !mine {
                self.refresh_standby(name, &view).await;
            }
        }
        Ok(())
    }

    /// Starts running a plugin this node took the lease of: reads what other nodes
    /// committed, fences them out, opens it from there.
    async fn activate(&self, name: &str) -> Result<(), ManagerError> {
        let (spec, plugin) = (self.spec(name)?, self.runtime(name)?.plugin.clone());
        let started = Instant::now();
        self.stop(name).await;
        let (store, owned) = (self.seams.store.clone(), name.to_string());
        if let Err(e) = blocking(move || Ok(store.acquire(&owned)?)).await {
            self.start(spec, plugin).await?;
            return Err(e);
        }
        self.active.lock().insert(name.to_string(), Instant::now());
        self.start(spec, plugin).await?;
        tracing::info!(message = "Plugin taken over: this node runs it now.", plugin = %name, took_ms = started.elapsed().as_millis() as u64);
        Ok(())
    }

    /// Stops running a plugin another node holds now; keeps it open for queries.
    async fn deactivate(&self, name: &str) -> Result<(), ManagerError> {
        let (spec, plugin) = (self.spec(name)?, self.runtime(name)?.plugin.clone());
        self.stop(name).await;
        self.active.lock().remove(name);
        self.seams.store.release(name);
        self.start(spec, plugin).await
    }

    /// What a plugin another node runs looks like now: its committed cursors and its node.
    async fn refresh_standby(&self, name: &str, view: &crate::cluster::View) {
        let Ok(runtime) = self.runtime(name) else {
            return;
        };
        let where_ = match view.describe_holder(name) {
            Some(node) => format!("runs on node {node}"),
            None => "waiting for a node to take it".to_string(),
        };
        let rt = runtime.clone();
        let cursors = blocking(move || {
            (0..rt.spec.partitions())
                .map(|p| Ok(rt.seams.store.cursor(&rt.spec.name, p)?))
                .collect::<Result<Vec<_>, ManagerError>>()
        })
        .await;
        let mut status = runtime.status.lock();
        for (p, s) in status.iter_mut().enumerate() {
            if let Ok(cursors) = &cursors {
                let c = &cursors[p];
                (s.committed, s.processed, s.skipped, s.dead_lettered) =
                    (c.next, c.processed, c.skipped, c.dead_lettered);
            }
            s.state = PartitionState::Standby(where_.clone());
        }
    }
}
