//! A deployed plugin's specification: what it runs, on what, with which limits and policies.

use weir_wasm::Limits;

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

impl AlertThresholds {
    /// The highest `--alert-lag` a deploy may set (offsets and lags are signed 64-bit in
    /// Kafka's protocol and in Prometheus' gauges).
    pub const MAX_LAG: u64 = i64::MAX as u64;
    /// The highest `--alert-delay-ms` a deploy may set.
    pub const MAX_DELAY_MS: u64 = weir_core::MAX_DURATION_MS;
}

/// The highest `--max-rate` a deploy may set, records per second over all partitions: far
/// above what one server reads, so a value above it is a mistake (2^64-1 from an unsigned
/// underflow), not a pace.
pub const MAX_RATE: u64 = 1_000_000_000;

/// Checks what a deploy sets beyond its limits (which `request::validate` checks): alert
/// thresholds and `--max-rate` within their ranges (0 turns each off), config keys not empty.
/// The message names the flag and its range.
///
/// # Errors
/// The first setting out of range, in words.
pub fn check_settings(
    alerts: &AlertThresholds,
    max_rate: u64,
    config: &[(String, String)],
) -> Result<(), String> {
    let ranges = [
        (
            "--alert-lag",
            alerts.max_lag,
            AlertThresholds::MAX_LAG,
            "records",
        ),
        (
            "--alert-delay-ms",
            alerts.max_delay_ms,
            AlertThresholds::MAX_DELAY_MS,
            "ms",
        ),
        ("--max-rate", max_rate, MAX_RATE, "records per second"),
    ];
    for (flag, value, max, unit) in ranges {
        if value > max {
            return Err(format!(
                "{flag} {value} is out of range: 0 (off) to {max} {unit}"
            ));
        }
    }
    // The value is not echoed: config may carry credentials.
    if let Some(n) = config.iter().position(|(key, _)| key.is_empty()) {
        return Err(format!(
            "--config entry {} of {} has an empty key: give each entry as key=value",
            n + 1,
            config.len()
        ));
    }
    Ok(())
}

/// Most records one commit may cover (`--commit-records`).
pub const MAX_COMMIT_RECORDS: usize = 100_000;
/// Longest `--commit-interval-ms`.
pub const MAX_COMMIT_INTERVAL_MS: u64 = 60_000;

/// How much one commit covers while the input has a backlog, as Kafka Streams'
/// `commit.interval.ms` under exactly-once: the plugin is called `max_batch` records at a
/// time (its limits apply per call), and the effects of the calls made within `interval_ms`,
/// up to `records` records, are committed together. A commit costs the same whatever it
/// covers; without a backlog it covers what one read finds, so latency does not grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBounds {
    /// Most records (read at once, then called `max_batch` at a time; below `max_batch`, calls
    /// are this small); 0: the default, [`CommitBounds::DEFAULT_RECORDS`] or `max_batch` when
    /// larger ([`CommitBounds::records_for`]). A plugin paced by `--max-rate` commits each call
    /// on its own.
    pub records: usize,
    /// Calls stop once this long has passed since the first: the commit covers the records
    /// up to there, and the rest wait for the next one. (Calls also stop once their outputs
    /// and state writes reach [`crate::MAX_BATCH_BYTES`].)
    pub interval_ms: u64,
}

impl CommitBounds {
    /// Records one commit covers unless told otherwise (when `max_batch` is not larger).
    pub const DEFAULT_RECORDS: usize = 5_000;

    /// The records one commit covers at most, for calls of `max_batch` records.
    pub fn records_for(&self, max_batch: usize) -> usize {
        match self.records {
            0 => Self::DEFAULT_RECORDS.max(max_batch),
            n => n,
        }
    }

    fn is_default(&self) -> bool {
        *self == CommitBounds::default()
    }
}

impl Default for CommitBounds {
    fn default() -> Self {
        CommitBounds {
            records: 0,
            interval_ms: 100,
        }
    }
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
    /// What one commit covers at most (written without it: the defaults). Not written when
    /// it is the default, so that a spec deployed with the defaults reads on a node of an
    /// older build during a rolling upgrade.
    #[serde(default, skip_serializing_if = "CommitBounds::is_default")]
    pub commit: CommitBounds,
    /// Resumes that restart the plugin made through a node not running it (cluster mode):
    /// the node running it restarts it when this changes (a halted partition retries).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PluginSpec {
    /// The plugin's dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.name)
    }

    /// Its input partitions (one partition loop and one producer id each).
    pub fn partitions(&self) -> u32 {
        self.producer_ids.len() as u32
    }
}
