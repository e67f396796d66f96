//! Writes that fail and land late, and a topic's life across creations, against a real
//! 3-node JetStream cluster on loopback: a request whose answer timed out (its server frozen,
//! SIGSTOP) reaches the engine when the server thaws, and must never land over what was
//! acknowledged after it; a topic deleted and created again is out of reach of the old one's
//! writes. Needs nats-server: `cargo xtask nats-server` installs it (`cargo xtask test` does).

mod common;
use common::*;

use weir_cluster::NatsCluster;
use weir_jetstream::JetStreamLog;

/// The server leading `stream`'s Raft group, once it has one.
fn leader_of(c: &NatsCluster, stream: &str) -> usize {
    for _ in 0..100 {
        if let Some(l) = c.stream_leader(stream) {
            return l;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("stream {stream} has no leader");
}

/// Thaws `frozen`, waits until it reports healthy again (it catches up with what the others
/// did while it was stopped), then 3 s more: what waited in its sockets has landed or been
/// refused by then.
fn thaw_and_settle(c: &NatsCluster, frozen: usize) {
    c.thaw(frozen);
    c.wait_healthy(frozen, std::time::Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(std::time::Duration::from_secs(3));
}

/// What `read` answers once it answers: a server just thawed may answer "stream not found"
/// for a few moments while it catches up; an error for 30 s fails the test.
fn answered<T>(read: impl Fn() -> Result<T, LogError>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match read() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("a read failed, asking again: {e}");
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Err(e) => panic!("no answer within 30 s: {e}"),
        }
    }
}

/// A server that leads none of `leaders`, a log reaching the cluster only through it, and a
/// log reaching it through the two others.
fn through_one_server(
    c: &NatsCluster,
    prefix: &str,
    leaders: &[usize],
) -> (usize, JetStreamLog, JetStreamLog) {
    let frozen = (0..3).find(|i| !leaders.contains(i)).unwrap();
    let a = connect_through(vec![c.nodes[frozen].url()], prefix);
    let b = connect_through(
        (0..3)
            .filter(|i| *i != frozen)
            .map(|i| c.nodes[i].url())
            .collect(),
        prefix,
    );
    (frozen, a, b)
}

use weir_core::{TopicConfig, TopicPartition};
use weir_log::{codec, Log, LogError, SharedLog};

type LateCommit = std::thread::JoinHandle<(JetStreamLog, Result<(), LogError>)>;

/// Node A (reaching NATS only through a server that leads nothing) commits group `g` at 10,
/// its server freezes, A commits 300 (at time 2: it hangs), and node B commits 600 (at time 3,
/// acknowledged). Returns the frozen server, A's hanging commit and B.
fn commit_while_frozen(c: &NatsCluster, prefix: &str) -> (usize, LateCommit, JetStreamLog) {
    let first = connect(c, prefix);
    let leader = leader_of(c, &first.names().meta_stream());
    let (frozen, a, b) = through_one_server(c, prefix, &[leader]);
    a.put_group_offsets("g", "t", &[(0, 10)], 1).unwrap();
    c.freeze(frozen);
    let late = std::thread::spawn(move || {
        let r = a.put_group_offsets("g", "t", &[(0, 300)], 2);
        (a, r)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    b.put_group_offsets("g", "t", &[(0, 600)], 3).unwrap();
    (frozen, late, b)
}

/// A node that reaches NATS through a server that freezes: its commit times out, but the
/// publish waits in the frozen server's socket and is delivered when it thaws. It must not
/// land over the commit another node made (and acknowledged) in between.
#[test]
fn a_group_commit_that_timed_out_never_lands_over_a_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let prefix = "late1";
    let (frozen, late, b) = commit_while_frozen(&c, prefix);
    assert_eq!(b.group_offsets("g", "t").unwrap(), vec![(0, 600)]);
    let (a, r) = late.join().unwrap();
    assert!(r.is_err(), "the commit through the frozen server timed out");
    thaw_and_settle(&c, frozen);
    for (who, log) in [("b", &b), ("a", &a), ("a fresh node", &connect(&c, prefix))] {
        assert_eq!(
            answered(|| log.group_offsets("g", "t")),
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

/// As above, but the server thaws before the commit's request times out: its fenced write
/// lands, loses to the commit made in between (a conflict), and the node reads the group
/// again. What it reads is a later commit: it must keep it, not write over it (it used to,
/// and a commit its client saw fail stayed on top of one acknowledged after it).
#[test]
fn a_group_commit_that_loses_the_race_to_a_later_one_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let prefix = "late5";
    let (frozen, late, b) = commit_while_frozen(&c, prefix);
    // Within A's 3 s request timeout: its write reaches the engine and is refused.
    c.thaw(frozen);
    let (a, r) = late.join().unwrap();
    if let Err(e) = r {
        // Under load the thaw may come too late for A's request; then it is the case above.
        eprintln!("the commit through the thawed server failed: {e}");
    }
    thaw_and_settle(&c, frozen);
    for (who, log) in [("b", &b), ("a", &a), ("a fresh node", &connect(&c, prefix))] {
        assert_eq!(
            answered(|| log.group_offsets("g", "t")),
            vec![(0, 600)],
            "{who}: the commit that started earlier must not replace the later one"
        );
    }
    // A commit through A that starts later than B's replaces it.
    a.put_group_offsets("g", "t", &[(0, 700)], 4).unwrap();
    assert_eq!(answered(|| b.group_offsets("g", "t")), vec![(0, 700)]);
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
    first.append(&tp, 0, &chunks(1), &[]).unwrap();
    // The server frozen leads neither the metadata stream nor the topic's.
    let leaders = [
        leader_of(&c, &first.names().meta_stream()),
        leader_of(&c, &first.names().topic_stream("keep0")),
    ];
    let (frozen, a, b) = through_one_server(&c, prefix, &leaders);
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
    b.append(&tp, 100, &chunks(2), &[]).unwrap();
    let (a, r) = late.join().unwrap();
    assert!(
        r.is_err(),
        "the deletion through the frozen server timed out"
    );
    thaw_and_settle(&c, frozen);
    let fresh = connect(&c, prefix);
    for (who, log) in [("b", &b), ("a", &a), ("a fresh node", &fresh)] {
        assert_eq!(
            answered(|| log.load_topics()),
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
    match a.append(&tp, 200, &chunks(3), &[]) {
        Err(LogError::Fenced { .. }) => {}
        other => panic!("expected the append to be fenced, got {other:?}"),
    }
    a.tail(&tp).unwrap();
    match a.append(&tp, 200, &chunks(3), &[]) {
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
    a.append(&tp, 0, &chunk(1), &[(7, &b"old-state"[..])])
        .unwrap();
    // Deleted and created again through B, with one record at the same stream sequence.
    b.load_topics().unwrap();
    b.delete_topic(&config).unwrap();
    b.put_topic(&config).unwrap();
    b.recover_partition(&tp).unwrap();
    b.append(&tp, 0, &chunk(2), &[]).unwrap();
    // A still sees the old topic: its writes are refused or reach nothing.
    assert!(a.append(&tp, 1, &chunk(3), &[]).is_err());
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
    a.append(&tp, 1, &chunk(4), &[]).unwrap();
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
    a.append(&tp, 0, &chunk, &[]).unwrap();
    b.load_topics().unwrap();
    let recovered = b.recover_partition(&tp).unwrap();
    assert_eq!(recovered.chunks.len(), 1);
    // Its stream does not allow direct gets: the tail is read from the leader.
    a.append(&tp, 3, &chunk, &[]).unwrap();
    let tail = b.tail(&tp).unwrap();
    assert_eq!(tail.chunks.len(), 1);
    assert_eq!(tail.chunks[0].0, 3);
    assert!(
        c.stream_leader(&names.topic_stream(&config.name)).is_some(),
        "the old stream is the topic's"
    );
    b.delete_topic(&config).unwrap();
    assert!(a.load_topics().unwrap().is_empty());
    a.put_topic(&config).unwrap();
    a.recover_partition(&tp).unwrap();
    a.append(&tp, 0, &chunk, &[]).unwrap();
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
                    match b.append(tp, next[p], &chunk, &[]) {
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
