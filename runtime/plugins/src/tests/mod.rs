//! The plugin core on fakes — no wasm, no broker, no disk: commit, retry and dead letters,
//! halts, forwarding, restarts, dedup, optimistic concurrency, storage failures. Each test
//! runs in milliseconds.

mod cluster;
mod commits;
mod fakes;
mod forwarding;
mod harness;
mod manager_cluster;
mod pipeline;
mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fakes::{rec, FakePlugin};
use harness::{spec, Harness};

use crate::io::{IoError, IoKind};
use crate::runtime::PartitionState;
use crate::spec::OnError;

/// Credits each record's value to its key's balance and emits the new balance.
fn points() -> Arc<FakePlugin> {
    FakePlugin::new(|r, ctx| {
        let key = std::str::from_utf8(r.key.unwrap()).unwrap();
        let amount: u64 = std::str::from_utf8(r.value)
            .unwrap()
            .parse()
            .map_err(|_| format!("{:?} is not an amount", String::from_utf8_lossy(r.value)))?;
        let balance = ctx.get(key).unwrap_or(0) + amount;
        ctx.put(key, balance);
        ctx.emit("out", Some(key), &balance.to_string());
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_state_ids_outputs_and_offsets_together_and_outputs_go_out_once() {
    let mut h = Harness::new(2, None);
    h.start(spec(2, OnError::Halt), points());
    h.input.append(
        "in",
        0,
        vec![rec("ann", "10", Some("o1")), rec("bob", "5", Some("o2"))],
    );
    h.input.append("in", 1, vec![rec("ann", "1", Some("o3"))]);
    h.idle().await;
    assert_eq!((h.state("ann"), h.state("bob")), (Some(11), Some(5)));
    let mut out = h.output.values("out");
    out.sort();
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(
        out.contains(&"11".into()) || out.contains(&"10".into()),
        "{out:?}"
    );
    let status = h.rt().status.lock().clone();
    assert_eq!(status.iter().map(|s| s.processed).sum::<u64>(), 3);
    assert_eq!((status[0].committed, status[1].committed), (2, 1));
    // The same message ids again: skipped, nothing applied twice.
    h.input.append("in", 0, vec![rec("ann", "10", Some("o1"))]);
    h.idle().await;
    assert_eq!(h.state("ann"), Some(11));
    assert_eq!(h.rt().status.lock()[0].skipped, 1);
    assert_eq!(h.output.values("out").len(), 3);
}

/// A failing record whose value fills the record limit: its dead letter (value plus error
/// and source headers) would be over the limit, refused by the broker and block the outbox
/// for good. It goes without its value, saying how large it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_always_fits_the_record_limit() {
    let mut h = Harness::new(1, None);
    let mut s = spec(1, OnError::Dlq);
    s.max_attempts = 1;
    h.start(s, points());
    let big = "x".repeat(fakes::RECORD_LIMIT - 64);
    h.input
        .append("in", 0, vec![rec("ann", &big, None), rec("ann", "2", None)]);
    h.idle().await;
    let dead = h.output.records("p.dlq");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].value.is_empty());
    let omitted = dead[0]
        .headers
        .iter()
        .find(|(k, _)| k == "weir-value-omitted")
        .expect("says the value was left out");
    assert!(String::from_utf8_lossy(&omitted.1).contains("in/0@0"));
    assert_eq!(h.state("ann"), Some(2), "later records flow");
}

/// A record fails on one partition while a copy with the same message id commits on another:
/// its dead letter then conflicts on the id. It is a duplicate, skipped — it used to be
/// retried for ever in a loop that not even a stop could end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_record_whose_id_commits_elsewhere_meanwhile_is_skipped() {
    let mut h = Harness::new(2, None);
    let mut s = spec(2, OnError::Dlq);
    s.max_attempts = 1;
    let failing = Arc::new(AtomicBool::new(false));
    let failing2 = failing.clone();
    let plugin = FakePlugin::new(move |r, ctx| {
        if r.value == b"oops" {
            // Fails slowly: the copy on partition 0 commits meanwhile.
            failing2.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            return Err("not an amount".into());
        }
        let key = std::str::from_utf8(r.key.unwrap()).unwrap();
        let amount: u64 = std::str::from_utf8(r.value).unwrap().parse().unwrap();
        let balance = ctx.get(key).unwrap_or(0) + amount;
        ctx.put(key, balance);
        Ok(())
    });
    h.start(s, plugin);
    h.input
        .append("in", 1, vec![rec("ann", "oops", Some("o1"))]);
    while !failing.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.input.append("in", 0, vec![rec("bob", "3", Some("o1"))]);
    h.idle().await;
    assert_eq!(h.state("bob"), Some(3));
    assert!(
        h.output.records("p.dlq").is_empty(),
        "a duplicate is not dead-lettered"
    );
    let status = h.rt().status.lock()[1].clone();
    assert_eq!((status.skipped, status.dead_lettered), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_record_is_retried_then_dead_lettered_alone() {
    let mut h = Harness::new(1, None);
    h.start(spec(1, OnError::Dlq), points());
    h.input.append(
        "in",
        0,
        vec![
            rec("ann", "1", None),
            rec("ann", "oops", None),
            rec("ann", "2", None),
        ],
    );
    h.idle().await;
    assert_eq!(h.state("ann"), Some(3), "the good records committed");
    let dead = h.output.records("p.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value.as_ref(), b"oops");
    let error = &dead[0]
        .headers
        .iter()
        .find(|(k, _)| k == "weir-error")
        .unwrap()
        .1;
    assert!(String::from_utf8_lossy(error).contains("not an amount"));
    let status = h.rt().status.lock()[0].clone();
    assert_eq!((status.processed, status.dead_lettered), (2, 1));
    let logs = {
        let _b = weir_core::blocking::allow();
        h.rt().log_lines().unwrap().join("\n")
    };
    assert!(logs.contains("attempt 1 failed"), "retried first: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_halt_policy_stops_at_the_failing_record_and_commits_nothing_of_it() {
    let mut h = Harness::new(1, None);
    h.start(spec(1, OnError::Halt), points());
    h.input.append(
        "in",
        0,
        vec![
            rec("ann", "1", None),
            rec("ann", "oops", None),
            rec("ann", "2", None),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !h.rt().status.lock()[0].state.is_halted() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = h.rt().status.lock()[0].clone();
    assert_eq!(status.committed, 1, "stopped before the failing record");
    assert!(
        status.state.to_string().contains("offset 1"),
        "{}",
        status.state
    );
    assert_eq!(h.state("ann"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_retries_what_may_pass_and_shows_what_is_blocked() {
    let mut h = Harness::new(1, None);
    for _ in 0..3 {
        h.output
            .fail
            .lock()
            .push_back(IoError::new(IoKind::Unavailable, "disk busy"));
    }
    h.start(spec(1, OnError::Halt), points());
    h.input.append("in", 0, vec![rec("ann", "1", Some("a"))]);
    h.idle().await;
    assert_eq!(
        h.output.values("out"),
        vec!["1"],
        "delivered once after retries"
    );
    assert_eq!(h.rt().status.lock()[0].forwarding, None, "flowing again");

    *h.output.block.lock() = Some(IoError::new(IoKind::Refused, "stale epoch"));
    h.input.append("in", 0, vec![rec("ann", "2", Some("b"))]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let forwarding = h.rt().status.lock()[0].forwarding.clone();
        if forwarding
            .as_deref()
            .is_some_and(|f| f.starts_with("blocked: ") && f.contains("stale epoch"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{forwarding:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    *h.output.block.lock() = None;
    // The next commit wakes the forwarder (otherwise it retries every 5 s).
    h.input.append("in", 0, vec![rec("ann", "3", Some("c"))]);
    h.idle().await;
    assert_eq!(h.output.values("out"), vec!["1", "3", "6"]);
}

/// Outputs blocked while the plugin kept committing wait in the outbox; the forwarder reads
/// that backlog a page at a time (it used to read it whole on every scan) and forwards all of
/// it, in order, once the way is clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_longer_than_a_page_is_forwarded_in_order() {
    let page = crate::forwarder::OUTBOX_PAGE;
    let mut h = Harness::new(1, None);
    *h.output.block.lock() = Some(IoError::new(IoKind::Unavailable, "broker away"));
    h.start(spec(1, OnError::Halt), points());
    let n = 2 * page as u64 + 7;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for i in 1..=n {
        // One commit, so one outbox entry, per record.
        h.input
            .append("in", 0, vec![rec("ann", "1", Some(&format!("m{i}")))]);
        while h.rt().status.lock()[0].committed < i {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (first_page, all) = {
        let _blocking = weir_core::blocking::allow();
        (
            h.store.outbox("p", 0, page).unwrap(),
            h.store.outbox("p", 0, usize::MAX).unwrap(),
        )
    };
    assert_eq!(all.len() as u64, n, "one entry per commit, all waiting");
    assert_eq!(first_page.len(), page, "a scan reads one page");
    let seqs = |e: &[crate::store::OutboxEntry]| e.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&first_page), seqs(&all[..page]), "the oldest first");
    *h.output.block.lock() = None;
    // The next commit wakes the forwarder (otherwise it retries after its backoff).
    h.input.append("in", 0, vec![rec("ann", "1", Some("last"))]);
    h.idle().await;
    let want: Vec<String> = (1..=n + 1).map(|i| i.to_string()).collect();
    assert_eq!(h.output.values("out"), want, "every output once, in order");
}

/// A runner forwarded a page of outbox entries (more batches to one output partition than
/// the broker remembers for retries) and crashed before deleting them: the next runner
/// re-forwards the page, and the oldest batches are answered "out of order", not as
/// duplicates. They were stored: outputs flow on, each once (they used to stall for good,
/// retried every 5 s while the outbox grew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_re_forwarded_after_a_crash_is_stored_once_and_outputs_flow_on() {
    let mut h = Harness::new(1, None);
    *h.output.block.lock() = Some(IoError::new(IoKind::Unavailable, "broker away"));
    h.start(spec(1, OnError::Halt), points());
    let n = 12u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for i in 1..=n {
        // One commit, so one outbox entry (one batch to `out`/0), per record.
        h.input
            .append("in", 0, vec![rec("ann", "1", Some(&format!("m{i}")))]);
        while h.rt().status.lock()[0].committed < i {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let producer_id = h.rt().spec.producer_ids[0];
    h.stop().await;
    *h.output.block.lock() = None;
    // What the crashed runner had done: every entry forwarded, none deleted.
    let entries = {
        let _blocking = weir_core::blocking::allow();
        h.store.outbox("p", 0, usize::MAX).unwrap()
    };
    assert_eq!(entries.len() as u64, n);
    for entry in entries {
        for g in entry.groups.unwrap() {
            let batch = crate::io::OutputBatch {
                topic: g.topic,
                partition: g.partition,
                producer_id,
                base_sequence: g.base_seq,
                records: g.records,
            };
            let durable = crate::io::Output::append(&*h.output, batch).await.unwrap();
            durable.await.unwrap();
        }
    }
    h.start(spec(1, OnError::Halt), points());
    h.input
        .append("in", 0, vec![rec("ann", "1", Some("after"))]);
    h.idle().await;
    let want: Vec<String> = (1..=n + 1).map(|i| i.to_string()).collect();
    assert_eq!(h.output.values("out"), want, "every output once, in order");
    assert_eq!(h.rt().status.lock()[0].forwarding, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_at_the_committed_offset_and_forwards_pending_outputs_once() {
    let mut h = Harness::new(1, None);
    // Outputs cannot leave during the first run: they wait in the outbox.
    *h.output.block.lock() = Some(IoError::new(IoKind::Unavailable, "broker away"));
    h.start(spec(1, OnError::Halt), points());
    h.input.append(
        "in",
        0,
        vec![rec("ann", "1", Some("a")), rec("ann", "2", Some("b"))],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.rt().status.lock()[0].committed < 2 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.stop().await;
    *h.output.block.lock() = None;
    // The same input again (a redelivery) and new input, after the restart.
    h.input.append(
        "in",
        0,
        vec![rec("ann", "1", Some("a")), rec("ann", "4", Some("c"))],
    );
    h.start(spec(1, OnError::Halt), points());
    h.idle().await;
    assert_eq!(h.state("ann"), Some(7));
    assert_eq!(
        h.output.values("out"),
        vec!["1", "3", "7"],
        "each output exactly once"
    );
    let status = h.rt().status.lock()[0].clone();
    assert_eq!(
        (status.committed, status.processed, status.skipped),
        (4, 3, 1),
        "counters survive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_updating_the_same_key_never_lose_an_update() {
    let mut h = Harness::new(4, None);
    h.start(spec(4, OnError::Halt), points());
    for round in 0..25 {
        for p in 0..4 {
            h.input.append(
                "in",
                p,
                vec![rec("shared", "1", Some(&format!("{round}-{p}")))],
            );
        }
    }
    h.idle().await;
    assert_eq!(
        h.state("shared"),
        Some(100),
        "optimistic commits re-ran on conflicts"
    );
    assert_eq!(h.output.values("out").len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_makes_the_partition_wait_without_spending_attempts() {
    let memory: Arc<dyn weir_log::Store> = Arc::new(weir_log::MemoryStore::new());
    let (faulty, faults) = weir_log::faulty::FaultyStore::wrap(memory);
    let mut h = Harness::new(1, Some(faulty));
    h.start(spec(1, OnError::Dlq), points());
    h.input.append("in", 0, vec![rec("ann", "1", None)]);
    h.idle().await;
    faults.kv.store(true, Ordering::SeqCst);
    h.input
        .append("in", 0, vec![rec("ann", "2", None), rec("ann", "3", None)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = h.rt().status.lock()[0].state.clone();
        if matches!(&state, PartitionState::Waiting(why) if why.contains("the store failed")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{state}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    faults.kv.store(false, Ordering::SeqCst);
    h.idle().await;
    assert_eq!(h.state("ann"), Some(6));
    let status = h.rt().status.lock()[0].clone();
    assert_eq!((status.processed, status.dead_lettered), (3, 0));
    assert!(
        h.output.records("p.dlq").is_empty(),
        "nothing dead-lettered for a disk failure"
    );
}

/// A pause interrupts a batch while it runs (the plugin spins until interrupted, as a wasm
/// guest does under the epoch callback): nothing of it commits, no attempt is spent, and after
/// the resume the record is processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_interrupts_a_running_batch_and_resume_carries_on_without_committing_twice() {
    let spin = Arc::new(AtomicBool::new(true));
    let started = Arc::new(AtomicBool::new(false));
    let (spin2, started2) = (spin.clone(), started.clone());
    let plugin = FakePlugin::new(move |r, ctx| {
        started2.store(true, Ordering::SeqCst);
        while spin2.load(Ordering::SeqCst) && !ctx.interrupted() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let key = std::str::from_utf8(r.key.unwrap()).unwrap();
        let amount: u64 = std::str::from_utf8(r.value).unwrap().parse().unwrap();
        let balance = ctx.get(key).unwrap_or(0) + amount;
        ctx.put(key, balance);
        Ok(())
    });
    let mut h = Harness::new(1, None);
    h.start(spec(1, OnError::Halt), plugin);
    h.input.append("in", 0, vec![rec("ann", "5", None)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !started.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.rt().paused.send_replace(true);
    while h.rt().status.lock()[0].state != PartitionState::Paused {
        assert!(
            std::time::Instant::now() < deadline,
            "the running batch was not interrupted: {:?}",
            h.rt().status.lock()[0].state
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        h.rt().status.lock()[0].committed,
        0,
        "paused: nothing committed"
    );
    assert_eq!(h.state("ann"), None);
    spin.store(false, Ordering::SeqCst);
    h.rt().paused.send_replace(false);
    h.idle().await;
    assert_eq!(h.state("ann"), Some(5));
    let logs = {
        let _b = weir_core::blocking::allow();
        h.rt().log_lines().unwrap().join("\n")
    };
    assert!(
        !logs.contains("attempt"),
        "an interrupt spends no attempt: {logs}"
    );
}
