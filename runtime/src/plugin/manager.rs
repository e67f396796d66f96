//! The plugin registry and lifecycle: deploy, upgrade, pause, resume, remove; restarting
//! every deployed plugin when the server opens. Specs live in the `plugins` namespace; wasm
//! files in `<data>/wasm/<sha256>.wasm` (synced before the spec that names them). Every
//! store and file access goes through [`crate::blocking::run`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::PluginEngine;
use super::executor::{PartitionStatus, PluginRuntime};
use super::spec::{
    partition_key, AlertThresholds, Cursor, DedupWindow, OnError, PluginSpec, StartFrom,
};
use super::{Limits, PluginError};
use crate::broker::{Broker, BrokerError, Caller, StartAt};
use crate::log::{LogError, LogStore};
use crate::record::{validate_topic_name, TopicConfig};

const REGISTRY: &str = "plugins";

/// Most records per batch a deploy may ask for.
pub const MAX_BATCH_RECORDS: usize = 10_000;
/// Most attempts per batch a deploy may ask for.
pub const MAX_ATTEMPTS: u32 = 100;

/// Server-side bounds and budgets of plugins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PluginConfig {
    /// Largest wasm accepted at deploy.
    pub max_wasm_bytes: usize,
    /// The ceiling of a deploy's CPU bound per batch (`--max-plugin-timeout-ms`).
    pub max_timeout: std::time::Duration,
    /// Committed-state cache per plugin, bytes (`--state-cache-mb`).
    pub state_cache_bytes: usize,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            max_wasm_bytes: 48 << 20,
            max_timeout: std::time::Duration::from_secs(60),
            state_cache_bytes: 64 << 20,
        }
    }
}

/// Runs blocking manager work (store, files, compiling) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ManagerError> + Send + 'static,
) -> Result<T, ManagerError> {
    crate::blocking::run(f)
        .await
        .map_err(|e| ManagerError::Io(e.to_string()))?
}

/// Why a plugin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No plugin of that name.
    #[error("unknown plugin {0:?}; `weir plugin list` shows the deployed ones")]
    UnknownPlugin(String),
    /// A plugin of that name exists.
    #[error("plugin {0:?} is already deployed; use `weir plugin upgrade {0} --wasm FILE` to replace its code")]
    Exists(String),
    /// A request field is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Compiling, validating or running the plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The broker refused (unknown topic, ...).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] LogError),
    /// A file operation failed.
    #[error("{0}")]
    Io(String),
    /// The deploying principal owns as many plugins as it may.
    #[error("{0}")]
    Quota(String),
}

/// A deploy request.
#[derive(Clone, Debug)]
pub struct DeployRequest {
    /// Plugin name.
    pub name: String,
    /// The component.
    pub wasm: Bytes,
    /// Input topic.
    pub input: String,
    /// Topics it may emit to (must exist).
    pub outputs: Vec<String>,
    /// Config for `configure`.
    pub config: Vec<(String, String)>,
    /// Where to start reading.
    pub start: StartFrom,
    /// Memory and time limits.
    pub limits: Limits,
    /// Failure policy.
    pub on_error: OnError,
    /// Attempts per batch.
    pub max_attempts: u32,
    /// Records per batch.
    pub max_batch: usize,
    /// How many message ids, for how long, are remembered to skip redeliveries.
    pub dedup: DedupWindow,
    /// The deploying principal, recorded as the plugin's owner.
    pub owner: Option<String>,
    /// Most plugins `owner` may have deployed at once, this one included (`None`: no limit).
    pub owner_quota: Option<usize>,
    /// Alert thresholds.
    pub alerts: AlertThresholds,
    /// Most records per second over all partitions (0 = unbounded).
    pub max_rate: u64,
}

/// A plugin as `weir plugin list` shows it.
#[derive(Clone, Debug)]
pub struct PluginInfo {
    /// Its spec.
    pub spec: PluginSpec,
    /// Per input partition.
    pub partitions: Vec<PartitionStatus>,
    /// Bytes its committed-state cache holds.
    pub state_cache_bytes: u64,
}

struct Running {
    runtime: Arc<PluginRuntime>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Owns every deployed plugin.
pub struct PluginManager {
    engine: Arc<PluginEngine>,
    broker: Arc<Broker>,
    store: Arc<dyn LogStore>,
    wasm_dir: PathBuf,
    config: PluginConfig,
    plugins: Mutex<BTreeMap<String, Running>>,
    admin: tokio::sync::Mutex<()>,
    probes: Arc<crate::monitor::probe::ProbeBook>,
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
        broker: Arc<Broker>,
        store: Arc<dyn LogStore>,
        config: PluginConfig,
    ) -> Result<Arc<Self>, ManagerError> {
        let engine = PluginEngine::new(compiled_dir)?;
        let wasm_dir = data_dir.join("wasm");
        std::fs::create_dir_all(&wasm_dir)
            .map_err(|e| ManagerError::Io(format!("cannot create {}: {e}", wasm_dir.display())))?;
        let manager = Arc::new(PluginManager {
            engine,
            broker,
            store,
            wasm_dir,
            config,
            plugins: Mutex::new(BTreeMap::new()),
            admin: Default::default(),
            probes: Default::default(),
        });
        let registry = manager.store.clone();
        for (_, value) in blocking(move || Ok(registry.kv_scan(REGISTRY, b"")?)).await? {
            let mut spec: PluginSpec = serde_json::from_slice(&value)
                .map_err(|e| ManagerError::Io(format!("unreadable plugin spec: {e}")))?;
            if spec.limits.timeout > config.max_timeout {
                tracing::warn!(message = "A plugin's time limit is above --max-plugin-timeout-ms; it runs with the ceiling.", plugin = %spec.name, timeout_ms = spec.limits.timeout.as_millis() as u64, ceiling_ms = config.max_timeout.as_millis() as u64);
                spec.limits.timeout = config.max_timeout;
            }
            // Plugins deployed before producer ownership was recorded: their producers become
            // the server's, so no client can fence or impersonate them.
            manager.broker.claim_for_server(&spec.producer_ids).await?;
            let path = manager.wasm_dir.join(format!("{}.wasm", spec.wasm_sha256));
            let (m, name) = (manager.clone(), spec.name.clone());
            let compiled = blocking(move || {
                let wasm = std::fs::read(&path).map_err(|e| {
                    ManagerError::Io(format!(
                        "plugin {name}: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                Ok(m.engine.compile(&wasm)?)
            })
            .await?;
            let name = spec.name.clone();
            manager.start(spec, compiled).await?;
            tracing::info!(message = "Plugin restarted.", plugin = %name);
        }
        Ok(manager)
    }

    async fn start(
        &self,
        spec: PluginSpec,
        compiled: super::CompiledPlugin,
    ) -> Result<(), ManagerError> {
        let name = spec.name.clone();
        let partitions = spec.producer_ids.len() as u32;
        let (store, broker, probes, cache) = (
            self.store.clone(),
            self.broker.clone(),
            self.probes.clone(),
            self.config.state_cache_bytes,
        );
        let runtime = blocking(move || {
            Ok(PluginRuntime::new(
                spec, compiled, store, broker, probes, cache,
            )?)
        })
        .await?;
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        // Every event of a plugin's tasks carries the plugin and partition (publish → commit →
        // forward can be followed in the logs with WEIR_LOG=weir_runtime=debug).
        use tracing::Instrument as _;
        for p in 0..partitions {
            tracker.spawn(
                runtime
                    .clone()
                    .run_partition(p, cancel.clone())
                    .instrument(tracing::info_span!("consume", plugin = %name, partition = p)),
            );
            tracker.spawn(
                runtime
                    .clone()
                    .run_forwarder(p, cancel.clone())
                    .instrument(tracing::info_span!("forward", plugin = %name, partition = p)),
            );
        }
        tracker.spawn(runtime.clone().run_compactor(cancel.clone()));
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

    async fn stop(&self, name: &str) -> Option<Arc<PluginRuntime>> {
        let running = self.plugins.lock().remove(name)?;
        running.cancel.cancel();
        running.tracker.close();
        running.tracker.wait().await;
        Some(running.runtime)
    }

    /// Stops every plugin (server shutdown).
    pub async fn shutdown(&self) {
        let names: Vec<String> = self.plugins.lock().keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    async fn compile(&self, wasm: Bytes) -> Result<super::CompiledPlugin, ManagerError> {
        if wasm.len() > self.config.max_wasm_bytes {
            return Err(PluginError::TooLarge {
                size: wasm.len(),
                max: self.config.max_wasm_bytes,
            }
            .into());
        }
        let engine = self.engine.clone();
        blocking(move || Ok(engine.compile(&wasm)?)).await
    }

    async fn save_wasm(&self, sha256: &str, wasm: Bytes) -> Result<(), ManagerError> {
        let (dir, path) = (
            self.wasm_dir.clone(),
            self.wasm_dir.join(format!("{sha256}.wasm")),
        );
        blocking(move || {
            use std::io::Write;
            if path.exists() {
                return Ok(());
            }
            let io = |e: std::io::Error| {
                ManagerError::Io(format!(
                    "cannot store the plugin wasm in {}: {e}",
                    dir.display()
                ))
            };
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            file.write_all(&wasm).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io)
        })
        .await
    }

    /// Applies registry / namespace writes and syncs them (under every fsync policy: specs
    /// are rare and must not be lost).
    async fn write_synced(
        &self,
        namespace: String,
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<(), ManagerError> {
        let (store, durability) = (self.store.clone(), self.broker.durability().clone());
        blocking(move || {
            store.kv_apply(&namespace, &writes)?;
            durability
                .sync_now()
                .map_err(|e| ManagerError::Io(e.to_string()))
        })
        .await
    }

    async fn save_spec(&self, spec: &PluginSpec) -> Result<(), ManagerError> {
        let json = serde_json::to_vec(spec).expect("spec serialises");
        self.write_synced(
            REGISTRY.into(),
            vec![(spec.name.as_bytes().to_vec(), Some(json))],
        )
        .await
    }

    /// Checks a deploy's limits against the server's bounds.
    fn validate(&self, request: &DeployRequest) -> Result<(), ManagerError> {
        let invalid = |m: String| Err(ManagerError::Invalid(m));
        validate_topic_name(&request.name).map_err(|e| {
            ManagerError::Invalid(format!(
                "invalid plugin name: {}",
                e.replace("topic name", "name")
            ))
        })?;
        if request.limits.memory_bytes == 0
            || request.limits.memory_bytes > super::engine::MAX_PLUGIN_MEMORY
        {
            return invalid(format!(
                "--memory-mb must be between 1 and {}",
                super::engine::MAX_PLUGIN_MEMORY >> 20
            ));
        }
        let max_ms = self.config.max_timeout.as_millis();
        if request.limits.timeout.is_zero() || request.limits.timeout > self.config.max_timeout {
            return invalid(format!(
                "--timeout-ms {} is out of range: this server allows 1 to {max_ms} ms per batch \
                 (weir serve --max-plugin-timeout-ms)",
                request.limits.timeout.as_millis()
            ));
        }
        if request.max_batch == 0 || request.max_batch > MAX_BATCH_RECORDS {
            return invalid(format!(
                "--max-batch {} is out of range: 1 to {MAX_BATCH_RECORDS} records",
                request.max_batch
            ));
        }
        if request.max_attempts == 0 || request.max_attempts > MAX_ATTEMPTS {
            return invalid(format!(
                "--max-attempts {} is out of range: 1 to {MAX_ATTEMPTS}",
                request.max_attempts
            ));
        }
        if request.dedup.max_ids == 0 || request.dedup.max_age_ms == 0 {
            return invalid(
                "the dedup window (--dedup-ids, --dedup-age-ms) must be positive".into(),
            );
        }
        if request.dedup.max_age_ms > crate::record::MAX_DURATION_MS {
            return invalid(format!(
                "--dedup-age-ms is out of range: 1 to {}",
                crate::record::MAX_DURATION_MS
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for output in &request.outputs {
            if *output == request.input {
                return invalid(format!(
                    "--output {output} is also the input: the plugin would consume its own \
                     outputs for ever; emit to another topic"
                ));
            }
            if !seen.insert(output) {
                return invalid(format!("--output {output} is given twice"));
            }
        }
        Ok(())
    }

    /// Validates, compiles and starts a new plugin. A refused deploy (bad request, bad wasm)
    /// changes nothing; one that fails half-way (storage) may leave an unused wasm file and
    /// producer ids, never a half-deployed plugin.
    ///
    /// # Errors
    /// Bad name or limits, existing plugin, unknown topics, invalid or mismatched wasm.
    pub async fn deploy(&self, request: DeployRequest) -> Result<PluginInfo, ManagerError> {
        self.validate(&request)?;
        let _admin = self.admin.lock().await;
        if self.plugins.lock().contains_key(&request.name) {
            return Err(ManagerError::Exists(request.name));
        }
        if let Some(quota) = request.owner_quota {
            let owned = self
                .plugins
                .lock()
                .values()
                .filter(|r| r.runtime.spec.owner == request.owner)
                .count();
            if owned >= quota {
                return Err(ManagerError::Quota(format!(
                    "{} already owns {owned} plugins, the limit is {quota}: remove one first \
                     (or raise max_plugins in the auth file / --max-plugins-per-principal)",
                    request.owner.as_deref().unwrap_or("anonymous")
                )));
            }
        }
        let input_partitions = self.broker.partition_count(&request.input)?;
        for output in &request.outputs {
            self.broker.partition_count(output)?;
        }
        let compiled = self.compile(request.wasm.clone()).await?;
        self.save_wasm(&compiled.sha256, request.wasm.clone())
            .await?;
        let mut outputs = request.outputs.clone();
        let spec_name = request.name.clone();
        if request.on_error == OnError::Dlq {
            let dlq = format!("{spec_name}.dlq");
            if self.broker.partition_count(&dlq).is_err() {
                self.broker
                    .create_topic(TopicConfig::new(dlq.clone(), input_partitions))
                    .await?;
            }
            outputs.push(dlq);
        }
        let mut producer_ids = Vec::new();
        let mut cursors = Vec::new();
        for p in 0..input_partitions {
            producer_ids.push(self.broker.init_producer(None, &Caller::Server).await?.0);
            let start = match request.start {
                StartFrom::Earliest => StartAt::Earliest,
                StartFrom::Latest => StartAt::Latest,
            };
            let offset = self.broker.resolve_start(&request.input, p, start).await?;
            cursors.push((
                partition_key(b'c', p, b""),
                Some(Cursor::at(offset).encode()),
            ));
        }
        let spec = PluginSpec {
            name: request.name,
            version: 1,
            wasm_sha256: compiled.sha256.clone(),
            input: request.input,
            outputs,
            config: request.config,
            limits: request.limits,
            on_error: request.on_error,
            max_attempts: request.max_attempts,
            max_batch: request.max_batch,
            dedup: request.dedup,
            producer_ids,
            paused: false,
            owner: request.owner,
            alerts: request.alerts,
            max_rate: request.max_rate,
        };
        let (store, namespace) = (self.store.clone(), spec.namespace());
        blocking(move || Ok(store.kv_drop(&namespace)?)).await?;
        self.write_synced(spec.namespace(), cursors).await?;
        self.save_spec(&spec).await?;
        tracing::info!(message = "Plugin deployed.", plugin = %spec.name, input = %spec.input, sha256 = %spec.wasm_sha256);
        self.start(spec.clone(), compiled).await?;
        self.info(&spec_name)
    }

    /// Replaces a plugin's code; the new version continues at the committed offsets with the
    /// state kept.
    ///
    /// # Errors
    /// Unknown plugin, invalid or mismatched wasm (the old version keeps running).
    pub async fn upgrade(&self, name: &str, wasm: Bytes) -> Result<PluginInfo, ManagerError> {
        let _admin = self.admin.lock().await;
        let mut spec = self.spec(name)?;
        let compiled = self.compile(wasm.clone()).await?;
        self.save_wasm(&compiled.sha256, wasm).await?;
        spec.version += 1;
        spec.wasm_sha256 = compiled.sha256.clone();
        self.stop(name).await;
        self.save_spec(&spec).await?;
        tracing::info!(message = "Plugin upgraded.", plugin = %name, version = spec.version);
        self.start(spec, compiled).await?;
        self.info(name)
    }

    /// Pauses or resumes a plugin; resuming a halted plugin restarts it.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<PluginInfo, ManagerError> {
        let _admin = self.admin.lock().await;
        let runtime = self.runtime(name)?;
        let mut spec = runtime.spec.clone();
        spec.paused = paused;
        self.save_spec(&spec).await?;
        let halted = runtime.status.lock().iter().any(|s| s.state.is_halted());
        if !paused && halted {
            // A halted partition's task has ended: resuming restarts the plugin, which retries
            // the record that halted it.
            let compiled = runtime.compiled.clone();
            self.stop(name).await;
            self.start(spec, compiled).await?;
        } else {
            runtime.paused.send_replace(paused);
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
        self.stop(name).await;
        self.write_synced(REGISTRY.into(), vec![(name.as_bytes().to_vec(), None)])
            .await?;
        let (store, namespace) = (self.store.clone(), spec.namespace());
        blocking(move || Ok(store.kv_drop(&namespace)?)).await?;
        self.probes.forget(name);
        let m = crate::metrics::global();
        let label = crate::metrics::plugin(name);
        m.plugin_batch_seconds.remove(&label);
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

    /// The engine plugins are compiled with.
    pub fn engine(&self) -> &Arc<PluginEngine> {
        &self.engine
    }

    /// Probe results of every plugin.
    pub fn probes(&self) -> &Arc<crate::monitor::probe::ProbeBook> {
        &self.probes
    }

    fn runtime(&self, name: &str) -> Result<Arc<PluginRuntime>, ManagerError> {
        self.plugins
            .lock()
            .get(name)
            .map(|r| r.runtime.clone())
            .ok_or_else(|| ManagerError::UnknownPlugin(name.into()))
    }

    /// The principal that deployed a plugin.
    ///
    /// # Errors
    /// Unknown plugin.
    pub fn owner(&self, name: &str) -> Result<Option<String>, ManagerError> {
        Ok(self.runtime(name)?.spec.owner.clone())
    }

    fn spec(&self, name: &str) -> Result<PluginSpec, ManagerError> {
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
        let runtime = self.runtime(name)?;
        let mut spec = runtime.spec.clone();
        spec.paused = *runtime.paused.borrow();
        let partitions = runtime.status.lock().clone();
        Ok(PluginInfo {
            spec,
            partitions,
            state_cache_bytes: runtime.cache.bytes() as u64,
        })
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
        blocking(move || Ok(runtime.state_entries()?)).await
    }

    /// Outbox entries (batches of outputs) committed but not yet forwarded.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub async fn pending_outputs(&self, name: &str) -> Result<usize, ManagerError> {
        let runtime = self.runtime(name)?;
        blocking(move || Ok(runtime.pending_outputs()?)).await
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
        blocking(move || Ok(runtime.state(&key)?)).await
    }
}
