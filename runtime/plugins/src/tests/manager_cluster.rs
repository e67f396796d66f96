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

/// A node takes a plugin over (its lease is this node's, the takeover entry lands) and then
/// cannot open it (a malformed entry in its store). It must not count itself the plugin's
/// runner: it used to stay marked active, the cluster loop never tried again while this live
/// node kept the lease, and no node ran the plugin. Once the store is mended, the next
/// takeover runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_cannot_open_the_plugin_is_tried_again() {
    let changelog = Arc::new(MemoryChangelog::default());
    let input = Arc::new(FakeInput::default());
    input.topic("in", 1);
    let output = Arc::new(FakeOutput::default());
    output.topic("out", 2);
    output.topic("p.dlq", 1);
    let kv = replicated(&changelog);
    let local: Arc<dyn weir_log::Store> = Arc::new(MemoryStore::new());
    let (durability, syncer) = Durability::start(local, FsyncPolicy::Never);
    let seams = Seams {
        input: input.clone(),
        output: output.clone(),
        store: Arc::new(KvPluginStore::replicated(kv.clone())),
        durability: durability.clone(),
        probes: Arc::new(NoProbes),
        cluster: Some(Arc::new(Membership::new(kv.clone(), "127.0.0.1:1"))),
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
    manager.shutdown().await;
    durability.stop();
    syncer.join().unwrap();
}
