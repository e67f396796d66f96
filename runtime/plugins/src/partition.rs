//! One task per plugin × input partition: read records, run the plugin on them `max_batch`
//! at a time and commit the calls together (`calls.rs`, off the async workers), retry,
//! dead-letter or halt.
//!
//! Failures are told apart by whose they are. The plugin's (trap, timeout, error, bad output)
//! spend attempts and end in a dead letter or a halt. The server's (the store, a full instance
//! pool) make the partition wait and retry without spending anything. An interrupt (pause,
//! remove, upgrade, shutdown) stops a batch within an epoch tick and commits nothing.
//!
//! Commits are pipelined: once a batch's commit is written to the store the partition reads
//! and runs the next batch, on the state the written commit leaves, while the store's group
//! commit makes it durable. A reporter beside the loop waits for each commit's durability in
//! order and only then shows it: status and `--after`, metrics, probes, and the forwarder's
//! watermark, so no output of a commit reaches its topic before the commit is durable. At
//! most [`MAX_IN_FLIGHT`](crate::pipeline::MAX_IN_FLIGHT) commits of a partition wait for durability at a time. A crash loses
//! the written, not yet durable commits together (the store recovers a prefix of its writes),
//! and the records they covered are read and run again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use weir_core::{Backoff, ReadLimits, StoredRecord};
use weir_wasm::{Interrupt, PluginError};

use crate::calls::run_and_commit;
use crate::commit::{commit_dead_letter, Commit, Done, Local, StepError};
use crate::io::IoKind;
use crate::pipeline::{report, InFlight, Pipeline, Place};
use crate::runtime::{PartitionState, PluginRuntime};
use crate::spec::OnError;

/// Encoded input bytes read for one commit at most (a record larger than this goes alone),
/// and so per call: a call's blob is copied into the plugin's memory, which is capped. A
/// commit's outputs and state writes are bounded by the same figure (`calls.rs`).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

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

/// The task of one input partition.
pub(crate) struct PartitionTask {
    rt: Arc<PluginRuntime>,
    partition: u32,
    stop: Stop,
    /// The partition's cursor, sequences and processor; `None` while a batch task holds them
    /// (or lost them by panicking: then they are reloaded from the store). Only ever reached
    /// through `&mut self` (`get_mut`, no locking); the mutex makes the task `Sync`, so its
    /// futures may hold `&self` across awaits.
    local: parking_lot::Mutex<Option<Local>>,
    pipeline: Pipeline,
    /// Given to the reporter when the loop starts.
    from_loop: Option<mpsc::UnboundedReceiver<InFlight>>,
}

impl PartitionTask {
    pub(crate) fn new(rt: Arc<PluginRuntime>, partition: u32, cancel: CancellationToken) -> Self {
        let paused = rt.paused.subscribe();
        let cursor = rt.cursors[partition as usize];
        let (pipeline, from_loop) = Pipeline::new(rt.label.clone());
        PartitionTask {
            rt,
            partition,
            stop: Stop { cancel, paused },
            local: parking_lot::Mutex::new(Some(Local::at(cursor))),
            pipeline,
            from_loop: Some(from_loop),
        }
    }

    fn set_state(&self, state: PartitionState) {
        self.rt.set_state(self.partition, state);
    }

    /// Runs until cancelled or halted; the reporter shows the commits still in flight then.
    pub(crate) async fn run(mut self) {
        let from_loop = self.from_loop.take().expect("run once");
        let reporter = report(self.rt.clone(), self.partition, from_loop);
        // The loop owns the pipeline's sender: when it ends, the reporter drains and ends.
        tokio::join!(self.run_loop(), reporter);
    }

    async fn run_loop(mut self) {
        let (rt, partition) = (self.rt.clone(), self.partition);
        let input = rt.spec.input.clone();
        rt.seams.input.know_topic(&input).await;
        let mut watch = match rt.seams.input.watch(&input, partition) {
            Ok(w) => w,
            Err(e) => return self.set_state(PartitionState::Halted(e.to_string())),
        };
        // --max-rate: this partition's share of the rate, as a schedule of when the next batch
        // may start.
        let per_second = rt.spec.max_rate as f64 / f64::from(rt.spec.partitions().max(1));
        let mut next_start = tokio::time::Instant::now();
        // Records read (and committed) at once: a paced plugin's batches are small enough
        // that the pace is smooth (about 20 per second), one call each; otherwise a commit
        // covers up to --commit-records, max_batch per call (calls are no larger than the
        // commit).
        let max_batch = if per_second > 0.0 {
            ((per_second / 20.0).ceil() as usize).clamp(1, rt.spec.max_batch)
        } else {
            rt.spec.commit.records_for(rt.spec.max_batch)
        };
        let mut read_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if self.stop.cancel.is_cancelled() {
                return;
            }
            if *self.stop.paused.borrow_and_update() {
                self.set_state(PartitionState::Paused);
                tokio::select! {
                    _ = self.stop.paused.changed() => {
                        // Resumed: say so now, not at the next record.
                        if !*self.stop.paused.borrow() {
                            self.set_state(PartitionState::Running);
                        }
                        continue;
                    }
                    _ = self.stop.cancel.cancelled() => return,
                }
            }
            let Some(offset) = self.local.get_mut().as_ref().map(|l| l.cursor.next) else {
                // A batch task panicked and took the partition's state with it: reload it
                // from the store, which holds exactly what was committed once the commits in
                // flight landed. In cluster mode the panic may have come after the batch's
                // commit was queued and before the pipeline had it: memory and the queue are
                // not to be trusted, so this runtime commits nothing more and the node takes
                // the plugin over anew.
                if rt.seams.store.queues_commits() {
                    crate::pipeline::lose(
                        &rt,
                        partition,
                        "a batch task panicked with its commit perhaps queued".into(),
                    );
                }
                self.pipeline.drain().await;
                let (rt, p) = (rt.clone(), partition);
                match weir_core::blocking::run(move || rt.seams.store.cursor(&rt.spec.name, p))
                    .await
                {
                    Ok(Ok(cursor)) => *self.local.get_mut() = Some(Local::at(cursor)),
                    Ok(Err(e)) => self.wait_for_store(&e.to_string()),
                    Err(e) => self.wait_for_store(&e.to_string()),
                }
                if self.local.get_mut().is_none() {
                    self.stop.sleep(read_backoff.next()).await;
                }
                continue;
            };
            watch.borrow_and_update();
            let limits = ReadLimits {
                max_records: max_batch,
                max_bytes: MAX_BATCH_BYTES,
            };
            let records = match rt.seams.input.read(&input, partition, offset, limits).await {
                Ok(r) => r,
                Err(e) if e.kind == IoKind::Unavailable => {
                    self.wait_for_store(&e.message);
                    self.stop.sleep(read_backoff.next()).await;
                    continue;
                }
                Err(e) => {
                    return self.set_state(PartitionState::Halted(format!("reading input: {e}")))
                }
            };
            read_backoff.reset();
            if records.is_empty() {
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() {
                        return self.set_state(PartitionState::Halted("input topic deleted".into()));
                    },
                    _ = self.stop.paused.changed() => {}
                    _ = self.stop.cancel.cancelled() => return,
                }
                continue;
            }
            if per_second > 0.0 {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_start) => {}
                    _ = self.stop.cancel.cancelled() => return,
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
            let result = tracing::Instrument::instrument(self.run_batch(&records), span).await;
            match result {
                Ok(()) => {
                    if !self.stop.requested() {
                        self.set_state(PartitionState::Running)
                    }
                }
                Err(Halt::Stopped) => {}
                Err(Halt::Fatal(why)) => return self.set_state(PartitionState::Waiting(why)),
                Err(Halt::Record(halt)) => {
                    rt.log(format!("partition {partition} halted: {halt}"));
                    tracing::warn!(message = "Plugin halted.", plugin = %rt.spec.name, partition, reason = %halt);
                    return self.set_state(PartitionState::Halted(halt));
                }
            }
        }
    }

    fn wait_for_store(&self, why: &str) {
        let state = PartitionState::Waiting(format!("the store failed, retrying: {why}"));
        let mut status = self.rt.status.lock();
        let slot = &mut status[self.partition as usize].state;
        if *slot != state {
            *slot = state;
            drop(status);
            self.rt.log(format!(
                "partition {}: waiting for the store (not the record's fault): {why}",
                self.partition
            ));
        }
    }

    /// Processes records with retries; on persistent failure applies the error policy, one
    /// record at a time so only the failing record is dead-lettered. Records of more than one
    /// call (`max_batch`) are tried once together: if a call fails, each call's records are
    /// then run as a batch of their own, so a failing record costs what it did when each
    /// batch was its own commit.
    async fn run_batch(&mut self, records: &[StoredRecord]) -> Result<(), Halt> {
        let calls = self.rt.spec.max_batch.max(1);
        if records.len() > calls {
            let e = match self.attempts(records, 1).await {
                Ok(()) => return Ok(()),
                Err(Failure::Stopped) => return Err(Halt::Stopped),
                Err(Failure::Fatal(why)) => return Err(Halt::Fatal(why)),
                Err(Failure::Plugin(e)) => e,
            };
            self.rt.log(format!(
                "partition {} offsets {}..={}: a call failed ({e}); running them {calls} at a time",
                self.partition,
                records[0].offset,
                records[records.len() - 1].offset
            ));
            for chunk in records.chunks(calls) {
                if self.stop.requested() {
                    return Err(Halt::Stopped);
                }
                self.run_calls(chunk).await?;
            }
            return Ok(());
        }
        self.run_calls(records).await
    }

    /// [`Self::run_batch`] for records of one call.
    async fn run_calls(&mut self, records: &[StoredRecord]) -> Result<(), Halt> {
        let max_attempts = self.rt.spec.max_attempts.max(1);
        let e = match self.attempts(records, max_attempts).await {
            Ok(()) => return Ok(()),
            Err(Failure::Stopped) => return Err(Halt::Stopped),
            Err(Failure::Fatal(why)) => return Err(Halt::Fatal(why)),
            Err(Failure::Plugin(e)) => e,
        };
        if records.len() == 1 {
            return self.give_up(&records[0], e).await;
        }
        // Isolate the failing record(s): commit the good ones one by one.
        for r in records {
            if self.stop.requested() {
                return Err(Halt::Stopped);
            }
            match self.attempts(std::slice::from_ref(r), max_attempts).await {
                Ok(()) => {}
                Err(Failure::Stopped) => return Err(Halt::Stopped),
                Err(Failure::Fatal(why)) => return Err(Halt::Fatal(why)),
                Err(Failure::Plugin(e)) => self.give_up(r, e).await?,
            }
        }
        Ok(())
    }

    /// Runs and commits `records` until it works, the plugin fails `max_attempts` times, or a
    /// stop is requested. The server's own failures are waited out without spending attempts.
    async fn attempts(
        &mut self,
        records: &[StoredRecord],
        max_attempts: u32,
    ) -> Result<(), Failure> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut server_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut attempt = 1;
        let mut waiting_logged = false;
        loop {
            if self.stop.requested() {
                return Err(Failure::Stopped);
            }
            let e = match self.process_and_commit(records).await {
                Ok(()) => return Ok(()),
                Err(StepError::Stopped) => return Err(Failure::Stopped),
                Err(StepError::Fatal(why)) => return Err(Failure::Fatal(why)),
                Err(StepError::Storage(e)) if !e.is_damage() => {
                    self.wait_for_store(&e.to_string());
                    if !self.stop.sleep(server_backoff.next()).await {
                        return Err(Failure::Stopped);
                    }
                    continue;
                }
                Err(StepError::StateUnavailable(why)) => {
                    self.wait_for_store(&why);
                    if !self.stop.sleep(server_backoff.next()).await {
                        return Err(Failure::Stopped);
                    }
                    continue;
                }
                // A full instance pool is the server's condition, not the record's: wait for
                // room (another plugin paused or removed) without spending attempts.
                Err(StepError::Plugin(e @ PluginError::NoInstanceRoom(_))) => {
                    if !waiting_logged {
                        self.rt
                            .log(format!("partition {}: waiting: {e}", self.partition));
                        waiting_logged = true;
                    }
                    self.set_state(PartitionState::Waiting(e.to_string()));
                    if !self.stop.sleep(Duration::from_secs(1)).await {
                        return Err(Failure::Stopped);
                    }
                    continue;
                }
                Err(StepError::Storage(damage)) => PluginError::Engine(damage.to_string()),
                Err(StepError::Plugin(e)) => e,
            };
            if attempt >= max_attempts {
                return Err(Failure::Plugin(e));
            }
            self.rt.log(format!(
                "partition {} offsets {}..={}: attempt {attempt} failed: {e}",
                self.partition,
                records[0].offset,
                records[records.len() - 1].offset
            ));
            self.set_state(PartitionState::Retrying(e.to_string()));
            if !self.stop.sleep(backoff.next()).await {
                return Err(Failure::Stopped);
            }
            attempt += 1;
        }
    }

    async fn give_up(&mut self, record: &StoredRecord, error: PluginError) -> Result<(), Halt> {
        let rt = self.rt.clone();
        if rt.spec.on_error == OnError::Halt {
            return Err(Halt::Record(format!(
                "record at offset {} failed {} time(s): {error}",
                record.offset, rt.spec.max_attempts
            )));
        }
        rt.log(format!(
            "partition {} offset {}: sent to {} after {} attempts: {error}",
            self.partition,
            record.offset,
            rt.spec.dlq_topic(),
            rt.spec.max_attempts
        ));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let place = self
                .pipeline
                .place(&rt.seams.durability)
                .await
                .map_err(Halt::Fatal)?;
            let Some(mut local) = self.local.get_mut().take() else {
                return Err(Halt::Stopped);
            };
            let (rt, p) = (rt.clone(), self.partition);
            let (record, error) = (record.clone(), error.to_string());
            let result = weir_core::blocking::run(move || {
                let r = commit_dead_letter(&rt, p, &record, &error, &mut local);
                (r, local)
            })
            .await;
            let outcome = match result {
                Ok((r, local)) => {
                    *self.local.get_mut() = Some(local);
                    r
                }
                Err(panicked) => Err(StepError::from(panicked)),
            };
            match outcome {
                Ok(done) => {
                    return self.committed(done, place).map_err(Halt::Fatal);
                }
                Err(StepError::Fatal(why)) => return Err(Halt::Fatal(why)),
                // The decision is made; only the store can delay it.
                Err(e) => {
                    self.wait_for_store(&e.describe());
                    if !self.stop.sleep(backoff.next()).await {
                        return Err(Halt::Stopped);
                    }
                }
            }
        }
    }

    /// One attempt: skip seen ids, run the plugin, commit; re-runs on a commit conflict.
    async fn process_and_commit(&mut self, mut records: &[StoredRecord]) -> Result<(), StepError> {
        loop {
            let (rt, p) = (self.rt.clone(), self.partition);
            let batch = records.to_vec();
            let interrupt = self.stop.interrupt();
            let place = self
                .pipeline
                .place(&self.rt.seams.durability)
                .await
                .map_err(StepError::Fatal)?;
            let Some(mut local) = self.local.get_mut().take() else {
                return Err(StepError::Stopped);
            };
            let (result, local) = weir_core::blocking::run(move || {
                let r = run_and_commit(&rt, p, &batch, &mut local, interrupt);
                (r, local)
            })
            .await?;
            *self.local.get_mut() = Some(local);
            match result? {
                // Another partition changed what the batch read: run it again, one call's
                // worth only, so that a larger commit does not keep losing the race.
                Commit::Conflict => {
                    records = &records[..records.len().min(self.rt.spec.max_batch.max(1))];
                    continue;
                }
                Commit::Done(done) => return self.committed(done, place).map_err(StepError::Fatal),
            }
        }
    }

    /// After a commit is written: it joins the pipeline; the reporter shows it once durable.
    fn committed(&mut self, done: Done, place: Place) -> Result<(), String> {
        self.pipeline.send(&self.rt.seams.durability, done, place)
    }
}
