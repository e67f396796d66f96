//! The commit pipeline of a partition: the commits its loop wrote and the reporter that shows
//! each once it is durable (see `partition` for the loop, ARCHITECTURE.md "A commit shows only
//! once it is durable").

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use weir_log::Durability;

use crate::commit::Done;
use crate::runtime::{PartitionState, PluginRuntime};

/// Commits of one partition written to the store and not yet seen durable, at most: the depth
/// of the commit pipeline. A crash replays at most this many batches per partition beyond what
/// the last sync covered.
pub const MAX_IN_FLIGHT: usize = 8;

/// A commit written to the store, waiting for the group commit that makes it durable.
pub(crate) struct InFlight {
    /// The durability ticket taken after it was written; `None` for a commit queued for the
    /// replicated changelog, durable once landed (the node's local store is a cache of the
    /// changelog there, whose syncs durability does not rest on).
    ticket: Option<u64>,
    done: Done,
    written: Instant,
    /// Its place in the pipeline, given back once it is shown.
    _permit: OwnedSemaphorePermit,
    /// Counts it in the plugin's `plugin_commits_in_flight` gauge while it exists.
    _counted: Counted,
}

/// One in the `plugin_commits_in_flight` gauge, taken back when dropped: once shown, or
/// dropped unshown (lost, or the reporter ended).
struct Counted(weir_metrics::Gauge);

impl Counted {
    fn new(gauge: &weir_metrics::Gauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A place in the pipeline (see [`Pipeline::place`]).
pub(crate) struct Place(OwnedSemaphorePermit);

/// The partition loop's end of the pipeline.
pub(crate) struct Pipeline {
    to_reporter: mpsc::UnboundedSender<InFlight>,
    permits: Arc<Semaphore>,
    /// The plugin's `plugin_commits_in_flight` gauge.
    in_flight: weir_metrics::Gauge,
}

impl Pipeline {
    /// A pipeline and the reporter's end of it.
    pub(crate) fn new(
        label: weir_metrics::PluginLabel,
    ) -> (Pipeline, mpsc::UnboundedReceiver<InFlight>) {
        let (to_reporter, from_loop) = mpsc::unbounded_channel();
        let pipeline = Pipeline {
            to_reporter,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            in_flight: weir_metrics::global()
                .plugin_commits_in_flight
                .get_or_create(&label)
                .clone(),
        };
        (pipeline, from_loop)
    }

    /// A place in the pipeline, taken before a batch runs: a partition has at most
    /// [`MAX_IN_FLIGHT`] commits written and not yet durable.
    ///
    /// # Errors
    /// A failed sync (the server stops).
    pub(crate) async fn place(&self, durability: &Durability) -> Result<Place, String> {
        if let Some(failed) = durability.failed() {
            return Err(failed.to_string());
        }
        tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.map(Place).map_err(|e| e.to_string()),
            failed = durability.failure() => Err(failed.to_string()),
        }
    }

    /// Hands the reporter a commit just written, in the place taken for it.
    ///
    /// # Errors
    /// A failed sync (the server stops), or a reporter gone.
    pub(crate) fn send(
        &self,
        durability: &Durability,
        done: Done,
        place: Place,
    ) -> Result<(), String> {
        let ticket = done.landing.is_none().then(|| durability.written());
        if let Some(failed) = durability.failed() {
            return Err(failed.to_string());
        }
        let in_flight = InFlight {
            ticket,
            written: done.written,
            done,
            _permit: place.0,
            _counted: Counted::new(&self.in_flight),
        };
        self.to_reporter
            .send(in_flight)
            .map_err(|_| "the partition's reporter stopped".to_string())
    }

    /// Waits until every commit sent is shown (or dropped as lost).
    pub(crate) async fn drain(&self) {
        if let Ok(all) = self.permits.acquire_many(MAX_IN_FLIGHT as u32).await {
            drop(all);
        }
    }
}

/// Shows a partition's commits in order once each is durable, until the loop ends and every
/// commit it sent is shown. In cluster mode a commit is first landed in the plugin's changelog
/// (landing the oldest lands whatever was queued behind it, from every partition: one append).
/// Commits found durable together are shown together: how many batches one durable step
/// covered is a metric. A failed sync shows in the partition's state; the server stops
/// (fail-stop). A commit that did not land loses the runtime its right to commit (see
/// `Committer::lost`): it and every later one are dropped unshown.
pub(crate) async fn report(
    rt: Arc<PluginRuntime>,
    partition: u32,
    mut from_loop: mpsc::UnboundedReceiver<InFlight>,
) {
    let durability = rt.seams.durability.clone();
    let m = weir_metrics::global();
    let mut queue: VecDeque<InFlight> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match from_loop.recv().await {
                Some(first) => queue.push_back(first),
                None => return,
            }
        }
        if rt.committer.lost.lock().is_some() {
            queue.clear();
            continue;
        }
        let front = queue.front_mut().expect("a front");
        if let Some(landing) = front.done.landing.take() {
            if !landing.is_landed() {
                let store = rt.seams.store.clone();
                let landed = weir_core::blocking::run(move || store.land(&landing)).await;
                let failed = match landed {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(panicked) => Some(panicked.to_string()),
                };
                if let Some(why) = failed {
                    lose(&rt, partition, why);
                    queue.clear();
                    continue;
                }
            }
        }
        let oldest = queue.front().and_then(|f| f.ticket).unwrap_or(0);
        if let Err(failed) = durability.durable(oldest).await {
            rt.set_state(partition, PartitionState::Waiting(failed.to_string()));
            return;
        }
        while let Ok(next) = from_loop.try_recv() {
            queue.push_back(next);
        }
        let mut covered = 0u64;
        while queue.front().is_some_and(|f| {
            f.done.landing.as_ref().is_none_or(|l| l.is_landed())
                && durability
                    .is_durable(f.ticket.unwrap_or(0))
                    .unwrap_or(false)
        }) {
            let shown = queue.pop_front().expect("a front");
            m.plugin_commit_seconds
                .get_or_create(&rt.label)
                .observe(shown.written.elapsed().as_secs_f64());
            show(&rt, partition, shown.done);
            covered += 1;
        }
        if covered > 0 {
            m.plugin_commit_batches
                .get_or_create(&rt.label)
                .observe(covered as f64);
        }
    }
}

/// A commit did not land: this runtime commits nothing more (its memory ran ahead of the
/// changelog); the node takes the plugin over anew, reading what landed, and runs it from
/// there.
pub(crate) fn lose(rt: &PluginRuntime, partition: u32, why: String) {
    let mut lost = rt.committer.lost.lock();
    if lost.is_none() {
        rt.log(format!(
            "partition {partition}: a commit did not land in the replicated log ({why}); the \
             plugin runs again from what landed once this node takes it over anew"
        ));
        tracing::warn!(message = "A plugin commit did not land; the plugin restarts from what landed.", plugin = %rt.spec.name, partition, error = %why);
        *lost = Some(why.clone());
    }
    drop(lost);
    // Not held any more (a failed append dropped the hold already; a failure to wait for it
    // may not have): the node takes the plugin over anew, which reopens the runtime.
    rt.seams.store.release(&rt.spec.name);
    let mut status = rt.status.lock();
    let state = &mut status[partition as usize].state;
    if !state.is_halted() {
        *state = PartitionState::Waiting(format!("a commit did not land: {why}"));
    }
}

/// A durable commit: shown in status (and so to `--after`), counted, its probes reported, its
/// outputs let through to the forwarder.
fn show(rt: &PluginRuntime, partition: u32, done: Done) {
    let mut status = rt.status.lock();
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
    let m = weir_metrics::global();
    m.plugin_records_out
        .get_or_create(&rt.label)
        .inc_by(done.outputs);
    m.plugin_dlq.get_or_create(&rt.label).inc_by(dead);
    m.plugin_dedup_skips
        .get_or_create(&rt.label)
        .inc_by(skipped);
    // Effects are durable now: this is the end of the probe's trip.
    let now = weir_core::now_ms();
    for (marker, published) in done.probes {
        let delay = weir_core::elapsed_ms(published, now);
        rt.seams
            .probes
            .record(&rt.spec.name, partition, marker, delay);
    }
    rt.durable_seq[partition as usize].store(done.cursor.seq, Ordering::Release);
    rt.outbox[partition as usize].notify_one();
}
