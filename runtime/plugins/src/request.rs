//! What a deploy asks for, what the server allows, and what a plugin operation can fail with.

use bytes::Bytes;
use weir_core::validate_topic_name;
use weir_log::LogError;
use weir_wasm::{Limits, PluginError};

use crate::io::IoError;
use crate::runtime::PartitionStatus;
use crate::spec::{
    AlertThresholds, CommitBounds, DedupWindow, OnError, PluginSpec, StartFrom,
    MAX_COMMIT_INTERVAL_MS, MAX_COMMIT_RECORDS,
};

/// Most records per batch a deploy may ask for.
pub const MAX_BATCH_RECORDS: usize = 10_000;
/// Most attempts per batch a deploy may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Most message ids a plugin's dedup window may keep (each costs ~24 bytes of memory).
pub const MAX_DEDUP_IDS: usize = 10_000_000;

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
    /// A topic call failed (unknown topic, the broker refused, ...).
    #[error(transparent)]
    Topics(#[from] IoError),
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
    /// What one commit covers at most.
    pub commit: CommitBounds,
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
    /// Cluster mode: the node running it ("id (address)"), if any is.
    pub node: Option<String>,
}

/// Checks a deploy's limits against the server's bounds.
pub(crate) fn validate(config: &PluginConfig, request: &DeployRequest) -> Result<(), ManagerError> {
    let invalid = |m: String| Err(ManagerError::Invalid(m));
    validate_topic_name(&request.name).map_err(|e| {
        ManagerError::Invalid(format!(
            "invalid plugin name: {}",
            e.replace("topic name", "name")
        ))
    })?;
    if request.limits.memory_bytes == 0
        || request.limits.memory_bytes > weir_wasm::MAX_PLUGIN_MEMORY
    {
        return invalid(format!(
            "--memory-mb must be between 1 and {}",
            weir_wasm::MAX_PLUGIN_MEMORY >> 20
        ));
    }
    let max_ms = config.max_timeout.as_millis();
    if request.limits.timeout.is_zero() || request.limits.timeout > config.max_timeout {
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
    if request.commit.records > MAX_COMMIT_RECORDS {
        return invalid(format!(
            "--commit-records {} is out of range: 1 to {MAX_COMMIT_RECORDS} records (0: the default)",
            request.commit.records
        ));
    }
    if request.commit.interval_ms == 0 || request.commit.interval_ms > MAX_COMMIT_INTERVAL_MS {
        return invalid(format!(
            "--commit-interval-ms {} is out of range: 1 to {MAX_COMMIT_INTERVAL_MS} ms",
            request.commit.interval_ms
        ));
    }
    if request.max_attempts == 0 || request.max_attempts > MAX_ATTEMPTS {
        return invalid(format!(
            "--max-attempts {} is out of range: 1 to {MAX_ATTEMPTS}",
            request.max_attempts
        ));
    }
    if request.dedup.max_ids == 0 || request.dedup.max_age_ms == 0 {
        return invalid("the dedup window (--dedup-ids, --dedup-age-ms) must be positive".into());
    }
    if request.dedup.max_ids > MAX_DEDUP_IDS {
        return invalid(format!(
            "--dedup-ids {} is out of range: 1 to {MAX_DEDUP_IDS}",
            request.dedup.max_ids
        ));
    }
    if request.dedup.max_age_ms > weir_core::MAX_DURATION_MS {
        return invalid(format!(
            "--dedup-age-ms is out of range: 1 to {}",
            weir_core::MAX_DURATION_MS
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
