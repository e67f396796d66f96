//! Cluster mode on fakes: plugins' stores on a shared in-memory changelog, several "nodes".

use std::sync::Arc;

use super::fakes::{self, rec};
use super::harness::{self, spec, Harness};
use super::points;
use crate::runtime::PartitionState;
use crate::spec::OnError;

/// A changelog the "nodes" share, and fake topics `in` and `out` (2 partitions) and `p.dlq`.
fn shared() -> (
    Arc<weir_log::MemoryChangelog>,
    Arc<fakes::FakeInput>,
    Arc<fakes::FakeOutput>,
) {
    let changelog = Arc::new(weir_log::MemoryChangelog::default());
    let input = Arc::new(fakes::FakeInput::default());
    input.topic("in", 2);
    let output = Arc::new(fakes::FakeOutput::default());
    output.topic("out", 2);
    output.topic("p.dlq", 2);
    (changelog, input, output)
}

/// Orders `from..to` into `in`: order i credits user `u{i % 5}` 1, id `o{i}`, partition i % 2.
fn orders(input: &fakes::FakeInput, from: usize, to: usize) {
    for i in from..to {
        let id = format!("o{i}");
        input.append(
            "in",
            (i % 2) as u32,
            vec![rec(&format!("u{}", i % 5), "1", Some(&id))],
        );
    }
}

/// `h` takes plugin `p` (as the node's placement would).
fn acquire(h: &Harness) {
    let _blocking = weir_core::blocking::allow();
    h.store.acquire("p").unwrap();
}

/// Nodes A and B made by `node`; A holds plugin `p`, runs it, and has committed and forwarded
/// orders 0..100; B is not started.
async fn a_ran_the_first_100(
    node: impl Fn() -> Harness,
    input: &fakes::FakeInput,
) -> (Harness, Harness) {
    let (mut a, b) = (node(), node());
    acquire(&a);
    a.start(spec(2, OnError::Halt), points());
    orders(input, 0, 100);
    a.idle().await;
    (a, b)
}

/// Cluster mode on fakes: two nodes share a plugin's changelog. B takes the plugin over
/// while A still runs it (A paused and resumed after its lease moved): A's commits are
/// refused by the fence, B carries on from what A committed, and every record's effect and
/// output exists exactly once. A third node with an empty cache rebuilds the state from the
/// snapshots and entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_running_one_plugin_leave_one_commit_chain() {
    let (changelog, input, output) = shared();
    let node = || harness::Harness::node(changelog.clone(), input.clone(), output.clone(), 7);
    let (mut a, mut b) = a_ran_the_first_100(node, &input).await;
    let feed = |from: usize, to: usize| orders(&input, from, to);
    // B takes over while A keeps running.
    acquire(&b);
    b.start(spec(2, OnError::Halt), points());
    feed(100, 300);
    // A duplicate of an id A committed: B knows it from the changelog.
    input.append("in", 0, vec![rec("u0", "1", Some("o0"))]);
    b.idle().await;
    let total: u64 = (0..5).map(|u| b.state(&format!("u{u}")).unwrap_or(0)).sum();
    assert_eq!(total, 300, "every record credited once");
    assert_eq!(output.values("out").len(), 300, "every output once");
    assert!(!a.store.held("p"), "A's writes were refused");
    let waiting = a
        .rt()
        .status
        .lock()
        .iter()
        .any(|s| matches!(s.state, PartitionState::Waiting(_)));
    let a_done: Vec<u64> = a.rt().status.lock().iter().map(|s| s.committed).collect();
    assert!(
        waiting || a_done.iter().sum::<u64>() <= 100,
        "{:?}",
        a.rt().status.lock()
    );
    // B's compactor snapshotted the changelog (every 7 entries here): it starts with one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let first = {
            use weir_log::Changelog;
            let _blocking = weir_core::blocking::allow();
            changelog.read_entries("plugin/p", 0, 1).unwrap()
        };
        if first.first().is_some_and(|e| e.rollup) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot was taken"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.stop().await;
    b.stop().await;
    // A node with an empty cache reads the snapshot and what followed.
    let c = node();
    let _blocking = weir_core::blocking::allow();
    let entries = c.store.state_entries("p").unwrap();
    let sum: u64 = entries.iter().map(|(_, v, _)| fakes::parse(v)).sum();
    assert_eq!(sum, 300);
    assert_eq!(
        c.store.cursor("p", 0).unwrap().next + c.store.cursor("p", 1).unwrap().next,
        301
    );
}

/// Cluster mode: a spec change made from a stale view (another node paused or upgraded the
/// plugin meanwhile) is refused, not written over the other node's change.
#[test]
fn a_spec_change_from_a_stale_view_is_refused() {
    use crate::store::PluginStore;
    let changelog = Arc::new(weir_log::MemoryChangelog::default());
    let (a, b) = (store_node(&changelog), store_node(&changelog));
    let _blocking = weir_core::blocking::allow();
    let v1 = spec(1, OnError::Halt);
    a.put_spec(&v1).unwrap();
    let mut paused = v1.clone();
    paused.paused = true;
    b.replace_spec(&paused, &v1).unwrap();
    let mut upgraded = v1.clone();
    upgraded.version = 2;
    assert!(matches!(
        a.replace_spec(&upgraded, &v1),
        Err(weir_log::LogError::Conflict { .. })
    ));
    assert!(a.specs().unwrap()[0].paused, "the pause stays");
}

/// Cluster mode: a remove of plugin `p` through node B (which does not run it) drops `p`'s
/// namespace between the reset and the spec of a new deployment of `p` through node C. The
/// drop asked the registry first (no `p` yet), so it lands; C finds its reset gone and makes
/// it again, and the new deployment starts at its own cursors, not at none.
#[test]
fn a_remove_racing_a_new_deployment_of_the_name_leaves_the_new_one_whole() {
    use crate::store::{Cursor, PluginStore};
    let changelog = Arc::new(weir_log::MemoryChangelog::default());
    let (b, c) = (
        Arc::new(store_node(&changelog)),
        Arc::new(store_node(&changelog)),
    );
    let _blocking = weir_core::blocking::allow();
    let cursors = [Cursor::at(7), Cursor::at(9)];
    let b_removes = b.clone();
    changelog.before_next_append("plugins", move || b_removes.remove("p").unwrap());
    c.acquire("p").unwrap();
    c.create(&spec(2, OnError::Halt), &cursors).unwrap();
    assert!(!changelog.hook_pending(), "the remove ran");
    assert!(c.held("p"));
    assert_eq!(b.specs().unwrap().len(), 1);
    for (p, cursor) in cursors.iter().enumerate() {
        assert_eq!(b.cursor("p", p as u32).unwrap(), *cursor);
    }
}

/// Cluster mode: a deployment whose spec write was not confirmed (its acknowledgement lost
/// in a leader election; the write landed) fails and takes the spec back: no node runs a
/// plugin whose deployment reported failure and whose producer ids were released.
#[test]
fn a_deployment_that_cannot_complete_takes_its_spec_back() {
    use crate::store::{Cursor, PluginStore};
    let changelog = Arc::new(weir_log::MemoryChangelog::default());
    let c = store_node(&changelog);
    let _blocking = weir_core::blocking::allow();
    let lossy = changelog.clone();
    changelog.before_next_append("plugins", move || lossy.lose_next_ack());
    c.acquire("p").unwrap();
    let created = c.create(&spec(2, OnError::Halt), &[Cursor::at(1), Cursor::at(2)]);
    assert!(created.is_err(), "{created:?}");
    assert!(!changelog.hook_pending());
    assert!(
        store_node(&changelog).specs().unwrap().is_empty(),
        "the spec that landed is taken back"
    );
}

/// A node's plugin store on a changelog shared by the "nodes" of a test.
fn store_node(changelog: &Arc<weir_log::MemoryChangelog>) -> crate::store::ReplicatedPluginStore {
    use crate::store::KvPluginStore;
    KvPluginStore::replicated(Arc::new(weir_log::ReplicatedKv::new(
        Arc::new(weir_log::MemoryStore::new()),
        changelog.clone(),
        KvPluginStore::OWNED_PREFIX,
    )))
}

/// Cluster mode: a node that no longer holds a plugin (taken over, removed, or a write of
/// its refused) forwards none of its outbox: a straggler's outputs must never reach a topic
/// after the plugin moved or was redeployed. The holder forwards them, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_the_plugin_forwards_nothing() {
    lost_plugin_forwards_nothing(Lost::Released).await;
}

/// Issue 25's redeployment: the plugin is removed and deployed again (new producer ids, from
/// the earliest input) through another node while the old runner's outputs wait in its outbox.
/// The old runner forwards nothing: every output exists once, the new deployment's (its
/// straggling forward used to add the old deployment's copies after the new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeployment_through_another_node_is_not_doubled_by_the_old_runner() {
    lost_plugin_forwards_nothing(Lost::Redeployed).await;
}

/// How the first runner loses the plugin.
enum Lost {
    /// It gives it back (its lease moved).
    Released,
    /// Another node takes it over; the first has not noticed.
    TakenOver,
    /// Another node removes it and deploys it again; the first has not noticed.
    Redeployed,
}

/// The same for a zombie: B took the plugin over while A, paused past its lease, has not
/// noticed (it still believes it holds it). A confirms its hold at the changelog's end before
/// forwarding a page, finds B's takeover, and forwards nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_confirms_its_hold_before_forwarding_and_forwards_nothing() {
    lost_plugin_forwards_nothing(Lost::TakenOver).await;
}

async fn lost_plugin_forwards_nothing(how: Lost) {
    use crate::io::{IoError, IoKind};
    let changelog = Arc::new(weir_log::MemoryChangelog::default());
    let input = Arc::new(fakes::FakeInput::default());
    input.topic("in", 1);
    let output = Arc::new(fakes::FakeOutput::default());
    output.topic("out", 2);
    output.topic("p.dlq", 1);
    let node = || harness::Harness::node(changelog.clone(), input.clone(), output.clone(), 1000);
    let (mut a, mut b) = (node(), node());
    {
        let _blocking = weir_core::blocking::allow();
        a.store.acquire("p").unwrap();
    }
    // Outputs cannot leave while A runs: they wait in its outbox.
    *output.block.lock() = Some(IoError::new(IoKind::Unavailable, "broker away"));
    a.start(spec(1, OnError::Halt), points());
    for i in 0..5 {
        input.append("in", 0, vec![rec("ann", "1", Some(&format!("m{i}")))]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.rt().status.lock()[0].committed < 5 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut redeployed = spec(1, OnError::Halt);
    redeployed.producer_ids = vec![9];
    match how {
        Lost::Released => a.store.release("p"),
        Lost::TakenOver => {
            let _blocking = weir_core::blocking::allow();
            b.store.acquire("p").unwrap();
            assert!(a.store.held("p"));
        }
        Lost::Redeployed => {
            let _blocking = weir_core::blocking::allow();
            b.store.remove("p").unwrap();
            b.store.acquire("p").unwrap();
            b.store
                .create(&redeployed, &[crate::store::Cursor::at(0)])
                .unwrap();
            assert!(a.store.held("p"));
        }
    }
    // The way out opens: A forwards nothing.
    *output.block.lock() = None;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        output.values("out").is_empty(),
        "{:?}",
        output.values("out")
    );
    assert!(!a.store.held("p"));
    let shown = a.rt().status.lock()[0].forwarding.clone();
    assert!(
        shown
            .as_deref()
            .is_some_and(|s| s.contains("no longer holds")),
        "{shown:?}"
    );
    if let Lost::Redeployed = how {
        // The new deployment processes the input again and forwards its own outputs.
        b.start(redeployed, points());
    } else {
        // B takes over and forwards A's committed outputs.
        {
            let _blocking = weir_core::blocking::allow();
            b.store.acquire("p").unwrap();
        }
        b.start(spec(1, OnError::Halt), points());
    }
    b.idle().await;
    assert_eq!(
        output.values("out"),
        vec!["1", "2", "3", "4", "5"],
        "each output once"
    );
    a.stop().await;
    b.stop().await;
}

/// Cluster mode: an acknowledgement lost while commits of both partitions are queued and in
/// flight (the append landed, the node cannot know). The node stops holding the plugin, the
/// runtime commits nothing more on memory that ran ahead of the changelog, and once the node
/// takes the plugin over anew (as its manager does) it runs on from what landed: every
/// record's effect and output exists once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_acknowledgement_of_pipelined_commits_restarts_the_plugin_from_what_landed() {
    let (changelog, input, output) = shared();
    let mut a = harness::Harness::node(changelog.clone(), input.clone(), output.clone(), 1000);
    let feed = |from: usize, to: usize| orders(&input, from, to);
    acquire(&a);
    a.start(spec(2, OnError::Halt), points());
    feed(0, 50);
    a.idle().await;
    changelog.lose_next_ack();
    feed(50, 600);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.store.held("p") {
        assert!(
            std::time::Instant::now() < deadline,
            "the lost acknowledgement was not noticed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Nothing the runtime shows as committed is ahead of the changelog.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let shown: u64 = a.rt().status.lock().iter().map(|s| s.committed).sum();
    let landed = {
        let _blocking = weir_core::blocking::allow();
        a.store.cursor("p", 0).unwrap().next + a.store.cursor("p", 1).unwrap().next
    };
    assert!(shown <= landed, "{shown} shown committed, {landed} landed");
    a.stop().await;
    acquire(&a);
    a.start(spec(2, OnError::Halt), points());
    a.idle().await;
    let total: u64 = (0..5).map(|u| a.state(&format!("u{u}")).unwrap_or(0)).sum();
    assert_eq!(total, 600, "every record credited once");
    let mut out = output.values("out");
    out.sort();
    assert_eq!(out.len(), 600, "every output once");
    a.stop().await;
}

/// Each user's outputs are its balances 1, 2, … n, once each (every record credits 1; a user's
/// records are on both input partitions, whose forwarders interleave): an output lost,
/// doubled or from a commit that never landed breaks the run. Returns each user's n.
fn balances_once(output: &fakes::FakeOutput) -> std::collections::BTreeMap<String, u64> {
    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for r in output.records("out") {
        let user = String::from_utf8_lossy(r.key.as_deref().expect("keyed")).into_owned();
        let balance: u64 = String::from_utf8_lossy(&r.value)
            .parse()
            .expect("a balance");
        seen.entry(user).or_default().push(balance);
    }
    seen.into_iter()
        .map(|(user, mut balances)| {
            balances.sort_unstable();
            let n = balances.len() as u64;
            assert_eq!(balances, (1..=n).collect::<Vec<_>>(), "{user}'s outputs");
            (user, n)
        })
        .collect()
}

/// A zombie owner (A) has pipelined commits queued when the new owner (B) announces itself,
/// just before A's append: the changelog's fence refuses A's tail, A shows and forwards none of
/// it, and B runs the records again — every credit and every output once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombies_pipelined_commits_after_the_new_owners_announce_never_land() {
    let (changelog, input, output) = shared();
    let node = || harness::Harness::node(changelog.clone(), input.clone(), output.clone(), 1000);
    let (mut a, mut b) = a_ran_the_first_100(node, &input).await;
    let feed = |from: usize, to: usize| orders(&input, from, to);
    // A's next append (the commits it queued for 100..400, pipelined) meets B's announce: B
    // takes the plugin over just before it lands, as a node whose lease on A ran out would.
    let b_store = b.store.clone();
    // Only a commit group writes a partition's cursor (`c/<p>/`): the compactor's and the
    // forwarder's appends pass.
    let is_commit = |payload: &[u8]| {
        payload
            .windows(7)
            .any(|w| w[..5] == *b"c/\0\0\0" && w[6] == b'/')
    };
    changelog
        .before_next_append_where("plugin/p", is_commit, move || b_store.acquire("p").unwrap());
    feed(100, 400);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stopped = |a: &Harness| {
        !changelog.hook_pending()
            && !a.store.held("p")
            && a.rt()
                .status
                .lock()
                .iter()
                .any(|s| matches!(s.state, PartitionState::Waiting(_)))
    };
    while !stopped(&a) {
        assert!(
            std::time::Instant::now() < deadline,
            "A's append never met B's announce (hook pending: {}): {:?}",
            changelog.hook_pending(),
            a.rt().status.lock()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Time for anything of A's tail to show, were it going to.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let shown: u64 = a.rt().status.lock().iter().map(|s| s.committed).sum();
    assert!(
        shown <= 100,
        "A shows {shown} records committed; 100 landed"
    );
    assert!(
        a.rt().status.lock().iter().any(|s| matches!(&s.state,
            PartitionState::Waiting(why) if why.contains("did not land"))),
        "A had commits in flight, refused: {:?}",
        a.rt().status.lock()
    );
    let before_b = balances_once(&output);
    assert!(
        before_b.values().all(|b| *b <= 20),
        "an output of A's refused tail was forwarded: {before_b:?}"
    );
    a.stop().await;
    b.start(spec(2, OnError::Halt), points());
    b.idle().await;
    let total: u64 = (0..5).map(|u| b.state(&format!("u{u}")).unwrap_or(0)).sum();
    assert_eq!(total, 400, "every record credited once");
    let last = balances_once(&output);
    assert_eq!(
        last.values().copied().collect::<Vec<_>>(),
        vec![80; 5],
        "every output once"
    );
    b.stop().await;
}
