//! The Kafka listener on the replicated backend: two `weir serve --log` nodes over a real
//! 3-node JetStream cluster, each with `--kafka-listen`, and a librdkafka idempotent lz4 producer
//! bootstrapped with both. Each node in turn is killed -9 while the producer sends (and
//! restarted): the producer's batches in flight are retried through the other node, whose
//! producer state is the shared log's, so every record is stored once. Then a consumer group
//! of two whose members bootstrap from different nodes: both are sent to the one node that
//! coordinates the group, and form one group there; once that node is killed -9, the group
//! is coordinated by the survivor and resumes at its offsets.

use crate::common;
use crate::kafka::{free_port, run_script};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::WeirProcess;
use weir_api::Client;
use weir_core::{StartAt, TopicConfig};

fn spawn_node(dir: &Path, port: u16, kafka_port: u16, nats: &str) -> WeirProcess {
    let kafka = format!("127.0.0.1:{kafka_port}");
    let args = ["--log", nats, "--cache-mb", "16", "--kafka-listen", &kafka];
    WeirProcess::spawn_on_port(dir, port, &args)
}

/// Every record of `topic` through `addr`: value → where it is stored.
async fn read_all(addr: &str, topic: &str) -> BTreeMap<String, Vec<(u32, u64)>> {
    let client = Client::connect(addr).await.unwrap();
    let info = client.describe_topic(topic).await.unwrap();
    let total: u64 = info.partitions.iter().map(|p| p.end_offset).sum();
    let mut subscription = client
        .subscribe(topic, &[], StartAt::Earliest, None)
        .await
        .unwrap();
    let (mut stored, mut read) = (BTreeMap::<String, Vec<(u32, u64)>>::new(), 0u64);
    while read < total {
        let batch = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("read back")
            .unwrap()
            .unwrap();
        for r in batch {
            read += 1;
            stored
                .entry(String::from_utf8_lossy(&r.record.value).into_owned())
                .or_default()
                .push((r.partition, r.offset));
        }
    }
    stored
}

fn acked_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_librdkafka_producer_failing_over_between_two_nodes_stores_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let nats = common::nats_cluster(dir.path());
    let urls = nats.url_list();
    let ports = [(free_port(), free_port()), (free_port(), free_port())];
    let data = [dir.path().join("node0"), dir.path().join("node1")];
    let mut nodes: Vec<WeirProcess> = (0..2)
        .map(|i| spawn_node(&data[i], ports[i].0, ports[i].1, &urls))
        .collect();
    Client::connect(&nodes[0].addr)
        .await
        .unwrap()
        .create_topic(&TopicConfig::new("kx", 2))
        .await
        .unwrap();
    let acked = dir.path().join("acked.txt");
    let total = 40_000;
    let bootstrap = format!("127.0.0.1:{},127.0.0.1:{}", ports[0].1, ports[1].1);
    let producer = tokio::spawn(run_script(
        "produce.py",
        vec![
            bootstrap,
            "kx".into(),
            total.to_string(),
            "--acked".into(),
            acked.display().to_string(),
            // Compressed, as the single-node tests produce in every compression.
            "--compression".into(),
            "lz4".into(),
            "--pace".into(),
            "0.15".into(),
            "--set".into(),
            "reconnect.backoff.max.ms=200".into(),
            "--set".into(),
            "topic.metadata.refresh.interval.ms=1000".into(),
        ],
    ));
    // Each node killed once while the producer sends: whichever one it is writing through,
    // one of the kills makes it go on through the other.
    for i in 0..2 {
        let before = acked_count(&acked);
        common::eventually(90, "acknowledgements before the kill", || {
            acked_count(&acked) >= before + 2000
        })
        .await;
        let node = nodes.remove(i);
        node.kill9();
        // Acknowledgements go on through the other node while this one is down.
        let down = acked_count(&acked);
        common::eventually(90, "acknowledgements through the other node", || {
            acked_count(&acked) >= down + 1000
        })
        .await;
        nodes.insert(i, spawn_node(&data[i], ports[i].0, ports[i].1, &urls));
    }
    let out = producer.await.unwrap();
    assert_eq!(out["acked"], total, "{out}");
    let stored = read_all(&nodes[1].addr, "kx").await;
    let twice: Vec<_> = stored
        .iter()
        .filter(|(_, at)| at.len() > 1)
        .take(5)
        .collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    assert_eq!(stored.len(), total, "every record stored");
    for line in std::fs::read_to_string(&acked).unwrap().lines() {
        let mut it = line.splitn(3, ' ');
        let (p, o, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let at = (p.parse::<u32>().unwrap(), o.parse::<u64>().unwrap());
        assert_eq!(stored.get(v), Some(&vec![at]), "{v} acknowledged at {at:?}");
    }
    // Both nodes serve the same log.
    assert_eq!(read_all(&nodes[0].addr, "kx").await, stored);

    // A consumer group of two whose members bootstrap from different nodes: FindCoordinator
    // sends both to the node the group is placed on, so they split the partitions as one
    // group. Its commits are the shared log's group offsets, which either node answers.
    Client::connect(&nodes[0].addr)
        .await
        .unwrap()
        .create_topic(&TopicConfig::new("kg", 4))
        .await
        .unwrap();
    let out = run_script(
        "group.py",
        vec![
            format!("127.0.0.1:{}|127.0.0.1:{}", ports[1].1, ports[0].1),
            "kg".into(),
            "4".into(),
            "600".into(),
        ],
    )
    .await;
    assert_eq!(out["distinct"], 600, "{out}");
    let split = |member: &str| {
        out["assignments"][member]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_array().unwrap().len() < 4)
    };
    assert!(
        split("A") && split("B"),
        "members bootstrapped from different nodes formed one group: {out}"
    );
    assert_eq!(out["c_values"].as_array().unwrap().len(), 50, "{out}");
    let other = Client::connect(&nodes[0].addr).await.unwrap();
    let info = other.describe_topic("kg").await.unwrap();
    let mut offsets = other.fetch_offsets("kgroup", "kg").await.unwrap();
    offsets.sort_unstable();
    let ends: Vec<(u32, u64)> = info
        .partitions
        .iter()
        .map(|p| (p.partition, p.end_offset))
        .collect();
    assert_eq!(
        offsets, ends,
        "the group's commits, read through the other node"
    );

    // The group's coordinator is killed -9: the survivor takes the group over once the dead
    // node's heartbeat times out, and a member bootstrapped with the survivor alone resumes at
    // the group's offsets (only the records produced after them).
    // Asked through either node, the group has one coordinator.
    let mut named = Vec::new();
    for p in &ports {
        let through = format!("127.0.0.1:{}", p.1);
        let args = vec!["coordinator".into(), through, "kgroup".into()];
        named.push(run_script("resume.py", args).await);
    }
    assert_eq!(
        named[0], named[1],
        "one coordinator, whichever node is asked"
    );
    let port = named[0]["port"].as_u64().unwrap() as u16;
    let dead = ports
        .iter()
        .position(|p| p.1 == port)
        .expect("a node's port");
    nodes.remove(dead).kill9();
    let survivor = format!("127.0.0.1:{}", ports[1 - dead].1);
    let out = run_script(
        "resume.py",
        vec![
            "resume".into(),
            survivor,
            "kg".into(),
            "kgroup".into(),
            "40".into(),
        ],
    )
    .await;
    let mut values: Vec<String> = out["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    values.sort_unstable();
    let mut expected: Vec<String> = (0..40).map(|i| format!("r-{i}")).collect();
    expected.sort_unstable();
    assert_eq!(
        values, expected,
        "resumed at the group's offsets on the survivor: {out}"
    );
}
