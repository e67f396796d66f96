//! The commit pipeline: a partition runs its next batches while its written commits wait for
//! the store's group commit, and nothing of a commit shows (status, `--after`, outputs) before
//! a sync covered it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use weir_log::{Durable, FsyncPolicy, LogError, MemoryStore};

use super::fakes::{rec, FakeInput, FakeOutput};
use super::harness::{spec, Harness};
use super::points;
use crate::pipeline::MAX_IN_FLIGHT;
use crate::spec::OnError;

/// Syncs that wait while held: a disk whose fsync has not returned yet. With a store, a
/// sync that returns syncs it (what a power cut keeps).
#[derive(Default)]
struct HeldSyncs {
    held: Mutex<bool>,
    released: Condvar,
    store: Option<Arc<MemoryStore>>,
}

impl HeldSyncs {
    fn hold(&self, on: bool) {
        *self.held.lock() = on;
        self.released.notify_all();
    }
}

/// Lets syncs go when dropped: a failed assertion must not leave the syncer (which the
/// harness joins) waiting for good.
struct ReleaseOnDrop(Arc<HeldSyncs>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.hold(false);
    }
}

impl Durable for HeldSyncs {
    fn sync(&self) -> Result<(), LogError> {
        let mut held = self.held.lock();
        while *held {
            self.released.wait(&mut held);
        }
        self.store.as_ref().map_or(Ok(()), |s| s.sync())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_run_on_while_their_commits_wait_for_a_sync_and_show_only_once_synced() {
    let syncs = Arc::new(HeldSyncs::default());
    let mut h = Harness::synced_by(
        1,
        Arc::new(MemoryStore::new()),
        syncs.clone(),
        FsyncPolicy::Always,
    );
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 10;
    // One call per commit: the records are all there at once and must still make several.
    spec.commit.records = 10;
    h.start(spec, points());
    // Let the open's own sync pass, then hold every sync.
    tokio::time::sleep(Duration::from_millis(50)).await;
    syncs.hold(true);
    let _release = ReleaseOnDrop(syncs.clone());
    let batches = MAX_IN_FLIGHT as u64 + 3;
    let records = batches * 10;
    h.input.append(
        "in",
        0,
        (0..records)
            .map(|i| rec("ann", "1", Some(&format!("o{i}"))))
            .collect(),
    );
    // The partition writes commits without waiting for their sync, up to the pipeline's
    // depth (the sync under way when the hold began may cover the first batch or two).
    let deadline = Instant::now() + Duration::from_secs(10);
    while written(&h) < MAX_IN_FLIGHT as u64 * 10 {
        assert!(
            Instant::now() < deadline,
            "only {} records' commits written while syncs were held: a batch waited for the \
             previous one's sync",
            written(&h)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held_at = written(&h);
    assert!(
        held_at <= records - 20,
        "{held_at} records' commits written: more than {MAX_IN_FLIGHT} commits were in flight"
    );
    // Nothing written and not yet synced shows: not in status (nor `--after`), not a single
    // output in the topic.
    let shown = h.rt().status.lock()[0].committed;
    let forwarded = h.output.values("out").len() as u64;
    assert!(
        shown + (MAX_IN_FLIGHT as u64 * 10) <= held_at,
        "status shows {shown} of {held_at} written while syncs are held"
    );
    assert!(
        forwarded <= shown,
        "{forwarded} outputs forwarded, but only {shown} records' commits are durable"
    );
    syncs.hold(false);
    h.idle().await;
    assert_eq!(h.state("ann"), Some(records));
    let out = h.output.values("out");
    assert_eq!(out.len() as u64, records, "one output per record");
    let mut balances: Vec<u64> = out.iter().map(|v| v.parse().unwrap()).collect();
    balances.sort_unstable();
    assert_eq!(balances, (1..=records).collect::<Vec<_>>());
    h.stop().await;
}

/// The records' commits written (not necessarily durable) on partition 0.
fn written(h: &Harness) -> u64 {
    let _blocking = weir_core::blocking::allow();
    h.store.cursor("p", 0).unwrap().next
}

/// A power cut while several commits wait for their sync: they are lost together (the store
/// keeps a prefix of its writes), none of them showed, and the restarted plugin runs their
/// records again — every effect once, one output per record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_with_commits_in_flight_loses_them_together_and_they_run_again_once() {
    let memory = Arc::new(MemoryStore::new());
    let syncs = Arc::new(HeldSyncs {
        store: Some(memory.clone()),
        ..HeldSyncs::default()
    });
    let mut h = Harness::synced_by(1, memory.clone(), syncs.clone(), FsyncPolicy::Always);
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 10;
    // One call per commit: the records are all there at once and must still make several.
    spec.commit.records = 10;
    h.start(spec.clone(), points());
    let orders = |from: u64, to: u64| {
        (from..to)
            .map(|i| rec("ann", "1", Some(&format!("o{i}"))))
            .collect::<Vec<_>>()
    };
    h.input.append("in", 0, orders(0, 30));
    h.idle().await;
    syncs.hold(true);
    let release = ReleaseOnDrop(syncs.clone());
    h.input.append("in", 0, orders(30, 100));
    let deadline = Instant::now() + Duration::from_secs(10);
    while written(&h) < 80 {
        assert!(Instant::now() < deadline, "{} written", written(&h));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        h.rt().status.lock()[0].committed <= 40,
        "a commit showed before its sync"
    );
    let cut = Arc::new(memory.power_cut());
    drop(release);
    h.stop().await;
    let (input, output): (Arc<FakeInput>, Arc<FakeOutput>) = (h.input.clone(), h.output.clone());
    drop(h);
    // The machine comes back with what was synced: the first 30 records' commits, perhaps one
    // more batch whose sync was under way when the hold began.
    let mut h = Harness::synced_by(1, cut.clone(), cut, FsyncPolicy::Always);
    h.input = input;
    h.output = output;
    let survived = written(&h);
    assert!(
        (30..=40).contains(&survived),
        "after the cut {survived} records' commits remain"
    );
    h.start(spec, points());
    h.idle().await;
    assert_eq!(h.state("ann"), Some(100));
    let mut balances: Vec<u64> = h
        .output
        .values("out")
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    balances.sort_unstable();
    assert_eq!(
        balances,
        (1..=100).collect::<Vec<_>>(),
        "one output per record"
    );
    h.stop().await;
}
