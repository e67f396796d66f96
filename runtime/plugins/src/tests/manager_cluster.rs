//! The plugin manager in cluster mode on fakes: a node's view of which plugins it runs.

use std::sync::Arc;
use std::time::Duration;

use weir_log::{Durability, FsyncPolicy, KvStore, MemoryChangelog, MemoryStore, ReplicatedKv};

use super::fakes::{rec, FakeInput, FakeOutput, NoProbes};
use super::harness::spec;
use super::points;
use crate::cluster::Membership;
use crate::runtime::{PartitionState, Seams};
use crate::spec::OnError;
use crate::store::{Cursor, KvPluginStore, PluginStore};
use crate::PluginManager;

/// Plugin `p`'s cursor of partition 0, as the store lays it out (`c/<p BE>/`).
fn cursor_key() -> Vec<u8> {
    let mut k = b"c/".to_vec();
    k.extend_from_slice(&0u32.to_be_bytes());
    k.push(b'/');
    k
}

fn replicated(changelog: &Arc<MemoryChangelog>) -> Arc<ReplicatedKv> {
    Arc::new(ReplicatedKv::new(
        Arc::new(MemoryStore::new()),
        changelog.clone(),
        KvPluginStore::OWNED_PREFIX,
    ))
}

/// One node of a test cluster: a manager in cluster mode over `kv`, reading `in` (1
/// partition) and writing `out` (2) through fakes.
struct Node {
    manager: Arc<PluginManager>,
    input: Arc<FakeInput>,
    durability: Arc<Durability>,
    syncer: std::thread::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn open(kv: Arc<ReplicatedKv>) -> Node {
        let input = Arc::new(FakeInput::default());
        input.topic("in", 1);
        let output = Arc::new(FakeOutput::default());
        output.topic("out", 2);
        output.topic("p.dlq", 1);
        let local: Arc<dyn weir_log::Store> = Arc::new(MemoryStore::new());
        let (durability, syncer) = Durability::start(local, FsyncPolicy::Never);
        let seams = Seams {
            input: input.clone(),
            output,
            store: Arc::new(KvPluginStore::replicated(kv.clone())),
            durability: durability.clone(),
            probes: Arc::new(NoProbes),
            cluster: Some(Arc::new(Membership::new(kv, "127.0.0.1:1"))),
        };
        let dir = tempfile::tempdir().unwrap();
        let manager = PluginManager::open(
            dir.path(),
            &dir.path().join("compiled"),
            seams,
            Default::default(),
        )
        .await
        .unwrap();
        Node {
            manager,
            input,
            durability,
            syncer,
            _dir: dir,
        }
    }

    async fn shut(self) {
        self.manager.shutdown().await;
        self.durability.stop();
        self.syncer.join().unwrap();
    }
}

/// A node that starts while the changelog cannot be read yet (a fresh NATS cluster electing
/// its stream leaders) waits for it instead of failing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starting_before_the_changelog_answers_waits_for_it() {
    let changelog = Arc::new(MemoryChangelog::default());
    changelog.fail_next_reads(2);
    let started = std::time::Instant::now();
    let node = Node::open(replicated(&changelog)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it read the registry again after each failure, a second apart"
    );
    assert!(node.manager.list().is_empty());
    node.shut().await;
}

/// A node takes a plugin over (its lease is this node's, the takeover entry lands) and then
/// cannot open it (a malformed entry in its store). It must not count itself the plugin's
/// runner: it used to stay marked active, the cluster loop never tried again while this live
/// node kept the lease, and no node ran the plugin. Once the store is mended, the next
/// takeover runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_cannot_open_the_plugin_is_tried_again() {
    let changelog = Arc::new(MemoryChangelog::default());
    let node = Node::open(replicated(&changelog)).await;
    let (manager, input) = (node.manager.clone(), node.input.clone());

    // Another node deployed `p` and ran it; this node keeps it open on standby.
    let other_kv = replicated(&changelog);
    let other = KvPluginStore::replicated(other_kv.clone());
    let s = spec(1, OnError::Halt);
    let mend = |value: Vec<u8>| {
        let _blocking = weir_core::blocking::allow();
        other.acquire("p").unwrap();
        other_kv
            .kv_apply("plugin/p", &[(cursor_key(), Some(value))])
            .unwrap();
    };
    {
        let _blocking = weir_core::blocking::allow();
        other.acquire("p").unwrap();
        other.create(&s, &[Cursor::at(0)]).unwrap();
    }
    manager.start(s.clone(), points()).await.unwrap();
    assert!(!manager.is_active("p"));
    // Its last entry is malformed: whoever takes the plugin over cannot open it.
    mend(b"not a cursor".to_vec());
    assert!(manager.activate("p").await.is_err());
    assert!(
        !manager.is_active("p"),
        "a plugin that failed to open is not running here"
    );

    // Mended; the cluster loop's next tick (this node holds the lease, the plugin is not
    // active) takes it over again, and it runs.
    mend(Cursor::at(0).encode());
    manager.activate("p").await.unwrap();
    assert!(manager.is_active("p"));
    input.append("in", 0, vec![rec("ann", "5", Some("m1"))]);
    let runtime = manager.runtime("p").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while runtime.status.lock()[0].committed < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            runtime.status.lock()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!matches!(
        runtime.status.lock()[0].state,
        PartitionState::Standby(_)
    ));
    node.shut().await;
}

/// A changelog as one node reaches it: while `cut`, every log but the cluster's membership
/// fails with a time-out, or (`hang`) does not answer until the path is back — a node whose
/// path to the registry's stream fails or hangs while its heartbeats land (as seen from
/// outside: "Following the cluster's plugins failed … timed out" every few seconds).
struct PartlyCut {
    inner: Arc<MemoryChangelog>,
    cut: std::sync::atomic::AtomicBool,
    hang: bool,
}

impl PartlyCut {
    fn check(&self, log: &str) -> Result<(), weir_log::LogError> {
        let cut = || self.cut.load(std::sync::atomic::Ordering::SeqCst);
        if log == "cluster" || !cut() {
            return Ok(());
        }
        if !self.hang {
            return Err(weir_log::LogError::Engine {
                op: format!("read {log}"),
                reason: "timed out (test)".into(),
            });
        }
        while cut() {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl weir_log::Changelog for PartlyCut {
    fn append_entry(
        &self,
        log: &str,
        expect: Option<u64>,
        payload: &[u8],
        rollup: bool,
    ) -> Result<u64, weir_log::LogError> {
        self.check(log)?;
        self.inner.append_entry(log, expect, payload, rollup)
    }
    fn last_position(&self, log: &str) -> Result<u64, weir_log::LogError> {
        self.check(log)?;
        self.inner.last_position(log)
    }
    fn read_entries(
        &self,
        log: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<weir_log::changelog::Entry>, weir_log::LogError> {
        self.check(log)?;
        self.inner.read_entries(log, after, limit)
    }
    fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), weir_log::LogError> {
        self.check(name)?;
        self.inner.put_blob(name, bytes)
    }
    fn get_blob(&self, name: &str) -> Result<Option<bytes::Bytes>, weir_log::LogError> {
        self.check(name)?;
        self.inner.get_blob(name)
    }
}

/// Another node's second: its heartbeat, then a tick over plugin `p`.
async fn beat_and_tick(node: &Arc<Membership>) -> crate::cluster::View {
    let node = node.clone();
    tokio::task::spawn_blocking(move || {
        let _blocking = weir_core::blocking::allow();
        node.heartbeat().unwrap();
        node.tick(&["p".to_string()], &[]).unwrap()
    })
    .await
    .unwrap()
}

/// Issue 25's plugin that no node ran: a node holds a plugin's lease while its cluster loop
/// keeps failing (its heartbeats still land). It used to stay live, so its lease stayed
/// valid and no other node could take the plugin; now it stops heartbeating once its loop
/// has failed for the lease time-out, another node takes the plugin, and once the node's
/// path is back it heartbeats again and stands by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_cluster_loop_keeps_failing_lets_its_plugins_go() {
    loop_cut_off(false).await;
}

/// The same with a path that hangs instead of failing: the node's look at the registry never
/// answers, which counts as failing once it has waited twice the lease time-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_cluster_loop_hangs_lets_its_plugins_go() {
    loop_cut_off(true).await;
}

async fn loop_cut_off(hang: bool) {
    let changelog = Arc::new(MemoryChangelog::default());
    let path = Arc::new(PartlyCut {
        inner: changelog.clone(),
        cut: false.into(),
        hang,
    });
    let node = Node::open(Arc::new(ReplicatedKv::new(
        Arc::new(MemoryStore::new()),
        path.clone(),
        KvPluginStore::OWNED_PREFIX,
    )))
    .await;
    let manager = node.manager.clone();
    let s = spec(1, OnError::Halt);
    {
        let _blocking = weir_core::blocking::allow();
        let other = KvPluginStore::replicated(replicated(&changelog));
        other.create(&s, &[Cursor::at(0)]).unwrap();
    }
    manager.start(s, points()).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(manager.clone().run_cluster(shutdown.clone()));
    // The only live node: it takes the plugin once it has beaten for a time-out.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !manager.is_active("p") {
        assert!(std::time::Instant::now() < deadline, "never took p");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Its path to everything but the membership breaks. Alone, it beats on past both
    // limits (stepping down would hand its plugins to no one).
    path.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let onlooker = Arc::new(Membership::new(replicated(&changelog), "127.0.0.1:3"));
    let alone_live = tokio::task::spawn_blocking(move || {
        let _blocking = weir_core::blocking::allow();
        onlooker.others_live().unwrap()
    })
    .await
    .unwrap();
    if !alone_live {
        path.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
    assert!(alone_live, "a node alone stopped heartbeating");
    // Another node beats and ticks.
    let b = Arc::new(Membership::new(replicated(&changelog), "127.0.0.1:2"));
    let cut_at = std::time::Instant::now();
    let holder = loop {
        let view = beat_and_tick(&b).await;
        let holder = view.holder("p").map(str::to_string);
        if holder.as_deref() == Some(b.node.as_str()) || cut_at.elapsed() > Duration::from_secs(40)
        {
            break holder;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Back before asserting: a hung read must return for the runtime to stop.
    path.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        holder.as_deref(),
        Some(b.node.as_str()),
        "a node that cannot follow the cluster kept its lease alive for 40 s"
    );

    // Its path is back: it sees the other node's lease, stops running the plugin, and beats.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let view = beat_and_tick(&b).await;
        if !manager.is_active("p") && view.live.len() == 2 {
            assert_eq!(view.holder("p"), Some(b.node.as_str()));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node never stood down and beat again: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shutdown.cancel();
    node.shut().await;
}

/// A resume through a node that does not run the plugin saves a new restart count (the runner
/// restarts it); the next change through the same node must start from that spec, not from the
/// one it had before, or it is refused as made from a stale view ("another weir node changed
/// plugin … at the same moment") until the cluster loop catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_a_standby_node_build_on_its_own_last_change() {
    let changelog = Arc::new(MemoryChangelog::default());
    let node = Node::open(replicated(&changelog)).await;
    let s = deployed_elsewhere(&changelog);
    node.manager.start(s, points()).await.unwrap();
    assert!(!node.manager.is_active("p"));
    let resumed = node.manager.set_paused("p", false).await.unwrap();
    assert_eq!(resumed.spec.restarts, 1);
    let paused = node.manager.set_paused("p", true).await.unwrap();
    assert!(paused.spec.paused);
    let resumed = node.manager.set_paused("p", false).await.unwrap();
    assert_eq!((resumed.spec.paused, resumed.spec.restarts), (false, 2));
    assert!(!node.manager.is_active("p"), "still on standby here");
    node.shut().await;
}

/// A node that holds a plugin's lease and cannot start it (its store has a malformed entry)
/// gives the lease up after three failed takeovers in a row and does not take it again for a
/// while, so another live node takes it over: with the lease kept, no node would run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_start_a_plugin_gives_its_lease_to_another() {
    let changelog = Arc::new(MemoryChangelog::default());
    let node = Node::open(replicated(&changelog)).await;
    let s = deployed_elsewhere(&changelog);
    node.manager.start(s, points()).await.unwrap();
    {
        // Its last entry is malformed: whoever takes the plugin over cannot open it.
        let _blocking = weir_core::blocking::allow();
        let other_kv = replicated(&changelog);
        KvPluginStore::replicated(other_kv.clone())
            .acquire("p")
            .unwrap();
        other_kv
            .kv_apply(
                "plugin/p",
                &[(cursor_key(), Some(b"not a cursor".to_vec()))],
            )
            .unwrap();
    }
    gives_the_lease_up(&changelog, node).await;
}

/// The same for a plugin this node could not even open on standby: deployed through another
/// node with code this node cannot load (here: its wasm was never stored), so it is not
/// listed here. Its takeovers fail before they take anything; they count all the same (they
/// did not, and a live node kept a lease of a plugin that ran nowhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_open_a_plugin_at_all_gives_its_lease_to_another() {
    let changelog = Arc::new(MemoryChangelog::default());
    let node = Node::open(replicated(&changelog)).await;
    deployed_elsewhere(&changelog);
    gives_the_lease_up(&changelog, node).await;
}

/// Plugin `p` (1 partition, halting) deployed through another node over `changelog`: its spec
/// in the registry and its store created at offset 0. Returns the spec.
fn deployed_elsewhere(changelog: &Arc<MemoryChangelog>) -> crate::spec::PluginSpec {
    let s = spec(1, OnError::Halt);
    let _blocking = weir_core::blocking::allow();
    let other = KvPluginStore::replicated(replicated(changelog));
    other.acquire("p").unwrap();
    other.create(&s, &[Cursor::at(0)]).unwrap();
    s
}

/// Runs `node`'s cluster loop as the only live node over a registry holding plugin `p`, which
/// it cannot start: it takes the lease, fails three ticks in a row and gives the lease up; it
/// does not take it again, and another node that joins takes it once steady.
async fn gives_the_lease_up(changelog: &Arc<MemoryChangelog>, node: Node) {
    let manager = node.manager.clone();
    let me = manager.membership().unwrap().node.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(manager.clone().run_cluster(shutdown.clone()));
    let membership = manager.membership().unwrap().clone();
    let lease = || {
        let m = membership.clone();
        tokio::task::spawn_blocking(move || {
            let _blocking = weir_core::blocking::allow();
            m.lease_of("p").unwrap()
        })
    };
    let (mut took, deadline) = (false, std::time::Instant::now() + Duration::from_secs(30));
    loop {
        let holder = lease().await.unwrap();
        took |= holder.as_deref() == Some(me.as_str());
        if took && holder.is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "took the lease: {took}; holder now {holder:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!manager.is_active("p"));
    // Given up: it does not take the free lease again, though it is the only node that
    // could; another node that joins takes it once it is steady.
    let b = Arc::new(Membership::new(replicated(changelog), "127.0.0.1:2"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let view = beat_and_tick(&b).await;
        let holder = view.leases.get("p").cloned();
        assert_ne!(
            holder.as_deref(),
            Some(me.as_str()),
            "took a given-up lease again"
        );
        if holder.as_deref() == Some(b.node.as_str()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{view:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!manager.is_active("p"));
    shutdown.cancel();
    node.shut().await;
}
