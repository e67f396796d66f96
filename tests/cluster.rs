//! Cluster chaos: three `weir serve --log nats://...` processes over a real 3-node JetStream
//! (Over 500 lines because it is one chaos test: its fault cycles share the cluster, the
//! producers and the final checks.)
//! cluster (R3) on 127.0.0.1, idempotent producers publishing through all of them, while the
//! topic stream's leader and the weir nodes are `kill -9`'d at random moments over many
//! cycles, and the nats-server under a node is frozen. Node 0 names every nats-server, node 1
//! all but one (`path`), node 2 only `path`: a freeze cycle SIGSTOPs `path` (past the 4 s
//! lease timeout, and every other time past the 10 s request timeout) while node 2's
//! publishes and a consumer-group commit through it hang, and node 1 goes on committing the
//! same group; after the thaw the commit that failed (or hung) must not undo the later
//! acknowledged one on any node (issue 21).
//!
//! A producer that gets no ack retries the same batch (same id, epoch and sequence) through
//! the next node. Checked at the end, through each node and through a node restarted on an
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
/// The group the freeze cycles commit through the frozen path and through a healthy node.
const GROUP: &str = "chaos-g";
/// Weir nodes: 0 names every nats-server, 1 all but `path`, 2 only `path`.
const NODES: usize = 3;

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
    WeirProcess::spawn_on_port(dir, port, &["--log", nats, "--cache-mb", "16"])
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

/// `GROUP`'s offsets when every partition is at `value`.
fn group_at(value: u64) -> Vec<(u32, u64)> {
    (0..PARTITIONS).map(|p| (p, value)).collect()
}

/// One commit of every partition of `GROUP` at `value` through `addr` (30 s deadline).
async fn commit_group(addr: &str, value: u64) -> Result<(), String> {
    let attempt = async {
        let client = Client::connect(addr).await.map_err(|e| e.to_string())?;
        client
            .commit_offsets(GROUP, TOPIC, &group_at(value))
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 30 s".into()))
}

/// `GROUP`'s offsets through `addr`, once (30 s deadline).
async fn group_offsets(addr: &str) -> Result<Vec<(u32, u64)>, String> {
    let attempt = async {
        let client = Client::connect(addr).await.map_err(|e| e.to_string())?;
        let mut offsets = client
            .fetch_offsets(GROUP, TOPIC)
            .await
            .map_err(|e| e.to_string())?;
        offsets.sort_unstable();
        Ok(offsets)
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 30 s".into()))
}

/// Waits up to `secs` until every node of `addrs` answers `GROUP` with the same offsets, all
/// partitions present and each accepted by `ok`, and returns them; fails with what each node
/// answered.
async fn group_settles(
    addrs: &[String],
    ok: impl Fn(u32, u64) -> bool,
    secs: u64,
    when: &str,
) -> Vec<(u32, u64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let mut answers = Vec::new();
        for addr in addrs {
            answers.push(group_offsets(addr).await);
        }
        if let Some(Ok(first)) = answers.first() {
            let whole = first.len() == PARTITIONS as usize && first.iter().all(|(p, o)| ok(*p, *o));
            if whole && answers.iter().all(|a| a.as_ref().ok() == Some(first)) {
                return first.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{when}: group {GROUP} is not settled as expected on every node within {secs} s; \
             nodes {addrs:?} answer {answers:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes and group commits under the faults the module documentation lists; see there.
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
    // The nats-server node 2 talks through, frozen by the freeze cycles.
    let path = rng.random_range(0..3usize);
    let node_urls = [
        urls.clone(),
        common::chaos::urls_except(&nats, path),
        nats.nodes[path].url(),
    ];
    println!(
        "node 2 reaches NATS only through {}; node 1 never through it",
        nats.nodes[path].name
    );

    let data = |name: &str| dir.path().join(name);
    let mut procs: Vec<Option<WeirProcess>> = (0..NODES)
        .map(|i| {
            Some(WeirProcess::spawn(
                &data(&format!("w{i}")),
                "127.0.0.1:0",
                &["--log", &node_urls[i]],
            ))
        })
        .collect();
    let ports: Vec<u16> = procs.iter().map(|p| p.as_ref().unwrap().port()).collect();
    let nodes: Nodes = Arc::new(Mutex::new(
        procs
            .iter()
            .map(|p| p.as_ref().map(|p| p.addr.clone()))
            .collect(),
    ));

    let client = Client::connect(procs[0].as_ref().unwrap().addr.as_str())
        .await
        .unwrap();
    client
        .create_topic(&TopicConfig::new(TOPIC, PARTITIONS))
        .await
        .unwrap();
    let mut producers = Vec::new();
    for i in 0..PRODUCERS {
        // Producer ids issued through every node.
        let via = Client::connect(procs[i % NODES].as_ref().unwrap().addr.as_str())
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

    let kinds = common::chaos::cycle_kinds(&mut rng, cycles, 3);
    let (mut weir_kills, mut empty_dirs, mut freezes) = (0, 0, 0);
    // The group's value every node must answer (after the first freeze cycle), and the next
    // value to commit.
    let (mut group, mut next_value) = (None, 1u64);
    for (cycle, kind) in kinds.into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(rng.random_range(800..2500)));
        match kind {
            0 => {
                let name =
                    common::kill_stream_leader(&mut nats, &stream, rng.random_range(300..1500));
                println!(
                    "cycle {cycle} at {:?}: killed stream leader {name}",
                    started.elapsed()
                );
            }
            1 => {
                let i = rng.random_range(0..NODES);
                nodes.lock().unwrap()[i] = None;
                procs[i].take().unwrap().kill9();
                std::thread::sleep(Duration::from_millis(rng.random_range(100..1000)));
                // Every other weir restart begins on an empty data directory.
                weir_kills += 1;
                let fresh = weir_kills % 2 == 0;
                let dir_name = if fresh {
                    empty_dirs += 1;
                    format!("w{i}-empty{empty_dirs}")
                } else {
                    format!("w{i}")
                };
                let p = spawn_weir(&data(&dir_name), ports[i], &node_urls[i]);
                nodes.lock().unwrap()[i] = Some(p.addr.clone());
                procs[i] = Some(p);
                println!(
                    "cycle {cycle} at {:?}: killed weir node {i}, restarted (empty data dir: {fresh})",
                    started.elapsed()
                );
            }
            _ => {
                // Freeze node 2's only nats-server. Publishers keep sending through every
                // node (node 2's appends hang, then fail or land late: their retries through
                // the other nodes must not store them twice). A commit of the group through
                // node 2 hangs; a commit of another value through node 1 is acknowledged; after
                // the thaw every node must answer that one, unless node 2's was acknowledged
                // too (then the two overlapped and either may be last).
                let ms = common::chaos::freeze_ms(&mut rng, freezes);
                freezes += 1;
                let (x, y) = if rng.random_bool(0.5) {
                    (next_value, next_value + 1)
                } else {
                    (next_value + 1, next_value)
                };
                next_value += 2;
                // Half the time node 2's commit starts a few milliseconds before the freeze:
                // its read of the group may get through and its fenced write wait in the
                // frozen server (the late landing); else it starts frozen.
                let early = rng.random_bool(0.5);
                let lead = rng.random_range(1..6);
                let through_path = procs[2].as_ref().unwrap().addr.clone();
                let client = Client::connect(&through_path).await.unwrap();
                let stale_commit = async move {
                    let offsets = group_at(x);
                    let commit = client.commit_offsets(GROUP, TOPIC, &offsets);
                    let result = match tokio::time::timeout(Duration::from_secs(30), commit).await {
                        Err(_) => Err("no answer within 30 s".to_string()),
                        Ok(r) => r.map_err(|e| e.to_string()),
                    };
                    (result, std::time::Instant::now())
                };
                let (stale, frozen_at);
                if early {
                    stale = tokio::spawn(stale_commit);
                    std::thread::sleep(Duration::from_millis(lead));
                    frozen_at = std::time::Instant::now();
                    nats.freeze(path);
                } else {
                    frozen_at = std::time::Instant::now();
                    nats.freeze(path);
                    stale = tokio::spawn(stale_commit);
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
                let healthy = procs[1].as_ref().unwrap().addr.clone();
                let y_started = std::time::Instant::now();
                let mut failures = Vec::new();
                while let Err(e) = commit_group(&healthy, y).await {
                    // The frozen server may have led the metadata stream: an election first.
                    failures.push(e);
                    assert!(
                        y_started.elapsed() < Duration::from_secs(60),
                        "cycle {cycle}: no commit through node 1 acknowledged within 60 s of \
                         freezing node 2's nats-server: {failures:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let y_took = y_started.elapsed();
                std::thread::sleep(Duration::from_millis(ms).saturating_sub(frozen_at.elapsed()));
                nats.thaw(path);
                let thawed_at = std::time::Instant::now();
                let (x_result, x_answered) = stale.await.unwrap();
                assert!(
                    early || x_result.is_err() || x_answered >= thawed_at,
                    "node 2 committed while its only nats-server was frozen: it reached NATS \
                     another way, and this cycle tests nothing"
                );
                let allowed = match &x_result {
                    Ok(()) if x_answered > y_started => vec![y, x],
                    _ => vec![y],
                };
                let live: Vec<String> = procs.iter().flatten().map(|p| p.addr.clone()).collect();
                let when = format!(
                    "cycle {cycle} (seed {seed}): after freezing {} for {ms} ms, commit {x} \
                     through node 2 (started before the freeze: {early}) answered {x_result:?}, \
                     commit {y} through node 1 acknowledged",
                    nats.nodes[path].name
                );
                // Two acknowledged commits that overlapped may interleave per partition (a
                // commit of several partitions is one write per partition, as in Kafka); a
                // failed one never lands over them.
                let settled = group_settles(&live, |_, o| allowed.contains(&o), 30, &when).await;
                // A write that waited in the thawed server lands within moments: it must not
                // change what every node answers.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let same = |p: u32, o: u64| settled.contains(&(p, o));
                group_settles(&live, same, 10, &format!("3 s after {when}")).await;
                group = Some(settled.clone());
                println!(
                    "cycle {cycle} at {:?}: froze {} (node 2's only server) for {ms} ms; group commit \
                     {x} through it (started before the freeze, by {lead} ms: {early}) answered {x_result:?} after {:?}, {y} through node 1 acknowledged \
                     after {y_took:?} ({} failed tries); every node answers {settled:?}",
                    started.elapsed(),
                    nats.nodes[path].name,
                    x_answered - frozen_at,
                    failures.len()
                );
            }
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

    // A consumer group committed through one node resumes through the others.
    let addrs: Vec<String> = procs
        .iter()
        .map(|p| p.as_ref().unwrap().addr.clone())
        .collect();
    let ca = Client::connect(&addrs[0]).await.unwrap();
    ca.commit_offsets("readers", TOPIC, &[(0, 3), (2, 1)])
        .await
        .unwrap();
    for addr in &addrs[1..] {
        let c = Client::connect(addr).await.unwrap();
        let mut fetched = c.fetch_offsets("readers", TOPIC).await.unwrap();
        fetched.sort_unstable();
        assert_eq!(fetched, vec![(0, 3), (2, 1)], "through {addr}");
    }

    println!("checking at {:?}", started.elapsed());
    // Each node follows the others' appends within moments: wait until they agree on every
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
        let mut all = Vec::new();
        for addr in &addrs {
            all.push(ends(addr.clone()).await);
        }
        if all.iter().all(|e| *e == all[0]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the nodes do not converge: ends {all:?} on nodes 0, 1, 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_a = read_all(&addrs[0]).await;
    for (i, addr) in addrs.iter().enumerate().skip(1) {
        same_log(&on_a, &read_all(addr).await, "node 0", &format!("node {i}"));
    }
    // A node started on an empty data directory serves the same data and offsets.
    let fresh = WeirProcess::spawn(&data("fresh"), "127.0.0.1:0", &["--log", &urls]);
    let on_fresh = read_all(&fresh.addr).await;
    same_log(&on_a, &on_fresh, "node 0", "a node on an empty data dir");
    let cf = Client::connect(&fresh.addr).await.unwrap();
    let mut fetched = cf.fetch_offsets("readers", TOPIC).await.unwrap();
    fetched.sort_unstable();
    assert_eq!(fetched, vec![(0, 3), (2, 1)]);
    if let Some(value) = group {
        // Nothing that waited in a frozen server changed the group since its cycle.
        let mut all = addrs.clone();
        all.push(fresh.addr.clone());
        group_settles(&all, |p, o| value.contains(&(p, o)), 10, "at the end").await;
    }

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
            panic!("record {id} stored twice, at {other:?} and {position:?} (seed {seed})");
        }
    }
    let acked: HashMap<&String, &(u32, u64)> =
        producers.iter().flat_map(|p| p.acked.iter()).collect();
    for (id, position) in &acked {
        assert_eq!(
            seen.get(*id),
            Some(*position),
            "acknowledged record {id} is where its ack said (seed {seed})"
        );
    }
    assert_eq!(
        seen.len(),
        acked.len(),
        "nothing unacknowledged is stored (seed {seed})"
    );
    assert!(
        acked.len() > 1000,
        "the test published too little to mean anything: {}",
        acked.len()
    );
    println!(
        "verified {} records through 4 nodes after {cycles} cycles ({freezes} freezes) at {:?}",
        acked.len(),
        started.elapsed()
    );
    drop(procs);
    drop(nats);
}
