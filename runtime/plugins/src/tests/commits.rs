//! A commit that covers several calls (`--commit-records`, `--commit-interval-ms`): the
//! plugin is called `--max-batch` records at a time, later calls see earlier calls' writes,
//! and a failed call leaves nothing of the commit; its calls then run as commits of their own.

use std::time::Duration;

use super::fakes::{rec, FakePlugin};
use super::harness::{spec, Harness};
use super::points;
use crate::spec::OnError;

/// Commits written on partition 0 (the cursor's sequence counts them).
fn commits(h: &Harness) -> u64 {
    let _blocking = weir_core::blocking::allow();
    h.store.cursor("p", 0).unwrap().seq
}

/// `n` orders of 1 for ann, with ids o0, o1, ….
fn orders(h: &Harness, n: u64) {
    h.input.append(
        "in",
        0,
        (0..n)
            .map(|i| rec("ann", "1", Some(&format!("o{i}"))))
            .collect(),
    );
}

fn balances(h: &Harness) -> Vec<u64> {
    let mut out: Vec<u64> = h
        .output
        .values("out")
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_covers_several_calls_and_each_call_sees_the_writes_before_it() {
    let mut h = Harness::new(1, None);
    orders(&h, 100);
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 10;
    // However slow this machine: the count below is by records, not time.
    spec.commit.interval_ms = 60_000;
    h.start(spec, points());
    h.idle().await;
    assert_eq!(
        commits(&h),
        1,
        "100 records in reach, 5,000 per commit: one commit"
    );
    assert_eq!(h.state("ann"), Some(100));
    // Each call of 10 read the balance the calls before it wrote, not the committed one.
    assert_eq!(balances(&h), (1..=100).collect::<Vec<_>>());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_in_a_later_call_of_the_same_commit_is_skipped() {
    let mut h = Harness::new(1, None);
    let ids = (0..10).chain(0..10).map(|i| format!("o{i}"));
    h.input
        .append("in", 0, ids.map(|id| rec("ann", "1", Some(&id))).collect());
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 10;
    // However slow this machine: the count below is by records, not time.
    spec.commit.interval_ms = 60_000;
    h.start(spec, points());
    h.idle().await;
    assert_eq!(commits(&h), 1);
    assert_eq!(h.state("ann"), Some(10));
    let status = h.rt().status.lock()[0].clone();
    assert_eq!((status.processed, status.skipped), (10, 10));
    assert_eq!(balances(&h), (1..=10).collect::<Vec<_>>());
    h.stop().await;
}

/// Call 6 of 10 fails on one record: the commit of all ten is not written; each call then runs
/// as a commit of its own, the failing one retried and its record dead-lettered alone. Every
/// other record's effects land once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_fails_its_commit_and_the_calls_run_again_each_on_its_own() {
    let mut h = Harness::new(1, None);
    h.input.append(
        "in",
        0,
        (0..100)
            .map(|i| {
                let amount = if i == 57 { "x" } else { "1" };
                rec("ann", amount, Some(&format!("o{i}")))
            })
            .collect(),
    );
    let mut spec = spec(1, OnError::Dlq);
    spec.max_batch = 10;
    // However slow this machine: the count below is by records, not time.
    spec.commit.interval_ms = 60_000;
    h.start(spec, points());
    h.idle().await;
    assert_eq!(h.state("ann"), Some(99));
    assert_eq!(balances(&h), (1..=99).collect::<Vec<_>>());
    assert_eq!(h.output.values("p.dlq").len(), 1);
    let status = h.rt().status.lock()[0].clone();
    assert_eq!((status.processed, status.dead_lettered), (99, 1));
    let logs = {
        let _blocking = weir_core::blocking::allow();
        h.rt().log_lines().unwrap().join("\n")
    };
    assert!(
        logs.contains("offsets 0..=99: a call failed")
            && logs.contains("running them 10 at a time"),
        "{logs}"
    );
    // Calls 1-5 and 7-10 committed one each; call 6 was retried, then its records committed
    // one by one (nine processed, one dead-lettered).
    assert_eq!(commits(&h), 9 + 10);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stop_at_the_commit_interval_and_the_rest_go_in_the_next_commit() {
    let mut h = Harness::new(1, None);
    orders(&h, 20);
    let slow = FakePlugin::new(|r, ctx| {
        std::thread::sleep(Duration::from_millis(3));
        let balance = ctx.get("ann").unwrap_or(0) + 1;
        ctx.put("ann", balance);
        ctx.emit("out", r.key.map(|_| "ann"), &balance.to_string());
        Ok(())
    });
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 5;
    // A call of 5 takes at least 15 ms: each commit stops after its first call.
    spec.commit.interval_ms = 1;
    h.start(spec, slow);
    h.idle().await;
    assert_eq!(commits(&h), 4);
    assert_eq!(h.state("ann"), Some(20));
    assert_eq!(balances(&h), (1..=20).collect::<Vec<_>>());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stop_once_their_outputs_reach_the_bound() {
    let mut h = Harness::new(1, None);
    orders(&h, 12);
    let big = FakePlugin::new(|_, ctx| {
        let balance = ctx.get("ann").unwrap_or(0) + 1;
        ctx.put("ann", balance);
        ctx.emit("out", None, &"x".repeat(900 << 10));
        Ok(())
    });
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 1;
    spec.commit.interval_ms = 60_000;
    h.start(spec, big);
    h.idle().await;
    // 4 MiB of outputs and state per commit: the fifth call's 900 KiB take it past, so
    // 5 + 5 + 2.
    assert_eq!(commits(&h), 3);
    assert_eq!(h.state("ann"), Some(12));
    assert_eq!(h.output.values("out").len(), 12);
    h.stop().await;
}

/// An instance worn out (a real one's output buffer nearly full) takes no more calls: the
/// commit covers the calls made, and the next commit runs on a fresh instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worn_out_instance_ends_the_commit_and_the_next_gets_a_fresh_one() {
    let mut h = Harness::new(1, None);
    orders(&h, 100);
    let plugin = points().wearing_out_after(3);
    let instances = plugin.instances.clone();
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 10;
    spec.commit.interval_ms = 60_000;
    h.start(spec, plugin);
    h.idle().await;
    assert_eq!(commits(&h), 4, "30 + 30 + 30 + 10 records");
    assert_eq!(*instances.lock(), 4);
    assert_eq!(h.state("ann"), Some(100));
    assert_eq!(balances(&h), (1..=100).collect::<Vec<_>>());
    h.stop().await;
}

/// A dedup window smaller than one commit's ids keeps the newest commit whole: a redelivery
/// of its records is still skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_window_smaller_than_a_commit_still_skips_its_redeliveries() {
    let mut h = Harness::new(1, None);
    orders(&h, 100);
    let mut spec = spec(1, OnError::Halt);
    spec.max_batch = 10;
    spec.commit.interval_ms = 60_000;
    spec.dedup.max_ids = 50;
    h.start(spec, points());
    h.idle().await;
    assert_eq!(commits(&h), 1);
    h.input.append(
        "in",
        0,
        (80..100)
            .map(|i| rec("ann", "1", Some(&format!("o{i}"))))
            .collect(),
    );
    h.idle().await;
    assert_eq!(h.state("ann"), Some(100));
    let status = h.rt().status.lock()[0].clone();
    assert_eq!((status.processed, status.skipped), (100, 20));
    assert_eq!(balances(&h), (1..=100).collect::<Vec<_>>());
    h.stop().await;
}
