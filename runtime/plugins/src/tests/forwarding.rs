//! The forwarder's pages: outputs appended without a wait per batch, and outbox entries
//! deleted only once what was appended for them is durable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_log::{KvStore, MemoryStore};

use super::fakes::rec;
use super::harness::{spec, Harness};
use super::points;
use crate::io::{IoError, IoKind};
use crate::spec::OnError;

/// Outbox entries of partition 0 still stored.
fn pending(h: &Harness) -> usize {
    let _blocking = weir_core::blocking::allow();
    h.store.pending_outputs("p").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_entry_deletes_what_went_before_it_only_once_that_is_durable() {
    let memory = Arc::new(MemoryStore::new());
    let mut h = Harness::new(1, Some(memory.clone()));
    three_entries_waiting(&mut h).await;
    // The middle entry becomes unreadable (a damaged value).
    let mut key = b"o/".to_vec();
    key.extend_from_slice(&0u32.to_be_bytes());
    key.push(b'/');
    key.extend_from_slice(&1u64.to_be_bytes());
    {
        let _blocking = weir_core::blocking::allow();
        memory
            .kv_apply("plugin/p", &[(key, Some(b"not an outbox entry".to_vec()))])
            .unwrap();
    }

    // Restarted with the broker's syncs held: the first page is [0, 1 (unreadable), 2]. Entry
    // 0's outputs are appended, not durable: the entry must stay until they are.
    h.output.syncs_held.store(true, Ordering::SeqCst);
    h.start(spec(1, OnError::Halt), points());
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.output.values("out").is_empty() {
        assert!(Instant::now() < deadline, "entry 0 appended");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pending(&h),
        3,
        "an entry was deleted before its outputs were durable (a crash now would lose them)"
    );
    // Durable: entry 0 goes; the forwarder stops at the unreadable one and says so.
    h.output.syncs_held.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(&h) != 2 {
        assert!(Instant::now() < deadline, "entry 0 deleted once durable");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = h.rt().status.lock()[0].forwarding.clone();
        if shown.as_deref().is_some_and(|s| s.contains("unreadable")) {
            break;
        }
        assert!(Instant::now() < deadline, "shown: {shown:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        h.output.values("out"),
        vec!["1"],
        "nothing after it is forwarded"
    );
    h.stop().await;
}

/// Three commits whose outputs wait in the outbox (entries 0, 1, 2), the plugin stopped.
async fn three_entries_waiting(h: &mut Harness) {
    *h.output.block.lock() = Some(IoError::new(IoKind::Unavailable, "broker away"));
    h.start(spec(1, OnError::Halt), points());
    for (i, amount) in ["1", "2", "3"].into_iter().enumerate() {
        h.input.append("in", 0, vec![rec("ann", amount, None)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.rt().status.lock()[0].committed < i as u64 + 1 {
            assert!(Instant::now() < deadline, "commit {i}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    h.stop().await;
    assert_eq!(pending(h), 3);
    *h.output.block.lock() = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_is_appended_whole_and_deleted_once_durable() {
    let mut h = Harness::new(1, None);
    three_entries_waiting(&mut h).await;
    h.output.syncs_held.store(true, Ordering::SeqCst);
    h.start(spec(1, OnError::Halt), points());
    // The page's three batches are appended while none is durable (no wait per batch), and
    // no entry is deleted meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.output.values("out").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "appended: {:?}",
            h.output.values("out")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pending(&h), 3, "deleted before durable");
    h.output.syncs_held.store(false, Ordering::SeqCst);
    h.idle().await;
    assert_eq!(h.output.values("out"), vec!["1", "3", "6"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_durability_wait_keeps_the_page_and_forwards_it_again_once() {
    let mut h = Harness::new(1, None);
    three_entries_waiting(&mut h).await;
    // The first page's batches are applied, then the wait for their sync fails: nothing may
    // be deleted; the page goes again and the broker recognises every batch.
    h.output.failed_syncs.store(1, Ordering::SeqCst);
    h.start(spec(1, OnError::Halt), points());
    h.idle().await;
    assert_eq!(
        h.output.failed_syncs.load(Ordering::SeqCst),
        0,
        "a sync failed"
    );
    assert_eq!(
        h.output.accepted.load(Ordering::SeqCst),
        6,
        "the page's three batches, then all three again (the page was kept)"
    );
    assert_eq!(
        h.output.values("out"),
        vec!["1", "3", "6"],
        "every output once, in order"
    );
    assert_eq!(pending(&h), 0);
    h.stop().await;
}
