//! Runs a plugin: one task per input partition (fetch → skip seen ids → call the plugin off
//! the async workers → commit atomically) and one forwarder per partition (outbox → output
//! topics as an idempotent producer).
//!
//! The commit of a batch is a single atomic write to the plugin's namespace holding its state
//! writes, its message ids, its outputs (outbox entry with producer sequences already
//! assigned) and the next input offset. A crash leaves all of it or none; the forwarder then
//! publishes the outbox with the same sequences, so the broker drops a re-forwarded batch.
//! Partitions of one plugin share its state: the commit checks, under the plugin's commit
//! lock, that the versions the batch read are unchanged and its ids still unseen, and re-runs
//! the batch otherwise (optimistic concurrency).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::dedup::{id_hash, DedupIndex};
use super::instance::{LogLevel, PluginInstance, StateReader};
use super::outbox::{encode_groups, output_record, Group};
use super::spec::{partition_key, OnError, PluginSpec};
use super::state::{encode_delta, log_key, read_through, StateCache};
use super::{CompiledPlugin, PluginError};
use crate::broker::Broker;
use crate::log::LogStore;
use crate::metrics;
use crate::monitor::probe::{ProbeBook, ProbeMarker};
use crate::record::{partition_for_key, Record, StoredRecord};

/// Batches an instance runs before it is replaced (wasmtime never frees instances a Store
/// created, and a fresh one bounds any leak in the plugin).
const RECYCLE_AFTER_BATCHES: u64 = 10_000;
/// Lines kept in a plugin's log.
const LOG_LINES: usize = 2_000;

/// What an operator sees of a partition of a plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStatus {
    /// Next input offset to process.
    pub committed: u64,
    /// Records whose effects were committed.
    pub processed: u64,
    /// Records skipped as already processed (dedup).
    pub skipped: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// `running`, `paused`, `retrying: …`, `halted: …`.
    pub state: String,
}

/// A plugin's running state, shared by its tasks.
pub(crate) struct PluginRuntime {
    pub spec: PluginSpec,
    pub(super) compiled: CompiledPlugin,
    pub(super) store: Arc<dyn LogStore>,
    pub(super) broker: Arc<Broker>,
    pub(super) namespace: String,
    pub(super) commit_lock: Mutex<()>,
    /// Committed state as of the last commit, for keys read or written since start (`None` =
    /// absent). Commits insert every key they write, under the commit lock; readers only fill
    /// missing entries. So an entry is never older than the store, and the commit's version
    /// check is a lookup instead of a store read.
    pub(super) cache: Arc<StateCache>,
    /// Next state-delta sequence (`l/<seq>`), advanced under the commit lock.
    pub(super) log_seq: std::sync::atomic::AtomicU64,
    pub(super) dedup: Mutex<DedupIndex>,
    pub(super) logs: Mutex<VecDeque<String>>,
    pub status: Mutex<Vec<PartitionStatus>>,
    pub(super) outbox: Vec<Notify>,
    pub paused: tokio::sync::watch::Sender<bool>,
    /// Where committed probes are reported.
    pub(super) probes: Arc<ProbeBook>,
    /// `plugin` label of its metrics.
    label: metrics::PluginLabel,
}

/// The outcome of trying to commit a batch.
enum Commit {
    Done {
        next: u64,
        processed: u64,
        skipped: u64,
        dead_lettered: u64,
        outputs: u64,
        /// Probes committed past, with their publish times.
        probes: Vec<(ProbeMarker, i64)>,
    },
    Conflict,
}

impl Commit {
    fn with_probes(self, found: Vec<(ProbeMarker, i64)>) -> Commit {
        match self {
            Commit::Done {
                next,
                processed,
                skipped,
                dead_lettered,
                outputs,
                ..
            } => Commit::Done {
                next,
                processed,
                skipped,
                dead_lettered,
                outputs,
                probes: found,
            },
            Commit::Conflict => Commit::Conflict,
        }
    }
}

/// Stored per-partition cursor: next input offset and next commit sequence.
fn encode_cursor(next: u64, seq: u64) -> Vec<u8> {
    let mut v = next.to_be_bytes().to_vec();
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

fn decode_cursor(b: &[u8]) -> Option<(u64, u64)> {
    Some((
        u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
        u64::from_be_bytes(b.get(8..16)?.try_into().ok()?),
    ))
}

impl PluginRuntime {
    /// Loads the plugin's dedup index and starts from the stored cursors.
    pub(crate) fn new(
        spec: PluginSpec,
        compiled: CompiledPlugin,
        store: Arc<dyn LogStore>,
        broker: Arc<Broker>,
        probes: Arc<ProbeBook>,
    ) -> Result<Arc<Self>, crate::log::LogError> {
        let namespace = spec.namespace();
        let mut dedup = DedupIndex::default();
        for (key, value) in store.kv_scan(&namespace, b"d/")? {
            if let Some((newest, ids)) = DedupIndex::decode(&value) {
                dedup.insert(key.to_vec(), newest, ids);
            }
        }
        let partitions = spec.producer_ids.len();
        let mut status = vec![PartitionStatus::default(); partitions];
        for (p, s) in status.iter_mut().enumerate() {
            s.committed = store
                .kv_get(&namespace, &partition_key(b'c', p as u32, b""))?
                .and_then(|v| decode_cursor(&v))
                .map_or(0, |c| c.0);
            s.state = if spec.paused {
                "paused".into()
            } else {
                "running".into()
            };
        }
        let paused = tokio::sync::watch::channel(spec.paused).0;
        let runtime = Arc::new(PluginRuntime {
            compiled,
            store,
            broker,
            namespace,
            commit_lock: Mutex::new(()),
            cache: Default::default(),
            log_seq: Default::default(),
            dedup: Mutex::new(dedup),
            logs: Mutex::new(VecDeque::new()),
            status: Mutex::new(status),
            outbox: (0..partitions).map(|_| Notify::new()).collect(),
            paused,
            probes,
            label: metrics::plugin(&spec.name),
            spec,
        });
        // Fold deltas a crash left before anything reads `s/` directly.
        runtime.compact()?;
        Ok(runtime)
    }

    /// Appends a line to the plugin's bounded log.
    pub(crate) fn log(&self, line: String) {
        let mut logs = self.logs.lock().expect("logs lock");
        if logs.len() >= LOG_LINES {
            logs.pop_front();
        }
        logs.push_back(line);
    }

    /// The plugin's log lines, oldest first.
    pub(crate) fn log_lines(&self) -> Vec<String> {
        self.logs
            .lock()
            .expect("logs lock")
            .iter()
            .cloned()
            .collect()
    }

    fn set_state(&self, partition: u32, state: impl Into<String>) {
        self.status.lock().expect("status lock")[partition as usize].state = state.into();
    }

    fn reader(&self) -> StateReader {
        let (store, ns, cache) = (
            self.store.clone(),
            self.namespace.clone(),
            self.cache.clone(),
        );
        Arc::new(move |key: &[u8]| read_through(&cache, &*store, &ns, key))
    }

    fn cursor(&self, partition: u32) -> (u64, u64) {
        self.store
            .kv_get(&self.namespace, &partition_key(b'c', partition, b""))
            .ok()
            .flatten()
            .and_then(|v| decode_cursor(&v))
            .unwrap_or((0, 0))
    }

    /// Runs one partition until cancelled or halted.
    pub(crate) async fn run_partition(self: Arc<Self>, partition: u32, cancel: CancellationToken) {
        let input = self.spec.input.clone();
        let mut watch = match self.broker.watch(&input, partition) {
            Ok(w) => w,
            Err(e) => return self.set_state(partition, format!("halted: {e}")),
        };
        let mut paused = self.paused.subscribe();
        let mut instance: Option<PluginInstance> = None;
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
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if *paused.borrow_and_update() {
                self.set_state(partition, "paused");
                tokio::select! {
                    _ = paused.changed() => continue,
                    _ = cancel.cancelled() => return,
                }
            }
            let offset = self.cursor(partition).0;
            watch.borrow_and_update();
            let mut records = match self.broker.read(&input, partition, offset, max_batch).await {
                Ok(r) => r,
                Err(e) => return self.set_state(partition, format!("halted: reading input: {e}")),
            };
            // Reads return whole stored chunks; a paced plugin takes only its batch of them
            // (the cursor moves by offset, so the rest is read again next time).
            if per_second > 0.0 {
                records.truncate(max_batch);
            }
            if records.is_empty() {
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() { return self.set_state(partition, "halted: input topic deleted") },
                    _ = paused.changed() => {}
                    _ = cancel.cancelled() => return,
                }
                continue;
            }
            if per_second > 0.0 {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_start) => {}
                    _ = cancel.cancelled() => return,
                }
                let now = tokio::time::Instant::now();
                next_start = next_start.max(now - std::time::Duration::from_millis(100))
                    + std::time::Duration::from_secs_f64(records.len() as f64 / per_second);
            }
            let span = tracing::debug_span!(
                "commit",
                first_offset = records[0].offset,
                records = records.len()
            );
            match tracing::Instrument::instrument(
                self.run_batch(partition, &records, &mut instance, &cancel),
                span,
            )
            .await
            {
                Ok(()) => self.set_state(partition, "running"),
                Err(halt) => {
                    self.log(format!("partition {partition} halted: {halt}"));
                    tracing::warn!(message = "Plugin halted.", plugin = %self.spec.name, partition, reason = %halt);
                    self.set_state(partition, format!("halted: {halt}"));
                    return;
                }
            }
        }
    }

    /// Processes records with retries; on persistent failure applies the error policy, one
    /// record at a time so only the failing record is dead-lettered. `Err` means halt.
    async fn run_batch(
        self: &Arc<Self>,
        partition: u32,
        records: &[StoredRecord],
        instance: &mut Option<PluginInstance>,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        match self.attempts(partition, records, instance, cancel).await {
            Ok(()) => return Ok(()),
            // Shutting down: leave the batch uncommitted for the next start; blame no record.
            Err(_) if cancel.is_cancelled() => return Ok(()),
            Err(e) if records.len() == 1 => return self.give_up(partition, &records[0], e).await,
            Err(_) => {}
        }
        // Isolate the failing record(s): commit the good ones one by one.
        for r in records {
            if cancel.is_cancelled() {
                return Ok(());
            }
            if let Err(e) = self
                .attempts(partition, std::slice::from_ref(r), instance, cancel)
                .await
            {
                self.give_up(partition, r, e).await?;
            }
        }
        Ok(())
    }

    async fn attempts(
        self: &Arc<Self>,
        partition: u32,
        records: &[StoredRecord],
        instance: &mut Option<PluginInstance>,
        cancel: &CancellationToken,
    ) -> Result<(), PluginError> {
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 1;
        let mut waiting_logged = false;
        loop {
            match self.process_and_commit(partition, records, instance).await {
                Ok(()) => return Ok(()),
                // A full instance pool is the server's condition, not the record's: wait for
                // room (another plugin paused or removed) without spending attempts.
                Err(e @ PluginError::NoInstanceRoom(_)) if !cancel.is_cancelled() => {
                    if !waiting_logged {
                        self.log(format!("partition {partition}: waiting: {e}"));
                        waiting_logged = true;
                    }
                    self.set_state(partition, format!("waiting: {e}"));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => return Err(e),
                    }
                }
                Err(e) if attempt < self.spec.max_attempts.max(1) && !cancel.is_cancelled() => {
                    self.log(format!(
                        "partition {partition} offsets {}..={}: attempt {attempt} failed: {e}",
                        records[0].offset,
                        records[records.len() - 1].offset
                    ));
                    self.set_state(partition, format!("retrying: {e}"));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return Err(e),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn give_up(
        self: &Arc<Self>,
        partition: u32,
        record: &StoredRecord,
        error: PluginError,
    ) -> Result<(), String> {
        match self.spec.on_error {
            OnError::Halt => Err(format!(
                "record at offset {} failed {} time(s): {error}",
                record.offset, self.spec.max_attempts
            )),
            OnError::Dlq => {
                self.log(format!(
                    "partition {partition} offset {}: sent to {} after {} attempts: {error}",
                    record.offset,
                    self.spec.dlq_topic(),
                    self.spec.max_attempts
                ));
                let this = self.clone();
                let (record, error) = (record.clone(), error.to_string());
                let done = tokio::task::spawn_blocking(move || {
                    this.commit_dead_letter(partition, &record, &error)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                self.after_commit(partition, done)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// One attempt: skip seen ids, run the plugin, commit; re-runs on a commit conflict.
    async fn process_and_commit(
        self: &Arc<Self>,
        partition: u32,
        records: &[StoredRecord],
        instance: &mut Option<PluginInstance>,
    ) -> Result<(), PluginError> {
        loop {
            let this = self.clone();
            let batch = records.to_vec();
            let taken = instance.take();
            let (result, back) =
                tokio::task::spawn_blocking(move || this.run_and_commit(partition, &batch, taken))
                    .await
                    .map_err(|e| PluginError::Engine(format!("executor task failed: {e}")))?;
            *instance = back;
            match result? {
                Commit::Conflict => continue,
                done => {
                    return self
                        .after_commit(partition, done)
                        .await
                        .map_err(|e| PluginError::Engine(e.to_string()))
                }
            }
        }
    }

    async fn after_commit(
        &self,
        partition: u32,
        done: Commit,
    ) -> Result<(), crate::durability::SyncFailed> {
        let ticket = self.broker.durability().written();
        self.broker.durability().durable(ticket).await?;
        if let Commit::Done {
            next,
            processed,
            skipped,
            dead_lettered,
            outputs,
            probes,
        } = done
        {
            let mut status = self.status.lock().expect("status lock");
            let s = &mut status[partition as usize];
            s.committed = next;
            s.processed += processed;
            s.skipped += skipped;
            s.dead_lettered += dead_lettered;
            drop(status);
            let m = metrics::global();
            m.plugin_records_out
                .get_or_create(&self.label)
                .inc_by(outputs);
            m.plugin_dlq
                .get_or_create(&self.label)
                .inc_by(dead_lettered);
            m.plugin_dedup_skips
                .get_or_create(&self.label)
                .inc_by(skipped);
            // Effects are durable now: this is the end of the probe's trip.
            let now = crate::record::now_ms();
            for (marker, published) in probes {
                let delay = (now - published).max(0) as u64;
                self.probes
                    .record(&self.spec.name, partition, marker, delay);
            }
        }
        self.outbox[partition as usize].notify_one();
        Ok(())
    }

    /// Blocking: run the plugin on the unseen records and commit. Returns the instance to keep
    /// (none after a failure: a trapped instance is not reused).
    fn run_and_commit(
        &self,
        partition: u32,
        records: &[StoredRecord],
        instance: Option<PluginInstance>,
    ) -> (Result<Commit, PluginError>, Option<PluginInstance>) {
        let mut seen_in_batch = HashSet::new();
        let fresh: Vec<&StoredRecord> = {
            let dedup = self.dedup.lock().expect("dedup lock");
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
        let next = records.last().map_or(0, |r| r.offset + 1);
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
        if fresh.is_empty() {
            let commit = self.commit(partition, next, &[], Default::default(), skipped, None);
            return (commit.map(|c| c.with_probes(probes)), instance);
        }
        metrics::global()
            .plugin_records_in
            .get_or_create(&self.label)
            .inc_by(fresh.len() as u64);
        let mut w = weir_codec::Writer::new();
        for r in &fresh {
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
        let blob = w.finish();
        let mut instance = match instance {
            Some(i) if i.batches < RECYCLE_AFTER_BATCHES && !i.output_nearly_full() => i,
            _ => match PluginInstance::new(
                &self.compiled,
                self.spec.limits,
                &self.spec.config,
                self.reader(),
            ) {
                Ok(i) => i,
                Err(e) => return (Err(e), None),
            },
        };
        let started = std::time::Instant::now();
        let result = instance.process(&blob);
        metrics::global()
            .plugin_batch_seconds
            .get_or_create(&self.label)
            .observe(started.elapsed().as_secs_f64());
        self.collect_output(&mut instance);
        match result {
            Ok(effects) => {
                let commit = self
                    .commit(partition, next, &fresh, effects, skipped, None)
                    .map(|c| c.with_probes(probes));
                let keep = commit.is_ok().then_some(instance);
                (commit, keep)
            }
            Err(e) => {
                metrics::global()
                    .plugin_traps
                    .get_or_create(&self.label)
                    .inc();
                (Err(self.with_limits(e)), None)
            }
        }
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
    ) -> Result<Commit, PluginError> {
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
            match self.commit(
                partition,
                record.offset + 1,
                &[record],
                Default::default(),
                0,
                Some(dead.clone()),
            )? {
                Commit::Conflict => continue,
                done => return Ok(done),
            }
        }
    }

    /// Validates and writes a batch's effects atomically under the plugin's commit lock.
    fn commit(
        &self,
        partition: u32,
        next: u64,
        processed: &[&StoredRecord],
        effects: super::instance::BatchEffects,
        skipped: u64,
        dead_letter: Option<Record>,
    ) -> Result<Commit, PluginError> {
        let mut outputs: Vec<(String, Record)> = Vec::new();
        if !effects.outputs.is_empty() {
            let decoded = weir_codec::decode_outputs(&effects.outputs)
                .map_err(|e| PluginError::BadOutput(e.to_string()))?;
            for o in decoded {
                if !self.spec.outputs.iter().any(|t| t == o.topic) {
                    return Err(PluginError::BadOutput(format!(
                        "emitted to {:?}, which is not one of its output topics {:?} (deploy with --output {})",
                        o.topic, self.spec.outputs, o.topic
                    )));
                }
                let record = output_record(&o);
                // Refused here, not at forwarding: a committed output the broker cannot take
                // would block the outbox forever.
                let max = self.broker.config().max_record_bytes;
                if record.encoded_len() > max {
                    return Err(PluginError::BadOutput(format!(
                        "an output to {:?} is {} bytes encoded; the record limit is {max}",
                        o.topic,
                        record.encoded_len()
                    )));
                }
                outputs.push((o.topic.to_string(), record));
            }
        }
        let emitted = outputs.len() as u64;
        let dead_lettered = u64::from(dead_letter.is_some());
        if let Some(dead) = dead_letter {
            outputs.push((self.spec.dlq_topic(), dead));
        }
        let ids: Vec<u64> = processed
            .iter()
            .filter_map(|r| r.record.id.as_deref())
            .map(id_hash)
            .collect();
        let newest_ms = processed
            .iter()
            .map(|r| r.record.timestamp_ms)
            .max()
            .unwrap_or(0);

        let _guard = self.commit_lock.lock().expect("commit lock");
        // Optimistic check: nothing this batch read changed, none of its ids was processed by
        // another partition meanwhile.
        for (key, version) in &effects.reads {
            let current =
                read_through(&self.cache, &*self.store, &self.namespace, key).map_or(0, |(_, v)| v);
            if current != *version {
                return Ok(Commit::Conflict);
            }
        }
        if ids
            .iter()
            .any(|id| self.dedup.lock().expect("dedup lock").contains(*id))
        {
            return Ok(Commit::Conflict);
        }
        let (_, seq) = self.cursor(partition);
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        if !effects.writes.is_empty() {
            // One delta value per batch instead of a sled key per state write (sled is
            // CPU-bound at ~125k keys/s); the compactor folds deltas into `s/` later.
            let log_seq = self
                .log_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            writes.push((log_key(log_seq), Some(encode_delta(&effects.writes))));
        }
        if !ids.is_empty() {
            writes.push((
                partition_key(b'd', partition, &seq.to_be_bytes()),
                Some(DedupIndex::encode(newest_ms, &ids)),
            ));
        }
        if !outputs.is_empty() {
            let groups = self
                .assign_sequences(partition, outputs, &mut writes)
                .map_err(|e| PluginError::BadOutput(e.to_string()))?;
            writes.push((
                partition_key(b'o', partition, &seq.to_be_bytes()),
                Some(encode_groups(&groups)),
            ));
        }
        writes.push((
            partition_key(b'c', partition, b""),
            Some(encode_cursor(next, seq + 1)),
        ));
        self.store
            .kv_apply(&self.namespace, &writes)
            .map_err(storage)?;
        let mut cache = self.cache.write().expect("state cache lock");
        for (key, value) in effects.writes {
            cache.insert(key, value);
        }
        drop(cache);
        let mut dedup = self.dedup.lock().expect("dedup lock");
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
            let deletes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                expired.into_iter().map(|k| (k, None)).collect();
            self.store
                .kv_apply(&self.namespace, &deletes)
                .map_err(storage)?;
        }
        Ok(Commit::Done {
            next,
            processed: processed.len() as u64 - dead_lettered,
            skipped,
            dead_lettered,
            outputs: emitted,
            probes: Vec::new(),
        })
    }

    /// Routes outputs to output partitions (key hash; keyless follow the input partition) and
    /// gives each output partition's group its next producer sequence.
    fn assign_sequences(
        &self,
        partition: u32,
        outputs: Vec<(String, Record)>,
        writes: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<Vec<Group>, crate::broker::BrokerError> {
        let mut by_target: BTreeMap<(String, u32), Vec<Record>> = BTreeMap::new();
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for (topic, record) in outputs {
            let n = match counts.get(&topic) {
                Some(n) => *n,
                None => {
                    let n = self.broker.describe_topic(&topic)?.config.partitions;
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
        let mut groups = Vec::new();
        for ((topic, p), records) in by_target {
            let mut suffix = topic.as_bytes().to_vec();
            suffix.push(0);
            suffix.extend_from_slice(&p.to_be_bytes());
            let key = partition_key(b'q', partition, &suffix);
            let base_seq = self
                .store
                .kv_get(&self.namespace, &key)?
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0);
            writes.push((
                key,
                Some((base_seq + records.len() as u64).to_be_bytes().to_vec()),
            ));
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

fn storage(e: impl std::fmt::Display) -> PluginError {
    PluginError::Engine(format!("storage: {e}"))
}
