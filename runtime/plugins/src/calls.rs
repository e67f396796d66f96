//! Running the plugin's calls for one commit: the records read at once (up to
//! `--commit-records`) go to the plugin `max_batch` at a time, each call on the state the
//! calls before it wrote, until the commit interval or the output bound; then their effects
//! are committed together (`commit.rs`).

use std::collections::HashSet;

use weir_core::{ProbeMarker, StoredRecord};
use weir_wasm::{BatchEffects, Interrupt, PluginError};

use crate::commit::{commit, Batch, Commit, Local, StepError};
use crate::dedup::id_hash;
use crate::processor::Processor;
use crate::runtime::PluginRuntime;

/// Blocking: runs the plugin on the unseen records, `max_batch` records per call, and
/// commits every call's effects at once. Calls stop once the plugin's commit interval has
/// passed (`--commit-interval-ms`), their outputs and state writes reach
/// [`crate::MAX_BATCH_BYTES`], or the instance is worn out: the commit covers the records up
/// to there and the rest are read again. Keeps the processor in
/// `local` unless a call failed (a trapped instance is not reused); a failed call fails the
/// whole commit, nothing of it is written.
pub(crate) fn run_and_commit(
    rt: &PluginRuntime,
    partition: u32,
    records: &[StoredRecord],
    local: &mut Local,
    interrupt: Interrupt,
) -> Result<Commit, StepError> {
    let c = &rt.committer;
    let m = weir_metrics::global();
    let started = std::time::Instant::now();
    let interval = std::time::Duration::from_millis(rt.spec.commit.interval_ms);
    let mut seen_in_batch: HashSet<u64, foldhash::fast::RandomState> = HashSet::default();
    let mut processed: Vec<&StoredRecord> = Vec::new();
    let mut probes = Vec::new();
    let mut next = local.cursor.next;
    let mut effects = BatchEffects::default();
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut processor = None;
    for chunk in records.chunks(rt.spec.max_batch.max(1)) {
        if next != local.cursor.next {
            // More calls are optional: not past the interval, nor the bytes the commit holds
            // until it is written (every call's outputs and the state written), nor an
            // instance whose output buffer is nearly full (the next commit gets a fresh one).
            let worn = processor
                .as_deref()
                .is_some_and(|p: &dyn Processor| p.worn_out());
            if worn
                || started.elapsed() >= interval
                || held_bytes(&blobs, &effects) >= crate::MAX_BATCH_BYTES
            {
                break;
            }
            // Paused or stopping: nothing of the commit is written, as for a call interrupted;
            // the instance, which did not fail, is kept.
            if interrupt() {
                local.processor = processor;
                return Err(StepError::Stopped);
            }
        }
        next = chunk.last().map_or(next, |r| r.offset + 1);
        let fresh: Vec<&StoredRecord> = {
            let dedup = c.dedup.lock();
            chunk
                .iter()
                .filter(|r| {
                    r.record.id.as_deref().is_none_or(|id| {
                        !dedup.contains(id_hash(id)) && seen_in_batch.insert(id_hash(id))
                    })
                })
                // Probes are the monitor's, never the plugin's: committed past, reported
                // after.
                .filter(|r| match ProbeMarker::of(&r.record) {
                    Some(marker) => {
                        probes.push((marker, r.record.timestamp_ms));
                        false
                    }
                    None => true,
                })
                .collect()
        };
        if fresh.is_empty() {
            continue;
        }
        let blob = encode_batch(partition, &fresh);
        let instance: &mut Box<dyn Processor> = match &mut processor {
            Some(p) => p,
            None => processor.insert(match local.processor.take() {
                Some(p) if !p.worn_out() => p,
                _ => rt.plugin.instantiate(
                    rt.spec.limits,
                    &rt.spec.config,
                    c.reader(&rt.seams.store, &rt.spec.name),
                    interrupt.clone(),
                )?,
            }),
        };
        let call = std::time::Instant::now();
        let result = instance.process(&blob, std::mem::take(&mut effects));
        m.plugin_batch_seconds
            .get_or_create(&rt.label)
            .observe(call.elapsed().as_secs_f64());
        for line in instance.drain_log() {
            rt.log(line);
        }
        match result {
            Ok(mut done) => {
                blobs.push(std::mem::take(&mut done.outputs));
                effects = done;
            }
            Err(e) => {
                if !matches!(
                    e,
                    PluginError::Interrupted | PluginError::StateUnavailable(_)
                ) {
                    m.plugin_traps.get_or_create(&rt.label).inc();
                }
                return Err(with_limits(rt, e).into());
            }
        }
        processed.extend(fresh);
    }
    let covered = records.iter().take_while(|r| r.offset < next).count();
    let batch = Batch {
        partition,
        next,
        skipped: (covered - processed.len() - probes.len()) as u64,
        processed: &processed,
        probes,
    };
    let records_in = processed.len() as u64;
    let result = commit(rt, local, batch, effects, &blobs, None);
    if let Ok(Commit::Done(_)) = &result {
        // Counted once committed: a commit thrown away (a failed call, a conflict) is run
        // again, and its records counted then.
        m.plugin_records_in
            .get_or_create(&rt.label)
            .inc_by(records_in);
    }
    // The instance did not fail: kept, also when the commit conflicted and runs again.
    if result.is_ok() && processor.is_some() {
        local.processor = processor;
    }
    result
}

/// What a commit under way holds in memory beyond its input: outputs and written state.
fn held_bytes(blobs: &[Vec<u8>], effects: &BatchEffects) -> usize {
    let written: usize = effects
        .writes
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, |(v, _)| v.len()))
        .sum();
    blobs.iter().map(Vec::len).sum::<usize>() + written
}

fn with_limits(rt: &PluginRuntime, e: PluginError) -> PluginError {
    match e {
        PluginError::Timeout { .. } => PluginError::Timeout {
            limit_ms: rt.spec.limits.timeout.as_millis() as u64,
        },
        PluginError::MemoryLimit { .. } => PluginError::MemoryLimit {
            limit_bytes: rt.spec.limits.memory_bytes,
        },
        other => other,
    }
}

/// The records as the batch blob a plugin gets (docs/batch-encoding.md).
pub(crate) fn encode_batch(partition: u32, records: &[&StoredRecord]) -> Vec<u8> {
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
