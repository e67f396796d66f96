//! Probe records (the seed's 监控消息, Kafka Monitor's end-to-end probe): the monitor writes a
//! marked record into each partition of watched topics; a plugin's partition loop never hands
//! one to the plugin: it commits past it and reports here, once the commit is durable, how
//! long it took from publish to effects committed.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};

pub use weir_core::{ProbeMarker, PROBE_HEADER};

/// Delays kept per plugin for the percentiles.
const RECENT: usize = 10_000;

/// What is known of one plugin's probes.
#[derive(Debug, Default)]
struct ProbeStats {
    delays_ms: VecDeque<u64>,
    seen: u64,
    lost: u64,
    duplicated: u64,
    /// Last marker seen per partition.
    last: HashMap<u32, ProbeMarker>,
}

/// A plugin's probe summary.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbeSummary {
    /// Probes committed past.
    pub seen: u64,
    /// Probes that never arrived (a gap in sequences).
    pub lost: u64,
    /// Probes that arrived twice.
    pub duplicated: u64,
    /// Median delay, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
}

/// Probe results of every plugin of a server.
#[derive(Debug, Default)]
pub struct ProbeBook {
    plugins: Mutex<HashMap<String, ProbeStats>>,
}

impl ProbeBook {
    /// Records a probe committed by `plugin` on `partition`, `delay_ms` after it was published.
    pub fn record(&self, plugin: &str, partition: u32, marker: ProbeMarker, delay_ms: u64) {
        let mut plugins = self.plugins.lock();
        let stats = plugins.entry(plugin.to_string()).or_default();
        match stats.last.get(&partition) {
            Some(last) if last.run == marker.run && marker.seq <= last.seq => {
                stats.duplicated += 1;
                return;
            }
            Some(last) if last.run == marker.run && marker.seq > last.seq + 1 => {
                stats.lost += marker.seq - last.seq - 1;
            }
            _ => {}
        }
        stats.last.insert(partition, marker);
        stats.seen += 1;
        if stats.delays_ms.len() == RECENT {
            stats.delays_ms.pop_front();
        }
        stats.delays_ms.push_back(delay_ms);
        weir_metrics::global()
            .probe_delay_seconds
            .get_or_create(&weir_metrics::plugin(plugin))
            .observe(delay_ms as f64 / 1000.0);
    }

    /// A plugin's summary over its recent probes.
    pub fn summary(&self, plugin: &str) -> ProbeSummary {
        let plugins = self.plugins.lock();
        let Some(stats) = plugins.get(plugin) else {
            return ProbeSummary::default();
        };
        let mut sorted: Vec<u64> = stats.delays_ms.iter().copied().collect();
        sorted.sort_unstable();
        let pct = |q: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i] as f64
        };
        ProbeSummary {
            seen: stats.seen,
            lost: stats.lost,
            duplicated: stats.duplicated,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
        }
    }

    /// Forgets a removed plugin.
    pub fn forget(&self, plugin: &str) {
        self.plugins.lock().remove(plugin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_lost_repeats_are_duplicates_and_a_new_run_starts_over() {
        let book = ProbeBook::default();
        let m = |run, seq| ProbeMarker { run, seq };
        for (seq, delay) in [(1, 10), (2, 20), (5, 30), (5, 99), (4, 99), (6, 40)] {
            book.record("p", 0, m(7, seq), delay);
        }
        book.record("p", 1, m(7, 9), 50); // another partition has its own sequence
        book.record("p", 0, m(8, 1), 60); // restarted monitor: a new run, no gap
        let s = book.summary("p");
        assert_eq!((s.seen, s.lost, s.duplicated), (6, 2, 2));
        assert_eq!(s.p50_ms, 30.0);
        assert_eq!(s.p99_ms, 60.0);
    }
}
