//! JetStreamLog against a real 3-node JetStream cluster on loopback: the fence between two
//! writers, the tail, fragments, recovery on a fresh connection, retention, producers, groups.
//! Needs nats-server: `cargo xtask nats-server` installs it (`cargo xtask test` does).

use bytes::Bytes;
use weir_core::{TopicConfig, TopicPartition};
use weir_jetstream::JetStreamLog;
use weir_log::{codec, Log, LogError, SharedLog};

mod common;
use common::*;

#[test]
fn two_writers_are_fenced_and_follow_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let (a, b) = (connect(&c, "t1"), connect(&c, "t1"));
    let config = TopicConfig::new("orders.eu", 2);
    a.put_topic(&config).unwrap();
    assert!(matches!(
        b.put_topic(&config),
        Err(LogError::Conflict { .. })
    ));
    assert_eq!(b.load_topics().unwrap(), vec![config.clone()]);
    let tp = TopicPartition::new("orders.eu", 0);
    a.recover_partition(&tp).unwrap();
    b.recover_partition(&tp).unwrap();

    let first = codec::encode_chunks(&records(300, 1000, 1), 1, 128 * 1024);
    assert!(first.len() > 1, "several chunks make an atomic batch");
    a.append(&tp, 0, &first, &[(7, &b"state-1"[..])]).unwrap();
    // B still believes the partition is empty: the engine refuses its append.
    let second = codec::encode_chunks(&records(10, 100, 2), 2, 128 * 1024);
    match b.append(&tp, 0, &second, &[]) {
        Err(LogError::Fenced { expected: 0, .. }) => {}
        other => panic!("expected a fence, got {other:?}"),
    }
    let tail = b.tail(&tp).unwrap();
    let counted: u64 = tail.chunks.iter().map(|(_, m)| u64::from(m.count)).sum();
    assert_eq!(counted, 300);
    assert_eq!(tail.producers, vec![(7, Bytes::from_static(b"state-1"))]);
    b.append(&tp, 300, &second, &[]).unwrap();

    // A learns B's chunk from the tail and reads it.
    assert!(
        a.read_chunk(&tp, 300).unwrap().is_none(),
        "unknown before the tail"
    );
    let tail = a.tail(&tp).unwrap();
    assert_eq!(tail.chunks.len(), 1);
    let got = a.read_chunk(&tp, 300).unwrap().expect("the chunk");
    let decoded = codec::decode_chunk(&got, 300, 0).unwrap();
    assert_eq!(decoded.len(), 10);
    assert_eq!(decoded[9].offset, 309);

    // One record larger than a message: fragments, read back whole.
    let big = codec::encode_chunks(&records(1, 1_300_000, 3), 3, 128 * 1024);
    a.append(&tp, 310, &big, &[(7, &b"state-2"[..])]).unwrap();
    let got = a.read_chunk(&tp, 310).unwrap().expect("the big chunk");
    assert_eq!(got, big[0].bytes);

    // A fresh connection recovers everything from the engine.
    let fresh = connect(&c, "t1");
    let r = fresh.recover_partition(&tp).unwrap();
    assert_eq!(r.start_offset, 0);
    let end: u64 = r.chunks.iter().map(|(_, m)| u64::from(m.count)).sum();
    assert_eq!(end, 311);
    assert_eq!(r.producers, vec![(7, Bytes::from_static(b"state-2"))]);
    assert_eq!(fresh.read_chunk(&tp, 310).unwrap().unwrap(), big[0].bytes);

    // Retention: the first chunk goes, the start moves, the fence still holds.
    let bases: Vec<u64> = r.chunks.iter().map(|(b, _)| *b).collect();
    fresh.trim(&tp, &bases[..1], bases[1]).unwrap();
    assert_eq!(a.first_offset(&tp).unwrap(), Some(bases[1]));
    assert!(a.read_chunk(&tp, 0).unwrap().is_none());
    let third = codec::encode_chunks(&records(5, 10, 4), 4, 128 * 1024);
    assert!(matches!(fresh.append(&tp, 311, &third, &[]), Ok(())));
    assert!(matches!(
        a.append(&tp, 311, &third, &[]),
        Err(LogError::Fenced { .. })
    ));
}

#[test]
fn producers_and_groups_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let (a, b) = (connect(&c, "t2"), connect(&c, "t2"));
    a.issue_producer(1, b"rec-a", 2).unwrap();
    // B proposes the same id: refused, and after reloading it issues the next one.
    assert!(matches!(
        b.issue_producer(1, b"rec-b", 2),
        Err(LogError::Conflict { .. })
    ));
    let stored = b.load_producers().unwrap();
    assert_eq!(stored.next_id, 2);
    b.issue_producer(stored.next_id, b"rec-b", 3).unwrap();
    assert_eq!(a.load_producer(2).unwrap().as_deref(), Some(&b"rec-b"[..]));
    a.put_producer(1, b"rec-a-epoch-1", 3).unwrap();
    assert_eq!(
        b.load_producer(1).unwrap().as_deref(),
        Some(&b"rec-a-epoch-1"[..])
    );
    a.delete_producers(&[1]).unwrap();
    assert_eq!(b.load_producers().unwrap().producers.len(), 1);

    a.put_group_offsets("g.1 x", "orders", &[(0, 5), (1, 7)], 1000)
        .unwrap();
    b.put_group_offsets("g.1 x", "orders", &[(1, 9)], 2000)
        .unwrap();
    assert_eq!(
        a.group_offsets("g.1 x", "orders").unwrap(),
        vec![(0, 5), (1, 9)]
    );
    let groups = b.list_groups().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(
        (groups[0].group.as_str(), groups[0].last_commit_ms),
        ("g.1 x", 2000)
    );
    a.delete_group("g.1 x", "orders").unwrap();
    assert!(b.group_offsets("g.1 x", "orders").unwrap().is_empty());
}

/// Cluster mode's plugin store on the engine: a fenced entry, a rollup inside a fenced
/// batch, entries bigger than a message, blobs, and ReplicatedKv's takeover between two
/// nodes.
#[test]
fn changelogs_fence_roll_up_and_carry_plugin_state_between_nodes() {
    use std::sync::Arc;
    use weir_log::{Changelog, KvStore, MemoryStore, ReplicatedKv};
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let a = Arc::new(connect(&c, "cl"));
    let b = Arc::new(connect(&c, "cl"));
    let s1 = a.append_entry("plugin/x", Some(0), b"one", false).unwrap();
    assert!(matches!(
        b.append_entry("plugin/x", Some(0), b"stale", false),
        Err(LogError::Conflict { .. })
    ));
    // Two fragments, then a rollup fenced on the last of them.
    let big = vec![7u8; 700 * 1024];
    let s2 = b.append_entry("plugin/x", Some(s1), &big, false).unwrap();
    assert_eq!(b.last_position("plugin/x").unwrap(), s2);
    let read = a.read_entries("plugin/x", 0, 10).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!((read[1].prev, read[1].payload.len()), (Some(s1), big.len()));
    assert!(matches!(
        a.append_entry("plugin/x", Some(s1), b"snap", true),
        Err(LogError::Conflict { .. })
    ));
    // A snapshot bigger than a message: a rollup of two fragments, fenced.
    let snapshot = vec![9u8; 900 * 1024];
    let s3 = a
        .append_entry("plugin/x", Some(s2), &snapshot, true)
        .unwrap();
    let read = b.read_entries("plugin/x", 0, 10).unwrap();
    assert_eq!(read.len(), 1, "the rollup deleted the entries before it");
    assert_eq!((read[0].seq, read[0].rollup), (s3, true));
    assert_eq!(read[0].payload.as_ref(), snapshot.as_slice());
    a.put_blob("wasm-1", &big).unwrap();
    assert_eq!(b.get_blob("wasm-1").unwrap().unwrap().len(), big.len());
    assert_eq!(b.get_blob("wasm-2").unwrap(), None);

    let node = |log: &Arc<JetStreamLog>| {
        ReplicatedKv::new(Arc::new(MemoryStore::new()), log.clone(), "plugin/")
    };
    let (na, nb) = (node(&a), node(&b));
    na.acquire("plugin/y").unwrap();
    na.kv_apply("plugin/y", &[(b"k".to_vec(), Some(b"1".to_vec()))])
        .unwrap();
    nb.acquire("plugin/y").unwrap();
    assert!(na
        .kv_apply("plugin/y", &[(b"k".to_vec(), Some(b"2".to_vec()))])
        .is_err());
    assert_eq!(
        nb.kv_get("plugin/y", b"k").unwrap().as_deref(),
        Some(b"1".as_slice())
    );
}

/// A tail of more messages and more bytes than one direct-get batch holds (256 messages,
/// 4 MiB) is read whole, in order, with the newest producer state; so is a whole partition
/// recovered on a fresh connection. Topic streams allow direct gets (how the tail is read).
#[test]
fn a_tail_longer_than_a_batch_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let (a, b) = (connect(&c, "t4"), connect(&c, "t4"));
    let config = TopicConfig::new("burst", 1);
    a.put_topic(&config).unwrap();
    b.load_topics().unwrap();
    let tp = TopicPartition::new("burst", 0);
    a.recover_partition(&tp).unwrap();
    b.recover_partition(&tp).unwrap();
    let mut next = 0u64;
    // ~7.5 MB in messages of ~128 KiB, then 300 one-record appends with producer states.
    for i in 0..50u8 {
        let chunks = codec::encode_chunks(&records(100, 1500, i), 1, 128 * 1024);
        a.append(&tp, next, &chunks, &[]).unwrap();
        next += 100;
    }
    for i in 0..300u32 {
        let chunks = codec::encode_chunks(&records(1, 10, 7), 1, 128 * 1024);
        let state = i.to_be_bytes();
        a.append(&tp, next, &chunks, &[(9, &state[..])]).unwrap();
        next += 1;
    }
    let tail = b.tail(&tp).unwrap();
    assert!(!tail.partial);
    let mut end = 0u64;
    for (base, meta) in &tail.chunks {
        assert_eq!(*base, end, "chunks in order, none missing");
        end += u64::from(meta.count);
    }
    assert_eq!(end, next);
    assert_eq!(
        tail.producers.last(),
        Some(&(9, Bytes::copy_from_slice(&299u32.to_be_bytes())))
    );
    // B appends after what it read: its view is the partition's end.
    let mine = codec::encode_chunks(&records(2, 10, 8), 2, 128 * 1024);
    b.append(&tp, next, &mine, &[]).unwrap();
    let fresh = connect(&c, "t4");
    let r = fresh.recover_partition(&tp).unwrap();
    let count: u64 = r.chunks.iter().map(|(_, m)| u64::from(m.count)).sum();
    assert_eq!(count, next + 2);
    assert_eq!(
        r.producers,
        vec![(9, Bytes::copy_from_slice(&299u32.to_be_bytes()))]
    );
    let stream = a.incarnation("burst").expect("the topic's stream");
    let allows_direct = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = async_nats::connect(c.urls()[0].as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let s = js.get_stream(&stream).await.unwrap();
        s.cached_info().config.allow_direct
    });
    assert!(allows_direct, "topic streams allow direct gets");
}

/// Opening the log with no NATS server at the address says so, naming the address, after
/// at least 5 s per server (it used to report a JetStream request that timed out, and to
/// ask whether JetStream was enabled, about a port nothing listened on).
#[test]
fn opening_with_no_server_at_the_address_names_it() {
    let port = weir_cluster::free_ports(1)[0];
    let url = format!("nats://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let Err(e) = weir_jetstream::JetStreamLog::connect({
        let mut o = weir_jetstream::JetStreamOptions::new(vec![url.clone()]);
        o.request_timeout = std::time::Duration::from_secs(1);
        o
    }) else {
        panic!("connected to {url}, where nothing listens");
    };
    let message = e.to_string();
    assert!(
        message.contains(&url) && message.contains("accepted a connection within 6s"),
        "{message}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}
