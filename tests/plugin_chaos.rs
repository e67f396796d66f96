//! Plugin chaos on a real JetStream cluster: weir nodes killed, paused past their lease and
//! restarted (on empty data directories too), the plugin-state stream's leader killed, the
//! nats-server under a node frozen, plugins upgraded and removed and redeployed while the
//! nodes running them die or pause, while publishers send paid orders and seckill requests
//! with duplicate ids; exact totals after, and one output per distinct input on every output
//! topic (issues 21 and 25).
//! (Over 500 lines because it is one test: its fault cycles share the nodes, the publishers
//! and the final checks; its nodes and admin helpers are in plugin_chaos/.)

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::WeirProcess;
use rand::{Rng, SeedableRng};

mod admin;
mod nodes;

use admin::*;
use nodes::*;

/// The weir nodes' addresses for publishers; `None` while a node is down or paused.
type Nodes = Arc<Mutex<Vec<Option<String>>>>;

/// The plugins the test runs.
const PLUGINS: [&str; 3] = ["points", "red-envelope", "order"];
/// Publishes `records` through a random live node until one acknowledges them (a batch whose
/// ack was lost is sent again: its records carry message ids, which the plugins skip).
async fn publish_retrying(nodes: &Nodes, topic: &str, records: Vec<weir_api::Record>, seed: u64) {
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

/// Every record of `topic` (retrying for 60 s while the engine answers that it is busy: an
/// election after the last cycle).
async fn read_topic(client: &weir_api::Client, topic: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match flash_sale::read_all(client, topic).await {
            Ok(records) => return records,
            Err(e) => assert!(Instant::now() < deadline, "reading {topic}: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Plugin chaos over 3 JetStream nodes and 3 weir nodes: points, red-envelope and order run
/// while publishers send paid orders and seckill requests (a tenth of the batches sent twice,
/// and any batch whose ack was lost sent again through another node), spread over the cycles.
/// Node 0 names every nats-server, node 1 all but one (`path`), node 2 only `path`. Each cycle
/// does one of (the kinds in seeded shuffled blocks, so a default run meets each once):
/// - `kill -9` a weir node (restarted after a moment, every other time on an empty data
///   directory);
/// - `kill -9` the leader of the plugin-state stream (restarted);
/// - `SIGSTOP` the node running a plugin for longer than a lease lives, then `SIGCONT` (it
///   resumes believing it runs the plugin: its commits are refused by the changelog's fence);
/// - freeze `path` (SIGSTOP the nats-server; past the 4 s lease, every other time past the
///   10 s request timeout) while node 2 may run plugins and publishers send through it;
/// - upgrade a plugin (to the same wasm) through a node that does not run it, racing `kill -9`
///   or `SIGSTOP` of the node that does; or, with `path` frozen, through node 2 (hangs, may
///   land late) and then through node 1;
/// - remove points and redeploy it to a new output topic `--from earliest`, racing `kill -9`
///   or `SIGSTOP` of its node; or, with `path` frozen, remove through node 1, a deploy to one
///   new topic through node 2 (hangs) and to another through node 1: at most one of the two
///   deployments is acknowledged and the one listed is it.
/// After each admin cycle every plugin runs on some node within 45 s. At the end, through a
/// node: every balance is the recount of distinct payments, one red envelope per user with 3
/// paid orders, sold = stock with nobody twice, one order output per distinct request; every
/// topic points ever wrote to has at most one credit per distinct payment, and the last one
/// exactly one.
///
/// `WEIR_PLUGIN_CHAOS_CYCLES` (default 6) and `WEIR_PLUGIN_CHAOS_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_keep_exactly_once_effects_while_nodes_die_pause_and_lose_their_leader() {
    let (cycles, seed) = common::chaos_knobs("WEIR_PLUGIN_CHAOS", 6);
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut nats = common::nats_cluster(dir.path());
    let kv_stream = weir_jetstream::Names::new("weir").kv_stream();
    let path = rng.random_range(0..3usize);
    let server = nats.nodes[path].name.clone();
    let mut weirs = Weirs::start(
        dir.path(),
        vec![
            nats.url_list(),
            common::chaos::urls_except(&nats, path),
            nats.nodes[path].url(),
        ],
    );
    println!(
        "node 2 reaches NATS only through {server}; node 1 never through it; nodes 0, 1, 2 at {:?}",
        (0..3).map(|i| weirs.addr(i)).collect::<Vec<_>>()
    );
    let a = weirs.addr(0);
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
    let wasm = |name: &str| -> String {
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
    let wasms: BTreeMap<&str, String> = PLUGINS.into_iter().map(|p| (p, wasm(p))).collect();

    // Publishing keeps pace with the cycles: the batches of cycle c go while it runs.
    let begun = Arc::new(AtomicUsize::new(0));
    let all_begun = Arc::new(AtomicBool::new(false));
    let publishers = [
        ("order.paid", pay_batches),
        ("seckill.requests", request_batches),
    ]
    .map(|(topic, batches)| {
        let nodes = weirs.nodes.clone();
        let (begun, all_begun) = (begun.clone(), all_begun.clone());
        tokio::spawn(async move {
            let n = batches.len();
            for (i, batch) in batches.into_iter().enumerate() {
                while !all_begun.load(Ordering::Relaxed)
                    && begun.load(Ordering::Relaxed) * n < i * cycles
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                publish_retrying(&nodes, topic, batch, seed ^ i as u64).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });

    // Every topic points has written to, and the one it writes to now.
    let mut points_outputs = vec!["points.credited".to_string()];
    let mut points_output = "points.credited".to_string();
    let mut freezes = 0;
    let kinds = common::chaos::cycle_kinds(&mut rng, cycles, 6);
    for (cycle, kind) in kinds.into_iter().enumerate() {
        begun.store(cycle + 1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..3500)));
        let at = started.elapsed();
        match kind {
            0 => {
                let live = weirs.live();
                let i = live[rng.random_range(0..live.len())];
                let fresh = weirs.kill9_restart(i, rng.random_range(300..1500));
                println!("cycle {cycle} at {at:?}: kill -9 weir node {i}, restarted (empty data dir: {fresh})");
            }
            1 => {
                let name =
                    common::kill_stream_leader(&mut nats, &kv_stream, rng.random_range(300..1500));
                println!(
                    "cycle {cycle} at {at:?}: kill -9 the plugin-state stream's leader {name}"
                );
            }
            2 => {
                // Pause the node running a plugin past its lease, then let it go on.
                let listed = weirs.list();
                let plugin = PLUGINS[rng.random_range(0..PLUGINS.len())];
                let owner = weirs.runner(&listed, plugin);
                let i = owner.unwrap_or(weirs.live()[0]);
                weirs.pause(i, 6500);
                println!(
                    "cycle {cycle} at {at:?}: paused weir node {i} for 6.5 s (it ran {plugin}: {})",
                    owner.is_some()
                );
            }
            3 => {
                let listed = weirs.list();
                let ran: Vec<&str> = PLUGINS
                    .into_iter()
                    .filter(|p| weirs.runner(&listed, p) == Some(2))
                    .collect();
                let ms = common::chaos::freeze_ms(&mut rng, freezes);
                freezes += 1;
                nats.freeze(path);
                std::thread::sleep(Duration::from_millis(ms));
                nats.thaw(path);
                println!("cycle {cycle} at {at:?}: froze {server} (node 2's only server) for {ms} ms; node 2 ran {ran:?}");
            }
            4 => {
                let plugin = PLUGINS[rng.random_range(0..PLUGINS.len())];
                let w = wasms[plugin].clone();
                let runner = weirs.runner(&weirs.list(), plugin);
                match rng.random_range(0..3) {
                    fault @ (0 | 1) => {
                        let target = runner.unwrap_or_else(|| weirs.other_than(None, &mut rng));
                        let via = weirs.other_than(Some(target), &mut rng);
                        let addr = weirs.addr(via);
                        let delay = rng.random_range(0..1000);
                        let admin = std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(delay));
                            upgrade_until_ok(&addr, plugin, &w)
                        });
                        std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
                        let what = if fault == 0 {
                            let fresh = weirs.kill9_restart(target, rng.random_range(300..1500));
                            format!("kill -9 (restart on an empty data dir: {fresh})")
                        } else {
                            weirs.pause(target, 6500);
                            "SIGSTOP for 6.5 s".to_string()
                        };
                        let failed = admin.join().unwrap();
                        println!(
                            "cycle {cycle} at {at:?}: upgraded {plugin} through node {via} racing {what} of node {target} (its runner: {}); failed tries {failed:?}",
                            runner.is_some()
                        );
                    }
                    _ => {
                        let ms = common::chaos::freeze_ms(&mut rng, freezes);
                        freezes += 1;
                        let frozen_at = Instant::now();
                        nats.freeze(path);
                        let (addr, stale_w) = (weirs.addr(2), w.clone());
                        let stale = std::thread::spawn(move || {
                            common::weir_cli(
                                &addr,
                                &["plugin", "upgrade", plugin, "--wasm", &stale_w],
                                "",
                            )
                        });
                        std::thread::sleep(Duration::from_millis(500));
                        let failed = upgrade_until_ok(&weirs.addr(1), plugin, &w);
                        std::thread::sleep(
                            Duration::from_millis(ms).saturating_sub(frozen_at.elapsed()),
                        );
                        nats.thaw(path);
                        let (ok, _, err) = stale.join().unwrap();
                        println!(
                            "cycle {cycle} at {at:?}: froze {server} for {ms} ms; upgrade of {plugin} (run by node {runner:?}) through node 2 answered {}, through node 1 acknowledged after failed tries {failed:?}",
                            if ok { "ok".to_string() } else { err.trim().to_string() }
                        );
                    }
                }
                weirs.wait_all_run(&format!("after cycle {cycle} (seed {seed})"));
            }
            _ => {
                let new = format!("pc.{cycle}");
                create_topic_until_ok(&weirs.addr(1), &new, 2);
                points_outputs.push(new.clone());
                let w = wasms["points"].clone();
                let runner = weirs.runner(&weirs.list(), "points");
                match rng.random_range(0..3) {
                    fault @ (0 | 1) => {
                        let target = runner.unwrap_or_else(|| weirs.other_than(None, &mut rng));
                        let via = weirs.other_than(Some(target), &mut rng);
                        let (addr, output) = (weirs.addr(via), new.clone());
                        let delay = rng.random_range(0..1000);
                        let admin = std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(delay));
                            let removing = remove_points(&addr);
                            (removing, deploy_points(&addr, &w, &output, &[]))
                        });
                        std::thread::sleep(Duration::from_millis(rng.random_range(0..2000)));
                        let what = if fault == 0 {
                            let fresh = weirs.kill9_restart(target, rng.random_range(300..1500));
                            format!("kill -9 (restart on an empty data dir: {fresh})")
                        } else {
                            weirs.pause(target, 6500);
                            "SIGSTOP for 6.5 s".to_string()
                        };
                        let (removing, (acked, deploying)) = admin.join().unwrap();
                        println!(
                            "cycle {cycle} at {at:?}: removed points and redeployed it to {new} through node {via} racing {what} of node {target} (its runner: {}); acknowledged: {acked}; failed tries {removing:?} {deploying:?}",
                            runner.is_some()
                        );
                        // Every node's view of the registry follows within moments.
                        weirs.wait_listed(
                            &format!("cycle {cycle} (seed {seed}): points redeployed to {new}"),
                            |l| outputs_of(l, "points") == Some(vec![new.clone()]),
                        );
                        points_output = new.clone();
                    }
                    _ => {
                        // Issue 25's second defect: a remove through a healthy node, a deploy
                        // through the node behind the frozen server, another through a healthy
                        // node.
                        let other = format!("pc.{cycle}b");
                        common::cli_ok(
                            &weirs.addr(1),
                            &["topic", "create", &other, "--partitions", "2"],
                            "",
                        );
                        points_outputs.push(other.clone());
                        let ms = common::chaos::freeze_ms(&mut rng, freezes);
                        freezes += 1;
                        // The remove before the freeze (node 2 knows points is gone, and its
                        // deploy waits on the frozen server) or during it (node 2 may refuse
                        // from what it last saw).
                        let remove_first = rng.random_bool(0.5);
                        let removing = if remove_first {
                            let removing = remove_points(&weirs.addr(1));
                            let deadline = Instant::now() + Duration::from_secs(30);
                            loop {
                                let listed =
                                    common::weir_cli(&weirs.addr(2), &["plugin", "list"], "").1;
                                if plugin_block(&listed, "points").is_none() {
                                    break;
                                }
                                assert!(
                                    Instant::now() < deadline,
                                    "node 2 still lists points 30 s after its remove:\n{listed}"
                                );
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            removing
                        } else {
                            Vec::new()
                        };
                        let frozen_at = Instant::now();
                        nats.freeze(path);
                        let removing = if remove_first {
                            removing
                        } else {
                            remove_points(&weirs.addr(1))
                        };
                        let (addr, stale_w, output) = (weirs.addr(2), w.clone(), other.clone());
                        let stale = std::thread::spawn(move || {
                            let args = deploy_points_args(&stale_w, &output);
                            let args: Vec<&str> = args.iter().map(String::as_str).collect();
                            common::weir_cli(&addr, &args, "")
                        });
                        std::thread::sleep(Duration::from_millis(500));
                        let (acked, deploying) =
                            deploy_points(&weirs.addr(1), &w, &new, &[other.clone()]);
                        std::thread::sleep(
                            Duration::from_millis(ms).saturating_sub(frozen_at.elapsed()),
                        );
                        nats.thaw(path);
                        let (stale_ok, _, stale_err) = stale.join().unwrap();
                        assert!(
                            !(acked && stale_ok),
                            "cycle {cycle} (seed {seed}): two deployments of points acknowledged, to {new} through node 1 and to {other} through node 2"
                        );
                        // What is listed is the acknowledged one (once the views settle).
                        let listed = weirs.wait_listed(
                            &format!(
                                "cycle {cycle} (seed {seed}): deploys to {new} through node 1 \
                                 (acknowledged: {acked}) and to {other} through node 2 \
                                 (acknowledged: {stale_ok})"
                            ),
                            |l| {
                                let outputs = outputs_of(l, "points");
                                match (acked, stale_ok) {
                                    (true, _) => outputs == Some(vec![new.clone()]),
                                    (_, true) => outputs == Some(vec![other.clone()]),
                                    _ => outputs.is_some(),
                                }
                            },
                        );
                        let outputs = outputs_of(&listed, "points");
                        points_output = outputs.unwrap().remove(0);
                        println!(
                            "cycle {cycle} at {at:?}: froze {server} for {ms} ms; removed points through node 1 (before the freeze: {remove_first}; failed tries {removing:?}); deploy to {other} through node 2 answered {}; deploy to {new} through node 1 acknowledged: {acked} ({deploying:?}); points writes to {points_output}",
                            if stale_ok { "ok".to_string() } else { stale_err.trim().to_string() }
                        );
                    }
                }
                weirs.wait_all_run(&format!("after cycle {cycle} (seed {seed})"));
            }
        }
    }
    all_begun.store(true, Ordering::Relaxed);
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
        (points_output.as_str(), payments.len()),
        ("red-envelope.grants", eligible),
        ("order.created", STOCK as usize),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut counts = Vec::new();
        for (topic, _) in want_outputs {
            counts.push(read_topic(&client, topic).await.len());
        }
        let rejected = read_topic(&client, "order.rejected").await.len();
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
        let key = format!("balance/{user}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let value = loop {
            match client.get_state("points", key.as_bytes()).await {
                Ok(found) => break found,
                Err(e) => assert!(Instant::now() < deadline, "points' {key}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let (value, _) = value.unwrap_or_else(|| panic!("points has no {key} (seed {seed})"));
        let got: u64 = serde_json::from_slice(&value).unwrap();
        assert_eq!(got, *want, "{user}'s balance (seed {seed})");
    }
    // Every topic points wrote to (a redeployment from the earliest payment writes them all
    // again to its new topic): at most one credit per payment, each of a real payment; the
    // topic it writes to now, one per payment.
    for topic in &points_outputs {
        let credited = read_topic(&client, topic).await;
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        for c in &credited {
            *seen.entry(c["order"].as_u64().unwrap()).or_default() += 1;
        }
        let twice: Vec<(&u64, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{topic} (seed {seed}): {} of {} payments credited more than once (order, times): {:?}",
            twice.len(),
            seen.len(),
            &twice[..twice.len().min(20)]
        );
        let unknown: Vec<&u64> = seen.keys().filter(|o| !payments.contains_key(o)).collect();
        assert!(
            unknown.is_empty(),
            "{topic}: credits of no payment {unknown:?}"
        );
        if *topic == points_output {
            assert_eq!(
                (credited.len(), seen.len()),
                (payments.len(), payments.len()),
                "one credit per payment in {topic}, the topic points writes to (seed {seed})"
            );
        }
        println!("{topic}: {} credits, none twice", credited.len());
    }
    let grants = read_topic(&client, "red-envelope.grants").await;
    let granted: BTreeSet<&str> = grants.iter().filter_map(|g| g["user"].as_str()).collect();
    assert_eq!(
        (grants.len(), granted.len()),
        (eligible, eligible),
        "one envelope per user with 3 paid orders"
    );
    let created = read_topic(&client, "order.created").await;
    let rejected = read_topic(&client, "order.rejected").await;
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
        "plugin chaos passed at {:?}: {} payments, {} requests, {eligible} envelopes, {freezes} freezes",
        started.elapsed(),
        payments.len(),
        requests.len()
    );
    drop(weirs);
    drop(nats);
}
