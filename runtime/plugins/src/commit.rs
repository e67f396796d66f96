//! Committing the effects of a plugin's calls (run by `calls.rs`). The commit is one
//! [`PluginStore::commit`]:
//! state writes (as one delta), message ids, the outbox entry with producer sequences already
//! assigned, and the partition's next cursor. A crash leaves all of it or none.
//!
//! Partitions of one plugin share its state: under the plugin's commit lock the commit checks
//! that the versions the batch read are unchanged and its ids still unseen, and answers
//! [`Commit::Conflict`] otherwise, for the batch to run again (optimistic concurrency).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use weir_codec::OutRecord;
use weir_core::{partition_for_key, ProbeMarker, Record, StoredRecord};
use weir_log::LogError;
use weir_wasm::{BatchEffects, PluginError};

use crate::cache::stamp_through;
use crate::dead_letter::dead_letter;
use crate::dedup::id_hash;
use crate::processor::Processor;
use crate::runtime::PluginRuntime;
use crate::store::{encode_groups, CommitWrite, Cursor, GroupRef};

/// Why a step of the partition loop did not complete.
#[derive(Debug)]
pub(crate) enum StepError {
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
    pub(crate) fn describe(&self) -> String {
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

impl From<weir_core::blocking::Panicked> for StepError {
    fn from(e: weir_core::blocking::Panicked) -> Self {
        StepError::Plugin(PluginError::Engine(e.to_string()))
    }
}

/// A committed batch.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) cursor: Cursor,
    pub(crate) outputs: u64,
    /// Probes committed past, with their publish times.
    pub(crate) probes: Vec<(ProbeMarker, i64)>,
    /// Cluster mode: the commit is queued for the plugin's changelog; it is durable once
    /// landed (`None`: written to the store already).
    pub(crate) landing: Option<weir_log::Landing>,
    /// When it was written (or queued).
    pub(crate) written: std::time::Instant,
}

/// The outcome of trying to commit a batch.
#[derive(Debug)]
pub(crate) enum Commit {
    Done(Done),
    Conflict,
}

/// What a partition task owns: its cursor, its output sequences, its processor. Moved into
/// the blocking pool for a batch and back; only this task writes them, so memory follows the
/// store without reading it.
pub(crate) struct Local {
    pub(crate) cursor: Cursor,
    /// Next producer sequence per output partition, read from the store once.
    pub(crate) sequences: HashMap<(String, u32), u64>,
    pub(crate) processor: Option<Box<dyn Processor>>,
}

impl Local {
    pub(crate) fn at(cursor: Cursor) -> Self {
        Local {
            cursor,
            sequences: HashMap::new(),
            processor: None,
        }
    }
}

/// A batch about to be committed.
pub(crate) struct Batch<'a> {
    pub(crate) partition: u32,
    /// The input offset after it.
    pub(crate) next: u64,
    /// Records whose effects it commits.
    pub(crate) processed: &'a [&'a StoredRecord],
    /// Records skipped as already processed.
    pub(crate) skipped: u64,
    /// Probes it moves past.
    pub(crate) probes: Vec<(ProbeMarker, i64)>,
}

/// Blocking: commits a record that failed every attempt to the dead-letter topic (with the
/// error and where it came from in headers, within the record limits), moving the offset past
/// it. If its message id was processed meanwhile (a copy on another partition), it is a
/// duplicate: skipped, not dead-lettered.
pub(crate) fn commit_dead_letter(
    rt: &PluginRuntime,
    partition: u32,
    record: &StoredRecord,
    error: &str,
    local: &mut Local,
) -> Result<Done, StepError> {
    let source = format!("{}/{}@{}", rt.spec.input, partition, record.offset);
    let dead = dead_letter(
        &record.record,
        source,
        error,
        rt.seams.output.max_record_bytes(),
    );
    let batch = Batch {
        partition,
        next: record.offset + 1,
        processed: &[record],
        skipped: 0,
        probes: Vec::new(),
    };
    // No state was read, so only its id can conflict.
    if let Commit::Done(done) = commit(rt, local, batch, BatchEffects::default(), &[], Some(&dead))?
    {
        return Ok(done);
    }
    let skip = Batch {
        partition,
        next: record.offset + 1,
        processed: &[],
        skipped: 1,
        probes: Vec::new(),
    };
    match commit(rt, local, skip, BatchEffects::default(), &[], None)? {
        Commit::Done(done) => Ok(done),
        Commit::Conflict => Err(StepError::Plugin(PluginError::Engine(
            "a commit without reads or ids conflicted".into(),
        ))),
    }
}

/// Validates and writes a batch's effects atomically under the plugin's commit lock. Outputs
/// go from the plugin's blobs (one per call) into the outbox entry without being materialised
/// as records.
pub(crate) fn commit(
    rt: &PluginRuntime,
    local: &mut Local,
    batch: Batch<'_>,
    effects: BatchEffects,
    blobs: &[Vec<u8>],
    dead_letter: Option<&Record>,
) -> Result<Commit, StepError> {
    let c = &rt.committer;
    let partition = batch.partition;
    let mut outputs: Vec<OutRecord<'_>> = Vec::new();
    for blob in blobs.iter().filter(|b| !b.is_empty()) {
        outputs.extend(
            weir_codec::decode_outputs(blob).map_err(|e| PluginError::BadOutput(e.to_string()))?,
        );
    }
    let max = rt.seams.output.max_record_bytes();
    for o in &outputs {
        if !rt.spec.outputs.iter().any(|t| t == o.topic) {
            return Err(PluginError::BadOutput(format!(
                "emitted to {:?}, which is not one of its output topics {:?} (deploy with --output {})",
                o.topic, rt.spec.outputs, o.topic
            ))
            .into());
        }
        // Refused here, not at forwarding: a committed output the broker cannot take would
        // block the outbox forever.
        let size = weir_core::stored_len(o.key, o.value, None, o.headers.iter().copied());
        if size > max {
            return Err(PluginError::BadOutput(format!(
                "an output to {:?} is {size} bytes encoded; the record limit is {max}",
                o.topic
            ))
            .into());
        }
    }
    let emitted = outputs.len() as u64;
    let dlq = rt.spec.dlq_topic();
    if let Some(dead) = dead_letter {
        outputs.push(OutRecord {
            topic: &dlq,
            key: dead.key.as_deref(),
            value: &dead.value,
            headers: dead
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_ref()))
                .collect(),
        });
    }
    let dead_lettered = u64::from(dead_letter.is_some());
    let ids: Vec<u64> = batch
        .processed
        .iter()
        .filter_map(|r| r.record.id.as_deref())
        .map(id_hash)
        .collect();
    // Record times drive the dedup window; one from a clock in the future must not expire
    // every id before it, so none counts as later than now.
    let newest_ms = batch
        .processed
        .iter()
        .map(|r| r.record.timestamp_ms)
        .max()
        .unwrap_or(0)
        .min(weir_core::now_ms());
    // Output partitions are routed before taking the lock (topic lookups).
    let routed = route(rt, partition, outputs)?;

    let _guard = c.lock.lock();
    if let Some(lost) = c.lost.lock().clone() {
        return Err(StepError::Storage(LogError::NotHeld {
            what: format!("plugin {} (a commit did not land: {lost})", rt.spec.name),
        }));
    }
    // Optimistic check: nothing this batch read changed, none of its ids was processed by
    // another partition meanwhile.
    for (key, read) in &effects.reads {
        let current = stamp_through(&c.cache, &*rt.seams.store, &rt.spec.name, key)?;
        if current != *read {
            return Ok(Commit::Conflict);
        }
    }
    let seen_elsewhere = {
        let dedup = c.dedup.lock();
        ids.iter().any(|id| dedup.contains(*id))
    };
    if seen_elsewhere {
        return Ok(Commit::Conflict);
    }
    let seq = local.cursor.seq;
    // One delta value per batch instead of a key per state write (sled is CPU-bound at
    // ~125k keys/s); the compactor folds deltas into per-key entries later.
    let delta_seq =
        (!effects.writes.is_empty()).then(|| c.next_delta.fetch_add(1, Ordering::Relaxed));
    let mut sequences = Vec::with_capacity(routed.len());
    let mut groups = Vec::with_capacity(routed.len());
    for ((topic, p), records) in &routed {
        let base_seq = match local.sequences.get(&(topic.to_string(), *p)) {
            Some(s) => *s,
            None => rt
                .seams
                .store
                .output_sequence(&rt.spec.name, partition, topic, *p)?,
        };
        sequences.push(((topic.to_string(), *p), base_seq + records.len() as u64));
        groups.push(GroupRef {
            topic,
            partition: *p,
            base_seq,
            records,
        });
    }
    let cursor = Cursor {
        next: batch.next,
        seq: seq + 1,
        processed: local.cursor.processed + batch.processed.len() as u64 - dead_lettered,
        skipped: local.cursor.skipped + batch.skipped,
        dead_lettered: local.cursor.dead_lettered + dead_lettered,
    };
    let write = CommitWrite {
        partition,
        cursor,
        delta: delta_seq.map(|s| (s, &effects.writes)),
        ids: (!ids.is_empty()).then_some((newest_ms, ids.as_slice())),
        outbox: (!groups.is_empty()).then(|| encode_groups(groups.into_iter())),
        sequences: &sequences,
    };
    let landing = rt.seams.store.commit(&rt.spec.name, &write)?;
    let written = std::time::Instant::now();
    // Written (or queued to land in this order): from here on memory follows the store.
    local.cursor = cursor;
    local.sequences.extend(sequences);
    if let Some(delta_seq) = delta_seq {
        c.cache.insert_all(effects.writes, delta_seq);
    }
    let mut dedup = c.dedup.lock();
    if !ids.is_empty() {
        dedup.insert((partition, seq), newest_ms, ids);
    }
    let expired = dedup.expire(&rt.spec.dedup, newest_ms);
    drop(dedup);
    if !expired.is_empty() {
        // Best effort: a failure leaves entries the next open reloads and expires again.
        if let Err(e) = rt.seams.store.forget_ids(&rt.spec.name, &expired) {
            tracing::warn!(message = "Deleting expired dedup ids failed.", plugin = %rt.spec.name, error = %e);
        }
    }
    Ok(Commit::Done(Done {
        cursor,
        outputs: emitted,
        probes: batch.probes,
        landing,
        written,
    }))
}

/// Routes outputs to output partitions: key hash; keyless ones follow the input partition.
fn route<'a>(
    rt: &PluginRuntime,
    partition: u32,
    outputs: Vec<OutRecord<'a>>,
) -> Result<BTreeMap<(&'a str, u32), Vec<OutRecord<'a>>>, StepError> {
    let mut by_target: BTreeMap<(&'a str, u32), Vec<OutRecord<'a>>> = BTreeMap::new();
    let mut counts: HashMap<&str, u32> = HashMap::new();
    for o in outputs {
        let n = match counts.get(o.topic) {
            Some(n) => *n,
            None => {
                let n = rt
                    .seams
                    .output
                    .partition_count(o.topic)
                    .map_err(|e| PluginError::BadOutput(e.to_string()))?;
                counts.insert(o.topic, n);
                n
            }
        };
        let p = o.key.map_or(partition % n, |k| partition_for_key(k, n));
        by_target.entry((o.topic, p)).or_default().push(o);
    }
    Ok(by_target)
}
