//! weir-metrics: Prometheus metrics (prometheus-client). Event counters and histograms live in
//! one process-wide [`Metrics`]: the broker, the syncer and the plugins' partition loops record into it where
//! the event happens. Lag, probe and alert gauges are snapshots the server's monitor keeps,
//! added to a scrape's registry then.

#![deny(missing_docs)]

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
pub use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
pub use prometheus_client::registry::Registry;

/// A topic label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    /// Topic name.
    pub topic: String,
}

/// A plugin label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    /// Plugin name.
    pub plugin: String,
}

fn seconds_histogram() -> Histogram {
    // 50 µs … ~26 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

fn count_histogram() -> Histogram {
    // 1 … 16 (a partition has at most 8 commits in flight)
    Histogram::new(exponential_buckets(1.0, 2.0, 5))
}

/// Every event metric of the process.
pub struct Metrics {
    /// Records appended, per topic.
    pub publish_records: Family<TopicLabel, Counter>,
    /// Encoded bytes appended, per topic.
    pub publish_bytes: Family<TopicLabel, Counter>,
    /// Writes to a replicated log that carried publishes, per topic: one write covers every
    /// publish to a partition queued while the one before it was in flight.
    pub publish_log_writes: Family<TopicLabel, Counter>,
    /// Duration of each store sync (flush + fdatasync).
    pub fsync_seconds: Histogram,
    /// Plugin batch processing time (the guest call), per plugin.
    pub plugin_batch_seconds: Family<PluginLabel, Histogram, fn() -> Histogram>,
    /// A plugin batch's commit: written to the store → seen durable (the pipeline's
    /// latency), per plugin.
    pub plugin_commit_seconds: Family<PluginLabel, Histogram, fn() -> Histogram>,
    /// Batches of one partition seen durable together (how many batches one durable step
    /// covered), per plugin.
    pub plugin_commit_batches: Family<PluginLabel, Histogram, fn() -> Histogram>,
    /// Records the plugin processed, counted once their commit is written (a call whose
    /// commit was thrown away and run again counts once), per plugin.
    pub plugin_records_in: Family<PluginLabel, Counter>,
    /// Records the plugin emitted (committed), per plugin.
    pub plugin_records_out: Family<PluginLabel, Counter>,
    /// Failed batch attempts (trap, timeout, memory, error), per plugin.
    pub plugin_traps: Family<PluginLabel, Counter>,
    /// Records sent to the dead-letter topic, per plugin.
    pub plugin_dlq: Family<PluginLabel, Counter>,
    /// Records skipped as already processed (dedup), per plugin.
    pub plugin_dedup_skips: Family<PluginLabel, Counter>,
    /// Records refused by a topic's admission limit.
    pub admission_refused: Family<TopicLabel, Counter>,
    /// Failed attempts to forward a plugin's committed outputs, per plugin.
    pub plugin_forward_failures: Family<PluginLabel, Counter>,
    /// Publish → effects committed for probe records, per plugin.
    pub probe_delay_seconds: Family<PluginLabel, Histogram, fn() -> Histogram>,
    /// Cluster mode: 1 while no live node has run the plugin for longer than the lease
    /// time-out (as this node sees the cluster), else 0.
    pub plugin_unowned: Family<PluginLabel, Gauge>,
    /// Commits written to the store (or queued for the changelog) and not yet seen durable,
    /// over the plugin's partitions: the depth of its commit pipeline now.
    pub plugin_commits_in_flight: Family<PluginLabel, Gauge>,
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            publish_records: Family::default(),
            publish_bytes: Family::default(),
            publish_log_writes: Family::default(),
            fsync_seconds: seconds_histogram(),
            plugin_batch_seconds: Family::new_with_constructor(seconds_histogram),
            plugin_commit_seconds: Family::new_with_constructor(seconds_histogram),
            plugin_commit_batches: Family::new_with_constructor(count_histogram),
            plugin_records_in: Family::default(),
            plugin_records_out: Family::default(),
            plugin_traps: Family::default(),
            plugin_dlq: Family::default(),
            plugin_dedup_skips: Family::default(),
            probe_delay_seconds: Family::new_with_constructor(seconds_histogram),
            admission_refused: Family::default(),
            plugin_forward_failures: Family::default(),
            plugin_unowned: Family::default(),
            plugin_commits_in_flight: Family::default(),
        }
    }

    /// A registry holding every event metric (cheap clones of the shared handles).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("weir");
        r.register(
            "publish_records",
            "Records appended to the log",
            self.publish_records.clone(),
        );
        r.register(
            "publish_bytes",
            "Encoded record bytes appended to the log",
            self.publish_bytes.clone(),
        );
        r.register(
            "publish_log_writes",
            "Writes to the replicated log that carried publishes (cluster mode: one write covers every publish to a partition queued while the one before it was in flight)",
            self.publish_log_writes.clone(),
        );
        r.register(
            "fsync_seconds",
            "Duration of a store sync (flush + fdatasync)",
            self.fsync_seconds.clone(),
        );
        r.register(
            "plugin_batch_seconds",
            "Time a plugin took to process a batch",
            self.plugin_batch_seconds.clone(),
        );
        r.register(
            "plugin_commit_seconds",
            "A plugin commit (the effects of one or more calls), from written to the store to durable",
            self.plugin_commit_seconds.clone(),
        );
        r.register(
            "plugin_commit_batches",
            "Commits of one plugin partition made durable by one step of the store's group commit",
            self.plugin_commit_batches.clone(),
        );
        r.register(
            "plugin_records_in",
            "Records a plugin processed, counted when their commit is written",
            self.plugin_records_in.clone(),
        );
        r.register(
            "plugin_records_out",
            "Records a plugin emitted, committed",
            self.plugin_records_out.clone(),
        );
        r.register(
            "plugin_traps",
            "Failed plugin batch attempts (trap, timeout, memory cap, error)",
            self.plugin_traps.clone(),
        );
        r.register(
            "plugin_dlq",
            "Records sent to a plugin's dead-letter topic",
            self.plugin_dlq.clone(),
        );
        r.register(
            "plugin_dedup_skips",
            "Records skipped as already processed",
            self.plugin_dedup_skips.clone(),
        );
        r.register(
            "probe_delay_seconds",
            "End-to-end delay of probe records: publish to effects committed",
            self.probe_delay_seconds.clone(),
        );
        r.register(
            "plugin_unowned",
            "1 while no live weir node has run the plugin for longer than the lease time-out",
            self.plugin_unowned.clone(),
        );
        r.register(
            "plugin_commits_in_flight",
            "Plugin commits written and not yet durable (the depth of the commit pipeline)",
            self.plugin_commits_in_flight.clone(),
        );
        r.register(
            "plugin_forward_failures",
            "Failed attempts to forward a plugin's committed outputs to their topics",
            self.plugin_forward_failures.clone(),
        );
        r.register(
            "admission_refused",
            "Records refused by a topic's admission limit (per key per window)",
            self.admission_refused.clone(),
        );
        r
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// A plugin label value.
pub fn plugin(name: &str) -> PluginLabel {
    PluginLabel {
        plugin: name.to_string(),
    }
}

/// A topic label value.
pub fn topic(name: &str) -> TopicLabel {
    TopicLabel {
        topic: name.to_string(),
    }
}
