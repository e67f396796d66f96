//! The plugin registry and lifecycle: deploy, upgrade, pause, resume, remove; restarting
//! every deployed plugin when the server opens. Specs live in the plugin store; wasm files in
//! `<data>/wasm/<sha256>.wasm` (synced before the spec that names them). Every store and file
//! access goes through [`weir_core::blocking::run`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weir_wasm::PluginEngine;

use crate::forwarder::Forwarder;
use crate::partition::PartitionTask;
use crate::processor::Plugin;
use crate::request::{ManagerError, PluginConfig, PluginInfo};
use crate::runtime::{PluginRuntime, Seams};
use crate::spec::PluginSpec;

mod cluster;
mod code;
mod deploy;
mod placement;
mod queries;

/// How long a cluster node's shutdown waits for its plugins' tasks.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs blocking manager work (store, files, compiling) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ManagerError> + Send + 'static,
) -> Result<T, ManagerError> {
    weir_core::blocking::run(f)
        .await
        .map_err(|e| ManagerError::Io(e.to_string()))?
}

struct Running {
    runtime: Arc<PluginRuntime>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Owns every deployed plugin.
pub struct PluginManager {
    engine: Arc<PluginEngine>,
    seams: Seams,
    wasm_dir: PathBuf,
    config: PluginConfig,
    plugins: Mutex<BTreeMap<String, Running>>,
    admin: tokio::sync::Mutex<()>,
    /// One deploy's or upgrade's compile at a time, outside the admin lock (which the cluster
    /// loop also takes): a flood of deploys does not compile many components at once.
    compiling: tokio::sync::Semaphore,
    /// Which plugins this node runs (all of them on one node; in cluster mode the others are
    /// open to answer queries only).
    placement: Arc<placement::Placement>,
    /// Cluster mode: what this node last saw of the cluster.
    view: Mutex<crate::cluster::View>,
    /// Cluster mode: since when every look at the cluster has failed (`None`: the last one
    /// worked). A node whose loop keeps failing stops heartbeating, so its leases lapse.
    failing_since: Mutex<Option<std::time::Instant>>,
    /// Cluster mode: since when the current look at the registry and leases has been waiting
    /// (`None`: not looking).
    looking_since: Mutex<Option<std::time::Instant>>,
}

impl PluginManager {
    /// Opens the registry under `data_dir` and starts every deployed plugin, caching compiled
    /// components in `compiled_dir`.
    ///
    /// # Errors
    /// The engine cannot start, or a stored plugin cannot be read or compiled.
    pub async fn open(
        data_dir: &std::path::Path,
        compiled_dir: &std::path::Path,
        seams: Seams,
        config: PluginConfig,
    ) -> Result<Arc<Self>, ManagerError> {
        let engine = PluginEngine::new(compiled_dir)?;
        let wasm_dir = data_dir.join("wasm");
        std::fs::create_dir_all(&wasm_dir)
            .map_err(|e| ManagerError::Io(format!("cannot create {}: {e}", wasm_dir.display())))?;
        let manager = Arc::new(PluginManager {
            engine,
            seams: seams.clone(),
            wasm_dir,
            config,
            plugins: Mutex::new(BTreeMap::new()),
            admin: Default::default(),
            compiling: tokio::sync::Semaphore::new(1),
            placement: Arc::new(placement::Placement::new(
                seams.store.clone(),
                seams.cluster.is_some(),
            )),
            view: Mutex::new(Default::default()),
            failing_since: Mutex::new(None),
            looking_since: Mutex::new(None),
        });
        for spec in manager.stored_specs().await? {
            let spec = manager.bounded(spec, true);
            // Plugins deployed before producer ownership was recorded: their producers become
            // the server's, so no client can fence or impersonate them.
            manager
                .seams
                .output
                .claim_producers(&spec.producer_ids)
                .await?;
            let compiled = manager.load_compiled(&spec).await?;
            let name = spec.name.clone();
            manager.start(spec, Arc::new(compiled)).await?;
            tracing::info!(message = "Plugin restarted.", plugin = %name);
        }
        Ok(manager)
    }

    /// The deployed plugins' specs. In cluster mode a node may start while the NATS cluster
    /// is still electing the leaders of weir's streams (a fresh cluster, or nodes started
    /// together): a read that gets no answer is tried again for up to a minute before the
    /// node gives up, the way it waits for the servers to accept its connection.
    async fn stored_specs(&self) -> Result<Vec<PluginSpec>, ManagerError> {
        const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let store = self.seams.store.clone();
            match blocking(move || Ok(store.specs()?)).await {
                Err(ManagerError::Storage(e @ weir_log::LogError::Engine { .. }))
                    if self.seams.cluster.is_some() && std::time::Instant::now() < deadline =>
                {
                    tracing::warn!(message = "The replicated log did not answer a read of the deployed plugins; trying again (a NATS cluster elects its leaders in seconds).", error = %e);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    }

    /// Whether this node runs `name` (always, outside cluster mode): it holds the lease and
    /// the plugin's store, and no write to it was refused or left uncertain since.
    pub(crate) fn is_active(&self, name: &str) -> bool {
        self.placement.runs(name)
    }

    /// A stored spec as this server runs it (its time limit at most the server's ceiling).
    fn bounded(&self, mut spec: PluginSpec, warn: bool) -> PluginSpec {
        if spec.limits.timeout > self.config.max_timeout {
            if warn {
                tracing::warn!(message = "A plugin's time limit is above --max-plugin-timeout-ms; it runs with the ceiling.", plugin = %spec.name, timeout_ms = spec.limits.timeout.as_millis() as u64, ceiling_ms = self.config.max_timeout.as_millis() as u64);
            }
            spec.limits.timeout = self.config.max_timeout;
        }
        spec
    }

    /// Opens a plugin; spawns its tasks if this node runs it.
    pub(crate) async fn start(
        &self,
        spec: PluginSpec,
        plugin: Arc<dyn Plugin>,
    ) -> Result<(), ManagerError> {
        let name = spec.name.clone();
        let active = self.is_active(&name);
        let (seams, cache) = (self.seams.clone(), self.config.state_cache_bytes);
        let runtime =
            blocking(move || Ok(PluginRuntime::open(spec, plugin, seams, cache, active)?)).await?;
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        if active {
            self.spawn_tasks(&runtime, &cancel, &tracker);
        }
        self.plugins.lock().insert(
            name,
            Running {
                runtime,
                cancel,
                tracker,
            },
        );
        Ok(())
    }

    /// A running plugin's tasks: per partition its loop and its forwarder, and the compactor.
    fn spawn_tasks(
        &self,
        runtime: &Arc<PluginRuntime>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let (name, partitions) = (&runtime.spec.name, runtime.spec.partitions());
        // Every event of a plugin's tasks carries the plugin and partition (publish → commit →
        // forward can be followed in the logs with WEIR_LOG=weir_plugins=debug).
        use tracing::Instrument as _;
        for p in 0..partitions {
            tracker.spawn(
                PartitionTask::new(runtime.clone(), p, cancel.clone())
                    .run()
                    .instrument(tracing::info_span!("consume", plugin = %name, partition = p)),
            );
            tracker.spawn(
                Forwarder::new(runtime.clone(), p)
                    .run(cancel.clone())
                    .instrument(tracing::info_span!("forward", plugin = %name, partition = p)),
            );
        }
        tracker.spawn(runtime.clone().run_compactor(cancel.clone()));
    }

    /// Stops a plugin's tasks. It stays listed, answering queries from what it committed,
    /// until [`PluginManager::start`] replaces it (a restart, an upgrade, a takeover: never
    /// "unknown plugin" in between) or [`PluginManager::unlist`] drops it.
    async fn stop(&self, name: &str) -> Option<Arc<PluginRuntime>> {
        let (runtime, cancel, tracker) = {
            let plugins = self.plugins.lock();
            let running = plugins.get(name)?;
            (
                running.runtime.clone(),
                running.cancel.clone(),
                running.tracker.clone(),
            )
        };
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        Some(runtime)
    }

    /// Stops a plugin and drops it from the list (removed, or the server stops).
    async fn unlist(&self, name: &str) {
        self.stop(name).await;
        self.plugins.lock().remove(name);
    }

    /// Stops every plugin (server shutdown): all are told at once, then waited for. In cluster
    /// mode for at most [`SHUTDOWN_WAIT`]: a task waiting on a replicated log whose servers are
    /// gone stops only when its request times out, and a stop cut short is as a crash (the
    /// node that takes the plugin over replays what was not committed).
    pub async fn shutdown(&self) {
        let running: Vec<(String, TaskTracker)> = {
            let plugins = self.plugins.lock();
            plugins
                .iter()
                .map(|(name, r)| {
                    r.cancel.cancel();
                    r.tracker.close();
                    (name.clone(), r.tracker.clone())
                })
                .collect()
        };
        let all = futures::future::join_all(running.iter().map(|(_, t)| t.wait()));
        if self.seams.cluster.is_some() {
            if tokio::time::timeout(SHUTDOWN_WAIT, all).await.is_err() {
                let waiting: Vec<&str> = running
                    .iter()
                    .filter(|(_, t)| !t.is_empty())
                    .map(|(name, _)| name.as_str())
                    .collect();
                tracing::warn!(message = "Plugins' tasks did not stop in time (the replicated log does not answer); the server stops without them, as a crash would stop them.", plugins = ?waiting, waited_ms = SHUTDOWN_WAIT.as_millis() as u64);
            }
        } else {
            all.await;
        }
        self.plugins.lock().clear();
    }

    /// Records a spec in place of `previous` and syncs it (under every fsync policy: specs
    /// are rare and must not be lost; a failed sync stops the server); in cluster mode only
    /// if the stored spec is still `previous` (another node may have changed it meanwhile).
    async fn save_spec(
        &self,
        spec: &PluginSpec,
        previous: &PluginSpec,
    ) -> Result<(), ManagerError> {
        let (seams, spec, previous) = (self.seams.clone(), spec.clone(), previous.clone());
        blocking(move || {
            seams.store.replace_spec(&spec, &previous)?;
            seams
                .durability
                .sync_now()
                .map_err(|e| ManagerError::Io(e.to_string()))
        })
        .await
    }

    /// Replaces a plugin's code; the new version continues at the committed offsets with the
    /// state kept.
    ///
    /// # Errors
    /// Unknown plugin, invalid or mismatched wasm (the old version keeps running).
    pub async fn upgrade(&self, name: &str, wasm: Bytes) -> Result<PluginInfo, ManagerError> {
        self.runtime(name)?;
        let compiled = self.compile(wasm.clone()).await?;
        let _admin = self.admin.lock().await;
        let mut spec = self.spec(name)?;
        self.save_wasm(&compiled.sha256, wasm, true).await?;
        let previous = self.runtime(name)?;
        spec.version += 1;
        spec.wasm_sha256 = compiled.sha256.clone();
        self.stop(name).await;
        self.replace(&previous, spec, Arc::new(compiled)).await?;
        tracing::info!(message = "Plugin upgraded.", plugin = %name, version = previous.spec.version + 1);
        self.info(name)
    }

    /// Saves `spec` and starts it in place of the stopped `previous`. On a failure the
    /// previous spec is saved and started again, so a failed upgrade or resume never leaves
    /// the plugin unknown; if even that fails, the next server start runs what is stored.
    async fn replace(
        &self,
        previous: &PluginRuntime,
        spec: PluginSpec,
        plugin: Arc<dyn Plugin>,
    ) -> Result<(), ManagerError> {
        let mut old = previous.spec.clone();
        old.paused = *previous.paused.borrow();
        let spec_saved = spec.clone();
        let (error, stored_new) = match self.save_spec(&spec, &old).await {
            Err(e) => (e, false),
            Ok(()) => match self.start(spec.clone(), plugin).await {
                Ok(()) => return Ok(()),
                Err(e) => (e, true),
            },
        };
        let restored = match stored_new {
            true => self.save_spec(&old, &spec_saved).await,
            false => Ok(()),
        };
        let restored = match restored {
            Ok(()) => self.start(old, previous.plugin.clone()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = restored {
            tracing::error!(message = "Restoring a plugin after a failed change failed; the next start runs what is stored.", plugin = %previous.spec.name, error = %e);
        }
        Err(error)
    }

    /// Pauses or resumes a plugin; resuming a halted plugin restarts it.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<PluginInfo, ManagerError> {
        let _admin = self.admin.lock().await;
        let runtime = self.runtime(name)?;
        let current = self.spec(name)?;
        let mut spec = current.clone();
        spec.paused = paused;
        let halted = runtime.status.lock().iter().any(|s| s.state.is_halted());
        // Cluster mode, another node runs it: whether it halted is that node's to see; a new
        // restart count makes it restart the plugin (which retries a halted record).
        let restarted = !paused && !self.is_active(name);
        if restarted {
            spec.restarts += 1;
        }
        if !paused && halted && !restarted {
            // A halted partition's task has ended: resuming restarts the plugin, which retries
            // the record that halted it.
            let plugin = runtime.plugin.clone();
            self.stop(name).await;
            self.replace(&runtime, spec, plugin).await?;
        } else {
            self.save_spec(&spec, &current).await?;
            runtime.paused.send_replace(paused);
            if restarted {
                // This node's standby copy opens again with the spec just saved: kept with the
                // old restart count, the next change through this node (an upgrade right after
                // the resume) was refused as made from a stale view until the cluster loop
                // caught up. Never rolled back if it fails to open (the runner may have acted
                // on the saved spec already): the cluster loop opens it then.
                let plugin = runtime.plugin.clone();
                self.stop(name).await;
                if let Err(e) = self.start(spec, plugin).await {
                    tracing::warn!(message = "The standby copy of a resumed plugin did not open again; the cluster loop retries.", plugin = %name, error = %e);
                }
            }
        }
        self.info(name)
    }

    /// Removes a plugin with its state and offsets (its output topics stay).
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn remove(&self, name: &str) -> Result<(), ManagerError> {
        let _admin = self.admin.lock().await;
        let spec = self.spec(name)?;
        self.unlist(name).await;
        let (seams, owned) = (self.seams.clone(), name.to_string());
        let holder = blocking(move || {
            // The holder before the spec goes: a lease taken after it (a new deployment of
            // the name through another node) is not this removal's to delete.
            // Unknown if it cannot be read: the holder drops its lease of a plugin no longer
            // registered at its next tick.
            let holder = match &seams.cluster {
                Some(cluster) => cluster.lease_of(&owned).unwrap_or_else(|e| {
                    tracing::warn!(message = "Reading a removed plugin's lease failed; its holder drops it.", plugin = %owned, error = %e);
                    None
                }),
                None => None,
            };
            seams.store.remove(&owned)?;
            seams
                .durability
                .sync_now()
                .map_err(|e| ManagerError::Io(e.to_string()))?;
            Ok(holder)
        })
        .await?;
        self.release_producers(name, &spec.producer_ids).await;
        match holder {
            Some(holder) => self.forget_lease(name, Some(holder)).await,
            None => self.give_back(name),
        }
        self.seams.probes.forget(name);
        let m = weir_metrics::global();
        let label = weir_metrics::plugin(name);
        m.plugin_batch_seconds.remove(&label);
        m.plugin_commit_seconds.remove(&label);
        m.plugin_commit_batches.remove(&label);
        m.plugin_records_in.remove(&label);
        m.plugin_records_out.remove(&label);
        m.plugin_traps.remove(&label);
        m.plugin_dlq.remove(&label);
        m.plugin_dedup_skips.remove(&label);
        m.plugin_forward_failures.remove(&label);
        m.probe_delay_seconds.remove(&label);
        tracing::info!(message = "Plugin removed.", plugin = %name);
        Ok(())
    }

    /// Best effort: producer ids left behind cost a record each and nothing else.
    async fn release_producers(&self, name: &str, ids: &[u64]) {
        if let Err(e) = self.seams.output.release_producers(ids).await {
            tracing::warn!(message = "Releasing a plugin's producer ids failed.", plugin = %name, error = %e);
        }
    }

    /// This node's cluster membership (`None` on a single node).
    pub fn membership(&self) -> Option<&Arc<crate::cluster::Membership>> {
        self.seams.cluster.as_ref()
    }

    /// The engine plugins are compiled with.
    pub fn engine(&self) -> &Arc<PluginEngine> {
        &self.engine
    }

    pub(crate) fn runtime(&self, name: &str) -> Result<Arc<PluginRuntime>, ManagerError> {
        self.plugins
            .lock()
            .get(name)
            .map(|r| r.runtime.clone())
            .ok_or_else(|| ManagerError::UnknownPlugin(name.into()))
    }
}
