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

/// A partition's position, stored at `c/<partition>` in every commit: the next input offset,
/// the next commit sequence and the counters `weir plugin list` shows (so they survive
/// restarts like the offset does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Next input offset to process.
    pub next: u64,
    /// Next commit sequence (keys `d/` and `o/` of this partition).
    pub seq: u64,
    /// Records whose effects were committed.
    pub processed: u64,
    /// Records skipped as already processed.
    pub skipped: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
}

impl Cursor {
    /// A fresh partition starting at `next`.
    pub fn at(next: u64) -> Self {
        Cursor {
            next,
            ..Cursor::default()
        }
    }

    /// Five u64 BE.
    pub fn encode(&self) -> Vec<u8> {
        [
            self.next,
            self.seq,
            self.processed,
            self.skipped,
            self.dead_lettered,
        ]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
    }

    /// Reads the stored form; one written before the counters were kept (16 bytes) reads
    /// with counters at 0.
    pub fn decode(b: &[u8]) -> Option<Cursor> {
        if b.len() != 16 && b.len() != 40 {
            return None;
        }
        let u = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let counter = |i: usize| if b.len() == 40 { u(i) } else { 0 };
        Some(Cursor {
            next: u(0),
            seq: u(1),
            processed: counter(2),
            skipped: counter(3),
            dead_lettered: counter(4),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_old_ones_read_with_zero_counters() {
        let c = Cursor {
            next: 9,
            seq: 4,
            processed: 7,
            skipped: 1,
            dead_lettered: 1,
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        let old = &c.encode()[..16];
        assert_eq!(
            Cursor::decode(old),
            Some(Cursor {
                next: 9,
                seq: 4,
                ..Cursor::default()
            })
        );
        assert_eq!(Cursor::decode(&[0; 12]), None);
    }
}
