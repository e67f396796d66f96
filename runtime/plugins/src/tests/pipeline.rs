//! The commit pipeline: a partition runs its next batches while its written commits wait for
//! the store's group commit, and nothing of a commit shows (status, `--after`, outputs) before
//! a sync covered it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use weir_log::{Durable, FsyncPolicy, LogError, MemoryStore};

use super::fakes::rec;
use super::harness::{spec, Harness};
use super::points;
use crate::pipeline::MAX_IN_FLIGHT;
use crate::spec::OnError;

/// Syncs that wait while held: a disk whose fsync has not returned yet.
#[derive(Default)]
struct HeldSyncs {
    held: Mutex<bool>,
    released: Condvar,
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
        Ok(())
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
    let written = |h: &Harness| {
        let _blocking = weir_core::blocking::allow();
        h.store.cursor("p", 0).unwrap().next
    };
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
