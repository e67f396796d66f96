//! Cluster mode: every node knows every plugin (the registry is replicated) and runs the
//! ones whose lease it holds. A heartbeat task says every second that the node lives (only
//! while its cluster loop works, or no other node lives: a node that cannot follow the
//! cluster must not keep leases alive that others could act on); once a second the cluster loop takes the leases of plugins whose node died, brings the node's
//! plugins in line with the registry (deployed, upgraded, paused, resumed or removed through
//! another node), and starts or stops what changed. A node that held a plugin for a while
//! gives it back when a joining node is preferred, so plugins spread again. A failure about
//! one plugin is logged and retried at the next tick; it never stops the loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::placement::START_FAILURES;
use super::{blocking, PluginManager};
use crate::request::ManagerError;
use crate::runtime::PartitionState;
use crate::spec::PluginSpec;

/// How often a node looks at the cluster.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// A node whose every look at the cluster has failed for this long stops heartbeating while
/// another node is live: it holds leases it cannot act on (a deploy, a removal or a takeover
/// through another node never reaches it), and while it beats no other node may take them.
/// Once it is dead to the others their loops take its plugins; its heartbeat returns with its
/// first good look. (Alone, it beats on: stepping down would hand nothing to anyone.)
const LOOP_FAILING_LIMIT: Duration = Duration::from_millis(crate::cluster::NODE_TTL_MS as u64);
/// A look at the cluster's registry and leases that has not answered for this long counts
/// as failing too (a read that hangs instead of timing out). Longer than the limit above: a
/// slow read on a loaded engine is not a failure.
const LOOK_HANGS_LIMIT: Duration = Duration::from_millis(2 * crate::cluster::NODE_TTL_MS as u64);

impl PluginManager {
    /// Cluster mode: the heartbeat and the cluster loop until `shutdown` (a no-op on a single
    /// node).
    pub async fn run_cluster(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(membership) = self.seams.cluster.clone() else {
            return;
        };
        // Its own task: compiling a plugin or taking several over must not delay it past the
        // time after which the others think this node dead.
        let beat = shutdown.clone();
        let manager = self.clone();
        tokio::spawn(async move {
            let mut withheld = false;
            loop {
                let failing = manager.loop_stalled();
                let m = membership.clone();
                let step_down = match failing {
                    Some(_) => !matches!(
                        weir_core::blocking::run(move || m.others_live()).await,
                        Ok(Ok(false))
                    ),
                    None => false,
                };
                match failing {
                    Some(for_) if step_down => {
                        if !withheld {
                            tracing::warn!(message = "This node's look at the cluster has failed for longer than the lease time-out: it stops heartbeating, so live nodes take the plugins it holds (it runs them until their new holder fences it), until a look works again.", failing_ms = for_.as_millis() as u64);
                        }
                        membership.withhold();
                        withheld = true;
                    }
                    _ => {
                        if withheld && failing.is_none() {
                            tracing::info!(message = "This node's look at the cluster works again: it heartbeats again.");
                        } else if withheld {
                            tracing::warn!(message = "This node's look at the cluster still fails, but no other node is live: it heartbeats again and keeps its plugins.");
                        }
                        withheld = false;
                        let m = membership.clone();
                        if let Ok(Err(e)) = weir_core::blocking::run(move || m.heartbeat()).await {
                            tracing::debug!(message = "Heartbeat not written; retrying.", error = %e);
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = beat.cancelled() => return,
                }
            }
        });
        loop {
            // A look cut short at shutdown is as a crash there: leases lapse, and the node
            // that takes a plugin over fences this one's writes.
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                result = self.reconcile() => result,
            };
            // Set once the admin lock was taken (a deploy holding it is not the look's
            // failure), cleared after the leases' tick.
            let began = self.looking_since.lock().take();
            match result {
                Ok(()) => *self.failing_since.lock() = None,
                Err(e) => {
                    // Failing since the failed look began: a read that timed out after 10 s
                    // has been failing for 10 s (counting from its answer would let the
                    // node beat again between the hang limit and this limit).
                    self.failing_since
                        .lock()
                        .get_or_insert(began.unwrap_or_else(Instant::now));
                    tracing::warn!(message = "Following the cluster's plugins failed; retrying.", error = %e);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// For how long this node's cluster loop has failed or hung, once past its limit.
    fn loop_stalled(&self) -> Option<Duration> {
        let failing = self.failing_since.lock().map(|since| since.elapsed());
        let hanging = self.looking_since.lock().map(|since| since.elapsed());
        match (failing, hanging) {
            (Some(f), _) if f >= LOOP_FAILING_LIMIT => Some(f),
            (_, Some(h)) if h >= LOOK_HANGS_LIMIT => Some(h),
            _ => None,
        }
    }

    /// One look at the cluster: the leases, the registry, then what to run.
    pub(crate) async fn reconcile(&self) -> Result<(), ManagerError> {
        let Some(membership) = self.seams.cluster.clone() else {
            return Ok(());
        };
        let _admin = self.admin.lock().await;
        *self.looking_since.lock() = Some(Instant::now());
        let store = self.seams.store.clone();
        let specs = blocking(move || Ok(store.specs()?)).await?;
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let release = {
            let view = self.view.lock();
            self.placement.to_release(&membership, &view, &names)
        };
        let (m, n, r) = (membership.clone(), names.clone(), release.clone());
        let view = blocking(move || Ok(m.tick(&n, &r)?)).await?;
        *self.looking_since.lock() = None;
        *self.view.lock() = view.clone();

        let known: Vec<String> = self.plugins.lock().keys().cloned().collect();
        for name in known.iter().filter(|n| !names.contains(n)) {
            tracing::info!(message = "Plugin removed through another node.", plugin = %name);
            self.unlist(name).await;
            self.give_back(name);
        }
        // What a deploy through this node cut short left taken (no spec, so not listed).
        self.placement.forget_undeployed(&names);
        for spec in &specs {
            if let Err(e) = self.follow_spec(spec).await {
                tracing::warn!(message = "Cannot open a plugin deployed or changed through another node; retrying.", plugin = %spec.name, error = %e);
            }
        }
        for name in &names {
            let mine = view.leases.get(name) == Some(&membership.node);
            let result = if mine && !self.is_active(name) {
                self.activate(name).await
            } else if !mine && self.placement.taken(name) {
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
                self.deactivate(name).await
            } else {
                if !mine {
                    self.refresh_standby(name, &view).await;
                }
                Ok(())
            };
            if let Err(e) = result {
                if !self.placement.given_up(name) {
                    tracing::warn!(message = "Starting or stopping a plugin failed; retrying.", plugin = %name, error = %e);
                }
            }
        }
        Ok(())
    }

    /// Brings this node's copy of a plugin in line with the registry's spec.
    async fn follow_spec(&self, stored: &PluginSpec) -> Result<(), ManagerError> {
        let spec = self.bounded(stored.clone(), false);
        let Ok(local) = self.spec(&spec.name) else {
            let compiled = self.load_compiled(&spec).await?;
            return self.start(spec, Arc::new(compiled)).await;
        };
        let same = |mut a: PluginSpec, b: &PluginSpec| {
            a.paused = b.paused;
            a == *b
        };
        if !same(local.clone(), &spec) {
            // Upgraded, or removed and deployed again, through another node.
            tracing::info!(message = "Plugin changed through another node.", plugin = %spec.name, version = spec.version);
            let plugin: Arc<dyn crate::processor::Plugin> = if local.wasm_sha256 == spec.wasm_sha256
            {
                self.runtime(&spec.name)?.plugin.clone()
            } else {
                Arc::new(self.load_compiled(&spec).await?)
            };
            self.stop(&spec.name).await;
            if local.producer_ids != spec.producer_ids {
                // Removed and deployed again: its store was reset by another node, whatever
                // this node's cache says. It runs here again only after a takeover.
                self.give_back(&spec.name);
            }
            return self.start(spec, plugin).await;
        }
        if local.paused != spec.paused {
            self.runtime(&spec.name)?.paused.send_replace(spec.paused);
        }
        Ok(())
    }

    /// Starts running a plugin this node took the lease of: reads what other nodes
    /// committed, fences them out, opens it from there. A failure is counted: after
    /// [`START_FAILURES`] in a row the node gives the lease up for a while.
    pub(crate) async fn activate(&self, name: &str) -> Result<(), ManagerError> {
        let (spec, plugin) = match (self.spec(name), self.runtime(name)) {
            (Ok(spec), Ok(runtime)) => (spec, runtime.plugin.clone()),
            // Not open on this node (its code could not be loaded here): a failure to start
            // it like any other, or this live node would keep a lease it never acts on.
            (Err(e), _) | (_, Err(e)) => {
                self.failed_to_start(name, &e);
                return Err(e);
            }
        };
        let started = Instant::now();
        self.stop(name).await;
        let (placement, owned) = (self.placement.clone(), name.to_string());
        let taken = blocking(move || Ok(placement.take(&owned)?)).await;
        let result = match taken {
            // Removed through another node meanwhile: given back.
            Ok(false) => Ok(()),
            Ok(true) => match self.start(spec.clone(), plugin.clone()).await {
                Ok(()) => {
                    self.placement.started(name);
                    tracing::info!(message = "Plugin taken over: this node runs it now.", plugin = %name, took_ms = started.elapsed().as_millis() as u64);
                    return Ok(());
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            // Not running after all (its store or code failed to open): not taken either (so
            // the standby copy below spawns nothing), and the next tick takes it over again.
            self.failed_to_start(name, e);
        }
        if let Err(standby) = self.start(spec, plugin).await {
            tracing::debug!(message = "The standby copy did not open either.", plugin = %name, error = %standby);
        }
        result
    }

    /// Counts a failed takeover (the store given back): after [`START_FAILURES`] in a row the
    /// next tick gives the lease up. Left counted as running, a plugin that failed to open
    /// was never retried while this live node kept the lease, and no node ran it.
    fn failed_to_start(&self, name: &str, error: &ManagerError) {
        let failures = self.placement.failed(name);
        if failures >= START_FAILURES {
            tracing::warn!(message = "This node cannot start a plugin it holds; it gives the lease up for another node to take.", plugin = %name, failures, error = %error);
        }
    }

    /// Stops running a plugin another node holds now; keeps it open for queries.
    async fn deactivate(&self, name: &str) -> Result<(), ManagerError> {
        let (spec, plugin) = (self.spec(name)?, self.runtime(name)?.plugin.clone());
        self.stop(name).await;
        self.give_back(name);
        self.start(spec, plugin).await
    }

    /// What a plugin another node runs looks like now: its committed cursors and its node.
    async fn refresh_standby(&self, name: &str, view: &crate::cluster::View) {
        let Ok(runtime) = self.runtime(name) else {
            return;
        };
        let unowned = self.seams.cluster.as_ref().is_some_and(|m| m.unowned(name));
        let where_ = match view.describe_holder(name) {
            Some(node) => format!("runs on node {node}"),
            None if unowned => {
                "no node has run it for longer than the lease time-out; a live node takes it over"
                    .to_string()
            }
            None => "waiting for a node to take it".to_string(),
        };
        let rt = runtime.clone();
        let cursors = blocking(move || {
            Ok(rt
                .seams
                .store
                .cursors(&rt.spec.name, rt.spec.partitions())?)
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

impl PluginManager {
    /// Cluster mode: this node stops running `name` and stops writing its store (it runs
    /// here again only after a takeover).
    pub(super) fn give_back(&self, name: &str) {
        self.placement.give_back(name);
    }

    /// Cluster mode: gives back what this node held of a removed plugin, or of a failed
    /// deploy, and deletes its lease if `holder` still holds it (`None`: this node).
    pub(super) async fn forget_lease(&self, name: &str, holder: Option<String>) {
        let Some(cluster) = self.seams.cluster.clone() else {
            return;
        };
        self.give_back(name);
        let owned = name.to_string();
        let holder = holder.unwrap_or_else(|| cluster.node.clone());
        if let Err(e) = blocking(move || Ok(cluster.forget(&owned, &holder)?)).await {
            tracing::warn!(message = "Deleting a plugin's lease failed; it expires with this node.", plugin = %name, error = %e);
        }
    }
}
