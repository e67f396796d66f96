//! Cluster mode as an operator sees it: a deploy naming a misspelt topic refused at once, and
//! `weir lag` saying which node runs a plugin (the table's "runs on node", the JSON's `node`).

use crate::common;

use std::time::{Duration, Instant};

use common::WeirProcess;
use weir_api::{Client, Code, Deploy};

/// A fresh 3-node JetStream cluster under `dir` and `n` `weir serve --log` nodes on it (the
/// lag sampled every 200 ms), with `points.wasm` written into `dir`.
fn nodes(dir: &std::path::Path, n: usize) -> (weir_cluster::NatsCluster, Vec<WeirProcess>) {
    let nats = common::nats_cluster(dir);
    let urls = nats.url_list();
    let nodes = (0..n)
        .map(|i| {
            WeirProcess::spawn(
                &dir.join(format!("node{i}")),
                "127.0.0.1:0",
                &["--log", &urls, "--lag-sample-ms", "200"],
            )
        })
        .collect();
    std::fs::write(dir.join("points.wasm"), common::plugin_wasm("points")).unwrap();
    (nats, nodes)
}

fn deploy_points(addr: &str, dir: &std::path::Path) {
    common::cli_ok(
        addr,
        &[
            "plugin",
            "deploy",
            "points",
            "--wasm",
            dir.join("points.wasm").to_str().unwrap(),
            "--input",
            "order.paid",
            "--output",
            "points.credited",
        ],
        "",
    );
}

/// A deploy naming an input or output topic the shared log does not have is refused with
/// NOT_FOUND at once. Before, each unknown name was looked up 20 times, 500 ms apart (the
/// wait meant for a topic another node is creating), so the refusal came after 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_deploy_naming_a_missing_topic_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nodes) = nodes(dir.path(), 1);
    let addr = &nodes[0].addr;
    common::cli_ok(addr, &["topic", "create", "order.paid"], "");
    common::cli_ok(addr, &["topic", "create", "points.credited"], "");
    // A good deploy first: the misspelt ones below find the component compiled already, so
    // their time is the topic lookup's.
    deploy_points(addr, dir.path());
    let client = Client::connect(addr).await.unwrap();
    let wasm = common::plugin_wasm("points").to_vec();
    for (input, output, missing) in [
        ("ordre.paid", "points.credited", "ordre.paid"),
        ("order.paid", "points.credit", "points.credit"),
    ] {
        let started = Instant::now();
        let refused = client
            .deploy_plugin(Deploy {
                name: "points-2".into(),
                wasm: wasm.clone(),
                input: input.into(),
                outputs: vec![output.into()],
                ..Default::default()
            })
            .await
            .expect_err("a deploy naming a missing topic was accepted");
        let took = started.elapsed();
        assert_eq!(refused.code(), Some(Code::NotFound), "{refused}");
        assert!(refused.to_string().contains(missing), "{refused}");
        assert!(
            took < Duration::from_secs(2),
            "refused after {took:?}: {refused}"
        );
    }
}

/// The node `weir lag points` through `addr` names in its JSON, and whether its table says the
/// same ("runs on node ..."); None while `addr` does not know the plugin yet.
fn lag_node(addr: &str) -> Option<(String, bool)> {
    let (_, table, _) = common::weir_cli(addr, &["lag", "points"], "");
    let (_, json, _) = common::weir_cli(addr, &["lag", "points", "--json"], "");
    let node = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["type"] == "consumer")?["node"]
        .as_str()?
        .to_string();
    let in_table = table.contains(&format!("runs on node {node}\n"));
    Some((node, in_table))
}

/// `weir lag` in cluster mode says which node runs a plugin, through every node: in the
/// table ("runs on node ID (HOST:PORT)") and in `--json` (`"node"`, which it lacked); the
/// same node through both, one of the two; a consumer group has none.
#[test]
fn weir_lag_says_which_node_runs_the_plugin_through_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nodes) = nodes(dir.path(), 2);
    let (a, b) = (&nodes[0].addr, &nodes[1].addr);
    common::cli_ok(a, &["topic", "create", "order.paid"], "");
    common::cli_ok(a, &["topic", "create", "points.credited"], "");
    deploy_points(a, dir.path());
    let hosts = [a, b].map(|n| n.trim_start_matches("http://").to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // B learns of the plugin from the shared store within a moment (NOT_FOUND until
        // then), and the plugin may move once between the nodes: both must agree.
        let (through_a, through_b) = (lag_node(a), lag_node(b));
        let agreed = match (&through_a, &through_b) {
            (Some((on_a, true)), Some((on_b, true))) => {
                on_a == on_b && hosts.iter().any(|h| on_a.ends_with(&format!("({h})")))
            }
            _ => false,
        };
        if agreed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "weir lag does not name the node running points: through A {through_a:?}, through B {through_b:?} (nodes {hosts:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A consumer group has no node.
    let client = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = Client::connect(b).await.unwrap();
        client
            .commit_offsets("audit", "order.paid", &[(0, 0)])
            .await
            .unwrap();
        client
    });
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, json, _) = common::weir_cli(b, &["lag", "audit", "--json"], "");
        let group = json
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["type"] == "consumer");
        if let Some(group) = group {
            assert!(group["node"].is_null(), "{json}");
            break;
        }
        assert!(Instant::now() < deadline, "no lag of group audit: {json}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A cluster node whose NATS servers are all gone still stops on SIGTERM within the request
/// time-out, as an orchestrator expects before it sends SIGKILL (Kubernetes waits 30 s). It
/// used to keep following the shared log after the signal: one tail read per partition, each
/// waiting out the 10 s request time-out, and another round after that.
#[test]
fn a_cluster_node_whose_nats_servers_are_gone_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = common::nats_cluster(dir.path());
    let log = dir.path().join("node.log");
    let node = WeirProcess::spawn_logging(
        &dir.path().join("node"),
        "127.0.0.1:0",
        &["--log", &nats.url_list()],
        &log,
    );
    std::fs::write(
        dir.path().join("points.wasm"),
        common::plugin_wasm("points"),
    )
    .unwrap();
    let addr = node.addr.clone();
    for t in 0..6 {
        common::cli_ok(
            &addr,
            &["topic", "create", &format!("t{t}"), "--partitions", "4"],
            "",
        );
    }
    common::cli_ok(&addr, &["topic", "create", "order.paid"], "");
    common::cli_ok(&addr, &["topic", "create", "points.credited"], "");
    deploy_points(&addr, dir.path());
    // A backlog, so that the plugin is committing and forwarding when the servers go.
    let orders: String = (0..20_000)
        .map(|i| format!(r#"{{"order":{i},"user":"u{}","amount":1}}"#, i % 100) + "\n")
        .collect();
    common::cli_ok(&addr, &["publish", "order.paid"], &orders);
    for i in 0..nats.nodes.len() {
        nats.kill(i);
    }
    // Its loops are now waiting on requests nobody answers.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let pid = node.pid();
    let exited = std::thread::spawn(move || node.terminate(Duration::from_secs(25)));
    let status = exited.join();
    let took = started.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines
        .iter()
        .position(|l| l.contains("Shutting down"))
        .unwrap_or(lines.len().saturating_sub(40));
    let after = &lines[from..];
    assert!(
        status.is_ok(),
        "weir serve (pid {pid}) did not exit within 25 s of SIGTERM; its log's end:\n{}",
        after.join("\n")
    );
    println!(
        "stopped {took:?} after SIGTERM; its log since:\n{}",
        after.join("\n")
    );
}
