//! What the monitor reports: Burrow's statuses, rows per consumer partition, per consumer
//! health, topic rates and lag history, and the snapshot that holds them.

use std::fmt;

use serde::{Serialize, Serializer};

use std::collections::VecDeque;

use super::probe::ProbeSummary;
use super::Sample;

/// A consumer partition's status, in Burrow's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Health {
    /// Caught up, or committing and not falling behind.
    Ok,
    /// Committing, but lag grew over the whole window (or an alert is active).
    Warn,
    /// Running but its committed offset has not moved for the window while lag > 0.
    Stall,
    /// Not committing at all for the window (paused plugin, departed group) while lag > 0.
    Stop,
    /// A halted plugin.
    Error,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Ok => "OK",
            Health::Warn => "WARN",
            Health::Stall => "STALL",
            Health::Stop => "STOP",
            Health::Error => "ERROR",
        })
    }
}

/// Plugin or consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerKind {
    /// A deployed plugin.
    Plugin,
    /// An external consumer group.
    Group,
}

impl ConsumerKind {
    /// `plugin` or `group`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerKind::Plugin => "plugin",
            ConsumerKind::Group => "group",
        }
    }
}

/// One consumer × partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LagRow {
    /// Plugin or group.
    pub kind: ConsumerKind,
    /// Its name.
    pub name: String,
    /// The topic it reads.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Next offset it will process.
    pub committed: u64,
    /// The partition's end.
    pub end: u64,
    /// `end - committed`.
    pub lag: u64,
    /// Age of the oldest record not yet processed, ms.
    pub time_lag_ms: u64,
    /// Status over the window.
    pub status: Health,
}

/// One consumer, all partitions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConsumerHealth {
    /// Plugin or group.
    pub kind: ConsumerKind,
    /// Its name.
    pub name: String,
    /// Worst partition status; at least WARN while an alert is active.
    pub status: Health,
    /// Sum of partition lags.
    pub lag: u64,
    /// Largest partition time lag, ms.
    pub time_lag_ms: u64,
    /// Active alerts.
    pub alerts: Vec<String>,
    /// Probe results (plugins).
    #[serde(serialize_with = "serialize_probes")]
    pub probes: ProbeSummary,
    /// Cluster mode: the node running the plugin, "id (address)".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn serialize_probes<S: Serializer>(p: &ProbeSummary, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("ProbeSummary", 6)?;
    st.serialize_field("seen", &p.seen)?;
    st.serialize_field("lost", &p.lost)?;
    st.serialize_field("duplicated", &p.duplicated)?;
    st.serialize_field("p50_ms", &p.p50_ms)?;
    st.serialize_field("p99_ms", &p.p99_ms)?;
    st.serialize_field("p999_ms", &p.p999_ms)?;
    st.end()
}

/// A topic's size and recent publish rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopicRate {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: u32,
    /// Sum of partition ends (records ever written).
    pub records: u64,
    /// Records per second over the last few samples.
    pub rate: f64,
}

/// A consumer's total lag over time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LagHistory {
    /// Plugin or group.
    pub kind: ConsumerKind,
    /// Its name.
    pub name: String,
    /// (ms since the epoch, total lag), oldest first.
    pub points: Vec<(i64, u64)>,
}

/// What the monitor saw at its last sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Every consumer × partition.
    pub rows: Vec<LagRow>,
    /// Every consumer.
    pub consumers: Vec<ConsumerHealth>,
    /// Every topic.
    pub topics: Vec<TopicRate>,
}

/// Burrow's evaluation of one partition's window.
pub(super) fn evaluate(
    window: &VecDeque<Sample>,
    size: usize,
    failed: bool,
    active: bool,
) -> Health {
    if failed {
        return Health::Error;
    }
    let (Some(first), Some(last)) = (window.front(), window.back()) else {
        return Health::Ok;
    };
    if last.lag == 0 || window.len() < size.max(2) {
        return Health::Ok;
    }
    if last.committed == first.committed {
        return if active { Health::Stall } else { Health::Stop };
    }
    let growing = window
        .iter()
        .zip(window.iter().skip(1))
        .all(|(a, b)| b.lag >= a.lag)
        && last.lag > first.lag;
    if growing {
        Health::Warn
    } else {
        Health::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(samples: &[(u64, u64)]) -> VecDeque<Sample> {
        samples
            .iter()
            .map(|&(committed, lag)| Sample { committed, lag })
            .collect()
    }

    #[test]
    fn burrow_rules() {
        let w = window(&[(10, 5), (20, 6), (30, 8), (40, 9)]);
        assert_eq!(evaluate(&w, 4, false, true), Health::Warn);
        let w = window(&[(10, 5), (20, 9), (30, 3), (40, 4)]);
        assert_eq!(evaluate(&w, 4, false, true), Health::Ok);
        let w = window(&[(10, 5), (10, 6), (10, 7), (10, 8)]);
        assert_eq!(evaluate(&w, 4, false, true), Health::Stall);
        assert_eq!(evaluate(&w, 4, false, false), Health::Stop);
        assert_eq!(evaluate(&w, 4, true, true), Health::Error);
        let w = window(&[(10, 0), (10, 0), (10, 0), (10, 0)]);
        assert_eq!(evaluate(&w, 4, false, false), Health::Ok);
        let w = window(&[(10, 5), (10, 5)]);
        assert_eq!(
            evaluate(&w, 4, false, false),
            Health::Ok,
            "window not full yet"
        );
    }
}
