use std::sync::Arc;

use super::*;
use crate::{MemoryChangelog, MemoryStore};

fn node(log: &Arc<MemoryChangelog>) -> ReplicatedKv {
    ReplicatedKv::new(Arc::new(MemoryStore::new()), log.clone(), "plugin/")
}

fn put(k: &str, v: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
}

fn get(kv: &ReplicatedKv, ns: &str, k: &str) -> Option<String> {
    kv.kv_get(ns, k.as_bytes())
        .unwrap()
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

const NS: &str = "plugin/points";

#[test]
fn an_owned_namespace_is_written_only_by_its_holder() {
    let log = Arc::new(MemoryChangelog::default());
    let (a, b) = (node(&log), node(&log));
    assert!(matches!(
        a.kv_apply(NS, &[put("x", "1")]),
        Err(LogError::NotHeld { .. })
    ));
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("x", "1")]).unwrap();
    // Another node reads what the holder committed.
    assert_eq!(get(&b, NS, "x").as_deref(), Some("1"));
    // It takes over: the old holder's next write is refused by the fence and stores nothing.
    b.acquire(NS).unwrap();
    let refused = a.kv_apply(NS, &[put("x", "zombie")]);
    assert!(
        matches!(refused, Err(LogError::NotHeld { .. })),
        "{refused:?}"
    );
    assert!(!a.held(NS));
    b.kv_apply(NS, &[put("x", "2")]).unwrap();
    assert_eq!(get(&b, NS, "x").as_deref(), Some("2"));
    // The old holder reacquires and finds the new holder's writes, not its own refused one.
    a.acquire(NS).unwrap();
    assert_eq!(get(&a, NS, "x").as_deref(), Some("2"));
    assert!(b.kv_apply(NS, &[put("x", "3")]).is_err());
}

#[test]
fn snapshots_replace_the_entries_before_them_and_a_fresh_cache_reads_them() {
    let log = Arc::new(MemoryChangelog::default());
    let a = node(&log).with_snapshot_every(3);
    a.acquire(NS).unwrap();
    let mut snapshots = 0u32;
    for i in 0..20 {
        a.kv_apply(
            NS,
            &[
                put(&format!("k{i}"), &i.to_string()),
                (b"k0".to_vec(), None),
            ],
        )
        .unwrap();
        // The holder's writes never snapshot: its compactor asks between them.
        let before = log.read_entries(NS, 0, usize::MAX).unwrap().len();
        let taken = a.snapshot_if_due(NS).unwrap();
        let after = log.read_entries(NS, 0, usize::MAX).unwrap().len();
        assert_eq!(
            taken,
            after < before,
            "a snapshot replaces what is before it"
        );
        snapshots += u32::from(taken);
    }
    assert!(
        snapshots >= 6,
        "{snapshots} snapshots of 21 entries, one due every 3"
    );
    let entries = log.read_entries(NS, 0, usize::MAX).unwrap();
    assert!(entries.len() <= 4, "{} entries kept", entries.len());
    assert!(entries[0].rollup);
    let fresh = node(&log);
    let all = fresh.kv_scan(NS, b"").unwrap();
    assert_eq!(all.len(), 19, "k1..k19, k0 deleted");
    assert_eq!(get(&fresh, NS, "k7").as_deref(), Some("7"));
    assert_eq!(get(&fresh, NS, "k0"), None);
    assert!(
        matches!(fresh.snapshot_if_due(NS), Err(LogError::NotHeld { .. })),
        "only the holder snapshots an owned namespace"
    );
}

#[test]
fn a_holders_commits_never_snapshot_an_owned_namespace_by_themselves() {
    let log = Arc::new(MemoryChangelog::default());
    let a = node(&log).with_snapshot_every(3);
    a.acquire(NS).unwrap();
    for i in 0..10 {
        a.kv_apply(NS, &[put(&format!("k{i}"), "v")]).unwrap();
    }
    let entries = log.read_entries(NS, 0, usize::MAX).unwrap();
    assert_eq!(entries.len(), 11, "the takeover and ten writes");
    assert!(entries.iter().all(|e| !e.rollup));
    // A shared namespace's writer still snapshots after its write.
    for i in 0..10 {
        a.kv_apply("plugins", &[put(&format!("p{i}"), "spec")])
            .unwrap();
    }
    assert!(log.read_entries("plugins", 0, usize::MAX).unwrap().len() <= 4);
}

#[test]
fn shared_namespaces_take_every_nodes_writes_and_update_is_a_compare_and_set() {
    let log = Arc::new(MemoryChangelog::default());
    let (a, b) = (node(&log), node(&log));
    a.kv_apply("plugins", &[put("p1", "spec1")]).unwrap();
    b.kv_apply("plugins", &[put("p2", "spec2")]).unwrap();
    assert_eq!(a.kv_scan("plugins", b"").unwrap().len(), 2);
    let take = |kv: &ReplicatedKv, me: &str| {
        kv.update("cluster", |now| {
            (!now.contains_key(b"l/p1".as_slice())).then(|| vec![put("l/p1", me)])
        })
        .unwrap()
    };
    assert!(take(&a, "a"));
    assert!(!take(&b, "b"), "b sees a's lease");
    assert_eq!(get(&b, "cluster", "l/p1").as_deref(), Some("a"));
}

#[test]
fn a_drop_by_a_node_not_holding_the_namespace_fences_the_holder() {
    let log = Arc::new(MemoryChangelog::default());
    let (a, b) = (node(&log), node(&log));
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("x", "1")]).unwrap();
    b.kv_drop(NS).unwrap();
    assert!(a.kv_apply(NS, &[put("x", "2")]).is_err());
    assert_eq!(get(&b, NS, "x"), None);
    a.acquire(NS).unwrap();
    assert_eq!(get(&a, NS, "x"), None);
}

/// A remove through node B races a new deployment of the name through node C: C writes the
/// namespace after B read its tail and asked whether to keep it. B's drop is refused by the
/// fence, B asks again (now the name is deployed: keep), and C's writes survive.
#[test]
fn a_conditional_drop_never_wipes_what_was_written_after_it_looked() {
    let log = Arc::new(MemoryChangelog::default());
    let (a, b, c) = (node(&log), node(&log), node(&log));
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("x", "old")]).unwrap();
    let mut asked = 0;
    let dropped = b
        .drop_unless(NS, || {
            asked += 1;
            if asked == 1 {
                // The new deployment lands between B's look and B's append.
                c.acquire(NS).unwrap();
                c.kv_apply(NS, &[put("x", "new")]).unwrap();
                return Ok(false);
            }
            Ok(true)
        })
        .unwrap();
    assert_eq!((dropped, asked), (false, 2));
    assert!(c.held(NS));
    c.kv_apply(NS, &[put("y", "1")]).unwrap();
    assert_eq!(get(&b, NS, "x").as_deref(), Some("new"));
    // Nothing raced: the drop lands and fences the holder.
    assert!(b.drop_unless(NS, || Ok(false)).unwrap());
    assert!(c.kv_apply(NS, &[put("x", "late")]).is_err());
    assert_eq!((get(&b, NS, "x"), get(&b, NS, "y")), (None, None));
}

#[test]
fn a_cache_ahead_of_its_changelog_is_dropped() {
    let log = Arc::new(MemoryChangelog::default());
    let local: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let a = ReplicatedKv::new(local.clone(), log.clone(), "plugin/");
    a.kv_apply("plugins", &[put("old", "1")]).unwrap();
    // The same cache against a new, empty cluster.
    let other = Arc::new(MemoryChangelog::default());
    let b = ReplicatedKv::new(local, other, "plugin/");
    assert_eq!(get(&b, "plugins", "old"), None);
}

#[test]
fn entries_round_trip() {
    let writes = vec![put("a", "1"), (b"b".to_vec(), None), put("", "")];
    assert_eq!(decode(&encode(true, &writes)), Some((true, writes)));
    assert_eq!(
        decode(&[1, 0, 0, 0, 0, 1]),
        None,
        "count says 1, nothing follows"
    );
}

#[test]
fn an_append_whose_ack_was_lost_drops_the_hold_and_is_read_back_on_reacquiring() {
    let log = Arc::new(MemoryChangelog::default());
    let a = node(&log);
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("x", "1")]).unwrap();
    log.lose_next_ack();
    assert!(matches!(
        a.kv_apply(NS, &[put("x", "2")]),
        Err(LogError::Engine { .. })
    ));
    assert!(
        !a.held(NS),
        "nothing is written on a view that may miss its own write"
    );
    assert!(a.kv_apply(NS, &[put("x", "3")]).is_err());
    a.acquire(NS).unwrap();
    assert_eq!(
        get(&a, NS, "x").as_deref(),
        Some("2"),
        "the write had landed"
    );
}

/// A snapshot whose acknowledgement was lost (it landed) keeps the hold — a takeover, whose
/// open compacts, would otherwise fail on the same snapshot for ever — and the holder's next
/// write, fenced on the position before it, is refused and drops the hold then; after
/// reacquiring, everything is there.
#[test]
fn a_snapshot_whose_ack_was_lost_leaves_the_hold_to_the_next_writes_fence() {
    let log = Arc::new(MemoryChangelog::default());
    let a = node(&log).with_snapshot_every(2);
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("x", "1")]).unwrap();
    log.lose_next_ack();
    assert!(matches!(
        a.snapshot_if_due(NS),
        Err(LogError::Engine { .. })
    ));
    assert!(a.held(NS), "an uncertain snapshot keeps the hold");
    assert!(a.kv_apply(NS, &[put("y", "2")]).is_err());
    assert!(!a.held(NS), "the fence found the landed snapshot");
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("y", "2")]).unwrap();
    assert_eq!(get(&a, NS, "x").as_deref(), Some("1"));
    assert_eq!(get(&node(&log), NS, "y").as_deref(), Some("2"));
}

#[test]
fn a_data_directory_written_without_a_changelog_is_refused_not_merged() {
    let log = Arc::new(MemoryChangelog::default());
    let local = Arc::new(MemoryStore::new());
    local.kv_apply("plugins", &[put("points", "{}")]).unwrap();
    let kv = ReplicatedKv::new(local, log, "plugin/");
    let err = kv.kv_scan("plugins", b"").unwrap_err().to_string();
    assert!(err.contains("weir migrate"), "{err}");
}

/// A holder paused past its lease (a zombie) still believes it holds the namespace and would
/// answer reads from its cache, a state the new holder has moved on from. Confirming the
/// hold reads the changelog's end: it finds the takeover, stops holding, and reads what the
/// new holder committed.
#[test]
fn a_holder_taken_over_finds_out_before_answering() {
    let log = Arc::new(MemoryChangelog::default());
    let (a, b) = (node(&log), node(&log));
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("x", "1")]).unwrap();
    assert!(a.confirm_held(NS).unwrap(), "nothing after its own entry");
    b.acquire(NS).unwrap();
    b.kv_apply(NS, &[put("x", "2")]).unwrap();
    assert!(a.held(NS), "a has not noticed yet");
    assert_eq!(get(&a, NS, "x").as_deref(), Some("1"), "its cache is stale");
    assert!(!a.confirm_held(NS).unwrap());
    assert!(!a.held(NS));
    assert_eq!(get(&a, NS, "x").as_deref(), Some("2"));
    assert!(b.confirm_held(NS).unwrap());
}
