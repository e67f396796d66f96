//! Runs a plugin's input partitions: one task per partition (fetch → skip seen ids → call the
//! plugin off the async workers → commit atomically), with retries, dead letters and halts.
//!
//! The commit of a batch is a single atomic write to the plugin's namespace holding its state
//! writes, its message ids, its outputs (outbox entry with producer sequences already
//! assigned) and the partition's cursor (next input offset, commit sequence, counters). A
//! crash leaves all of it or none; the forwarder ([`super::outbox`]) then publishes the outbox
//! with the same sequences, so the broker drops a re-forwarded batch. Partitions of one plugin
//! share its state: the commit checks, under the plugin's commit lock, that the versions the
//! batch read are unchanged and its ids still unseen, and re-runs the batch otherwise
//! (optimistic concurrency).
//!
//! Failures are told apart by whose they are. The plugin's (trap, timeout, error, bad output)
//! spend attempts and end in a dead letter or a halt. The server's (the store, a full
//! instance pool) make the partition wait and retry without spending anything. An interrupt
//! (pause, remove, upgrade, shutdown) stops a batch within an epoch tick and commits nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::dedup::{id_hash, DedupIndex};
use super::instance::{BatchEffects, Interrupt, LogLevel, PluginInstance, StateReader};
use super::logs::LogRing;
use super::outbox::{encode_groups, output_record, Group};
use super::spec::{partition_key, Cursor, OnError, PluginSpec};
use super::state::{encode_delta, log_key, read_through, StateCache};
use super::{CompiledPlugin, PluginError};
use crate::backoff::Backoff;
use crate::broker::{Broker, ReadLimits};
use crate::log::{LogError, LogStore};
use crate::metrics;
use crate::monitor::probe::{ProbeBook, ProbeMarker};
use crate::record::{partition_for_key, Record, StoredRecord};

/// Batches an instance runs before it is replaced (wasmtime never frees instances a Store
/// created, and a fresh one bounds any leak in the plugin).
const RECYCLE_AFTER_BATCHES: u64 = 10_000;
/// Encoded input bytes per batch at most (a record larger than this goes alone): a batch's
/// blob is copied into the plugin's memory, which is capped.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What a partition of a plugin is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PartitionState {
    /// Processing (or waiting for records).
    #[default]
    Running,
    /// Paused by the operator.
    Paused,
    /// A batch failed and is retried: why.
    Retrying(String),
    /// Waiting for the server (its store, room in the instance pool): why. No attempt is
    /// spent while waiting.
    Waiting(String),
    /// Stopped on a record that failed every attempt (or its input is gone): why.
    Halted(String),
}

impl PartitionState {
    /// Whether the partition stopped for good (until resumed or upgraded).
    pub fn is_halted(&self) -> bool {
        matches!(self, PartitionState::Halted(_))
    }
}

impl std::fmt::Display for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartitionState::Running => f.write_str("running"),
            PartitionState::Paused => f.write_str("paused"),
            PartitionState::Retrying(why) => write!(f, "retrying: {why}"),
            PartitionState::Waiting(why) => write!(f, "waiting: {why}"),
            PartitionState::Halted(why) => write!(f, "halted: {why}"),
        }
    }
}

/// What an operator sees of a partition of a plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStatus {
    /// Next input offset to process.
    pub committed: u64,
    /// Records whose effects were committed (since deploy; kept across restarts).
    pub processed: u64,
    /// Records skipped as already processed (dedup).
    pub skipped: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// What the partition is doing.
    pub state: PartitionState,
    /// Why committed outputs are not reaching their topics, when they are not.
    pub forwarding: Option<String>,
}

/// Why a step of the partition loop did not complete.
pub(super) enum StepError {
    /// The plugin failed on the batch: spends an attempt.
    Plugin(PluginError),
    /// The store failed: wait and retry.
    Storage(LogError),
    /// A state read failed in the store while the plugin ran: wait and retry.
    StateUnavailable(String),
    /// Interrupted (pause, stop, shutdown): nothing committed, nothing spent.
    Stopped,
    /// The store cannot be synced: the server is stopping (fail-stop).
    Fatal(String),
}

impl StepError {
    fn describe(&self) -> String {
        match self {
            StepError::Plugin(e) => e.to_string(),
            StepError::Storage(e) => e.to_string(),
            StepError::StateUnavailable(why) | StepError::Fatal(why) => why.clone(),
            StepError::Stopped => "stopped".into(),
        }
    }
}

impl From<PluginError> for StepError {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::Interrupted => StepError::Stopped,
            PluginError::StateUnavailable(why) => StepError::StateUnavailable(why),
            other => StepError::Plugin(other),
        }
    }
}

impl From<LogError> for StepError {
    fn from(e: LogError) -> Self {
        StepError::Storage(e)
    }
}

impl From<crate::blocking::Panicked> for StepError {
    fn from(e: crate::blocking::Panicked) -> Self {
        StepError::Plugin(PluginError::Engine(e.to_string()))
    }
}

/// A plugin's running state, shared by its tasks.
pub(crate) struct PluginRuntime {
    pub spec: PluginSpec,
    pub(super) compiled: CompiledPlugin,
    pub(super) store: Arc<dyn LogStore>,
    pub(super) broker: Arc<Broker>,
    pub(super) namespace: String,
    pub(super) commit_lock: Mutex<()>,
    /// Committed state of recently used keys (see [`StateCache`]).
    pub(super) cache: Arc<StateCache>,
    /// Next state-delta sequence (`l/<seq>`), advanced under the commit lock.
    pub(super) log_seq: AtomicU64,
    pub(super) dedup: Mutex<DedupIndex>,
    pub(super) logs: LogRing,
    pub status: Mutex<Vec<PartitionStatus>>,
    pub(super) outbox: Vec<Notify>,
    pub paused: watch::Sender<bool>,
    /// Where committed probes are reported.
    pub(super) probes: Arc<ProbeBook>,
    /// Each partition's cursor as stored at open; the partition task owns it from then on.
    cursors: Vec<Cursor>,
    /// `plugin` label of its metrics.
    pub(super) label: metrics::PluginLabel,
}

/// A committed batch.
struct Done {
    cursor: Cursor,
    outputs: u64,
    /// Probes committed past, with their publish times.
    probes: Vec<(ProbeMarker, i64)>,
}

/// The outcome of trying to commit a batch.
enum Commit {
    Done(Done),
    Conflict,
}

/// What a partition task owns: its cursor, its output sequences, its instance. Moved into
/// the blocking pool for a batch and back.
struct Local {
    cursor: Cursor,
    /// Next producer sequence per output partition (`q/` keys), read once.
    sequences: HashMap<(String, u32), u64>,
    instance: Option<PluginInstance>,
}

/// A partition task's view of stop requests.
struct Stop {
    cancel: CancellationToken,
    paused: watch::Receiver<bool>,
}

impl Stop {
    fn requested(&self) -> bool {
        self.cancel.is_cancelled() || *self.paused.borrow()
    }

    fn interrupt(&self) -> Interrupt {
        let (cancel, paused) = (self.cancel.clone(), self.paused.clone());
        Arc::new(move || cancel.is_cancelled() || *paused.borrow())
    }

    /// Sleeps `d`; `false` when a stop was requested meanwhile.
    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.cancel.cancelled() => {}
            _ = self.paused.changed() => {}
        }
        !self.requested()
    }
}

impl PluginRuntime {
    /// Loads the plugin's dedup index, cursors and log position. Blocking.
    pub(crate) fn new(
        spec: PluginSpec,
        compiled: CompiledPlugin,
        store: Arc<dyn LogStore>,
        broker: Arc<Broker>,
        probes: Arc<ProbeBook>,
        state_cache_bytes: usize,
    ) -> Result<Arc<Self>, LogError> {
        let namespace = spec.namespace();
        let mut dedup = DedupIndex::default();
        for (key, value) in store.kv_scan(&namespace, b"d/")? {
            if let Some((newest, ids)) = DedupIndex::decode(&value) {
                dedup.insert(key.to_vec(), newest, ids);
            }
        }
        let partitions = spec.producer_ids.len();
        let mut cursors = Vec::with_capacity(partitions);
        let mut status = Vec::with_capacity(partitions);
        for p in 0..partitions as u32 {
            let key = partition_key(b'c', p, b"");
            let cursor = match store.kv_get(&namespace, &key)? {
                Some(v) => Cursor::decode(&v).ok_or_else(|| LogError::Malformed {
                    what: format!("cursor of partition {p} of plugin {}", spec.name),
                    reason: format!("{} bytes", v.len()),
                })?,
                None => Cursor::default(),
            };
            status.push(PartitionStatus {
                committed: cursor.next,
                processed: cursor.processed,
                skipped: cursor.skipped,
                dead_lettered: cursor.dead_lettered,
                state: if spec.paused {
                    PartitionState::Paused
                } else {
                    PartitionState::Running
                },
                forwarding: None,
            });
            cursors.push(cursor);
        }
        let log_seq = store
            .kv_scan(&namespace, b"l/")?
            .last()
            .and_then(|(k, _)| k.get(2..10)?.try_into().ok().map(u64::from_be_bytes))
            .map_or(0, |s| s + 1);
        let logs = LogRing::open(&*store, &namespace)?;
        let runtime = Arc::new(PluginRuntime {
            label: metrics::plugin(&spec.name),
            paused: watch::channel(spec.paused).0,
            outbox: (0..partitions).map(|_| Notify::new()).collect(),
            spec,
            compiled,
            store,
            broker,
            namespace,
            commit_lock: Mutex::new(()),
            cache: Arc::new(StateCache::new(state_cache_bytes)),
            log_seq: AtomicU64::new(log_seq),
            dedup: Mutex::new(dedup),
            logs,
            status: Mutex::new(status),
            probes,
            cursors,
        });
        // Fold state deltas left by a crash before anything reads `s/` entries.
        runtime.compact()?;
        Ok(runtime)
    }

    /// Appends a line to the plugin's log (kept in the store, the newest lines only).
    pub(crate) fn log(&self, line: String) {
        self.logs.push(line);
    }

    /// The plugin's log lines, oldest first. Blocking.
    pub(crate) fn log_lines(&self) -> Result<Vec<String>, LogError> {
        self.logs.lines(&*self.store, &self.namespace)
    }

    /// Writes buffered log lines to the store.
    pub(crate) async fn flush_logs(self: &Arc<Self>) {
        let this = self.clone();
        let flushed =
            crate::blocking::run(move || this.logs.flush(&*this.store, &this.namespace)).await;
        if let Ok(Err(e)) = flushed {
            tracing::debug!(message = "Plugin log lines not written yet.", plugin = %self.spec.name, error = %e);
        }
    }

    fn set_state(&self, partition: u32, state: PartitionState) {
        self.status.lock()[partition as usize].state = state;
    }

    fn reader(&self) -> StateReader {
        let (store, ns, cache) = (
            self.store.clone(),
            self.namespace.clone(),
            self.cache.clone(),
        );
        Arc::new(move |key: &[u8]| {
            read_through(&cache, &*store, &ns, key).map_err(|e| e.to_string())
        })
    }

    /// Runs one partition until cancelled or halted.
    pub(crate) async fn run_partition(self: Arc<Self>, partition: u32, cancel: CancellationToken) {
        let input = self.spec.input.clone();
        let mut watch = match self.broker.watch(&input, partition) {
            Ok(w) => w,
            Err(e) => return self.set_state(partition, PartitionState::Halted(e.to_string())),
        };
        let mut stop = Stop {
            cancel,
            paused: self.paused.subscribe(),
        };
        let mut local = Some(Local {
            cursor: self.cursors[partition as usize],
            sequences: HashMap::new(),
            instance: None,
        });
        // --max-rate: this partition's share of the rate, as a schedule of when the next batch
        // may start.
        let partitions = self.spec.producer_ids.len().max(1) as f64;
        let per_second = self.spec.max_rate as f64 / partitions;
        let mut next_start = tokio::time::Instant::now();
        let max_batch = if per_second > 0.0 {
            // Small enough batches that the pace is smooth (about 20 per second).
            ((per_second / 20.0).ceil() as usize).clamp(1, self.spec.max_batch)
        } else {
            self.spec.max_batch
        };
        let mut read_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if stop.cancel.is_cancelled() {
                return;
            }
            if *stop.paused.borrow_and_update() {
                self.set_state(partition, PartitionState::Paused);
                tokio::select! {
                    _ = stop.paused.changed() => continue,
                    _ = stop.cancel.cancelled() => return,
                }
            }
            let Some(l) = local.as_ref() else {
                // A batch task panicked and took the partition's state with it: reload it
                // from the store, which holds exactly what was committed.
                match self.reload(partition).await {
                    Ok(l) => local = Some(l),
                    Err(e) => {
                        self.wait_for_store(partition, &e.describe());
                        stop.sleep(read_backoff.next()).await;
                    }
                }
                continue;
            };
            let offset = l.cursor.next;
            watch.borrow_and_update();
            let limits = ReadLimits {
                max_records: max_batch,
                max_bytes: MAX_BATCH_BYTES,
            };
            let records = match self
                .broker
                .read_limited(&input, partition, offset, limits)
                .await
            {
                Ok(r) => r,
                Err(crate::broker::BrokerError::Storage(e)) if !e.is_damage() => {
                    self.wait_for_store(partition, &e.to_string());
                    stop.sleep(read_backoff.next()).await;
                    continue;
                }
                Err(e) => {
                    return self.set_state(
                        partition,
                        PartitionState::Halted(format!("reading input: {e}")),
                    )
                }
            };
            read_backoff.reset();
            if records.is_empty() {
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() {
                        return self.set_state(partition, PartitionState::Halted("input topic deleted".into()));
                    },
                    _ = stop.paused.changed() => {}
                    _ = stop.cancel.cancelled() => return,
                }
                continue;
            }
            if per_second > 0.0 {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_start) => {}
                    _ = stop.cancel.cancelled() => return,
                }
                let now = tokio::time::Instant::now();
                next_start = next_start.max(now - Duration::from_millis(100))
                    + Duration::from_secs_f64(records.len() as f64 / per_second);
            }
            let span = tracing::debug_span!(
                "commit",
                first_offset = records[0].offset,
                records = records.len()
            );
            let result = tracing::Instrument::instrument(
                self.run_batch(partition, &records, &mut local, &mut stop),
                span,
            )
            .await;
            match result {
                Ok(()) => {
                    if !stop.requested() {
                        self.set_state(partition, PartitionState::Running)
                    }
                }
                Err(Halt::Stopped) => {}
                Err(Halt::Fatal(why)) => {
                    self.set_state(partition, PartitionState::Waiting(why));
                    return;
                }
                Err(Halt::Record(halt)) => {
                    self.log(format!("partition {partition} halted: {halt}"));
                    tracing::warn!(message = "Plugin halted.", plugin = %self.spec.name, partition, reason = %halt);
                    self.set_state(partition, PartitionState::Halted(halt));
                    return;
                }
            }
        }
    }

    fn wait_for_store(&self, partition: u32, why: &str) {
        let state = PartitionState::Waiting(format!("the store failed, retrying: {why}"));
        let mut status = self.status.lock();
        if status[partition as usize].state != state {
            status[partition as usize].state = state;
            drop(status);
            self.log(format!(
                "partition {partition}: waiting for the store (not the record's fault): {why}"
            ));
        }
    }

    /// The partition's state as stored (after a batch task panicked).
    async fn reload(self: &Arc<Self>, partition: u32) -> Result<Local, StepError> {
        let this = self.clone();
        let cursor = crate::blocking::run(move || {
            let key = partition_key(b'c', partition, b"");
            match this.store.kv_get(&this.namespace, &key)? {
                Some(v) => Cursor::decode(&v).ok_or_else(|| LogError::Malformed {
                    what: format!("cursor of partition {partition}"),
                    reason: format!("{} bytes", v.len()),
                }),
                None => Ok(Cursor::default()),
            }
        })
        .await??;
        Ok(Local {
            cursor,
            sequences: HashMap::new(),
            instance: None,
        })
    }

    /// Processes records with retries; on persistent failure applies the error policy, one
    /// record at a time so only the failing record is dead-lettered.
    async fn run_batch(
        self: &Arc<Self>,
        partition: u32,
        records: &[StoredRecord],
        local: &mut Option<Local>,
        stop: &mut Stop,
    ) -> Result<(), Halt> {
        let e = match self.attempts(partition, records, local, stop).await {
            Ok(()) => return Ok(()),
            Err(Failure::Stopped) => return Err(Halt::Stopped),
            Err(Failure::Fatal(why)) => return Err(Halt::Fatal(why)),
            Err(Failure::Plugin(e)) => e,
        };
        if records.len() == 1 {
            return self.give_up(partition, &records[0], e, local, stop).await;
        }
        // Isolate the failing record(s): commit the good ones one by one.
        for r in records {
            if stop.requested() {
                return Err(Halt::Stopped);
            }
            match self
                .attempts(partition, std::slice::from_ref(r), local, stop)
                .await
            {
                Ok(()) => {}
                Err(Failure::Stopped) => return Err(Halt::Stopped),
                Err(Failure::Fatal(why)) => return Err(Halt::Fatal(why)),
                Err(Failure::Plugin(e)) => self.give_up(partition, r, e, local, stop).await?,
            }
        }
        Ok(())
    }

    /// Runs and commits `records` until it works, the plugin fails `max_attempts` times, or a
    /// stop is requested. The server's own failures are waited out without spending attempts.
    async fn attempts(
        self: &Arc<Self>,
        partition: u32,
        records: &[StoredRecord],
        local: &mut Option<Local>,
        stop: &mut Stop,
    ) -> Result<(), Failure> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut server_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut attempt = 1;
        let mut waiting_logged = false;
        loop {
            if stop.requested() {
                return Err(Failure::Stopped);
            }
            let e = match self
                .process_and_commit(partition, records, local, stop)
                .await
            {
                Ok(()) => return Ok(()),
                Err(StepError::Stopped) => return Err(Failure::Stopped),
                Err(StepError::Fatal(why)) => return Err(Failure::Fatal(why)),
                Err(StepError::Storage(e)) if !e.is_damage() => {
                    self.wait_for_store(partition, &e.to_string());
                    if !stop.sleep(server_backoff.next()).await {
                        return Err(Failure::Stopped);
                    }
                    continue;
                }
                Err(StepError::StateUnavailable(why)) => {
                    self.wait_for_store(partition, &why);
                    if !stop.sleep(server_backoff.next()).await {
                        return Err(Failure::Stopped);
                    }
                    continue;
                }
                // A full instance pool is the server's condition, not the record's: wait for
                // room (another plugin paused or removed) without spending attempts.
                Err(StepError::Plugin(e @ PluginError::NoInstanceRoom(_))) => {
                    if !waiting_logged {
                        self.log(format!("partition {partition}: waiting: {e}"));
                        waiting_logged = true;
                    }
                    self.set_state(partition, PartitionState::Waiting(e.to_string()));
                    if !stop.sleep(Duration::from_secs(1)).await {
                        return Err(Failure::Stopped);
                    }
                    continue;
                }
                Err(StepError::Storage(damage)) => PluginError::Engine(damage.to_string()),
                Err(StepError::Plugin(e)) => e,
            };
            if attempt >= self.spec.max_attempts.max(1) {
                return Err(Failure::Plugin(e));
            }
            self.log(format!(
                "partition {partition} offsets {}..={}: attempt {attempt} failed: {e}",
                records[0].offset,
                records[records.len() - 1].offset
            ));
            self.set_state(partition, PartitionState::Retrying(e.to_string()));
            if !stop.sleep(backoff.next()).await {
                return Err(Failure::Stopped);
            }
            attempt += 1;
        }
    }

    async fn give_up(
        self: &Arc<Self>,
        partition: u32,
        record: &StoredRecord,
        error: PluginError,
        local: &mut Option<Local>,
        stop: &mut Stop,
    ) -> Result<(), Halt> {
        if self.spec.on_error == OnError::Halt {
            return Err(Halt::Record(format!(
                "record at offset {} failed {} time(s): {error}",
                record.offset, self.spec.max_attempts
            )));
        }
        self.log(format!(
            "partition {partition} offset {}: sent to {} after {} attempts: {error}",
            record.offset,
            self.spec.dlq_topic(),
            self.spec.max_attempts
        ));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let this = self.clone();
            let (record, error) = (record.clone(), error.to_string());
            let Some(mut l) = local.take() else {
                return Err(Halt::Stopped);
            };
            let result = crate::blocking::run(move || {
                let r = this.commit_dead_letter(partition, &record, &error, &mut l);
                (r, l)
            })
            .await;
            let outcome = match result {
                Ok((r, l)) => {
                    *local = Some(l);
                    r
                }
                Err(panicked) => Err(StepError::from(panicked)),
            };
            match outcome {
                Ok(done) => {
                    return match self.after_commit(partition, done).await {
                        Ok(()) => Ok(()),
                        Err(why) => Err(Halt::Fatal(why)),
                    }
                }
                Err(StepError::Fatal(why)) => return Err(Halt::Fatal(why)),
                // The decision is made; only the store can delay it.
                Err(e) => {
                    self.wait_for_store(partition, &e.describe());
                    if !stop.sleep(backoff.next()).await {
                        return Err(Halt::Stopped);
                    }
                }
            }
        }
    }

    /// One attempt: skip seen ids, run the plugin, commit; re-runs on a commit conflict.
    async fn process_and_commit(
        self: &Arc<Self>,
        partition: u32,
        records: &[StoredRecord],
        local: &mut Option<Local>,
        stop: &Stop,
    ) -> Result<(), StepError> {
        loop {
            let this = self.clone();
            let batch = records.to_vec();
            let interrupt = stop.interrupt();
            let Some(mut l) = local.take() else {
                return Err(StepError::Stopped);
            };
            let (result, l) = crate::blocking::run(move || {
                let r = this.run_and_commit(partition, &batch, &mut l, interrupt);
                (r, l)
            })
            .await?;
            *local = Some(l);
            match result? {
                Commit::Conflict => continue,
                Commit::Done(done) => {
                    return self
                        .after_commit(partition, done)
                        .await
                        .map_err(StepError::Fatal)
                }
            }
        }
    }

    /// After a commit is written: wait until it is durable, then show and report it.
    async fn after_commit(&self, partition: u32, done: Done) -> Result<(), String> {
        let ticket = self.broker.durability().written();
        self.broker
            .durability()
            .durable(ticket)
            .await
            .map_err(|e| e.to_string())?;
        let mut status = self.status.lock();
        let s = &mut status[partition as usize];
        let (skipped, dead) = (
            done.cursor.skipped.saturating_sub(s.skipped),
            done.cursor.dead_lettered.saturating_sub(s.dead_lettered),
        );
        s.committed = done.cursor.next;
        s.processed = done.cursor.processed;
        s.skipped = done.cursor.skipped;
        s.dead_lettered = done.cursor.dead_lettered;
        drop(status);
        let m = metrics::global();
        m.plugin_records_out
            .get_or_create(&self.label)
            .inc_by(done.outputs);
        m.plugin_dlq.get_or_create(&self.label).inc_by(dead);
        m.plugin_dedup_skips
            .get_or_create(&self.label)
            .inc_by(skipped);
        // Effects are durable now: this is the end of the probe's trip.
        let now = crate::record::now_ms();
        for (marker, published) in done.probes {
            let delay = crate::record::elapsed_ms(published, now);
            self.probes
                .record(&self.spec.name, partition, marker, delay);
        }
        self.outbox[partition as usize].notify_one();
        Ok(())
    }

    /// Blocking: run the plugin on the unseen records and commit. Keeps the instance in
    /// `local` unless the batch failed (a trapped instance is not reused).
    fn run_and_commit(
        &self,
        partition: u32,
        records: &[StoredRecord],
        local: &mut Local,
        interrupt: Interrupt,
    ) -> Result<Commit, StepError> {
        let mut seen_in_batch = HashSet::new();
        let fresh: Vec<&StoredRecord> = {
            let dedup = self.dedup.lock();
            records
                .iter()
                .filter(|r| {
                    r.record.id.as_deref().is_none_or(|id| {
                        !dedup.contains(id_hash(id)) && seen_in_batch.insert(id_hash(id))
                    })
                })
                .collect()
        };
        let skipped = (records.len() - fresh.len()) as u64;
        let next = records.last().map_or(local.cursor.next, |r| r.offset + 1);
        // Probes are the monitor's, never the plugin's: committed past, reported after.
        let mut probes = Vec::new();
        let fresh: Vec<&StoredRecord> = fresh
            .into_iter()
            .filter(|r| match ProbeMarker::of(&r.record) {
                Some(marker) => {
                    probes.push((marker, r.record.timestamp_ms));
                    false
                }
                None => true,
            })
            .collect();
        let batch = Batch {
            partition,
            next,
            processed: &fresh,
            skipped,
            probes,
        };
        if fresh.is_empty() {
            return self.commit(local, batch, BatchEffects::default(), None);
        }
        metrics::global()
            .plugin_records_in
            .get_or_create(&self.label)
            .inc_by(fresh.len() as u64);
        let blob = encode_batch(partition, &fresh);
        let mut instance = match local.instance.take() {
            Some(i) if i.batches < RECYCLE_AFTER_BATCHES && !i.output_nearly_full() => i,
            _ => PluginInstance::new(
                &self.compiled,
                self.spec.limits,
                &self.spec.config,
                self.reader(),
                interrupt.clone(),
            )?,
        };
        let started = std::time::Instant::now();
        let result = instance.process(&blob);
        metrics::global()
            .plugin_batch_seconds
            .get_or_create(&self.label)
            .observe(started.elapsed().as_secs_f64());
        self.collect_output(&mut instance);
        let effects = match result {
            Ok(effects) => effects,
            Err(e) => {
                if !matches!(
                    e,
                    PluginError::Interrupted | PluginError::StateUnavailable(_)
                ) {
                    metrics::global()
                        .plugin_traps
                        .get_or_create(&self.label)
                        .inc();
                }
                return Err(self.with_limits(e).into());
            }
        };
        let commit = self.commit(local, batch, effects, None);
        if commit.is_ok() {
            local.instance = Some(instance);
        }
        commit
    }

    fn with_limits(&self, e: PluginError) -> PluginError {
        match e {
            PluginError::Timeout { .. } => PluginError::Timeout {
                limit_ms: self.spec.limits.timeout.as_millis() as u64,
            },
            PluginError::MemoryLimit { .. } => PluginError::MemoryLimit {
                limit_bytes: self.spec.limits.memory_bytes,
            },
            other => other,
        }
    }

    fn collect_output(&self, instance: &mut PluginInstance) {
        for line in instance.take_output().lines().filter(|l| !l.is_empty()) {
            self.log(format!("[stdout] {line}"));
        }
        for (level, message) in instance.take_logs() {
            let level = match level {
                LogLevel::Debug => "debug",
                LogLevel::Info => "info",
                LogLevel::Warn => "warn",
                LogLevel::Error => "error",
            };
            self.log(format!("[{level}] {message}"));
        }
    }

    fn commit_dead_letter(
        &self,
        partition: u32,
        record: &StoredRecord,
        error: &str,
        local: &mut Local,
    ) -> Result<Done, StepError> {
        let mut headers = record.record.headers.clone();
        headers.push(("weir-error".into(), Bytes::from(error.to_string())));
        headers.push((
            "weir-source".into(),
            Bytes::from(format!(
                "{}/{}@{}",
                self.spec.input, partition, record.offset
            )),
        ));
        let dead = Record {
            headers,
            timestamp_ms: 0,
            ..record.record.clone()
        };
        loop {
            let batch = Batch {
                partition,
                next: record.offset + 1,
                processed: &[record],
                skipped: 0,
                probes: Vec::new(),
            };
            match self.commit(local, batch, BatchEffects::default(), Some(dead.clone()))? {
                Commit::Conflict => continue,
                Commit::Done(done) => return Ok(done),
            }
        }
    }

    /// Validates and writes a batch's effects atomically under the plugin's commit lock.
    fn commit(
        &self,
        local: &mut Local,
        batch: Batch<'_>,
        effects: BatchEffects,
        dead_letter: Option<Record>,
    ) -> Result<Commit, StepError> {
        let partition = batch.partition;
        let mut outputs: Vec<(String, Record)> = Vec::new();
        if !effects.outputs.is_empty() {
            let decoded = weir_codec::decode_outputs(&effects.outputs)
                .map_err(|e| PluginError::BadOutput(e.to_string()))?;
            let max = self.broker.config().max_record_bytes;
            for o in decoded {
                if !self.spec.outputs.iter().any(|t| t == o.topic) {
                    return Err(PluginError::BadOutput(format!(
                        "emitted to {:?}, which is not one of its output topics {:?} (deploy with --output {})",
                        o.topic, self.spec.outputs, o.topic
                    ))
                    .into());
                }
                let record = output_record(&o);
                // Refused here, not at forwarding: a committed output the broker cannot take
                // would block the outbox forever.
                if record.encoded_len() > max {
                    return Err(PluginError::BadOutput(format!(
                        "an output to {:?} is {} bytes encoded; the record limit is {max}",
                        o.topic,
                        record.encoded_len()
                    ))
                    .into());
                }
                outputs.push((o.topic.to_string(), record));
            }
        }
        let emitted = outputs.len() as u64;
        let dead_lettered = u64::from(dead_letter.is_some());
        if let Some(dead) = dead_letter {
            outputs.push((self.spec.dlq_topic(), dead));
        }
        let ids: Vec<u64> = batch
            .processed
            .iter()
            .filter_map(|r| r.record.id.as_deref())
            .map(id_hash)
            .collect();
        let newest_ms = batch
            .processed
            .iter()
            .map(|r| r.record.timestamp_ms)
            .max()
            .unwrap_or(0);
        // Output partitions are routed before taking the lock (topic lookups).
        let routed = self.route(partition, outputs)?;

        let _guard = self.commit_lock.lock();
        // Optimistic check: nothing this batch read changed, none of its ids was processed by
        // another partition meanwhile.
        for (key, version) in &effects.reads {
            let current = read_through(&self.cache, &*self.store, &self.namespace, key)?
                .map_or(0, |(_, v)| v);
            if current != *version {
                return Ok(Commit::Conflict);
            }
        }
        if ids.iter().any(|id| self.dedup.lock().contains(*id)) {
            return Ok(Commit::Conflict);
        }
        let seq = local.cursor.seq;
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let delta_seq = (!effects.writes.is_empty()).then(|| {
            // One delta value per batch instead of a sled key per state write (sled is
            // CPU-bound at ~125k keys/s); the compactor folds deltas into `s/` later.
            let delta_seq = self.log_seq.fetch_add(1, Ordering::Relaxed);
            writes.push((log_key(delta_seq), Some(encode_delta(&effects.writes))));
            delta_seq
        });
        if !ids.is_empty() {
            writes.push((
                partition_key(b'd', partition, &seq.to_be_bytes()),
                Some(DedupIndex::encode(newest_ms, &ids)),
            ));
        }
        let mut sequences = Vec::new();
        if !routed.is_empty() {
            let groups = self.assign_sequences(partition, routed, local, &mut sequences)?;
            for ((topic, p), next) in &sequences {
                let mut suffix = topic.as_bytes().to_vec();
                suffix.push(0);
                suffix.extend_from_slice(&p.to_be_bytes());
                writes.push((
                    partition_key(b'q', partition, &suffix),
                    Some(next.to_be_bytes().to_vec()),
                ));
            }
            writes.push((
                partition_key(b'o', partition, &seq.to_be_bytes()),
                Some(encode_groups(&groups)),
            ));
        }
        let cursor = Cursor {
            next: batch.next,
            seq: seq + 1,
            processed: local.cursor.processed + batch.processed.len() as u64 - dead_lettered,
            skipped: local.cursor.skipped + batch.skipped,
            dead_lettered: local.cursor.dead_lettered + dead_lettered,
        };
        writes.push((partition_key(b'c', partition, b""), Some(cursor.encode())));
        self.store.kv_apply(&self.namespace, &writes)?;
        // Written: from here on memory follows the store.
        local.cursor = cursor;
        local.sequences.extend(sequences);
        if let Some(delta_seq) = delta_seq {
            for (key, value) in effects.writes {
                self.cache.insert(key, value, delta_seq);
            }
        }
        let mut dedup = self.dedup.lock();
        if !ids.is_empty() {
            dedup.insert(
                partition_key(b'd', partition, &seq.to_be_bytes()),
                newest_ms,
                ids,
            );
        }
        let expired = dedup.expire(&self.spec.dedup, newest_ms);
        drop(dedup);
        if !expired.is_empty() {
            // Best effort: a failure leaves entries the next open reloads and expires again.
            let deletes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                expired.into_iter().map(|k| (k, None)).collect();
            if let Err(e) = self.store.kv_apply(&self.namespace, &deletes) {
                tracing::warn!(message = "Deleting expired dedup ids failed.", plugin = %self.spec.name, error = %e);
            }
        }
        Ok(Commit::Done(Done {
            cursor,
            outputs: emitted,
            probes: batch.probes,
        }))
    }

    /// Routes outputs to output partitions: key hash; keyless ones follow the input partition.
    fn route(
        &self,
        partition: u32,
        outputs: Vec<(String, Record)>,
    ) -> Result<BTreeMap<(String, u32), Vec<Record>>, StepError> {
        let mut by_target: BTreeMap<(String, u32), Vec<Record>> = BTreeMap::new();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for (topic, record) in outputs {
            let n = match counts.get(&topic) {
                Some(n) => *n,
                None => {
                    let n = self
                        .broker
                        .partition_count(&topic)
                        .map_err(|e| PluginError::BadOutput(e.to_string()))?;
                    counts.insert(topic.clone(), n);
                    n
                }
            };
            let p = record
                .key
                .as_deref()
                .map_or(partition % n, |k| partition_for_key(k, n));
            by_target.entry((topic, p)).or_default().push(record);
        }
        Ok(by_target)
    }

    /// Gives each output partition's group its next producer sequence (read once per
    /// partition task, then kept in memory: only this task writes its `q/` keys).
    fn assign_sequences(
        &self,
        partition: u32,
        routed: BTreeMap<(String, u32), Vec<Record>>,
        local: &Local,
        next: &mut Vec<((String, u32), u64)>,
    ) -> Result<Vec<Group>, StepError> {
        let mut groups = Vec::with_capacity(routed.len());
        for ((topic, p), records) in routed {
            let base_seq = match local.sequences.get(&(topic.clone(), p)) {
                Some(s) => *s,
                None => {
                    let mut suffix = topic.as_bytes().to_vec();
                    suffix.push(0);
                    suffix.extend_from_slice(&p.to_be_bytes());
                    let key = partition_key(b'q', partition, &suffix);
                    self.store
                        .kv_get(&self.namespace, &key)?
                        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                        .unwrap_or(0)
                }
            };
            next.push(((topic.clone(), p), base_seq + records.len() as u64));
            groups.push(Group {
                topic,
                partition: p,
                base_seq,
                records,
            });
        }
        Ok(groups)
    }
}

/// Why a partition's batch loop stopped.
enum Halt {
    /// A stop was requested: nothing to report.
    Stopped,
    /// The server is stopping on a failed sync.
    Fatal(String),
    /// A record failed every attempt under `--on-error halt`: why.
    Record(String),
}

/// Why a batch's attempts ended without a commit.
enum Failure {
    Stopped,
    Fatal(String),
    Plugin(PluginError),
}

/// A batch about to be committed.
struct Batch<'a> {
    partition: u32,
    /// The input offset after it.
    next: u64,
    /// Records whose effects it commits.
    processed: &'a [&'a StoredRecord],
    /// Records skipped as already processed.
    skipped: u64,
    /// Probes it moves past.
    probes: Vec<(ProbeMarker, i64)>,
}

/// The records as the batch blob a plugin gets (docs/batch-encoding.md).
pub(super) fn encode_batch(partition: u32, records: &[&StoredRecord]) -> Vec<u8> {
    let mut w = weir_codec::Writer::new();
    for r in records {
        let headers: Vec<(&str, &[u8])> = r
            .record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        w.push_in(&weir_codec::InRecord {
            offset: r.offset,
            timestamp_ms: r.record.timestamp_ms,
            partition,
            key: r.record.key.as_deref(),
            value: &r.record.value,
            id: r.record.id.as_deref(),
            headers,
        });
    }
    w.finish()
}
