//! Exactly-once effects under `kill -9`: a real `weir serve` runs the points, red-envelope and
//! flash-sale order plugins, and the points plugin again in Python and in JavaScript
//! (examples/points-py, examples/points-js), while a publisher sends paid orders and seckill requests
//! (re-sending some batches on purpose, and every batch that was in flight at a crash). The
//! server is killed at random moments over many cycles — during processing, commit and
//! forwarding. At the end every effect is checked exactly:
//! every balance equals the sum over distinct orders (in all three languages, whose outputs are
//! identical record for record), one envelope per eligible user, sold
//! count = stock with no user twice, and no output record duplicated or missing.
//!
//! `WEIR_CRASH_CYCLES` (default 8) and `WEIR_CRASH_SEED` make runs longer or reproducible.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{example_wasm, plugin_wasm, weir_cli, WeirProcess};
use rand::{Rng, SeedableRng};
use weir_api::Client;
use weir_core::{Record, TopicConfig};

const USERS: u64 = 40;
const STOCK: u64 = 30;
const THRESHOLD: u64 = 3;
const RATE: f64 = 0.1;
/// The points plugin in each language: (plugin name, output topic).
const POINTS: [(&str, &str); 3] = [
    ("points", "points.credited"),
    ("points-py", "points.credited.py"),
    ("points-js", "points.credited.js"),
];

fn order(i: u64) -> (String, u64, f64) {
    (
        format!("user-{}", i % USERS),
        i,
        5.0 + ((i * 7919) % 200) as f64,
    )
}

/// The batches the publisher sends, in order: paid orders and seckill requests, 25 each.
fn batch(n: u64) -> (Vec<Record>, Vec<Record>) {
    let paid = (n * 25..n * 25 + 25)
        .map(|i| {
            let (user, id, amount) = order(i);
            Record {
                key: Some(Bytes::from(user.clone())),
                id: Some(format!("order-{id}")),
                ..Record::from_value(format!(
                    r#"{{"order":{id},"user":"{user}","amount":{amount}}}"#
                ))
            }
        })
        .collect();
    let requests = (n * 25..n * 25 + 25)
        .map(|i| {
            let user = format!("user-{}", (i * 13) % USERS);
            Record {
                key: Some(Bytes::from(user.clone())),
                id: Some(format!("req-{i}")),
                ..Record::from_value(format!(
                    r#"{{"request":"req-{i}","user":"{user}","item":"phone"}}"#
                ))
            }
        })
        .collect();
    (paid, requests)
}

struct Publisher {
    next_batch: u64,
    /// A batch that may or may not have been stored when the server died: sent again.
    in_doubt: Option<u64>,
}

async fn publish_batch(client: &Client, n: u64) -> Result<(), weir_api::ClientError> {
    let (paid, requests) = batch(n);
    client.publish("order.paid", None, paid).await?;
    client.publish("seckill", None, requests).await?;
    Ok(())
}

async fn run_publisher(
    addr: String,
    state: Arc<Mutex<Publisher>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let Ok(client) = Client::connect(&addr).await else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let n = {
            let mut s = state.lock().unwrap();
            match s.in_doubt {
                Some(n) => n,
                None => {
                    s.next_batch += 1;
                    s.in_doubt = Some(s.next_batch - 1);
                    s.next_batch - 1
                }
            }
        };
        if publish_batch(&client, n).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // Re-send an old batch now and then: the plugins must see its ids as duplicates.
        if rng.random_ratio(1, 5) && n > 0 {
            let _ = publish_batch(&client, rng.random_range(0..n)).await;
        }
        state.lock().unwrap().in_doubt = None;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spawn_on(dir: &std::path::Path, port: u16) -> WeirProcess {
    WeirProcess::spawn_on_port(dir, port, &[])
}

fn deploy(
    server: &str,
    name: &str,
    wasm: &std::path::Path,
    input: &str,
    outputs: &[&str],
    config: &[&str],
) {
    let mut args = vec![
        "plugin",
        "deploy",
        name,
        "--wasm",
        wasm.to_str().unwrap(),
        "--input",
        input,
    ];
    for o in outputs {
        args.extend(["--output", o]);
    }
    for c in config {
        args.extend(["--config", c]);
    }
    let (ok, out, err) = weir_cli(server, &args, "");
    assert!(ok, "deploy {name}: {err}");
    assert!(out.contains(&format!("deployed plugin {name} v1")), "{out}");
}

async fn read_topic(client: &Client, topic: &str) -> Vec<serde_json::Value> {
    let info = client.describe_topic(topic).await.unwrap();
    let total: u64 = info.partitions.iter().map(|p| p.end_offset).sum();
    let mut sub = client
        .subscribe(topic, &[], weir_core::StartAt::Earliest, None)
        .await
        .unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        for r in tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            out.push(serde_json::from_slice(&r.record.value).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_effects_are_exactly_once_across_kill_9() {
    let cycles: usize = std::env::var("WEIR_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("WEIR_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("plugin crash test: {cycles} cycles, WEIR_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let wasm_dir = tempfile::tempdir().unwrap();
    let wasm = |name: &str| {
        let path = wasm_dir.path().join(format!("{name}.wasm"));
        std::fs::write(&path, plugin_wasm(name)).unwrap();
        path
    };

    let server = WeirProcess::spawn(dir.path(), "127.0.0.1:0", &[]);
    let port = server.port();
    let client = Client::connect(&server.addr).await.unwrap();
    for (name, partitions) in [
        ("order.paid", 3),
        ("seckill", 3),
        ("points.credited", 2),
        ("points.credited.py", 2),
        ("points.credited.js", 2),
        ("red-envelope.grants", 1),
        ("order.created", 2),
        ("order.rejected", 2),
    ] {
        client
            .create_topic(&TopicConfig {
                name: name.into(),
                partitions,
                retention_ms: 0,
                retention_bytes: 0,
                admission: None,
            })
            .await
            .unwrap();
    }
    for (name, output) in POINTS {
        let path = match name {
            "points" => wasm("points"),
            example => example_wasm(example),
        };
        deploy(
            &server.addr,
            name,
            &path,
            "order.paid",
            &[output],
            &[&format!("rate={RATE}"), &format!("output={output}")],
        );
    }
    deploy(
        &server.addr,
        "red-envelope",
        &wasm("red-envelope"),
        "order.paid",
        &["red-envelope.grants"],
        &[&format!("threshold={THRESHOLD}"), "campaign=1111"],
    );
    deploy(
        &server.addr,
        "order",
        &wasm("order"),
        "seckill",
        &["order.created", "order.rejected"],
        &[&format!("stock={STOCK}")],
    );
    drop(client);

    let publisher = Arc::new(Mutex::new(Publisher {
        next_batch: 0,
        in_doubt: None,
    }));
    let mut process = Some(server);
    for cycle in 0..cycles {
        let server = process.take().unwrap_or_else(|| spawn_on(dir.path(), port));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run_publisher(
            server.addr.clone(),
            publisher.clone(),
            stop.clone(),
            seed ^ cycle as u64,
        ));
        let run_for = Duration::from_millis(rng.random_range(150..1200));
        tokio::time::sleep(run_for).await;
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        task.await.unwrap();
        println!(
            "cycle {cycle}: killed after {run_for:?}; {} batches published",
            publisher.lock().unwrap().next_batch
        );
    }

    let server = spawn_on(dir.path(), port);
    let client = Client::connect(&server.addr).await.unwrap();
    let in_doubt = publisher.lock().unwrap().in_doubt;
    if let Some(n) = in_doubt {
        publish_batch(&client, n).await.unwrap();
    }
    let batches = publisher.lock().unwrap().next_batch;
    assert!(
        batches >= 4,
        "published too little to mean anything: {batches} batches"
    );

    // Wait until every plugin committed its whole input and forwarded its outbox.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut last_outputs = 0;
    let mut stable_since = std::time::Instant::now();
    loop {
        let plugins = client.list_plugins().await.unwrap();
        let mut caught_up = true;
        for p in &plugins {
            let ends = client.describe_topic(&p.input).await.unwrap().partitions;
            caught_up &= p
                .partitions
                .iter()
                .zip(&ends)
                .all(|(s, e)| s.committed == e.end_offset);
            assert!(
                !p.partitions
                    .iter()
                    .any(|s| s.state.to_string().starts_with("halted")),
                "{} halted: {:?}",
                p.name,
                p.partitions
            );
        }
        let mut outputs = 0;
        for t in [
            "points.credited",
            "points.credited.py",
            "points.credited.js",
            "red-envelope.grants",
            "order.created",
            "order.rejected",
        ] {
            outputs += client
                .describe_topic(t)
                .await
                .unwrap()
                .partitions
                .iter()
                .map(|p| p.end_offset)
                .sum::<u64>();
        }
        if outputs != last_outputs {
            last_outputs = outputs;
            stable_since = std::time::Instant::now();
        }
        if caught_up && stable_since.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "plugins did not catch up: {plugins:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Points: every balance is the sum over distinct orders; one credit per order.
    let orders: Vec<(String, u64, f64)> = (0..batches * 25).map(order).collect();
    let mut want_balance: BTreeMap<String, u64> = BTreeMap::new();
    let mut paid_count: HashMap<String, u64> = HashMap::new();
    for (user, _, amount) in &orders {
        *want_balance.entry(user.clone()).or_default() += (amount * RATE).floor() as u64;
        *paid_count.entry(user.clone()).or_default() += 1;
    }
    let mut by_language = Vec::new();
    for (name, output) in POINTS {
        for (user, want) in &want_balance {
            let (value, _) = client
                .get_state(name, format!("balance/{user}").as_bytes())
                .await
                .unwrap()
                .expect("balance");
            assert_eq!(
                serde_json::from_slice::<u64>(&value).unwrap(),
                *want,
                "{name}: balance of {user}"
            );
        }
        let mut credited = read_topic(&client, output).await;
        let credited_orders: Vec<u64> = credited
            .iter()
            .map(|c| c["order"].as_u64().unwrap())
            .collect();
        let distinct: BTreeSet<u64> = credited_orders.iter().copied().collect();
        assert_eq!(
            credited_orders.len(),
            distinct.len(),
            "{name}: a {output} record was duplicated"
        );
        assert_eq!(
            distinct,
            orders.iter().map(|o| o.1).collect::<BTreeSet<_>>(),
            "{name}: a {output} record is missing"
        );
        credited.sort_by_key(|c| c["order"].as_u64().unwrap());
        by_language.push((name, credited));
    }
    // Same inputs, same effects: every output record (points and running balance) is equal
    // in the three languages.
    for (name, credited) in &by_language[1..] {
        assert!(
            credited == &by_language[0].1,
            "{name}'s outputs differ from the Rust plugin's"
        );
    }

    // Red envelopes: exactly one per eligible user.
    let grants = read_topic(&client, "red-envelope.grants").await;
    let mut granted: Vec<String> = grants
        .iter()
        .map(|g| g["user"].as_str().unwrap().to_string())
        .collect();
    granted.sort();
    let mut eligible: Vec<String> = paid_count
        .iter()
        .filter(|(_, n)| **n >= THRESHOLD)
        .map(|(u, _)| u.clone())
        .collect();
    eligible.sort();
    assert_eq!(granted, eligible, "one envelope per eligible user");

    // Flash sale: sold = stock, nobody twice, every distinct request answered once.
    let created = read_topic(&client, "order.created").await;
    let rejected = read_topic(&client, "order.rejected").await;
    let buyers: BTreeSet<&str> = created
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    let requests = batches * 25;
    let distinct_requesters: BTreeSet<u64> = (0..requests).map(|i| (i * 13) % USERS).collect();
    assert_eq!(
        created.len() as u64,
        STOCK.min(distinct_requesters.len() as u64),
        "sold count = stock"
    );
    assert_eq!(buyers.len(), created.len(), "no user bought twice");
    assert_eq!(
        created.len() + rejected.len(),
        requests as usize,
        "every request answered exactly once"
    );
    let answered: BTreeSet<&str> = created
        .iter()
        .chain(&rejected)
        .map(|r| r["request"].as_str().or(r["order"].as_str()).unwrap())
        .collect();
    assert_eq!(answered.len() as u64, requests);
    println!(
        "verified {} orders, {} grants, {} sold after {cycles} kill -9 cycles",
        orders.len(),
        granted.len(),
        created.len()
    );
    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success());
}
