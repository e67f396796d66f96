//! Lag and latency monitoring (the seed's 消息延迟): every `sample_interval` the monitor reads
//! each plugin's and consumer group's committed offsets against the partitions' ends, keeps a
//! sliding window of samples per partition and evaluates it with Burrow's rules; it raises and
//! clears per-plugin alerts, writes probe records on their own interval, and keeps the history
//! the status page charts. `weir lag`, `/metrics` and the status page all read its snapshot.

mod gauges;
pub mod http;
mod model;
pub mod probe;

use model::evaluate;
pub use model::{ConsumerHealth, ConsumerKind, Health, LagHistory, LagRow, Snapshot, TopicRate};

use std::collections::{BTreeMap, HashMap, VecDeque};

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use probe::{ProbeMarker, ProbeSummary, PROBE_HEADER};
use weir_broker::{Broker, Publish};
use weir_core::{now_ms, Record};
use weir_plugins::{AlertThresholds, PluginManager};

/// How the monitor samples, evaluates and probes.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorConfig {
    /// Time between samples.
    pub sample_interval: Duration,
    /// Samples in Burrow's evaluation window.
    pub window: usize,
    /// Samples of total lag kept per consumer for the status page's chart.
    pub history: usize,
    /// Time between probe records; `None` writes none.
    pub probe_interval: Option<Duration>,
    /// Topics probed; empty = every plugin's input topic.
    pub probe_topics: Vec<String>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            sample_interval: Duration::from_secs(1),
            window: 10,
            history: 600,
            probe_interval: None,
            probe_topics: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub(crate) committed: u64,
    pub(crate) lag: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum AlertKind {
    Lag,
    Delay,
    /// Cluster mode: no live node has run the plugin for longer than the lease time-out.
    Unowned,
}

#[derive(Default)]
struct Inner {
    windows: HashMap<(ConsumerKind, String, String, u32), VecDeque<Sample>>,
    /// (kind, name) → (t ms, total lag), for the chart.
    history: BTreeMap<(ConsumerKind, String), VecDeque<(i64, u64)>>,
    /// topic → (t ms, records), for rates.
    topic_ends: HashMap<String, VecDeque<(i64, u64)>>,
    /// Active alerts and their text.
    alerts: BTreeMap<(String, AlertKind), String>,
    snapshot: Snapshot,
}

/// The monitor of one server.
pub struct Monitor {
    broker: Arc<Broker>,
    plugins: Arc<PluginManager>,
    probes: Arc<probe::ProbeBook>,
    config: MonitorConfig,
    inner: Mutex<Inner>,
    run: u64,
}

/// What one consumer partition looks like right now.
struct Observed {
    kind: ConsumerKind,
    name: String,
    topic: String,
    partition: u32,
    committed: u64,
    end: u64,
    time_lag_ms: u64,
    /// Halted plugin partition, or one whose outputs are blocked.
    failed: bool,
    /// Why its committed outputs cannot be forwarded, if they cannot.
    blocked: Option<String>,
    /// Committing (a running plugin; a group that committed within the window).
    active: bool,
}

impl Monitor {
    /// A monitor over a broker and its plugins.
    pub fn new(
        broker: Arc<Broker>,
        plugins: Arc<PluginManager>,
        probes: Arc<probe::ProbeBook>,
        config: MonitorConfig,
    ) -> Arc<Self> {
        Arc::new(Monitor {
            broker,
            plugins,
            probes,
            config,
            inner: Mutex::new(Inner::default()),
            run: rand::random(),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// Samples until `shutdown`, and writes probes if configured.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if let Some(every) = self.config.probe_interval {
            tokio::spawn(self.clone().run_probes(every, shutdown.clone()));
        }
        let mut tick = tokio::time::interval(self.config.sample_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A sample only reads: one cut short at shutdown leaves nothing half-done (a
            // sample waiting on a shared log whose servers are gone would hold the shutdown).
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = async {
                    tick.tick().await;
                    self.sample().await;
                } => {}
            }
        }
    }

    /// The last snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().snapshot.clone()
    }

    /// Total lag per consumer over the kept history, for the chart.
    pub fn history(&self) -> Vec<LagHistory> {
        self.inner
            .lock()
            .history
            .iter()
            .map(|((kind, name), h)| LagHistory {
                kind: *kind,
                name: name.clone(),
                points: h.iter().copied().collect(),
            })
            .collect()
    }

    async fn observe(
        &self,
    ) -> (
        Vec<Observed>,
        Vec<TopicRate>,
        HashMap<String, AlertThresholds>,
    ) {
        let now = now_ms();
        let window_ms = self.config.sample_interval.as_millis() as i64 * self.config.window as i64;
        let mut observed = Vec::new();
        let mut thresholds = HashMap::new();
        for info in self.plugins.list() {
            thresholds.insert(info.spec.name.clone(), info.spec.alerts);
            let Ok(topic) = self.broker.describe_topic(&info.spec.input) else {
                continue;
            };
            for (p, status) in info.partitions.iter().enumerate() {
                let end = topic.partitions.get(p).map_or(0, |s| s.end_offset);
                let blocked = status
                    .forwarding
                    .as_deref()
                    .and_then(|f| f.strip_prefix("blocked: "))
                    .map(str::to_string);
                observed.push(Observed {
                    kind: ConsumerKind::Plugin,
                    name: info.spec.name.clone(),
                    topic: info.spec.input.clone(),
                    partition: p as u32,
                    committed: status.committed,
                    end,
                    time_lag_ms: self
                        .oldest_age(&info.spec.input, p as u32, status.committed, end, now)
                        .await,
                    failed: status.state.is_halted() || blocked.is_some(),
                    blocked,
                    active: !info.spec.paused,
                });
            }
        }
        for (group, topic_name) in self.broker.list_groups().await.unwrap_or_default() {
            let Ok(topic) = self.broker.describe_topic(&topic_name) else {
                continue;
            };
            let offsets = self
                .broker
                .fetch_offsets(&group, &topic_name)
                .await
                .unwrap_or_default();
            let active = self
                .broker
                .group_last_commit_ms(&group, &topic_name)
                .is_some_and(|t| now - t <= window_ms);
            for (p, committed) in offsets {
                let end = topic.partitions.get(p as usize).map_or(0, |s| s.end_offset);
                observed.push(Observed {
                    kind: ConsumerKind::Group,
                    name: group.clone(),
                    topic: topic_name.clone(),
                    partition: p,
                    committed,
                    end,
                    time_lag_ms: self.oldest_age(&topic_name, p, committed, end, now).await,
                    failed: false,
                    blocked: None,
                    active,
                });
            }
        }
        let topics = self
            .broker
            .list_topics()
            .into_iter()
            .map(|t| TopicRate {
                records: t.partitions.iter().map(|p| p.end_offset).sum(),
                partitions: t.config.partitions,
                name: t.config.name,
                rate: 0.0,
            })
            .collect();
        (observed, topics, thresholds)
    }

    /// Age of the record at `committed`, if it is still waiting.
    async fn oldest_age(
        &self,
        topic: &str,
        partition: u32,
        committed: u64,
        end: u64,
        now: i64,
    ) -> u64 {
        if committed >= end {
            return 0;
        }
        match self.broker.read(topic, partition, committed, 1).await {
            Ok(records) => records
                .first()
                .map_or(0, |r| weir_core::elapsed_ms(r.record.timestamp_ms, now)),
            Err(_) => 0,
        }
    }

    /// Takes one sample of everything and re-evaluates.
    pub async fn sample(&self) {
        let (observed, mut topics, specs) = self.observe().await;
        let now = now_ms();
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let mut rows = Vec::with_capacity(observed.len());
        let mut live = std::collections::HashSet::new();
        let mut blocked: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in observed {
            if let Some(why) = &o.blocked {
                blocked.entry(o.name.clone()).or_default().push(format!(
                    "outputs of partition {} blocked: {why}",
                    o.partition
                ));
            }
            let key = (o.kind, o.name.clone(), o.topic.clone(), o.partition);
            let window = inner.windows.entry(key.clone()).or_default();
            let lag = o.end.saturating_sub(o.committed);
            window.push_back(Sample {
                committed: o.committed,
                lag,
            });
            while window.len() > self.config.window {
                window.pop_front();
            }
            live.insert(key);
            rows.push(LagRow {
                status: evaluate(window, self.config.window, o.failed, o.active),
                kind: o.kind,
                name: o.name,
                topic: o.topic,
                partition: o.partition,
                committed: o.committed,
                end: o.end,
                lag,
                time_lag_ms: o.time_lag_ms,
            });
        }
        inner.windows.retain(|k, _| live.contains(k));
        // Per consumer: totals, alerts, probes, history.
        let mut consumers: BTreeMap<(ConsumerKind, String), ConsumerHealth> = BTreeMap::new();
        for r in &rows {
            let c = consumers
                .entry((r.kind, r.name.clone()))
                .or_insert_with(|| ConsumerHealth {
                    kind: r.kind,
                    name: r.name.clone(),
                    status: Health::Ok,
                    lag: 0,
                    time_lag_ms: 0,
                    alerts: Vec::new(),
                    probes: ProbeSummary::default(),
                    node: None,
                });
            c.status = c.status.max(r.status);
            c.lag += r.lag;
            c.time_lag_ms = c.time_lag_ms.max(r.time_lag_ms);
        }
        let mut active_alerts = BTreeMap::new();
        for c in consumers.values_mut() {
            if c.kind == ConsumerKind::Plugin {
                c.probes = self.probes.summary(&c.name);
                c.node = self.plugins.info(&c.name).ok().and_then(|i| i.node);
                if self.plugins.unowned(&c.name) {
                    active_alerts.insert(
                        (c.name.clone(), AlertKind::Unowned),
                        "no live weir node has run it for longer than the lease time-out; a live node takes it over".to_string(),
                    );
                }
                if let Some(t) = specs.get(&c.name) {
                    if t.max_lag > 0 && c.lag > t.max_lag {
                        active_alerts.insert(
                            (c.name.clone(), AlertKind::Lag),
                            format!("lag {} > {}", c.lag, t.max_lag),
                        );
                    }
                    if t.max_delay_ms > 0 && c.time_lag_ms > t.max_delay_ms {
                        active_alerts.insert(
                            (c.name.clone(), AlertKind::Delay),
                            format!("delay {} ms > {} ms", c.time_lag_ms, t.max_delay_ms),
                        );
                    }
                }
                for ((name, _), text) in &active_alerts {
                    if name == &c.name {
                        c.alerts.push(text.clone());
                    }
                }
                c.alerts.extend(blocked.remove(&c.name).unwrap_or_default());
                if !c.alerts.is_empty() {
                    c.status = c.status.max(Health::Warn);
                }
            }
            let h = inner.history.entry((c.kind, c.name.clone())).or_default();
            h.push_back((now, c.lag));
            while h.len() > self.config.history {
                h.pop_front();
            }
        }
        for (key, text) in &active_alerts {
            if !inner.alerts.contains_key(key) {
                tracing::warn!(message = "Alert raised.", plugin = %key.0, alert = ?key.1, detail = %text);
            }
        }
        for (key, text) in &inner.alerts {
            if !active_alerts.contains_key(key) {
                tracing::info!(message = "Alert cleared.", plugin = %key.0, alert = ?key.1, was = %text);
            }
        }
        inner.alerts = active_alerts;
        inner.history.retain(|k, _| consumers.contains_key(k));
        // Topic rates over the last five samples.
        for t in &mut topics {
            let ends = inner.topic_ends.entry(t.name.clone()).or_default();
            ends.push_back((now, t.records));
            while ends.len() > 6 {
                ends.pop_front();
            }
            if let (Some(&(t0, r0)), Some(&(t1, r1))) = (ends.front(), ends.back()) {
                if t1 > t0 {
                    t.rate = r1.saturating_sub(r0) as f64 * 1000.0 / (t1 - t0) as f64;
                }
            }
        }
        let names: std::collections::HashSet<&String> = topics.iter().map(|t| &t.name).collect();
        inner.topic_ends.retain(|k, _| names.contains(k));
        inner.snapshot = Snapshot {
            at_ms: now,
            rows,
            consumers: consumers.into_values().collect(),
            topics,
        };
    }

    /// Writes one probe into every partition of the watched topics each `every`.
    async fn run_probes(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut seqs: HashMap<(String, u32), u64> = HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let topics: Vec<String> = if self.config.probe_topics.is_empty() {
                let mut t: Vec<String> = self
                    .plugins
                    .list()
                    .into_iter()
                    .map(|i| i.spec.input)
                    .collect();
                t.sort();
                t.dedup();
                t
            } else {
                self.config.probe_topics.clone()
            };
            // Sequences of topics no longer probed are forgotten (bounded by live topics).
            seqs.retain(|(t, _), _| topics.contains(t));
            for topic in topics {
                let Ok(info) = self.broker.describe_topic(&topic) else {
                    continue;
                };
                for p in 0..info.config.partitions {
                    let seq = seqs.entry((topic.clone(), p)).or_insert(0);
                    *seq += 1;
                    let marker = ProbeMarker {
                        run: self.run,
                        seq: *seq,
                    };
                    let record = Record {
                        headers: vec![(PROBE_HEADER.into(), marker.encode().into())],
                        timestamp_ms: now_ms(),
                        ..Record::from_value("probe")
                    };
                    let publish = Publish {
                        topic: topic.clone(),
                        partition: Some(p),
                        records: vec![record],
                        ..Default::default()
                    };
                    if let Err(e) = self.broker.publish(publish).await {
                        tracing::debug!(message = "Probe not written.", %topic, partition = p, error = %e);
                    }
                }
            }
        }
    }
}
