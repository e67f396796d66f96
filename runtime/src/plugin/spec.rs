//! A deployed plugin's specification, stored in the registry namespace, and the keys of its
//! own namespace.

use super::Limits;

/// What to do with a batch that still fails after its retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop the plugin's partition; the status says why. Resume after fixing (upgrade).
    Halt,
    /// Send the failing record to `<plugin>.dlq` with the error, and go on.
    Dlq,
}

/// Where a new plugin starts reading its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// From the oldest stored record.
    Earliest,
    /// Only records published after the deploy.
    Latest,
}

/// How long a processed message id is remembered for dedup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupWindow {
    /// At most this many ids.
    pub max_ids: usize,
    /// For at most this long (by record timestamp).
    pub max_age_ms: u64,
}

impl Default for DedupWindow {
    fn default() -> Self {
        DedupWindow {
            max_ids: 1_000_000,
            max_age_ms: 24 * 3600 * 1000,
        }
    }
}

/// Alert thresholds of a plugin; 0 turns one off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertThresholds {
    /// Records waiting, summed over partitions.
    pub max_lag: u64,
    /// Age of the oldest waiting record, ms (any partition).
    pub max_delay_ms: u64,
}

/// A deployed plugin.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Unique name (same rule as topic names).
    pub name: String,
    /// 1 at deploy, +1 per upgrade.
    pub version: u32,
    /// sha256 of the wasm in the artifact directory.
    pub wasm_sha256: String,
    /// Input topic.
    pub input: String,
    /// Topics the plugin may emit to.
    pub outputs: Vec<String>,
    /// `--config k=v` pairs passed to `configure`.
    pub config: Vec<(String, String)>,
    /// Limits per instance.
    pub limits: Limits,
    /// Failure policy.
    pub on_error: OnError,
    /// Attempts per batch before the policy applies.
    pub max_attempts: u32,
    /// Most records per batch.
    pub max_batch: usize,
    /// Dedup window.
    pub dedup: DedupWindow,
    /// Idempotent-producer id per input partition, for forwarding outputs exactly once.
    pub producer_ids: Vec<u64>,
    /// Paused by the operator.
    pub paused: bool,
    /// The principal that deployed it (`None` when deployed on a server without `--auth`
    /// before ownership was recorded).
    #[serde(default)]
    pub owner: Option<String>,
    /// When the monitor raises an alert.
    #[serde(default)]
    pub alerts: AlertThresholds,
    /// Most input records per second over all partitions (0 = unbounded): the pace a
    /// downstream system (the seed's database) can take.
    #[serde(default)]
    pub max_rate: u64,
}

impl PluginSpec {
    /// The plugin's dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.name)
    }

    /// Its key-value namespace.
    pub fn namespace(&self) -> String {
        namespace(&self.name)
    }
}

/// The key-value namespace of a plugin.
pub fn namespace(name: &str) -> String {
    format!("plugin/{name}")
}

/// Key of a state entry.
pub fn state_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    k.extend_from_slice(b"s/");
    k.extend_from_slice(key);
    k
}

/// Key of a partition-scoped entry: `<tag>/<partition BE>/<suffix>`.
pub fn partition_key(tag: u8, partition: u32, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + suffix.len());
    k.push(tag);
    k.push(b'/');
    k.extend_from_slice(&partition.to_be_bytes());
    k.push(b'/');
    k.extend_from_slice(suffix);
    k
}

/// Stored state value: version u64 BE, then the value.
pub fn encode_state(value: &[u8], version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(value);
    v
}

/// Reads a stored state value.
pub fn decode_state(stored: &[u8]) -> Option<(Vec<u8>, u64)> {
    let version = u64::from_be_bytes(stored.get(..8)?.try_into().ok()?);
    Some((stored[8..].to_vec(), version))
}
