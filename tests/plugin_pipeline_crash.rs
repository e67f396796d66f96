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
//! (none missing, none twice), and no output a reader saw before a kill was taken back
//! (outputs are never visible before their commit is durable).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{plugin_wasm, WeirProcess};
use weir_api::Client;
use weir_core::{Record, TopicConfig};

const USERS: u64 = 60;
/// Orders published per cycle, while the plugin is paused: a backlog drained at full speed.
const BACKLOG: u64 = 6_000;
const CYCLES: u64 = 4;
const SYNC_DELAY_MS: &str = "120";
/// Commits in flight over the plugin's 3 partitions the kill waits for.
const IN_FLIGHT: f64 = 4.0;

fn amount(i: u64) -> u64 {
    1 + (i * 7919) % 100
}

fn orders(from: u64, n: u64) -> Vec<Record> {
    (from..from + n)
        .map(|i| {
            let user = format!("user-{}", i % USERS);
            Record {
                key: Some(Bytes::from(user.clone())),
                id: Some(format!("order-{i}")),
                ..Record::from_value(format!(
                    r#"{{"order":{i},"user":"{user}","amount":{}}}"#,
                    amount(i)
                ))
            }
        })
        .collect()
}

/// The value of `name{plugin="points"}` in the server's `/metrics` (0 when absent).
fn metric(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let series = format!("{name}{{plugin=\"points\"}} ");
    raw.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Records whose effects the plugin committed durably (its status), over its partitions.
async fn processed(client: &Client) -> u64 {
    let plugins = client.list_plugins().await.unwrap();
    let points = plugins.iter().find(|p| p.name == "points").expect("points");
    points.partitions.iter().map(|p| p.processed).sum()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_with_commits_in_flight_and_outputs_unforwarded_lose_and_double_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wasm_dir = tempfile::tempdir().unwrap();
    let wasm = wasm_dir.path().join("points.wasm");
    std::fs::write(&wasm, plugin_wasm("points")).unwrap();
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
    for (name, partitions) in [("order.paid", 3), ("points.credited", 2)] {
        client
            .create_topic(&TopicConfig::new(name, partitions))
            .await
            .unwrap();
    }
    client
        .deploy_plugin(weir_api::Deploy {
            name: "points".into(),
            wasm: std::fs::read(&wasm).unwrap(),
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            ..Default::default()
        })
        .await
        .unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(120);
    while processed(&client).await < total
        || ends(&client, "points.credited").await.iter().sum::<u64>() < total
    {
        assert!(Instant::now() < deadline, "the plugin did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let end = ends(&client, "points.credited").await;
    for (cycle, seen) in seen_before_kills.iter().enumerate() {
        for (p, (seen, now)) in seen.iter().zip(&end).enumerate() {
            assert!(
                now >= seen,
                "points.credited/{p}: {seen} records were visible before kill {cycle}, {now} now"
            );
        }
    }
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
        let (value, _) = client
            .get_state("points", format!("balance/{user}").as_bytes())
            .await
            .unwrap()
            .expect("a balance");
        assert_eq!(
            serde_json::from_slice::<u64>(&value).unwrap(),
            balance,
            "balance of {user}"
        );
    }
    assert!(server.terminate(Duration::from_secs(30)).success());
}
