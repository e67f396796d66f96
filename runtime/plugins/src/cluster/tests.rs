//! Membership: leases taken after the time-out, failed deploys, withheld nodes, stale
//! leases, and the Kafka address in the heartbeat.

use super::*;

fn node(log: &Arc<weir_log::MemoryChangelog>, addr: &str) -> Membership {
    let kv = ReplicatedKv::new(
        Arc::new(weir_log::MemoryStore::new()),
        log.clone(),
        crate::store::KvPluginStore::OWNED_PREFIX,
    );
    Membership::new(Arc::new(kv), addr)
}

/// A node serving Kafka says where in its heartbeat; every node's view has it, and a
/// node without a listener is live but not in the Kafka map.
#[test]
fn the_kafka_address_travels_in_the_heartbeat() {
    let _blocking = weir_core::blocking::allow();
    let log = Arc::new(weir_log::MemoryChangelog::default());
    let (a, b) = (node(&log, "a:1"), node(&log, "b:1"));
    assert!(a.view().is_none(), "no tick yet");
    a.serve_kafka("127.0.0.1:9092".into());
    a.heartbeat().unwrap();
    b.heartbeat().unwrap();
    let seen_by_b = b.tick(&[], &[]).unwrap();
    assert_eq!(seen_by_b.live.len(), 2);
    assert_eq!(
        seen_by_b.kafka.into_iter().collect::<Vec<_>>(),
        vec![(a.node.clone(), "127.0.0.1:9092".to_string())]
    );
    assert_eq!(
        b.view().unwrap().live.len(),
        2,
        "the last tick's view is kept"
    );
    assert_eq!(seen_by_b.live[&a.node], "a:1", "the address is unchanged");
    // a restarted on the same Kafka address (a new node id) while a's last heartbeat is
    // young: once the new one's heartbeat is in the table, the old one (which has not
    // beaten since the new one started) leaves every view.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let restarted = node(&log, "a:1");
    restarted.serve_kafka("127.0.0.1:9092".into());
    restarted.heartbeat().unwrap();
    restarted.heartbeat().unwrap();
    let kafka_of = |m: &Membership| {
        let mut v: Vec<String> = m.view().unwrap().kafka.keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(kafka_of(&restarted), vec![restarted.node.clone()]);
    b.heartbeat().unwrap();
    assert_eq!(
        kafka_of(&b),
        vec![restarted.node.clone()],
        "the heartbeat keeps the view too"
    );
    // Two live nodes told to advertise one address (a misconfiguration): both stay, in
    // every view alike, rather than flipping between them.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let twin = node(&log, "c:1");
    twin.serve_kafka("127.0.0.1:9092".into());
    twin.heartbeat().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    restarted.heartbeat().unwrap();
    b.heartbeat().unwrap();
    let mut both = vec![restarted.node.clone(), twin.node.clone()];
    both.sort();
    assert_eq!(kafka_of(&b), both);
}

/// A plugin whose preferred node does not take it (whatever the reason) is not left
/// running nowhere: once it has been free for longer than the time-out, another live
/// node takes it, and until then it is reported unowned.
#[test]
fn a_plugin_no_node_takes_is_taken_by_any_live_node_after_the_time_out() {
    let _blocking = weir_core::blocking::allow();
    let log = Arc::new(weir_log::MemoryChangelog::default());
    let (a, b) = (node(&log, "a:1"), node(&log, "b:1"));
    // Both beat for a whole time-out: steady, each sees the other live.
    let started = std::time::Instant::now();
    while started.elapsed().as_millis() as i64 <= NODE_TTL_MS + 300 {
        a.heartbeat().unwrap();
        b.heartbeat().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // A plugin preferred by one of them; only the other ticks.
    let view = a.tick(&[], &[]).unwrap();
    let plugin = (0..100)
        .map(|i| format!("p{i}"))
        .find(|p| view.preferred(p) == Some(a.node.as_str()))
        .expect("some plugin prefers a");
    let plugins = vec![plugin.clone()];
    let view = b.tick(&plugins, &[]).unwrap();
    assert_eq!(view.holder(&plugin), None, "b is not preferred: it waits");
    assert!(!b.unowned(&plugin));
    let started = std::time::Instant::now();
    while started.elapsed().as_millis() as i64 <= NODE_TTL_MS + 300 {
        a.heartbeat().unwrap();
        b.heartbeat().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(b.unowned(&plugin), "free longer than the time-out");
    let view = b.tick(&plugins, &[]).unwrap();
    assert_eq!(view.holder(&plugin), Some(b.node.as_str()), "b took it");
    assert!(!b.unowned(&plugin));
}

/// A deploy that failed after taking the lease deletes the lease only if this node still
/// holds it: another node's deploy of the name (or a takeover while this node was cut off)
/// may hold it by then, and deleting that left the new deployment without a runner.
#[test]
fn a_failed_deploy_forgets_only_its_own_lease() {
    let _blocking = weir_core::blocking::allow();
    let log = Arc::new(weir_log::MemoryChangelog::default());
    let (a, b) = (node(&log, "a:1"), node(&log, "b:1"));
    let p = vec!["p".to_string()];
    assert_eq!(a.take("p").unwrap(), None, "a took p");
    // a's heartbeat never landed (a cut off): b, live, takes the lease over.
    b.heartbeat().unwrap();
    assert_eq!(b.take("p").unwrap(), None, "b took p from a dead node");
    a.forget("p", &a.node).unwrap();
    let view = b.tick(&p, &[]).unwrap();
    assert_eq!(view.holder("p"), Some(b.node.as_str()), "b's lease stays");
    // A removal forgets the holder it read.
    assert_eq!(a.lease_of("p").unwrap().as_deref(), Some(b.node.as_str()));
    a.forget("p", &b.node).unwrap();
    assert_eq!(b.tick(&p, &[]).unwrap().holder("p"), None);
}

/// A node that stopped heartbeating (withheld) or whose heartbeat failed is not steady
/// again until it has beaten a whole time-out; then it is (a streak left unset by a
/// failed beat followed at once by a good one never restarted: no lease for its life).
#[test]
fn a_withheld_node_is_steady_again_after_beating_a_time_out() {
    let _blocking = weir_core::blocking::allow();
    let log = Arc::new(weir_log::MemoryChangelog::default());
    let a = node(&log, "a:1");
    a.beat(true);
    a.withhold();
    a.beat(true);
    assert!(!a.steady(), "steady at once after a withhold");
    a.beat(false);
    a.beat(true);
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(NODE_TTL_MS as u64 + 300) {
        a.beat(true);
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(a.steady(), "never steady again after a failed beat");
}

/// A lease this node holds of a plugin no longer in the registry (a deploy that failed
/// after taking it) is deleted at its next tick; other nodes' leases stay.
#[test]
fn a_lease_of_a_plugin_not_deployed_is_dropped_by_its_holder() {
    let _blocking = weir_core::blocking::allow();
    let log = Arc::new(weir_log::MemoryChangelog::default());
    let (a, b) = (node(&log, "a:1"), node(&log, "b:1"));
    a.heartbeat().unwrap();
    b.heartbeat().unwrap();
    assert_eq!(a.take("gone").unwrap(), None);
    assert_eq!(b.take("other").unwrap(), None);
    let view = a.tick(&["p".to_string()], &[]).unwrap();
    assert_eq!(view.holder("gone"), None, "a dropped its stale lease");
    assert_eq!(view.holder("other"), Some(b.node.as_str()), "b's stays");
}
