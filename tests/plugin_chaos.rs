//! Plugin chaos on a real JetStream cluster: weir nodes killed, paused past their lease and
//! restarted (on empty data directories too), the plugin-state stream's leader killed, while
//! publishers send paid orders and seckill requests with duplicate ids; exact totals after.

use crate::common;

use std::time::Duration;

use common::WeirProcess;

/// The weir nodes' addresses for publishers; `None` while a node is down or paused.
type Nodes = std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>;

/// Publishes `records` through a random live node until one acknowledges them (a batch whose
/// ack was lost is sent again: its records carry message ids, which the plugins skip).
async fn publish_retrying(nodes: &Nodes, topic: &str, records: Vec<weir_api::Record>, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        let live: Vec<String> = nodes.lock().unwrap().iter().flatten().cloned().collect();
        if !live.is_empty() {
            let addr = &live[rng.random_range(0..live.len())];
            let attempt = async {
                let client = weir_api::Client::connect(addr).await.ok()?;
                client.publish(topic, None, records.clone()).await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(8), attempt).await {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn record(key: &str, id: &str, value: String) -> weir_api::Record {
    weir_api::Record {
        key: Some(key.to_string().into()),
        id: Some(id.to_string()),
        ..weir_api::Record::from_value(value)
    }
}

/// Plugin chaos over 3 JetStream nodes and 3 weir nodes: points, red-envelope and order run
/// while publishers send paid orders and seckill requests (a tenth of the batches sent twice,
/// and any batch whose ack was lost sent again through another node). Each cycle does one of:
/// `kill -9` a weir node (restarted after a moment, every other time on an empty data
/// directory); `kill -9` the leader of the plugin-state stream (restarted); `SIGSTOP` the node
/// running a plugin for longer than a lease lives, then `SIGCONT` (it resumes believing it
/// runs the plugin: its commits are refused by the changelog's fence). At the end, through a
/// node: every balance is the recount of distinct payments, one red envelope per user with 3
/// paid orders, sold = stock with nobody twice, one order output per distinct request, one
/// credit per distinct payment.
///
/// `WEIR_PLUGIN_CHAOS_CYCLES` (default 6) and `WEIR_PLUGIN_CHAOS_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_keep_exactly_once_effects_while_nodes_die_pause_and_lose_their_leader() {
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    let (cycles, seed) = common::chaos_knobs("WEIR_PLUGIN_CHAOS", 6);
    let started = std::time::Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut nats = common::nats_cluster(dir.path());
    let urls = nats.url_list();
    let kv_stream = weir_jetstream::Names::new("weir").kv_stream();
    let data = |name: &str| dir.path().join(name);
    let mut procs: Vec<Option<WeirProcess>> = (0..3)
        .map(|i| {
            Some(WeirProcess::spawn(
                &data(&format!("w{i}")),
                "127.0.0.1:0",
                &["--log", &urls],
            ))
        })
        .collect();
    let ports: Vec<u16> = procs.iter().map(|p| p.as_ref().unwrap().port()).collect();
    let nodes: Nodes = std::sync::Arc::new(std::sync::Mutex::new(
        procs
            .iter()
            .map(|p| p.as_ref().map(|p| p.addr.clone()))
            .collect(),
    ));
    let a = procs[0].as_ref().unwrap().addr.clone();
    for (topic, partitions) in [
        ("order.paid", "4"),
        ("points.credited", "2"),
        ("red-envelope.grants", "2"),
        ("seckill.requests", "4"),
        ("order.created", "2"),
        ("order.rejected", "2"),
    ] {
        common::cli_ok(
            &a,
            &["topic", "create", topic, "--partitions", partitions],
            "",
        );
    }
    let wasm = |name: &str| {
        let path = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&path, common::plugin_wasm(name)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let deploy = |name: &str, input: &str, output: &str, config: &[&str]| {
        let w = wasm(name);
        let mut args = vec![
            "plugin", "deploy", name, "--wasm", &w, "--input", input, "--output", output,
        ];
        for c in config {
            args.extend(["--config", c]);
        }
        common::cli_ok(&a, &args, "");
    };
    const STOCK: u64 = 60;
    deploy("points", "order.paid", "points.credited", &[]);
    deploy(
        "red-envelope",
        "order.paid",
        "red-envelope.grants",
        &["threshold=3", "amount=8"],
    );
    let w = wasm("order");
    common::cli_ok(
        &a,
        &[
            "plugin",
            "deploy",
            "order",
            "--wasm",
            &w,
            "--input",
            "seckill.requests",
            "--output",
            "order.created",
            "--output",
            "order.rejected",
            "--config",
            "stock=60",
            "--config",
            "shares=4",
        ],
        "",
    );

    // The load: payments of 80 users, seckill requests of 300 users (some twice).
    let mut payments: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    let mut pay_batches = Vec::new();
    for b in 0..40u64 {
        let batch: Vec<weir_api::Record> = (0..10)
            .map(|i| {
                let n = b * 10 + i;
                let (user, amount) = (
                    format!("u{}", rng.random_range(0..80)),
                    rng.random_range(10..300u64),
                );
                payments.insert(n, (user.clone(), amount));
                record(
                    &user,
                    &format!("paid-{n}"),
                    format!(r#"{{"order":{n},"user":"{user}","amount":{amount}}}"#),
                )
            })
            .collect();
        pay_batches.push(batch.clone());
        if rng.random_range(0..10) == 0 {
            pay_batches.push(batch);
        }
    }
    let mut requests: BTreeSet<String> = BTreeSet::new();
    let mut request_batches = Vec::new();
    for b in 0..40u64 {
        let batch: Vec<weir_api::Record> = (0..20)
            .map(|i| {
                let n = b * 20 + i;
                let user = format!("s{}", rng.random_range(0..300));
                requests.insert(format!("req-{n}"));
                record(
                    &user,
                    &format!("req-{n}"),
                    format!(r#"{{"request":"req-{n}","user":"{user}","item":"phone-x"}}"#),
                )
            })
            .collect();
        request_batches.push(batch.clone());
        if rng.random_range(0..10) == 0 {
            request_batches.push(batch);
        }
    }
    let publishers = [
        ("order.paid", pay_batches),
        ("seckill.requests", request_batches),
    ]
    .map(|(topic, batches)| {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            for (i, batch) in batches.into_iter().enumerate() {
                publish_retrying(&nodes, topic, batch, seed ^ i as u64).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });

    let mut empty_dirs = 0;
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..3500)));
        let live: Vec<usize> = (0..3).filter(|i| procs[*i].is_some()).collect();
        match cycle % 3 {
            0 => {
                let i = live[rng.random_range(0..live.len())];
                nodes.lock().unwrap()[i] = None;
                procs[i].take().unwrap().kill9();
                std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
                let fresh = cycle % 2 == 0;
                let name = if fresh {
                    empty_dirs += 1;
                    format!("w{i}-empty{empty_dirs}")
                } else {
                    format!("w{i}")
                };
                let p = super::cluster::spawn_weir(&data(&name), ports[i], &urls);
                nodes.lock().unwrap()[i] = Some(p.addr.clone());
                procs[i] = Some(p);
                println!("cycle {cycle} at {:?}: kill -9 weir node {i}, restarted (empty data dir: {fresh})", started.elapsed());
            }
            1 => {
                let name =
                    common::kill_stream_leader(&mut nats, &kv_stream, rng.random_range(300..1500));
                println!(
                    "cycle {cycle} at {:?}: kill -9 the plugin-state stream's leader {name}",
                    started.elapsed()
                );
            }
            _ => {
                // Pause the node running a plugin past its lease, then let it go on.
                let listed = common::cli_ok(
                    &procs[live[0]].as_ref().unwrap().addr,
                    &["plugin", "list"],
                    "",
                );
                let owner = (0..3).find(|i| {
                    procs[*i].is_some() && listed.contains(&format!("(127.0.0.1:{})", ports[*i]))
                });
                let i = owner.unwrap_or(live[0]);
                let pid = procs[i].as_ref().unwrap().child.id().to_string();
                nodes.lock().unwrap()[i] = None;
                std::process::Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .unwrap();
                std::thread::sleep(Duration::from_millis(6500));
                std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .status()
                    .unwrap();
                nodes.lock().unwrap()[i] = procs[i].as_ref().map(|p| p.addr.clone());
                println!(
                    "cycle {cycle} at {:?}: paused weir node {i} for 6.5 s (it ran a plugin: {})",
                    started.elapsed(),
                    owner.is_some()
                );
            }
        }
    }
    for p in publishers {
        p.await.unwrap();
    }
    println!("publishing done at {:?}", started.elapsed());

    // Drained: every plugin committed past every record, and its outputs forwarded.
    let client = weir_api::Client::connect(&a).await.unwrap();
    flash_sale::drain(
        &client,
        "",
        Duration::from_millis(250),
        Duration::from_secs(90),
        &mut |_| {},
    )
    .await
    .unwrap();
    let distinct_users: BTreeMap<&str, u64> =
        payments
            .values()
            .fold(BTreeMap::new(), |mut m, (u, amount)| {
                *m.entry(u.as_str()).or_default() += amount;
                m
            });
    let paid_count: BTreeMap<&str, usize> =
        payments.values().fold(BTreeMap::new(), |mut m, (u, _)| {
            *m.entry(u.as_str()).or_default() += 1;
            m
        });
    let eligible = paid_count.values().filter(|n| **n >= 3).count();
    let want_outputs = [
        ("points.credited", payments.len()),
        ("red-envelope.grants", eligible),
        ("order.created", STOCK as usize),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut counts = Vec::new();
        for (topic, _) in want_outputs {
            counts.push(flash_sale::read_all(&client, topic).await.unwrap().len());
        }
        let rejected = flash_sale::read_all(&client, "order.rejected")
            .await
            .unwrap()
            .len();
        let done = want_outputs
            .iter()
            .zip(&counts)
            .all(|((_, want), got)| got >= want)
            && counts[2] + rejected >= requests.len();
        if done || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (user, want) in &distinct_users {
        let (value, _) = client
            .get_state("points", format!("balance/{user}").as_bytes())
            .await
            .unwrap()
            .unwrap();
        let got: u64 = serde_json::from_slice(&value).unwrap();
        assert_eq!(got, *want, "{user}'s balance");
    }
    let credited = flash_sale::read_all(&client, "points.credited")
        .await
        .unwrap();
    let credited_orders: BTreeSet<u64> = credited
        .iter()
        .map(|c| c["order"].as_u64().unwrap())
        .collect();
    assert_eq!(
        (credited.len(), credited_orders.len()),
        (payments.len(), payments.len()),
        "one credit per payment"
    );
    let grants = flash_sale::read_all(&client, "red-envelope.grants")
        .await
        .unwrap();
    let granted: BTreeSet<&str> = grants.iter().filter_map(|g| g["user"].as_str()).collect();
    assert_eq!(
        (grants.len(), granted.len()),
        (eligible, eligible),
        "one envelope per user with 3 paid orders"
    );
    let created = flash_sale::read_all(&client, "order.created")
        .await
        .unwrap();
    let rejected = flash_sale::read_all(&client, "order.rejected")
        .await
        .unwrap();
    let buyers: BTreeSet<&str> = created.iter().filter_map(|o| o["user"].as_str()).collect();
    assert_eq!(
        (created.len(), buyers.len()),
        (STOCK as usize, STOCK as usize),
        "sold = stock, nobody twice"
    );
    let answered: BTreeSet<&str> = created
        .iter()
        .filter_map(|o| o["order"].as_str())
        .chain(rejected.iter().filter_map(|r| r["request"].as_str()))
        .collect();
    assert_eq!(
        (created.len() + rejected.len(), answered.len()),
        (requests.len(), requests.len()),
        "one answer per distinct request"
    );
    println!(
        "plugin chaos passed at {:?}: {} payments, {} requests, {eligible} envelopes",
        started.elapsed(),
        payments.len(),
        requests.len()
    );
    drop(procs);
    drop(nats);
}
