//! JetStreamLog against a real 3-node JetStream cluster on loopback: the fence between two
//! writers, the tail, fragments, recovery on a fresh connection, retention, producers, groups.
//! Needs nats-server: `cargo xtask nats-server` installs it (`cargo xtask test` does).

use std::path::Path;

use bytes::Bytes;
use weir_cluster::{nats_server_binary, NatsCluster, SyncMode};
use weir_core::{Record, TopicConfig, TopicPartition};
use weir_jetstream::{JetStreamLog, JetStreamOptions};
use weir_log::{codec, Log, LogError};

fn cluster(dir: &Path) -> NatsCluster {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = nats_server_binary(&root).unwrap_or_else(|e| panic!("{e}"));
    NatsCluster::start(&bin, dir, 3, SyncMode::Default).unwrap_or_else(|e| panic!("{e}"))
}

fn connect(c: &NatsCluster, prefix: &str) -> JetStreamLog {
    let mut o = JetStreamOptions::new(c.urls());
    o.prefix = prefix.into();
    JetStreamLog::connect(o).expect("connect")
}

/// A log reaching the cluster only through `servers`, whose requests give up after 3 s.
fn connect_through(servers: Vec<String>, prefix: &str) -> JetStreamLog {
    let mut o = JetStreamOptions::new(servers);
    o.prefix = prefix.into();
    o.request_timeout = std::time::Duration::from_secs(3);
    JetStreamLog::connect(o).expect("connect")
}

fn records(n: usize, size: usize, tag: u8) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            key: Some(Bytes::from(format!("k{i}"))),
            value: Bytes::from(vec![tag; size]),
            ..Default::default()
        })
        .collect()
}

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
    a.append(&tp, 0, &first, Some((7, b"state-1"))).unwrap();
    // B still believes the partition is empty: the engine refuses its append.
    let second = codec::encode_chunks(&records(10, 100, 2), 2, 128 * 1024);
    match b.append(&tp, 0, &second, None) {
        Err(LogError::Fenced { expected: 0, .. }) => {}
        other => panic!("expected a fence, got {other:?}"),
    }
    let tail = b.tail(&tp).unwrap();
    let counted: u64 = tail.chunks.iter().map(|(_, m)| u64::from(m.count)).sum();
    assert_eq!(counted, 300);
    assert_eq!(tail.producers, vec![(7, Bytes::from_static(b"state-1"))]);
    b.append(&tp, 300, &second, None).unwrap();

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
    a.append(&tp, 310, &big, Some((7, b"state-2"))).unwrap();
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
    assert!(matches!(fresh.append(&tp, 311, &third, None), Ok(())));
    assert!(matches!(
        a.append(&tp, 311, &third, None),
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

/// A node that reaches NATS through a server that freezes: its commit times out, but the
/// publish waits in the frozen server's socket and is delivered when it thaws. It must not
/// land over the commit another node made (and acknowledged) in between.
#[test]
fn a_group_commit_that_timed_out_never_lands_over_a_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let prefix = "late1";
    let first = connect(&c, prefix);
    let leader = (0..100)
        .find_map(|_| {
            let l = c.stream_leader(&first.names().meta_stream());
            if l.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            l
        })
        .expect("the metadata stream has a leader");
    let frozen = (0..3).find(|i| *i != leader).unwrap();
    let a = connect_through(vec![c.nodes[frozen].url()], prefix);
    let b = connect_through(
        (0..3)
            .filter(|i| *i != frozen)
            .map(|i| c.nodes[i].url())
            .collect(),
        prefix,
    );
    a.put_group_offsets("g", "t", &[(0, 10)], 1).unwrap();
    c.freeze(frozen);
    let late = std::thread::spawn(move || {
        let r = a.put_group_offsets("g", "t", &[(0, 300)], 2);
        (a, r)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    b.put_group_offsets("g", "t", &[(0, 600)], 3).unwrap();
    assert_eq!(b.group_offsets("g", "t").unwrap(), vec![(0, 600)]);
    let (a, r) = late.join().unwrap();
    assert!(r.is_err(), "the commit through the frozen server timed out");
    c.thaw(frozen);
    std::thread::sleep(std::time::Duration::from_secs(3));
    for (who, log) in [("b", &b), ("a", &a), ("a fresh node", &connect(&c, prefix))] {
        assert_eq!(
            log.group_offsets("g", "t").unwrap(),
            vec![(0, 600)],
            "{who}: the late commit must not replace the acknowledged one"
        );
    }
    // A commit through A after it failed reads again and lands.
    a.put_group_offsets("g", "t", &[(0, 700)], 4).unwrap();
    assert_eq!(b.group_offsets("g", "t").unwrap(), vec![(0, 700)]);
    // A deletion is a value written over the commit: gone for every node, and a new commit
    // of the group starts from nothing.
    b.delete_group("g", "t").unwrap();
    assert!(a.group_offsets("g", "t").unwrap().is_empty());
    assert!(a.list_groups().unwrap().is_empty());
    a.put_group_offsets("g", "t", &[(0, 5)], 5).unwrap();
    assert_eq!(b.group_offsets("g", "t").unwrap(), vec![(0, 5)]);
}

/// A deletion through a node whose nats-server freezes times out; its request waits in the
/// frozen server. Records acknowledged through another node meanwhile must stay: the late
/// deletion must not land over them (it used to remove the topic's key when the server
/// thawed, and every node answered "unknown topic").
#[test]
fn a_topic_deletion_that_timed_out_never_lands_over_later_records() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let prefix = "late2";
    let first = connect(&c, prefix);
    let config = TopicConfig::new("keep0", 1);
    let tp = TopicPartition::new("keep0", 0);
    let chunks = |tag| codec::encode_chunks(&records(100, 10, tag), 1, 128 * 1024);
    first.put_topic(&config).unwrap();
    first.recover_partition(&tp).unwrap();
    first.append(&tp, 0, &chunks(1), None).unwrap();
    // The server frozen leads neither the metadata stream nor the topic's.
    let leaders: Vec<usize> = [
        first.names().meta_stream(),
        first.names().topic_stream("keep0"),
    ]
    .iter()
    .map(|stream| {
        (0..100)
            .find_map(|_| {
                let l = c.stream_leader(stream);
                if l.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                l
            })
            .expect("the stream has a leader")
    })
    .collect();
    let frozen = (0..3).find(|i| !leaders.contains(i)).unwrap();
    let a = connect_through(vec![c.nodes[frozen].url()], prefix);
    let b = connect_through(
        (0..3)
            .filter(|i| *i != frozen)
            .map(|i| c.nodes[i].url())
            .collect(),
        prefix,
    );
    b.recover_partition(&tp).unwrap();
    assert_eq!(a.load_topics().unwrap(), vec![config.clone()]);
    c.freeze(frozen);
    let late = {
        let config = config.clone();
        std::thread::spawn(move || {
            let r = a.delete_topic(&config);
            (a, r)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    b.append(&tp, 100, &chunks(2), None).unwrap();
    let (a, r) = late.join().unwrap();
    assert!(
        r.is_err(),
        "the deletion through the frozen server timed out"
    );
    c.thaw(frozen);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let fresh = connect(&c, prefix);
    for (who, log) in [("b", &b), ("a", &a), ("a fresh node", &fresh)] {
        assert_eq!(
            log.load_topics().unwrap(),
            vec![config.clone()],
            "{who}: the topic is still there"
        );
    }
    let recovered = fresh.recover_partition(&tp).unwrap();
    let stored: u64 = recovered
        .chunks
        .iter()
        .map(|(_, m)| u64::from(m.count))
        .sum();
    assert_eq!(stored, 200, "every acknowledged record is still stored");

    // A deletion that goes through closes the topic first: a node that has not heard of it
    // is refused (its append is fenced, and the tail says closed), never acknowledged.
    a.recover_partition(&tp).unwrap();
    b.close_topic(&config).unwrap_or_else(|e| panic!("{e}"));
    match a.append(&tp, 200, &chunks(3), None) {
        Err(LogError::Fenced { .. }) => {}
        other => panic!("expected the append to be fenced, got {other:?}"),
    }
    a.tail(&tp).unwrap();
    match a.append(&tp, 200, &chunks(3), None) {
        Err(LogError::Closed { topic }) => assert_eq!(topic, "keep0"),
        other => panic!("expected the closed topic to refuse, got {other:?}"),
    }
    b.delete_topic(&config).unwrap();
    assert!(fresh.load_topics().unwrap().is_empty());
}

/// A topic deleted and created again gets a new stream. Writes meant for the old one — an
/// append, a retention trim, a producer-state purge, from a node whose view is stale or whose
/// request landed late — never reach the new one (with one stream name for both, an append
/// fenced on a sequence the new stream happened to have landed there, and a trim purged it).
#[test]
fn a_topic_created_again_is_out_of_reach_of_the_old_ones_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let (a, b) = (connect(&c, "again"), connect(&c, "again"));
    let config = TopicConfig::new("t", 1);
    let tp = TopicPartition::new("t", 0);
    let chunk = |tag| codec::encode_chunks(&records(1, 10, tag), 1, 128 * 1024);
    a.put_topic(&config).unwrap();
    a.recover_partition(&tp).unwrap();
    a.append(&tp, 0, &chunk(1), Some((7, b"old-state")))
        .unwrap();
    // Deleted and created again through B, with one record at the same stream sequence.
    b.load_topics().unwrap();
    b.delete_topic(&config).unwrap();
    b.put_topic(&config).unwrap();
    b.recover_partition(&tp).unwrap();
    b.append(&tp, 0, &chunk(2), None).unwrap();
    // A still sees the old topic: its writes are refused or reach nothing.
    assert!(a.append(&tp, 1, &chunk(3), None).is_err());
    let _ = a.trim(&tp, &[0], 1);
    let _ = a.remove_producers(&tp, &[7]);
    let fresh = connect(&c, "again");
    assert_eq!(fresh.load_topics().unwrap(), vec![config.clone()]);
    let recovered = fresh.recover_partition(&tp).unwrap();
    assert_eq!(recovered.chunks.len(), 1, "only B's record: {recovered:?}");
    assert_eq!(recovered.chunks[0].0, 0);
    let bytes = fresh.read_chunk(&tp, 0).unwrap().expect("B's chunk");
    let got = codec::decode_chunk(&bytes, 0, 0).unwrap();
    assert_eq!(got[0].record.value[0], 2, "B's record, not A's");
    assert!(recovered.producers.is_empty(), "{:?}", recovered.producers);
    // A learns the new topic from the metadata and writes to it.
    a.load_topics().unwrap();
    a.recover_partition(&tp).unwrap();
    a.append(&tp, 1, &chunk(4), None).unwrap();
}

/// A topic as the weir before per-creation streams stored it (its config without a stream
/// name, its stream named `<prefix>-t-<token>`) opens, takes appends, is deleted, and its name
/// can be created again: clusters written by that weir carry on.
#[test]
fn a_topic_written_by_the_previous_layout_opens_and_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let prefix = "legacy";
    let log = connect(&c, prefix); // makes the metadata stream
    let names = log.names().clone();
    let config = TopicConfig::new("old.orders", 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(c.urls()[0].as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: names.topic_stream(&config.name),
            subjects: vec![names.topic_subjects(&config.name)],
            num_replicas: 3,
            allow_rollup: true,
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let key = format!(
            "{prefix}.meta.topic.{}",
            weir_jetstream::Names::token(&config.name)
        );
        js.publish(key, serde_json::to_vec(&config).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let (a, b) = (connect(&c, prefix), connect(&c, prefix));
    assert_eq!(a.load_topics().unwrap(), vec![config.clone()]);
    let tp = TopicPartition::new("old.orders", 0);
    a.recover_partition(&tp).unwrap();
    let chunk = codec::encode_chunks(&records(3, 10, 1), 1, 128 * 1024);
    a.append(&tp, 0, &chunk, None).unwrap();
    b.load_topics().unwrap();
    let recovered = b.recover_partition(&tp).unwrap();
    assert_eq!(recovered.chunks.len(), 1);
    assert!(
        c.stream_leader(&names.topic_stream(&config.name)).is_some(),
        "the old stream is the topic's"
    );
    b.delete_topic(&config).unwrap();
    assert!(a.load_topics().unwrap().is_empty());
    a.put_topic(&config).unwrap();
    a.recover_partition(&tp).unwrap();
    a.append(&tp, 0, &chunk, None).unwrap();
    assert_eq!(b.load_topics().unwrap(), vec![config]);
}

/// A topic under steady appends through another node is deleted: each partition closes
/// between two appends (a close of every partition in one fenced batch was refused by any
/// append anywhere, and the deletion gave up), and after its close every append is refused.
#[test]
fn a_topic_under_steady_appends_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let (a, b) = (connect(&c, "busy"), connect(&c, "busy"));
    let config = TopicConfig::new("busy", 4);
    a.put_topic(&config).unwrap();
    b.load_topics().unwrap();
    let tps: Vec<TopicPartition> = (0..4).map(|p| TopicPartition::new("busy", p)).collect();
    for tp in &tps {
        b.recover_partition(tp).unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let chunk = codec::encode_chunks(&records(1, 10, 1), 1, 128 * 1024);
            let mut next = [0u64; 4];
            let mut refused = [false; 4];
            while !refused.iter().all(|r| *r) && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for (p, tp) in tps.iter().enumerate() {
                    if refused[p] {
                        continue;
                    }
                    match b.append(tp, next[p], &chunk, None) {
                        Ok(()) => next[p] += 1,
                        Err(LogError::Closed { .. }) => refused[p] = true,
                        Err(LogError::Fenced { .. }) => {
                            // Reads the close, or fails once the stream is gone.
                            if b.tail(tp).is_err() {
                                refused[p] = true;
                            }
                        }
                        // The stream is gone once the deletion is through.
                        Err(_) => refused[p] = true,
                    }
                }
            }
            next
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let deleted = a.delete_topic(&config);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let appended = writer.join().unwrap();
    deleted.unwrap_or_else(|e| panic!("the deletion under load failed: {e}"));
    assert!(
        appended.iter().all(|n| *n > 0),
        "appends went on: {appended:?}"
    );
    assert!(connect(&c, "busy").load_topics().unwrap().is_empty());
}
