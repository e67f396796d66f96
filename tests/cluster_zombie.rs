//! Plugins on a real cluster when a node loses one or cannot run it (issue 21): a weir node
//! paused past its plugin's lease (SIGSTOP: a GC pause, a frozen VM) while another node took
//! the plugin over must not answer from the state it had; a plugin whose store a node cannot
//! open must not be left running nowhere.

use crate::common;

use std::time::Duration;

use common::WeirProcess;

fn signal(p: &WeirProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(signal)
        .arg(p.child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// `weir state get points balance/ann` through `addr`: the value, if found.
fn balance(addr: &str) -> Option<String> {
    let (found, out, _) = common::weir_cli(addr, &["state", "get", "points", "balance/ann"], "");
    found.then(|| {
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Topics `order.paid` and `points.credited`, and points deployed through `addr` (which runs
/// it first).
fn deploy_points(addr: &str, wasm: &std::path::Path) {
    common::cli_ok(addr, &["topic", "create", "order.paid"], "");
    common::cli_ok(addr, &["topic", "create", "points.credited"], "");
    common::cli_ok(
        addr,
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
}

fn order(id: &str, amount: u64) -> String {
    format!(
        "{{\"key\":\"ann\",\"id\":\"{id}\",\"value\":{{\"order\":1,\"user\":\"ann\",\"amount\":{amount}}}}}\n"
    )
}

/// A runs points; A is frozen past its lease, B takes points over and commits another order;
/// a `state get` sent to A while it is frozen is answered when it resumes — with what B
/// committed, not the balance A had in memory (A confirms its hold at the changelog's end
/// first, finds B's takeover, and reads the tail).
#[test]
fn a_node_resumed_after_losing_its_plugin_answers_what_the_new_runner_committed() {
    let (dir, _nats, a, b) = crate::cluster_plugins::two_nodes();
    deploy_points(&a.addr, &dir.path().join("points.wasm"));
    common::cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &order("o1", 10),
    );
    wait_for("A credits o1", || balance(&a.addr).as_deref() == Some("10"));

    signal(&a, "-STOP");
    let b_host = b.addr.replace("http://", "");
    wait_for("B takes points over", || {
        let listed = common::weir_cli(&b.addr, &["plugin", "list"], "").1;
        listed.contains("runs on node") && listed.contains(&b_host)
    });
    common::cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &order("o2", 20),
    );
    wait_for("B credits o2", || balance(&b.addr).as_deref() == Some("30"));

    // Asked while A is frozen: the request waits in A's socket and is answered on resume,
    // before A's own cluster loop has looked at the leases.
    let asked = {
        let addr = a.addr.clone();
        std::thread::spawn(move || balance(&addr))
    };
    std::thread::sleep(Duration::from_millis(500));
    signal(&a, "-CONT");
    let answered = asked.join().unwrap();
    assert_eq!(
        answered.as_deref(),
        Some("30"),
        "A answered from the state it had before B took points over"
    );
}

/// Plugin `points`'s cursor of input partition 0, as the plugin store lays it out.
fn cursor_key() -> Vec<u8> {
    let mut k = b"c/".to_vec();
    k.extend_from_slice(&0u32.to_be_bytes());
    k.push(b'/');
    k
}

/// The node running points takes it over again after a write of another writer, and cannot
/// open it (a malformed entry in its changelog). It must not count itself the plugin's runner
/// for good: once the entry is mended, points runs again and credits what waited (it stayed
/// marked active, no tick tried again, and the plugin ran nowhere).
#[test]
fn a_plugin_that_could_not_be_opened_runs_again_once_mended() {
    use weir_log::{KvStore, ReplicatedKv};
    let (dir, nats, a, b) = crate::cluster_plugins::two_nodes();
    deploy_points(&a.addr, &dir.path().join("points.wasm"));
    common::cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &order("o1", 10),
    );
    wait_for("o1 credited", || balance(&b.addr).as_deref() == Some("10"));

    // Another writer of the plugin's changelog (this test) leaves a malformed cursor.
    let _blocking = weir_core::blocking::allow();
    let log =
        weir_jetstream::JetStreamLog::connect(weir_jetstream::JetStreamOptions::new(nats.urls()))
            .unwrap();
    let kv = ReplicatedKv::new(
        std::sync::Arc::new(weir_log::MemoryStore::new()),
        std::sync::Arc::new(log),
        "plugin/",
    );
    let write_cursor = |value: Vec<u8>| {
        kv.acquire("plugin/points").unwrap();
        kv.kv_apply("plugin/points", &[(cursor_key(), Some(value))])
            .unwrap();
    };
    write_cursor(b"not a cursor".to_vec());
    // The runner's next commit is refused; it takes points over again and cannot open it.
    common::cli_ok(
        &b.addr,
        &["publish", "order.paid", "--json"],
        &order("o2", 20),
    );
    std::thread::sleep(Duration::from_secs(3));
    // Mended: o1 (offset 0) was committed, o2 waits.
    write_cursor(weir_plugins::store::Cursor::at(1).encode());
    wait_for("points runs again and credits o2", || {
        balance(&b.addr).as_deref() == Some("30")
    });
}
