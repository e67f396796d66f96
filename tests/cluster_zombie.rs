//! A weir node paused past its plugin's lease (SIGSTOP: a GC pause, a frozen VM) while
//! another node took the plugin over and committed more: when it resumes it must not answer
//! from the state it had (issue 21: "a zombie answers reads from its cache").

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
    let wasm = dir.path().join("points.wasm");
    common::cli_ok(&a.addr, &["topic", "create", "order.paid"], "");
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
