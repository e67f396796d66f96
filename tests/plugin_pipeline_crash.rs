//! `kill -9` at the moments the commit pipeline makes interesting, found rather than left to
//! chance. A real `weir serve` whose syncs are slowed (`--debug-sync-delay-ms`: a slow disk,
//! nothing acknowledged sooner) drains a backlog of paid orders with the points plugin. Each
//! cycle it is killed as soon as, in one look (metrics, then the plugin's status and its output
//! topic, then the kill, within a few ms of a sync that takes over 100 ms):
//! - several commits are written and not yet durable (`weir_plugin_commits_in_flight`): the
//!   later ones ran on state only the earlier, lost ones made;
//! - durable commits' outputs are not all visible in the output topic yet: the crash falls
//!   between a commit and the forwarding of its outputs.
//!
//! At the end every balance is the sum over distinct orders, every order is credited once
//! (none missing, none twice), and no output partition's end is below what a reader saw before
//! a kill. (That outputs never show before their commit is durable is the model tests' to
//! check: runtime/plugins/src/tests/pipeline.rs.)
//!
//! The cluster's versions kill, or freeze past its lease (SIGSTOP), the weir node running
//! points (over a JetStream R3 cluster) once several of its commits are queued for the
//! changelog and not yet landed; the other node takes the plugin over from what landed, and a
//! frozen node that resumes lands nothing after the takeover.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::WeirProcess;
use weir_api::Client;
use weir_core::Record;

const USERS: u64 = 60;
/// Orders published per cycle, while the plugin is paused: a backlog drained at full speed,
/// four commits of two calls per partition (`--commit-records 1000`).
const BACKLOG: u64 = 12_000;
const CYCLES: u64 = 4;
const SYNC_DELAY_MS: &str = "120";
/// Commits in flight over the plugin's 3 partitions the kill waits for.
const IN_FLIGHT: f64 = 4.0;

fn amount(i: u64) -> u64 {
    1 + (i * 7919) % 100
}

fn orders(from: u64, n: u64) -> Vec<Record> {
    (from..from + n)
        .map(|i| common::paid(i, &format!("user-{}", i % USERS), amount(i) as f64))
        .collect()
}

/// The value of `name{plugin="points"}` in the server's `/metrics` (0 when absent).
fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = crate::monitor::http_get_blocking(addr.parse().unwrap(), "/metrics");
    let series = format!("{name}{{plugin=\"points\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Records whose effects the plugin committed durably (its status), over its partitions; 0
/// while the node does not list it (a cluster node taking it over).
async fn processed(client: &Client) -> u64 {
    let plugins = client.list_plugins().await.unwrap();
    plugins
        .iter()
        .find(|p| p.name == "points")
        .map_or(0, |points| {
            points.partitions.iter().map(|p| p.processed).sum()
        })
}

async fn ends(client: &Client, topic: &str) -> Vec<u64> {
    let info = client.describe_topic(topic).await.unwrap();
    info.partitions.iter().map(|p| p.end_offset).collect()
}

async fn publish_backlog(client: &Client, from: u64) {
    for start in (from..from + BACKLOG).step_by(1_000) {
        client
            .publish("order.paid", None, orders(start, 1_000))
            .await
            .unwrap();
    }
}

/// order.paid (3 partitions), points.credited (2) and points deployed from the earliest
/// offset, its commits of 1,000 records (two calls each): several per partition and backlog.
async fn topics_and_points(client: &Client) {
    crate::monitor::topics(client, &[("order.paid", 3), ("points.credited", 2)]).await;
    client
        .deploy_plugin(weir_api::Deploy {
            name: "points".into(),
            wasm: common::plugin_wasm("points").to_vec(),
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            commit_records: 1_000,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Waits until the plugin processed `total` orders and forwarded as many outputs; the output
/// topic's ends then.
async fn caught_up(client: &Client, total: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while processed(client).await < total
        || ends(client, "points.credited").await.iter().sum::<u64>() < total
    {
        assert!(
            Instant::now() < deadline,
            "the plugin did not catch up: {} processed",
            processed(client).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ends(client, "points.credited").await
}

/// Every order 0..`total` credited exactly once in points.credited (whose ends are `end`),
/// every balance the sum of its user's amounts.
async fn every_order_credited_once(client: &Client, total: u64, end: &[u64]) {
    let mut sub = client
        .subscribe("points.credited", &[], weir_core::StartAt::Earliest, None)
        .await
        .unwrap();
    let mut credited = Vec::new();
    while (credited.len() as u64) < end.iter().sum::<u64>() {
        let batch = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("outputs readable")
            .expect("a batch")
            .unwrap();
        for r in batch {
            let v: serde_json::Value = serde_json::from_slice(&r.record.value).unwrap();
            credited.push(v["order"].as_u64().unwrap());
        }
    }
    let distinct: BTreeSet<u64> = credited.iter().copied().collect();
    assert_eq!(
        credited.len(),
        distinct.len(),
        "an order was credited twice"
    );
    assert_eq!(
        distinct,
        (0..total).collect::<BTreeSet<_>>(),
        "an order's credit is missing"
    );
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..total {
        *want.entry(format!("user-{}", i % USERS)).or_default() += amount(i);
    }
    for (user, balance) in want {
        assert_eq!(
            common::balance(client, &user).await,
            Some(balance),
            "balance of {user}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_with_commits_in_flight_and_outputs_unforwarded_lose_and_double_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", crate::kafka::free_port());
    let slow = [
        "--metrics",
        metrics.as_str(),
        "--debug-sync-delay-ms",
        SYNC_DELAY_MS,
    ];
    let first = WeirProcess::spawn(dir.path(), "127.0.0.1:0", &slow);
    let port = first.port();
    let client = Client::connect(&first.addr).await.unwrap();
    topics_and_points(&client).await;
    drop(client);

    let mut process = Some(first);
    // Per cycle, the output topic's ends a reader could see just before the kill.
    let mut seen_before_kills = Vec::new();
    for cycle in 0..CYCLES {
        let server = process
            .take()
            .unwrap_or_else(|| WeirProcess::spawn_on_port(dir.path(), port, &slow));
        let client = Client::connect(&server.addr).await.unwrap();
        client.pause_plugin("points", true).await.unwrap();
        publish_backlog(&client, cycle * BACKLOG).await;
        // Some of the last cycle's orders again: skipped as duplicates, never credited twice.
        if cycle > 0 {
            client
                .publish("order.paid", None, orders(cycle * BACKLOG - 300, 300))
                .await
                .unwrap();
        }
        client.pause_plugin("points", false).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let (in_flight, done, visible) = loop {
            let in_flight = metric(&metrics, "weir_plugin_commits_in_flight");
            if in_flight >= IN_FLIGHT {
                let done = processed(&client).await;
                let visible = ends(&client, "points.credited").await;
                if done > visible.iter().sum::<u64>() {
                    break (in_flight, done, visible);
                }
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: never saw {IN_FLIGHT} commits in flight with outputs waiting \
                 (last: {in_flight} in flight)"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        server.kill9();
        println!(
            "cycle {cycle}: killed with {in_flight} commits in flight, {} records' outputs \
             durable and not yet visible",
            done - visible.iter().sum::<u64>()
        );
        seen_before_kills.push(visible);
    }

    // Carry on at full speed until everything is committed and forwarded.
    let server = WeirProcess::spawn_on_port(dir.path(), port, &[]);
    let client = Client::connect(&server.addr).await.unwrap();
    let total = CYCLES * BACKLOG;
    let end = caught_up(&client, total).await;
    for (cycle, seen) in seen_before_kills.iter().enumerate() {
        for (p, (seen, now)) in seen.iter().zip(&end).enumerate() {
            assert!(
                now >= seen,
                "points.credited/{p}: {seen} records were visible before kill {cycle}, {now} now"
            );
        }
    }
    every_order_credited_once(&client, total, &end).await;
    assert!(server.terminate(Duration::from_secs(30)).success());
}

/// The value of `weir_plugin_commits_in_flight{plugin="points"}` on a node (0 when down).
fn in_flight_on(metrics: &str) -> f64 {
    if std::net::TcpStream::connect(metrics).is_err() {
        return 0.0;
    }
    metric(metrics, "weir_plugin_commits_in_flight")
}

/// Two weir nodes (with `--metrics`) over a fresh 3-node JetStream cluster, points deployed
/// through the first and paused while `total` orders are published, then resumed.
struct Draining {
    nats: weir_cluster::NatsCluster,
    nodes: Vec<Option<WeirProcess>>,
    addrs: Vec<String>,
    metrics: Vec<String>,
}

async fn cluster_draining(dir: &std::path::Path, total: u64) -> Draining {
    let nats = common::nats_cluster(dir);
    let urls = nats.url_list();
    let metrics: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", crate::kafka::free_port()))
        .collect();
    let nodes: Vec<Option<WeirProcess>> = ["a", "b"]
        .iter()
        .zip(&metrics)
        .map(|(name, m)| {
            Some(WeirProcess::spawn(
                &dir.join(name),
                "127.0.0.1:0",
                &["--log", &urls, "--metrics", m],
            ))
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| n.as_ref().unwrap().addr.clone())
        .collect();
    let client = Client::connect(&addrs[0]).await.unwrap();
    topics_and_points(&client).await;
    client.pause_plugin("points", true).await.unwrap();
    for start in (0..total).step_by(1_000) {
        client
            .publish("order.paid", None, orders(start, 1_000))
            .await
            .unwrap();
    }
    client.pause_plugin("points", false).await.unwrap();
    Draining {
        nats,
        nodes,
        addrs,
        metrics,
    }
}

impl Draining {
    /// The node running points once it has 2 or more commits queued for the changelog and
    /// not landed, and how many.
    async fn runner_with_commits_in_flight(&self) -> (usize, f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen: Vec<f64> = self.metrics.iter().map(|m| in_flight_on(m)).collect();
            if let Some(i) = seen.iter().position(|n| *n >= 2.0) {
                return (i, seen[i]);
            }
            assert!(
                Instant::now() < deadline,
                "never saw 2 commits in flight on the node running points (last: {seen:?})"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_with_commits_in_flight_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let total = 2 * BACKLOG;
    let mut cluster = cluster_draining(dir.path(), total).await;
    // Killed once, in one look, commits are in flight and landed commits' outputs are not all
    // in the output topic yet (a crash between a commit and the forwarding of its outputs).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (killed, in_flight, waiting) = loop {
        let (runner, in_flight) = cluster.runner_with_commits_in_flight().await;
        let client = Client::connect(&cluster.addrs[runner]).await.unwrap();
        let done = processed(&client).await;
        let visible: u64 = ends(&client, "points.credited").await.iter().sum();
        if done > visible {
            cluster.nodes[runner].take().unwrap().kill9();
            break (runner, in_flight, done - visible);
        }
        assert!(
            Instant::now() < deadline,
            "never saw commits in flight with outputs waiting"
        );
    };
    println!(
        "killed node {killed} with {in_flight} commits queued for the changelog and {waiting} \
         landed records' outputs not yet in their topic"
    );
    let client = Client::connect(&cluster.addrs[1 - killed]).await.unwrap();
    let end = caught_up(&client, total).await;
    every_order_credited_once(&client, total, &end).await;
    drop(cluster.nats);
}

/// The node running points is frozen (SIGSTOP: a GC pause, a frozen VM) with commits queued
/// for the changelog; the other node takes points over past the lease and drains the rest;
/// then the frozen node resumes with its pipelined tail and outbox in memory. Its tail must
/// never land after the new owner's takeover, nor its outputs reach the topic twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_frozen_with_commits_in_flight_past_its_lease_lands_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let total = 2 * BACKLOG;
    let cluster = cluster_draining(dir.path(), total).await;
    let (frozen, in_flight) = cluster.runner_with_commits_in_flight().await;
    let pid = cluster.nodes[frozen]
        .as_ref()
        .unwrap()
        .child
        .id()
        .to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    };
    signal("-STOP");
    println!("froze node {frozen} with {in_flight} commits queued for the changelog");
    let client = Client::connect(&cluster.addrs[1 - frozen]).await.unwrap();
    caught_up(&client, total).await;
    signal("-CONT");
    // Time for the resumed node to try: its queued appends meet the fence, its forwarder
    // confirms its hold at the changelog's end and finds the takeover.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = caught_up(&client, total).await;
    every_order_credited_once(&client, total, &end).await;
    drop(cluster.nats);
}
