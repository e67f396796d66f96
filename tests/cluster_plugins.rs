//! Plugins across weir nodes on a real JetStream cluster: a plugin moving to a survivor after
//! `kill -9`, the flash sale on three nodes with two killed, and the plugin chaos test (weir
//! nodes killed, paused and restarted, the plugin-state stream's leader killed, while
//! publishers send orders and seckill requests with duplicate ids).

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::WeirProcess;
use weir_cluster::{nats_server_binary, NatsCluster, SyncMode};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cli_ok(server: &str, args: &[&str], stdin: &str) -> String {
    let (ok, out, err) = common::weir_cli(server, args, stdin);
    assert!(ok, "weir {args:?} failed: {err}");
    out
}

/// Waits until `weir state get points balance/ann` through `addr` says `want`.
fn wait_balance(addr: &str, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (found, out, _) =
            common::weir_cli(addr, &["state", "get", "points", "balance/ann"], "");
        if found && out.starts_with(&format!("{want} ")) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "balance through {addr} is {out:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn orders(list: &[(&str, u64)]) -> String {
    list.iter()
        .map(|(id, amount)| {
            format!("{{\"key\":\"ann\",\"id\":\"{id}\",\"value\":{{\"order\":1,\"user\":\"ann\",\"amount\":{amount}}}}}\n")
        })
        .collect()
}

/// A plugin deployed on one node of a cluster consumes records published through the other,
/// exactly once; the other node answers its state and says where it runs. When its node is
/// killed (-9) the survivor takes it over from the changelog and carries on: the balance
/// counts every order once (duplicate ids across the failover included), and every output
/// exists once.
#[test]
fn a_plugin_moves_to_the_surviving_node_when_its_node_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let bin = nats_server_binary(&root()).unwrap_or_else(|e| panic!("{e}"));
    let nats = NatsCluster::start(&bin, &dir.path().join("nats"), 3, SyncMode::Default)
        .unwrap_or_else(|e| panic!("{e}"));
    let urls = nats.url_list();
    let a = WeirProcess::spawn(&dir.path().join("a"), "127.0.0.1:0", &["--log", &urls]);
    let b = WeirProcess::spawn(&dir.path().join("b"), "127.0.0.1:0", &["--log", &urls]);
    let wasm = dir.path().join("points.wasm");
    std::fs::write(&wasm, common::plugin_wasm("points")).unwrap();
    cli_ok(
        &a.addr,
        &["topic", "create", "order.paid", "--partitions", "2"],
        "",
    );
    cli_ok(&a.addr, &["topic", "create", "points.credited"], "");
    cli_ok(
        &a.addr,
        &[
            "plugin",
            "deploy",
            "points",
            "--wasm",
            wasm.to_str().unwrap(),
            "--input",
            "order.paid",
            "--output",
            "points.credited",
        ],
        "",
    );
    // Through node B, with a duplicate order id.
    cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &orders(&[("o1", 10), ("o2", 20), ("o1", 10), ("o3", 5)]),
    );
    wait_balance(&a.addr, 35);
    // B does not run it (A deployed it and holds it) but answers from the changelog.
    wait_balance(&b.addr, 35);
    let listed = cli_ok(&b.addr, &["plugin", "list"], "");
    assert!(
        listed.contains("runs on node") && listed.contains(&a.addr.replace("http://", "")),
        "{listed}"
    );
    a.kill9();
    cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &orders(&[("o4", 100), ("o2", 20), ("o5", 1000)]),
    );
    wait_balance(&b.addr, 1135);
    let listed = cli_ok(&b.addr, &["plugin", "list"], "");
    assert!(listed.contains(&b.addr.replace("http://", "")), "{listed}");
    let credited = cli_ok(
        &b.addr,
        &[
            "consume",
            "points.credited",
            "--from",
            "earliest",
            "--idle-ms",
            "1500",
        ],
        "",
    );
    assert_eq!(
        credited.lines().count(),
        5,
        "one output per distinct order: {credited}"
    );
}

/// The flash sale (CI size) on one node, then on three weir nodes over JetStream with the
/// nodes running the order and points plugins killed with `kill -9` mid-drain (a survivor
/// takes each over from its changelog): the same verified totals — sold = stock with nobody
/// twice, every balance recounted exactly, one red envelope per paying user, every output
/// once. `cargo xtask demo --cluster` is the full-size run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flash_sale_on_three_nodes_with_two_killed_matches_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let bin = nats_server_binary(&root()).unwrap_or_else(|e| panic!("{e}"));
    let nats = NatsCluster::start(&bin, &dir.path().join("nats"), 3, SyncMode::Default)
        .unwrap_or_else(|e| panic!("{e}"));
    let wasm_dir = std::env::var("WEIR_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target/wasm32-wasip2/plugin"));
    let opts = flash_sale::DemoOptions {
        weir: PathBuf::from(common::weir_bin()),
        wasm_dir,
        sale: flash_sale::Sale::small(),
        verbose: std::env::var("WEIR_DEMO_VERBOSE").is_ok(),
    };
    let (single, cluster) = flash_sale::demo_cluster(&opts, &nats.url_list(), "fs")
        .await
        .unwrap();
    assert_eq!(single, cluster.totals);
    assert_eq!(cluster.totals.orders, 200);
    assert_eq!(cluster.failovers.len(), 2);
    for (plugin, took) in &cluster.failovers {
        eprintln!(
            "failover of {plugin}: {took:?} from kill -9 to the first commit on the new node"
        );
    }
}

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
    let cycles: usize = std::env::var("WEIR_PLUGIN_CHAOS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("WEIR_PLUGIN_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("plugin chaos: {cycles} cycles, WEIR_PLUGIN_CHAOS_SEED={seed}");
    let started = std::time::Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let bin = nats_server_binary(&root()).unwrap_or_else(|e| panic!("{e}"));
    let mut nats = NatsCluster::start(&bin, &dir.path().join("nats"), 3, SyncMode::Default)
        .unwrap_or_else(|e| panic!("{e}"));
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
        cli_ok(
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
        cli_ok(&a, &args, "");
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
    cli_ok(
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
                let mut leader = None;
                for _ in 0..200 {
                    leader = nats.stream_leader(&kv_stream);
                    if leader.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let leader = leader.expect("the plugin-state stream has a leader within 20 s");
                nats.kill(leader);
                std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
                nats.restart(leader).unwrap_or_else(|e| panic!("{e}"));
                println!(
                    "cycle {cycle} at {:?}: kill -9 the plugin-state stream's leader {}",
                    started.elapsed(),
                    nats.nodes[leader].name
                );
            }
            _ => {
                // Pause the node running a plugin past its lease, then let it go on.
                let listed = cli_ok(
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
