//! The local runtime: weir's whole host — store, syncer, broker, plugins with their
//! limits — in-process on a temporary directory, with no network. For plugin integration
//! tests in any Rust test, and for `weir test`.
//!
//! ```no_run
//! # async fn demo(wasm: Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
//! use weir_server::local::LocalRuntime;
//! use weir_core::Record;
//! let local = LocalRuntime::start().await?;
//! local.create_topic("order.paid", 1).await?;
//! local.create_topic("points.credited", 1).await?;
//! local.deploy("points", wasm, "order.paid", &["points.credited"], &[("rate", "0.1")]).await?;
//! local.publish("order.paid", vec![Record::from_value(r#"{"order":1,"user":"ann","amount":50}"#)]).await?;
//! local.run_until_idle().await?;
//! assert_eq!(local.state("points", "balance/ann").await?, Some(b"5".to_vec()));
//! local.close().await;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;

use weir_broker::{BrokerError, PartitionAck, Publish};
use weir_core::{Record, StoredRecord, TopicConfig};
use weir_log::FsyncPolicy;
use weir_plugins::{DeployRequest, Limits, ManagerError, OnError, PluginInfo, StartFrom};

use crate::server::{Core, ServerConfig, ServerError};

/// Why a local run failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The runtime could not start.
    #[error(transparent)]
    Start(#[from] ServerError),
    /// The broker refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A plugin operation failed (deploy: invalid wasm, wrong world, ...).
    #[error(transparent)]
    Plugin(#[from] ManagerError),
    /// A plugin stopped on a record it could not process.
    #[error("plugin {plugin} halted on partition {partition}: {reason}")]
    Halted {
        /// Plugin name.
        plugin: String,
        /// Input partition.
        partition: u32,
        /// Why (the trap or error, with the record's offset).
        reason: String,
    },
    /// The plugins did not catch up in time.
    #[error("plugins still busy after {0:?}")]
    Timeout(Duration),
}

/// An in-process weir on a temporary directory.
pub struct LocalRuntime {
    core: Core,
    _dir: tempfile::TempDir,
}

/// The compiled-plugin cache local runs share, so `weir test` compiles a component once
/// (Python and JavaScript components take seconds): `$WEIR_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/weir/compiled`, else `~/.cache/weir/compiled`; `None` (the run's own temp
/// directory) when none is set or it cannot be created.
fn user_compiled_cache() -> Option<PathBuf> {
    let env = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = env("WEIR_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("weir/compiled")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/weir/compiled")))?;
    std::fs::create_dir_all(&dir).ok().map(|()| dir)
}

impl LocalRuntime {
    /// Starts on a fresh temporary directory (fsync `never`: durability is not what a local
    /// test is about; everything else is the server's code path).
    ///
    /// # Errors
    /// The directory or the store cannot be created.
    pub async fn start() -> Result<Self, LocalError> {
        let dir = tempfile::tempdir().map_err(|e| {
            ServerError::Store(weir_log::LogError::Io {
                path: std::env::temp_dir(),
                source: e,
            })
        })?;
        let mut config = ServerConfig::new(dir.path());
        config.fsync = FsyncPolicy::Never;
        config.cache_bytes = 64 * 1024 * 1024;
        config.compiled_dir = user_compiled_cache();
        let core = Core::open(&config).await?;
        Ok(LocalRuntime { core, _dir: dir })
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// Invalid name or partition count, existing topic.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), LocalError> {
        self.core
            .broker
            .create_topic(TopicConfig::new(name, partitions))
            .await?;
        Ok(())
    }

    /// Deploys a plugin from the earliest offset with default limits; the first failure of a
    /// record halts it (so a test sees the error at once).
    ///
    /// # Errors
    /// As `weir plugin deploy`: invalid wasm, wrong world, unknown topics.
    pub async fn deploy(
        &self,
        name: &str,
        wasm: impl Into<Bytes>,
        input: &str,
        outputs: &[&str],
        config: &[(&str, &str)],
    ) -> Result<PluginInfo, LocalError> {
        let request = DeployRequest {
            name: name.into(),
            wasm: wasm.into(),
            input: input.into(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            start: StartFrom::Earliest,
            limits: Limits::default(),
            on_error: OnError::Halt,
            max_attempts: 1,
            max_batch: 500,
            dedup: Default::default(),
            owner: None,
            owner_quota: None,
            alerts: Default::default(),
            max_rate: 0,
            commit: Default::default(),
        };
        Ok(self.core.plugins.deploy(request).await?)
    }

    /// The topics `wasm` emits to when it processes `records` as one batch from empty state
    /// (a dry run; nothing is stored).
    ///
    /// # Errors
    /// The wasm does not compile, or the plugin fails on the records.
    pub async fn emitted_topics(
        &self,
        wasm: Vec<u8>,
        config: &[(&str, &str)],
        records: &[Record],
    ) -> Result<Vec<String>, LocalError> {
        let engine = self.core.plugins.engine().clone();
        let config: Vec<(String, String)> = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let records: Vec<StoredRecord> = records
            .iter()
            .enumerate()
            .map(|(i, r)| StoredRecord {
                partition: 0,
                offset: i as u64,
                record: r.clone(),
            })
            .collect();
        let topics = weir_core::blocking::run(move || {
            let compiled = engine.compile(&wasm)?;
            weir_plugins::emitted_topics(&compiled, &config, &records)
        })
        .await
        .map_err(|e| ManagerError::Io(e.to_string()))?
        .map_err(ManagerError::Plugin)?;
        Ok(topics.into_iter().collect())
    }

    /// Removes a plugin with its state.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn remove(&self, name: &str) -> Result<(), LocalError> {
        Ok(self.core.plugins.remove(name).await?)
    }

    /// Deploys with a full request (limits, DLQ policy, dedup window).
    ///
    /// # Errors
    /// As [`LocalRuntime::deploy`].
    pub async fn deploy_request(&self, request: DeployRequest) -> Result<PluginInfo, LocalError> {
        Ok(self.core.plugins.deploy(request).await?)
    }

    /// Publishes records (partitioned by key).
    ///
    /// # Errors
    /// Unknown topic, invalid records.
    pub async fn publish(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<PartitionAck>, LocalError> {
        Ok(self
            .core
            .broker
            .publish(Publish {
                topic: topic.into(),
                records,
                ..Default::default()
            })
            .await?)
    }

    /// Waits until every plugin has committed its whole input and forwarded its outputs
    /// (at most 60 s).
    ///
    /// # Errors
    /// [`LocalError::Halted`] when a plugin stopped on a record, with the reason.
    pub async fn run_until_idle(&self) -> Result<(), LocalError> {
        let limit = Duration::from_secs(60);
        let deadline = Instant::now() + limit;
        loop {
            let mut idle = true;
            for info in self.core.plugins.list() {
                let ends = self
                    .core
                    .broker
                    .describe_topic(&info.spec.input)?
                    .partitions;
                for (p, (status, end)) in info.partitions.iter().zip(&ends).enumerate() {
                    if let weir_plugins::PartitionState::Halted(reason) = &status.state {
                        return Err(LocalError::Halted {
                            plugin: info.spec.name.clone(),
                            partition: p as u32,
                            reason: reason.clone(),
                        });
                    }
                    idle &= status.committed == end.end_offset;
                }
                idle &= self.core.plugins.pending_outputs(&info.spec.name).await? == 0;
            }
            if idle {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalError::Timeout(limit));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every record of a topic, partition by partition.
    ///
    /// # Errors
    /// Unknown topic.
    pub async fn read(&self, topic: &str) -> Result<Vec<StoredRecord>, LocalError> {
        let mut out = Vec::new();
        for p in self.core.broker.describe_topic(topic)?.partitions {
            out.extend(
                self.core
                    .broker
                    .read(topic, p.partition, 0, usize::MAX)
                    .await?,
            );
        }
        Ok(out)
    }

    /// A plugin's committed state value for a key.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn state(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, LocalError> {
        Ok(self
            .core
            .plugins
            .state_get(plugin, key.as_bytes())
            .await?
            .map(|(v, _)| v))
    }

    /// Every committed state entry of a plugin: (key, value, version).
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn state_entries(
        &self,
        plugin: &str,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>, u64)>, LocalError> {
        Ok(self.core.plugins.state_entries(plugin).await?)
    }

    /// A plugin's log lines.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn logs(&self, plugin: &str) -> Result<Vec<String>, LocalError> {
        Ok(self.core.plugins.logs(plugin).await?)
    }

    /// A plugin's spec and partition status (processed, skipped, dead-lettered, state).
    ///
    /// # Errors
    /// Unknown plugin.
    pub fn info(&self, plugin: &str) -> Result<PluginInfo, LocalError> {
        Ok(self.core.plugins.info(plugin)?)
    }

    /// Stops the plugins and removes the temporary directory.
    pub async fn close(self) {
        self.core.close().await;
    }
}
