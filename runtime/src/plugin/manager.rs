//! The plugin registry and lifecycle: deploy, upgrade, pause, resume, remove; restarting
//! every deployed plugin when the server opens. Specs live in the `plugins` namespace; wasm
//! files in `<data>/wasm/<sha256>.wasm` (synced before the spec that names them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::PluginEngine;
use super::executor::{PartitionStatus, PluginRuntime};
use super::spec::{partition_key, AlertThresholds, DedupWindow, OnError, PluginSpec, StartFrom};
use super::{Limits, PluginError};
use crate::broker::{Broker, BrokerError, StartAt};
use crate::log::{LogError, LogStore};
use crate::record::{validate_topic_name, TopicConfig};

const REGISTRY: &str = "plugins";

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
    max_wasm_bytes: usize,
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
        max_wasm_bytes: usize,
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
            max_wasm_bytes,
            plugins: Mutex::new(BTreeMap::new()),
            admin: Default::default(),
            probes: Default::default(),
        });
        for (_, value) in manager.store.kv_scan(REGISTRY, b"")? {
            let spec: PluginSpec = serde_json::from_slice(&value)
                .map_err(|e| ManagerError::Io(format!("unreadable plugin spec: {e}")))?;
            let path = manager.wasm_dir.join(format!("{}.wasm", spec.wasm_sha256));
            let wasm = std::fs::read(&path).map_err(|e| {
                ManagerError::Io(format!(
                    "plugin {}: cannot read {}: {e}",
                    spec.name,
                    path.display()
                ))
            })?;
            let (m, name) = (manager.clone(), spec.name.clone());
            let compiled = tokio::task::spawn_blocking(move || m.engine.compile(&wasm))
                .await
                .map_err(|e| ManagerError::Io(e.to_string()))??;
            manager.start(spec, compiled)?;
            tracing::info!(message = "Plugin restarted.", plugin = %name);
        }
        Ok(manager)
    }

    fn start(&self, spec: PluginSpec, compiled: super::CompiledPlugin) -> Result<(), ManagerError> {
        let name = spec.name.clone();
        let partitions = spec.producer_ids.len() as u32;
        let runtime = PluginRuntime::new(
            spec,
            compiled,
            self.store.clone(),
            self.broker.clone(),
            self.probes.clone(),
        )?;
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
        self.plugins.lock().expect("plugins lock").insert(
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
        let running = self.plugins.lock().expect("plugins lock").remove(name)?;
        running.cancel.cancel();
        running.tracker.close();
        running.tracker.wait().await;
        Some(running.runtime)
    }

    /// Stops every plugin (server shutdown).
    pub async fn shutdown(&self) {
        let names: Vec<String> = self
            .plugins
            .lock()
            .expect("plugins lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    async fn compile(&self, wasm: Bytes) -> Result<super::CompiledPlugin, ManagerError> {
        if wasm.len() > self.max_wasm_bytes {
            return Err(PluginError::TooLarge {
                size: wasm.len(),
                max: self.max_wasm_bytes,
            }
            .into());
        }
        let engine = self.engine.clone();
        let compiled = tokio::task::spawn_blocking(move || engine.compile(&wasm))
            .await
            .map_err(|e| ManagerError::Io(e.to_string()))??;
        Ok(compiled)
    }

    fn save_wasm(&self, sha256: &str, wasm: &[u8]) -> Result<(), ManagerError> {
        use std::io::Write;
        let path = self.wasm_dir.join(format!("{sha256}.wasm"));
        if path.exists() {
            return Ok(());
        }
        let io = |e: std::io::Error| {
            ManagerError::Io(format!(
                "cannot store the plugin wasm in {}: {e}",
                self.wasm_dir.display()
            ))
        };
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(wasm).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.wasm_dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    async fn save_spec(&self, spec: &PluginSpec) -> Result<(), ManagerError> {
        let json = serde_json::to_vec(spec).expect("spec serialises");
        self.store
            .kv_apply(REGISTRY, &[(spec.name.as_bytes().to_vec(), Some(json))])?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .map_err(|e| ManagerError::Io(e.to_string()))??;
        Ok(())
    }

    /// Validates, compiles and starts a new plugin. Nothing changes if any step fails.
    ///
    /// # Errors
    /// Bad name, existing plugin, unknown topics, invalid or mismatched wasm.
    pub async fn deploy(&self, request: DeployRequest) -> Result<PluginInfo, ManagerError> {
        validate_topic_name(&request.name).map_err(|e| {
            ManagerError::Invalid(format!(
                "invalid plugin name: {}",
                e.replace("topic name", "name")
            ))
        })?;
        if request.limits.memory_bytes == 0
            || request.limits.memory_bytes > super::engine::MAX_PLUGIN_MEMORY
        {
            return Err(ManagerError::Invalid(format!(
                "--memory-mb must be between 1 and {}",
                super::engine::MAX_PLUGIN_MEMORY >> 20
            )));
        }
        if request.limits.timeout.is_zero()
            || request.max_batch == 0
            || request.dedup.max_ids == 0
            || request.dedup.max_age_ms == 0
        {
            return Err(ManagerError::Invalid(
                "--timeout-ms, the batch size and the dedup window must be positive".into(),
            ));
        }
        let _admin = self.admin.lock().await;
        if self
            .plugins
            .lock()
            .expect("plugins lock")
            .contains_key(&request.name)
        {
            return Err(ManagerError::Exists(request.name));
        }
        if let Some(quota) = request.owner_quota {
            let owned = self
                .plugins
                .lock()
                .expect("plugins lock")
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
        let input = self.broker.describe_topic(&request.input)?;
        for output in &request.outputs {
            self.broker.describe_topic(output)?;
        }
        let compiled = self.compile(request.wasm.clone()).await?;
        self.save_wasm(&compiled.sha256, &request.wasm)?;
        let mut outputs = request.outputs.clone();
        let spec_name = request.name.clone();
        if request.on_error == OnError::Dlq {
            let dlq = format!("{spec_name}.dlq");
            if self.broker.describe_topic(&dlq).is_err() {
                self.broker
                    .create_topic(TopicConfig {
                        name: dlq.clone(),
                        partitions: input.config.partitions,
                        retention_ms: 0,
                        retention_bytes: 0,
                        admission: None,
                    })
                    .await?;
            }
            outputs.push(dlq);
        }
        let mut producer_ids = Vec::new();
        let mut cursors = Vec::new();
        for p in 0..input.config.partitions {
            producer_ids.push(self.broker.init_producer(None).await?.0);
            let start = match request.start {
                StartFrom::Earliest => StartAt::Earliest,
                StartFrom::Latest => StartAt::Latest,
            };
            let offset = self.broker.resolve_start(&request.input, p, start).await?;
            let mut cursor = offset.to_be_bytes().to_vec();
            cursor.extend_from_slice(&0u64.to_be_bytes());
            cursors.push((partition_key(b'c', p, b""), Some(cursor)));
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
            max_attempts: request.max_attempts.max(1),
            max_batch: request.max_batch,
            dedup: request.dedup,
            producer_ids,
            paused: false,
            owner: request.owner,
            alerts: request.alerts,
            max_rate: request.max_rate,
        };
        self.store.kv_drop(&spec.namespace())?;
        self.store.kv_apply(&spec.namespace(), &cursors)?;
        self.save_spec(&spec).await?;
        tracing::info!(message = "Plugin deployed.", plugin = %spec.name, input = %spec.input, sha256 = %spec.wasm_sha256);
        self.start(spec.clone(), compiled)?;
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
        self.save_wasm(&compiled.sha256, &wasm)?;
        spec.version += 1;
        spec.wasm_sha256 = compiled.sha256.clone();
        self.stop(name).await;
        self.save_spec(&spec).await?;
        tracing::info!(message = "Plugin upgraded.", plugin = %name, version = spec.version);
        self.start(spec, compiled)?;
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
        let halted = runtime
            .status
            .lock()
            .expect("status lock")
            .iter()
            .any(|s| s.state.starts_with("halted"));
        if !paused && halted {
            // A halted partition's task has ended: resuming restarts the plugin, which retries
            // the record that halted it.
            let compiled = runtime.compiled.clone();
            self.stop(name).await;
            self.start(spec, compiled)?;
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
        self.store
            .kv_apply(REGISTRY, &[(name.as_bytes().to_vec(), None)])?;
        self.store.kv_drop(&spec.namespace())?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .map_err(|e| ManagerError::Io(e.to_string()))??;
        self.probes.forget(name);
        tracing::info!(message = "Plugin removed.", plugin = %name);
        Ok(())
    }

    /// Probe results of every plugin.
    pub fn probes(&self) -> &Arc<crate::monitor::probe::ProbeBook> {
        &self.probes
    }

    fn runtime(&self, name: &str) -> Result<Arc<PluginRuntime>, ManagerError> {
        self.plugins
            .lock()
            .expect("plugins lock")
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
        let partitions = runtime.status.lock().expect("status lock").clone();
        Ok(PluginInfo { spec, partitions })
    }

    /// Every plugin.
    pub fn list(&self) -> Vec<PluginInfo> {
        let names: Vec<String> = self
            .plugins
            .lock()
            .expect("plugins lock")
            .keys()
            .cloned()
            .collect();
        names.iter().filter_map(|n| self.info(n).ok()).collect()
    }

    /// A plugin's log lines, oldest first.
    ///
    /// # Errors
    /// Unknown plugin.
    pub fn logs(&self, name: &str) -> Result<Vec<String>, ManagerError> {
        Ok(self.runtime(name)?.log_lines())
    }

    /// Every committed state entry of a plugin: (key, value, version), in key order.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub fn state_entries(&self, name: &str) -> Result<Vec<(Vec<u8>, Vec<u8>, u64)>, ManagerError> {
        Ok(self.runtime(name)?.state_entries()?)
    }

    /// Outbox entries (batches of outputs) committed but not yet forwarded.
    ///
    /// # Errors
    /// Unknown plugin, storage failure.
    pub fn pending_outputs(&self, name: &str) -> Result<usize, ManagerError> {
        Ok(self.runtime(name)?.pending_outputs()?)
    }

    /// A committed state value and its version.
    ///
    /// # Errors
    /// Unknown plugin.
    pub fn state_get(
        &self,
        name: &str,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, u64)>, ManagerError> {
        Ok(self.runtime(name)?.state(key))
    }
}
