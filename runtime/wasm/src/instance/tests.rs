//! HostState's state calls: the versions a batch sees and what its commit checks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::weir::plugin::state::Host;
use super::*;

/// A host over a committed state of `k` = (b"v1", `stored`'s version), counting store
/// reads.
fn host(reads: Arc<AtomicUsize>, stored: Arc<AtomicU64>) -> HostState {
    HostState {
        wasi: WasiCtx::builder().build(),
        table: ResourceTable::new(),
        limits: StoreLimitsBuilder::new().build(),
        reader: Arc::new(move |key: &[u8]| {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok((key == b"k").then(|| (b"v1".to_vec(), stored.load(Ordering::SeqCst))))
        }),
        effects: BatchEffects::default(),
        logs: Vec::new(),
        interrupt: Arc::new(|| false),
        ticks_left: 0,
    }
}

#[test]
fn versions_follow_the_batch_and_a_key_read_once_is_not_read_again() {
    let reads = Arc::new(AtomicUsize::new(0));
    let mut h = host(reads.clone(), Arc::new(AtomicU64::new(4)));
    let got = h.get(b"k".to_vec()).unwrap().unwrap();
    assert_eq!((got.value, got.version), (b"v1".to_vec(), 4));
    // A put after a get: the next version, with no second read of the store.
    h.put(b"k".to_vec(), b"v2".to_vec()).unwrap();
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    assert_eq!(h.effects.writes[&b"k".to_vec()], Some((b"v2".to_vec(), 5)));
    // Compare-and-set sees the batch's own write; a stale version is refused.
    assert_eq!(
        h.compare_and_set(b"k".to_vec(), 4, b"x".to_vec()).unwrap(),
        None
    );
    assert_eq!(
        h.compare_and_set(b"k".to_vec(), 5, b"v3".to_vec()).unwrap(),
        Some(6)
    );
    // A delete and a put again start from absent; an unread key is read once.
    h.delete(b"k".to_vec()).unwrap();
    h.put(b"k".to_vec(), b"v4".to_vec()).unwrap();
    assert_eq!(h.effects.writes[&b"k".to_vec()], Some((b"v4".to_vec(), 1)));
    h.put(b"new".to_vec(), b"a".to_vec()).unwrap();
    assert_eq!(
        h.compare_and_set(b"new".to_vec(), 1, b"b".to_vec())
            .unwrap(),
        Some(2)
    );
    assert_eq!(reads.load(Ordering::SeqCst), 2);
    // What the commit checks: what was read from the store, once each, version and value.
    assert_eq!(
        h.effects.reads[b"k".as_slice()],
        ReadStamp::of(Some(&(b"v1".to_vec(), 4)))
    );
    assert_eq!(
        h.effects.reads.get(b"k".as_slice()).map(|r| r.version),
        Some(4)
    );
    assert_eq!(
        h.effects.reads.get(b"new".as_slice()).map(|r| r.version),
        Some(0)
    );
}

#[test]
fn compare_and_set_answers_as_get_would_after_another_partition_committed() {
    let (reads, stored) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(4)));
    let mut h = host(reads, stored.clone());
    assert_eq!(h.get(b"k".to_vec()).unwrap().unwrap().version, 4);
    // Another partition commits version 5 of `k`: get and compare-and-set both see it.
    stored.store(5, Ordering::SeqCst);
    assert_eq!(h.get(b"k".to_vec()).unwrap().unwrap().version, 5);
    assert_eq!(
        h.compare_and_set(b"k".to_vec(), 5, b"v".to_vec()).unwrap(),
        Some(6)
    );
    // The commit checks what was read first, version 4: it conflicts and the batch runs again.
    assert_eq!(
        h.effects.reads.get(b"k".as_slice()).map(|r| r.version),
        Some(4)
    );
}
