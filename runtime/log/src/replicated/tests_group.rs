//! Group commit of owned namespaces: queued writes land together, in order, and one that does
//! not land fails every write queued after it.

use std::sync::Arc;

use super::*;
use crate::{Changelog, MemoryChangelog, MemoryStore};

fn node(log: &Arc<MemoryChangelog>) -> ReplicatedKv {
    ReplicatedKv::new(Arc::new(MemoryStore::new()), log.clone(), "plugin/")
}

fn put(k: &str, v: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
}

fn get(kv: &ReplicatedKv, k: &str) -> Option<String> {
    kv.kv_get(NS, k.as_bytes())
        .unwrap()
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

fn entries(log: &MemoryChangelog) -> usize {
    log.read_entries(NS, 0, 1000).unwrap().len()
}

const NS: &str = "plugin/points";

#[test]
fn writes_queued_before_an_append_land_in_it_in_the_order_they_were_queued() {
    let log = Arc::new(MemoryChangelog::default());
    let (a, b) = (node(&log), node(&log));
    a.acquire(NS).unwrap();
    let before = entries(&log);
    let first = a.begin(NS, vec![put("x", "1")]).unwrap().unwrap();
    let second = a
        .begin(NS, vec![put("x", "2"), put("y", "1")])
        .unwrap()
        .unwrap();
    let third = a.begin(NS, vec![put("z", "1")]).unwrap().unwrap();
    assert!(!first.is_landed());
    // Landing the last appends for all three: one entry.
    a.land(&third).unwrap();
    assert!(first.is_landed() && second.is_landed());
    a.land(&first).unwrap();
    assert_eq!(entries(&log), before + 1, "one append for three writes");
    // Later writes win, as if the entries had landed one by one; another node reads the same.
    for kv in [&a, &b] {
        assert_eq!(
            (get(kv, "x"), get(kv, "y"), get(kv, "z")),
            (Some("2".into()), Some("1".into()), Some("1".into()))
        );
    }
}

#[test]
fn a_group_is_bounded_by_its_bytes() {
    let log = Arc::new(MemoryChangelog::default());
    let a = node(&log);
    a.acquire(NS).unwrap();
    let before = entries(&log);
    let big = "v".repeat(GROUP_MAX_BYTES / 2 + 1);
    let first = a.begin(NS, vec![put("a", &big)]).unwrap().unwrap();
    let second = a.begin(NS, vec![put("b", &big)]).unwrap().unwrap();
    a.land(&second).unwrap();
    assert!(first.is_landed());
    assert_eq!(entries(&log), before + 2);
}

#[test]
fn a_write_that_does_not_land_fails_every_write_queued_after_it_and_drops_the_hold() {
    let log = Arc::new(MemoryChangelog::default());
    let (a, b) = (node(&log), node(&log));
    a.acquire(NS).unwrap();
    a.kv_apply(NS, &[put("x", "1")]).unwrap();
    let first = a.begin(NS, vec![put("x", "a1")]).unwrap().unwrap();
    let second = a.begin(NS, vec![put("x", "a2")]).unwrap().unwrap();
    // B takes over before A's queued writes are appended: A's append is refused.
    b.acquire(NS).unwrap();
    assert!(matches!(a.land(&first), Err(LogError::NotHeld { .. })));
    assert!(matches!(a.land(&second), Err(LogError::NotHeld { .. })));
    assert!(!a.held(NS));
    assert!(matches!(
        a.begin(NS, vec![put("x", "a3")]),
        Err(LogError::NotHeld { .. })
    ));
    assert_eq!(get(&b, "x").as_deref(), Some("1"));
    // A write queued after the failure was decided (another thread's, say) fails too, even
    // if it was queued before the failure was noticed: the release empties the queue.
    a.acquire(NS).unwrap();
    let queued = a.begin(NS, vec![put("x", "a4")]).unwrap().unwrap();
    a.release(NS);
    assert!(matches!(a.land(&queued), Err(LogError::NotHeld { .. })));
    assert_eq!(get(&b, "x").as_deref(), Some("1"));
}

#[test]
fn a_lost_acknowledgement_fails_the_group_and_the_reacquire_reads_what_landed() {
    let log = Arc::new(MemoryChangelog::default());
    let a = node(&log);
    a.acquire(NS).unwrap();
    let first = a.begin(NS, vec![put("x", "1")]).unwrap().unwrap();
    let second = a.begin(NS, vec![put("y", "1")]).unwrap().unwrap();
    log.lose_next_ack();
    assert!(a.land(&first).is_err());
    assert!(matches!(a.land(&second), Err(LogError::NotHeld { .. })));
    assert!(!a.held(NS));
    // The group did land: taken over anew, the holder finds both writes.
    a.acquire(NS).unwrap();
    assert_eq!(
        (get(&a, "x"), get(&a, "y")),
        (Some("1".into()), Some("1".into()))
    );
}

#[test]
fn a_write_queued_under_an_earlier_hold_never_lands_under_a_later_one() {
    let log = Arc::new(MemoryChangelog::default());
    let a = node(&log);
    a.acquire(NS).unwrap();
    let stale = a.begin(NS, vec![put("x", "stale")]).unwrap().unwrap();
    // Acquired again (as a takeover does) without the queue being emptied in between: the
    // write decided under the first hold must not land under the second.
    a.held.lock().remove(NS);
    *a.holds.lock().get_mut(NS).unwrap() += 1;
    a.held.lock().insert(NS.to_string());
    let fresh = a.begin(NS, vec![put("y", "1")]).unwrap().unwrap();
    a.land(&fresh).unwrap();
    assert!(matches!(a.land(&stale), Err(LogError::NotHeld { .. })));
    assert_eq!((get(&a, "x"), get(&a, "y")), (None, Some("1".into())));
}

/// A lander waiting for the namespace while an append fails without landing must not append
/// the writes queued after it: fenced on the same position they would land without it (batch
/// n+1's cursor without batch n's effects).
#[test]
fn writes_queued_behind_an_append_that_failed_without_landing_never_land() {
    let log = Arc::new(MemoryChangelog::default());
    let a = Arc::new(node(&log));
    a.acquire(NS).unwrap();
    let first = a.begin(NS, vec![put("n", "1")]).unwrap().unwrap();
    let waiter = Arc::new(Mutex::new(None));
    let (kv, slot) = (a.clone(), waiter.clone());
    log.before_next_append(NS, move || {
        // While the first append is under way: the next batch queues its write and its
        // lander waits for the namespace.
        let next = kv.begin(NS, vec![put("n", "2")]).unwrap().unwrap();
        let kv = kv.clone();
        *slot.lock() = Some(std::thread::spawn(move || kv.land(&next)));
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
    log.fail_next_append();
    assert!(a.land(&first).is_err());
    let waited = waiter.lock().take().unwrap().join().unwrap();
    assert!(
        matches!(waited, Err(LogError::NotHeld { .. })),
        "{waited:?}"
    );
    a.acquire(NS).unwrap();
    assert_eq!(
        get(&a, "n"),
        None,
        "the second write landed without the first"
    );
}
