//! Plugins across weir nodes on a real JetStream cluster: a plugin moving to a survivor after
//! `kill -9`, the flash sale on three nodes with two killed, plugins operated through any node
//! (placement is in cluster_placement.rs, the chaos test in plugin_chaos.rs).

use crate::common;

use std::time::Duration;

use common::WeirProcess;

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

/// Asks `weir state get points balance/ann --after` the last record of each partition of
/// `topic` through `addr`, once: the answer must not be pending.
fn not_pending_through(addr: &str, topic: &str) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = weir_api::Client::connect(addr).await.unwrap();
        let info = client.describe_topic(topic).await.unwrap();
        for p in info.partitions.iter().filter(|p| p.end_offset > 0) {
            let answer = client
                .get_state_after("points", b"balance/ann", p.partition, p.end_offset - 1)
                .await
                .unwrap();
            assert!(
                !matches!(answer, weir_api::StateAnswer::Pending),
                "{topic}/{} through {addr}: {answer:?}",
                p.partition
            );
        }
    });
}

fn orders(list: &[(&str, u64)]) -> String {
    list.iter()
        .map(|(id, amount)| {
            format!("{{\"key\":\"ann\",\"id\":\"{id}\",\"value\":{{\"order\":1,\"user\":\"ann\",\"amount\":{amount}}}}}\n")
        })
        .collect()
}

/// Two `weir serve --log` nodes on a fresh 3-node JetStream cluster, `points.wasm` in the
/// directory returned (which, like the cluster, must outlive the test).
pub(crate) fn two_nodes() -> (
    tempfile::TempDir,
    weir_cluster::NatsCluster,
    WeirProcess,
    WeirProcess,
) {
    let dir = tempfile::tempdir().unwrap();
    let nats = common::nats_cluster(dir.path());
    let urls = nats.url_list();
    let a = WeirProcess::spawn(&dir.path().join("a"), "127.0.0.1:0", &["--log", &urls]);
    let b = WeirProcess::spawn(&dir.path().join("b"), "127.0.0.1:0", &["--log", &urls]);
    std::fs::write(
        dir.path().join("points.wasm"),
        common::plugin_wasm("points"),
    )
    .unwrap();
    (dir, nats, a, b)
}

/// A plugin deployed on one node of a cluster consumes records published through the other,
/// exactly once; the other node answers its state and says where it runs. When its node is
/// killed (-9) the survivor takes it over from the changelog and carries on: the balance
/// counts every order once (duplicate ids across the failover included), and every output
/// exists once.
#[test]
fn a_plugin_moves_to_the_surviving_node_when_its_node_is_killed() {
    let (dir, _nats, a, b) = two_nodes();
    let wasm = dir.path().join("points.wasm");
    common::cli_ok(
        &a.addr,
        &["topic", "create", "order.paid", "--partitions", "2"],
        "",
    );
    common::cli_ok(&a.addr, &["topic", "create", "points.credited"], "");
    common::cli_ok(
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
    common::cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &orders(&[("o1", 10), ("o2", 20), ("o1", 10), ("o3", 5)]),
    );
    wait_balance(&a.addr, 35);
    // The node not running it answers from the changelog. A deployed it and runs it first;
    // after 10 s it hands it to B if B is the node preferred for it (a slow run gets there).
    wait_balance(&b.addr, 35);
    let listed = common::cli_ok(&b.addr, &["plugin", "list"], "");
    // "runs on node <id> (<address>)": the address whole, so port 3456 is not found in 34567.
    let at = |node: &WeirProcess| format!("({})", node.addr.replace("http://", ""));
    let on_a = listed.contains(&at(&a));
    let (runner, survivor) = if on_a { (a, b) } else { (b, a) };
    assert!(
        listed.contains("runs on node") && listed.contains(&at(&runner)),
        "{listed}"
    );
    runner.kill9();
    common::cli_ok(
        &survivor.addr,
        &["publish", "order.paid", "--json"],
        &orders(&[("o4", 100), ("o2", 20), ("o5", 1000)]),
    );
    wait_balance(&survivor.addr, 1135);
    let listed = common::cli_ok(&survivor.addr, &["plugin", "list"], "");
    assert!(listed.contains(&at(&survivor)), "{listed}");
    let credited = common::cli_ok(
        &survivor.addr,
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
    let nats = common::nats_cluster(dir.path());
    let opts = common::small_sale(std::env::var("WEIR_DEMO_VERBOSE").is_ok());
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

/// Waits until `weir plugin list` through `addr` prints something `check` accepts.
pub(crate) fn wait_listed(addr: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = common::weir_cli(addr, &["plugin", "list"], "").1;
        if check(&listed) {
            return listed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}; plugin list through {addr}:\n{listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `weir plugin list` through one of `addrs` prints something `check` accepts:
/// the node running a plugin shows its partitions' states (the others show standby), and a
/// plugin deployed through one node may move to the node preferred for it after 10 s (on a
/// loaded machine, while the test runs).
fn wait_listed_any(addrs: &[&str], what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        for addr in addrs {
            let listed = common::weir_cli(addr, &["plugin", "list"], "").1;
            if check(&listed) {
                return listed;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}; plugin list through {addrs:?}:\n{}",
            common::weir_cli(addrs[0], &["plugin", "list"], "").1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Upgrade, pause, resume and remove through a node that does not run the plugin reach the
/// node that does (a change from a stale view is refused: runtime/plugins tests).
#[test]
fn plugins_are_operated_through_any_node() {
    let (dir, _nats, a, b) = two_nodes();
    let wasm = dir.path().join("points.wasm");
    let w = wasm.to_str().unwrap();
    common::cli_ok(
        &a.addr,
        &["topic", "create", "order.paid", "--partitions", "2"],
        "",
    );
    common::cli_ok(&a.addr, &["topic", "create", "points.credited"], "");
    let deploy = [
        "plugin",
        "deploy",
        "points",
        "--wasm",
        w,
        "--input",
        "order.paid",
        "--output",
        "points.credited",
    ];
    common::cli_ok(&a.addr, &deploy, "");
    let a_addr = a.addr.replace("http://", "");
    // B knows it, and where it runs; a second deploy of the name through B is refused.
    wait_listed(&b.addr, "B sees points on A", |l| {
        l.contains("runs on node") && l.contains(&a_addr)
    });
    let (ok, _, err) = common::weir_cli(&b.addr, &deploy, "");
    assert!(!ok && err.contains("already deployed"), "{err}");
    // Pause through B: A's partitions pause.
    common::cli_ok(&b.addr, &["plugin", "pause", "points"], "");
    let both = [a.addr.as_str(), b.addr.as_str()];
    wait_listed_any(&both, "the runner pauses points", |l| {
        l.contains("(paused)") && l.matches("  paused").count() == 2
    });
    common::cli_ok(&b.addr, &["plugin", "resume", "points"], "");
    wait_listed_any(&both, "the runner resumes points", |l| {
        l.contains("(deployed)") && l.matches("running").count() == 2
    });
    // Upgrade through B: A runs version 2.
    common::cli_ok(&b.addr, &["plugin", "upgrade", "points", "--wasm", w], "");
    wait_listed(&a.addr, "A runs version 2", |l| l.contains("points v2"));
    common::cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &orders(&[("o1", 10), ("o2", 20)]),
    );
    wait_balance(&a.addr, 30);
    // Through B, which does not run points, `--after` the last record of each partition
    // stops answering pending as soon as A's commit landed (read from the changelog, not
    // from B's view refreshed every second).
    not_pending_through(&b.addr, "order.paid");
    wait_balance(&b.addr, 30);
    // A record points cannot read halts its partition on A; a resume through B restarts it
    // there (the record is tried again and halts it again: a second "halted" log line).
    common::cli_ok(
        &b.addr,
        &["publish", "order.paid", "--key", "ann", "not json"],
        "",
    );
    wait_listed_any(&both, "the runner halts points", |l| l.contains("halted"));
    let halts = || {
        common::cli_ok(&b.addr, &["plugin", "logs", "points"], "")
            .matches("halted")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut before = halts();
    while before == 0 {
        // The log line reaches the store within a moment of the status.
        assert!(
            std::time::Instant::now() < deadline,
            "no halted line in the plugin's log"
        );
        std::thread::sleep(Duration::from_millis(100));
        before = halts();
    }
    common::cli_ok(&b.addr, &["plugin", "resume", "points"], "");
    while halts() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the resume through B did not restart points on A"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Remove through B: gone from A too.
    common::cli_ok(&b.addr, &["plugin", "remove", "points"], "");
    wait_listed(&a.addr, "A forgets points", |l| !l.contains("points v"));
}
