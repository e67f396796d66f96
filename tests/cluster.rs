//! Cluster chaos: two `weir serve --log nats://...` processes over a real 3-node JetStream
//! cluster (R3) on 127.0.0.1, idempotent producers publishing through both, while the topic
//! stream's leader and the weir nodes are `kill -9`'d at random moments over many cycles.
//!
//! A producer that gets no ack retries the same batch (same id, epoch and sequence) through
//! the other node. Checked at the end, through each node and through a node restarted on an
//! empty data directory: every acknowledged record is stored exactly once at the offset its
//! ack named, offsets are contiguous from 0, nothing unacknowledged is stored, a consumer
//! group's committed offsets are what every node returns.
//!
//! `WEIR_CLUSTER_CYCLES` (default 6) and `WEIR_CLUSTER_SEED` make runs longer or reproducible.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::idem::IdemProducer;
use common::WeirProcess;
use rand::{Rng, SeedableRng};
use weir_api::Client;
use weir_core::{StartAt, TopicConfig};

const PARTITIONS: u32 = 3;
const PRODUCERS: usize = 4;
const TOPIC: &str = "chaos";

/// The gRPC addresses of the weir nodes; `None` while a node is down.
type Nodes = Arc<Mutex<Vec<Option<String>>>>;

/// One attempt with a deadline: a leader election can hold a request for seconds. Only
/// failure symptoms are acceptable refusals.
async fn send(client: &Client, p: &mut IdemProducer) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(30), p.send(client)).await {
        Err(_) => Err("no answer within 30 s".into()),
        Ok(Err(status)) => {
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::Internal
                        | tonic::Code::DeadlineExceeded
                ),
                "publish refused (not a failure symptom): {status:?}"
            );
            Err(status.message().to_string())
        }
        Ok(Ok(())) => Ok(()),
    }
}

/// Publishes until `stop`, each attempt through the next live node; a batch without an ack
/// is retried as it was, through the other node.
async fn run_producer(nodes: Nodes, mut p: IdemProducer, stop: Arc<AtomicBool>) -> IdemProducer {
    let mut clients: HashMap<String, Client> = HashMap::new();
    let mut turn = p.id as usize;
    while !stop.load(Ordering::Relaxed) || p.pending.is_some() {
        turn += 1;
        let addr = {
            let nodes = nodes.lock().unwrap();
            let live: Vec<String> = nodes.iter().flatten().cloned().collect();
            if live.is_empty() {
                None
            } else {
                Some(live[turn % live.len()].clone())
            }
        };
        let Some(addr) = addr else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !clients.contains_key(&addr) {
            match Client::connect(&addr).await {
                Ok(c) => {
                    clients.insert(addr.clone(), c);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        if send(&clients[&addr], &mut p).await.is_err() {
            clients.remove(&addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            // A steady load (a few thousand records/s), not a flood: the check reads
            // everything back three times.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    p
}

pub(crate) fn spawn_weir(dir: &Path, port: u16, nats: &str) -> WeirProcess {
    let args = ["--log", nats, "--cache-mb", "16"];
    for _ in 0..100 {
        let result = std::panic::catch_unwind(|| {
            WeirProcess::spawn(dir, &format!("127.0.0.1:{port}"), &args)
        });
        if let Ok(process) = result {
            return process;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("weir serve --log did not start on port {port}");
}

/// Everything stored, read through `addr` from the earliest offsets.
async fn read_all(addr: &str) -> BTreeMap<(u32, u64), String> {
    let client = Client::connect(addr).await.unwrap();
    let info = client.describe_topic(TOPIC).await.unwrap();
    let total: u64 = info.partitions.iter().map(|p| p.end_offset).sum();
    let mut subscription = client
        .subscribe(TOPIC, &[], StartAt::Earliest, None)
        .await
        .unwrap();
    let mut stored = BTreeMap::new();
    while (stored.len() as u64) < total {
        let batch = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("read back")
            .unwrap()
            .unwrap();
        for r in batch {
            assert!(stored
                .insert((r.partition, r.offset), r.record.id.clone().unwrap())
                .is_none());
        }
    }
    stored
}

/// Fails with the first difference between two nodes' reads (not two maps of 100k entries).
fn same_log(
    a: &BTreeMap<(u32, u64), String>,
    b: &BTreeMap<(u32, u64), String>,
    an: &str,
    bn: &str,
) {
    if a == b {
        return;
    }
    let first = a
        .iter()
        .zip(b.iter())
        .find(|(x, y)| x != y)
        .map(|(x, y)| format!("{an} has {x:?} where {bn} has {y:?}"))
        .unwrap_or_else(|| "one is a prefix of the other".into());
    panic!(
        "{an} and {bn} serve different logs: {} vs {} records; first difference: {first}",
        a.len(),
        b.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_publishes_survive_kill_9_of_stream_leaders_and_weir_nodes() {
    let (cycles, seed) = common::chaos_knobs("WEIR_CLUSTER", 6);
    let started = std::time::Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // Started from the test's own thread: the servers die with it.
    let mut nats = common::nats_cluster(dir.path());
    let urls = nats.url_list();
    let stream = weir_jetstream::Names::new("weir").topic_stream(TOPIC);

    let data = |name: &str| dir.path().join(name);
    let first = WeirProcess::spawn(&data("w0"), "127.0.0.1:0", &["--log", &urls]);
    let second = WeirProcess::spawn(&data("w1"), "127.0.0.1:0", &["--log", &urls]);
    let ports = [first.port(), second.port()];
    let nodes: Nodes = Arc::new(Mutex::new(vec![
        Some(first.addr.clone()),
        Some(second.addr.clone()),
    ]));
    let mut procs = vec![Some(first), Some(second)];

    let client = Client::connect(procs[0].as_ref().unwrap().addr.as_str())
        .await
        .unwrap();
    client
        .create_topic(&TopicConfig::new(TOPIC, PARTITIONS))
        .await
        .unwrap();
    let mut producers = Vec::new();
    for i in 0..PRODUCERS {
        // Producer ids issued through both nodes.
        let via = Client::connect(procs[i % 2].as_ref().unwrap().addr.as_str())
            .await
            .unwrap();
        let (id, epoch) = via.init_producer(None).await.unwrap();
        producers.push(IdemProducer::new(
            id,
            epoch,
            TOPIC,
            PARTITIONS,
            50,
            seed ^ i as u64,
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = producers
        .drain(..)
        .map(|p| tokio::spawn(run_producer(nodes.clone(), p, stop.clone())))
        .collect();

    let mut empty_dirs = 0;
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.random_range(800..2500)));
        if cycle % 2 == 0 {
            let name = common::kill_stream_leader(&mut nats, &stream, rng.random_range(300..1500));
            println!(
                "cycle {cycle} at {:?}: killed stream leader {name}",
                started.elapsed()
            );
        } else {
            let i = rng.random_range(0..2usize);
            nodes.lock().unwrap()[i] = None;
            procs[i].take().unwrap().kill9();
            std::thread::sleep(Duration::from_millis(rng.random_range(100..1000)));
            // Every other weir restart begins on an empty data directory.
            let fresh = cycle % 4 == 3;
            let dir_name = if fresh {
                empty_dirs += 1;
                format!("w{i}-empty{empty_dirs}")
            } else {
                format!("w{i}")
            };
            let p = spawn_weir(&data(&dir_name), ports[i], &urls);
            nodes.lock().unwrap()[i] = Some(p.addr.clone());
            procs[i] = Some(p);
            println!(
                "cycle {cycle} at {:?}: killed weir node {i}, restarted (empty data dir: {fresh})",
                started.elapsed()
            );
        }
    }
    // Let the producers run on a healthy cluster, then resolve every batch in doubt.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut producers = Vec::new();
    for t in tasks {
        producers.push(t.await.unwrap());
    }
    let duplicates: usize = producers.iter().map(|p| p.duplicates).sum();
    println!("{duplicates} retried batches were recognised as already stored");

    // A consumer group committed through one node resumes through the other.
    let a = procs[0].as_ref().unwrap().addr.clone();
    let b = procs[1].as_ref().unwrap().addr.clone();
    let ca = Client::connect(&a).await.unwrap();
    ca.commit_offsets("readers", TOPIC, &[(0, 3), (2, 1)])
        .await
        .unwrap();
    let cb = Client::connect(&b).await.unwrap();
    let mut fetched = cb.fetch_offsets("readers", TOPIC).await.unwrap();
    fetched.sort_unstable();
    assert_eq!(fetched, vec![(0, 3), (2, 1)]);

    println!("checking at {:?}", started.elapsed());
    // Each node follows the other's appends within moments: wait until they agree on every
    // partition's end (a node that never catches up fails here, naming the offsets).
    let ends = |addr: String| async move {
        let c = Client::connect(&addr).await.unwrap();
        let info = c.describe_topic(TOPIC).await.unwrap();
        info.partitions
            .iter()
            .map(|p| p.end_offset)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ea, eb) = (ends(a.clone()).await, ends(b.clone()).await);
        if ea == eb {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the nodes do not converge: ends {ea:?} on node 0, {eb:?} on node 1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_a = read_all(&a).await;
    let on_b = read_all(&b).await;
    same_log(&on_a, &on_b, "node 0", "node 1");
    // A node started on an empty data directory serves the same data and offsets.
    let fresh = WeirProcess::spawn(&data("fresh"), "127.0.0.1:0", &["--log", &urls]);
    let on_fresh = read_all(&fresh.addr).await;
    same_log(&on_a, &on_fresh, "node 0", "a node on an empty data dir");
    let cf = Client::connect(&fresh.addr).await.unwrap();
    let mut fetched = cf.fetch_offsets("readers", TOPIC).await.unwrap();
    fetched.sort_unstable();
    assert_eq!(fetched, vec![(0, 3), (2, 1)]);

    for p in 0..PARTITIONS {
        let offsets: Vec<u64> = on_a
            .keys()
            .filter(|(part, _)| *part == p)
            .map(|(_, o)| *o)
            .collect();
        let n = offsets.len() as u64;
        assert_eq!(
            offsets,
            (0..n).collect::<Vec<_>>(),
            "partition {p} is dense from 0"
        );
    }
    let mut seen = HashMap::new();
    for (position, id) in &on_a {
        if let Some(other) = seen.insert(id.clone(), *position) {
            panic!("record {id} stored twice, at {other:?} and {position:?}");
        }
    }
    let acked: HashMap<&String, &(u32, u64)> =
        producers.iter().flat_map(|p| p.acked.iter()).collect();
    for (id, position) in &acked {
        assert_eq!(
            seen.get(*id),
            Some(*position),
            "acknowledged record {id} is where its ack said"
        );
    }
    assert_eq!(seen.len(), acked.len(), "nothing unacknowledged is stored");
    assert!(
        acked.len() > 1000,
        "the test published too little to mean anything: {}",
        acked.len()
    );
    println!(
        "verified {} records through 3 nodes after {cycles} cycles of kill -9",
        acked.len()
    );
    drop(procs);
    drop(nats);
}
