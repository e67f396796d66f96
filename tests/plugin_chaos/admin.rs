//! Plugin administration through the CLI as the chaos test does it: what a node lists, and
//! upgrades, removes and deploys retried through a fault.

use super::*;

/// The lines of `weir plugin list` about `plugin`: its header and the indented ones after.
pub(super) fn plugin_block(listed: &str, plugin: &str) -> Option<String> {
    let header = format!("{plugin} v");
    let mut lines = listed.lines().skip_while(|l| !l.starts_with(&header));
    let first = lines.next()?;
    let rest: Vec<&str> = lines.take_while(|l| l.starts_with(' ')).collect();
    Some(
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The output topics `weir plugin list` gives `plugin`, if it is deployed.
pub(super) fn outputs_of(listed: &str, plugin: &str) -> Option<Vec<String>> {
    let block = plugin_block(listed, plugin)?;
    let header = block.lines().next()?;
    let inside = header.split_once("-> [")?.1.split_once(']')?.0;
    Some(inside.split(", ").map(str::to_string).collect())
}

/// `weir plugin upgrade NAME --wasm W` through `addr` until one is acknowledged (90 s);
/// returns the failed attempts.
pub(super) fn upgrade_until_ok(addr: &str, name: &str, wasm: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failures = Vec::new();
    loop {
        let (ok, _, err) = common::weir_cli(addr, &["plugin", "upgrade", name, "--wasm", wasm], "");
        if ok {
            return failures;
        }
        failures.push(err.trim().to_string());
        assert!(
            Instant::now() < deadline,
            "no upgrade of {name} through {addr} acknowledged within 90 s: {failures:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `weir topic create` through `addr`, retried while the engine is unavailable (a leader
/// election after a fault: the CLI says to retry); an attempt that failed may have landed, so
/// "already exists" after a failed try is success.
pub(super) fn create_topic_until_ok(addr: &str, topic: &str, partitions: u32) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let partitions = partitions.to_string();
    let mut failures: Vec<String> = Vec::new();
    loop {
        let (ok, _, err) = common::weir_cli(
            addr,
            &["topic", "create", topic, "--partitions", &partitions],
            "",
        );
        if ok || (!failures.is_empty() && err.contains("already exists")) {
            return;
        }
        assert!(
            err.contains("(Unavailable)") && Instant::now() < deadline,
            "creating {topic} through {addr} failed: {err} (after {failures:?})"
        );
        failures.push(err.trim().to_string());
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `weir plugin remove points` through `addr` until the listing through it has no points (an
/// attempt that failed may have landed); returns the failed attempts.
pub(super) fn remove_points(addr: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failures = Vec::new();
    loop {
        let (ok, _, err) = common::weir_cli(addr, &["plugin", "remove", "points"], "");
        if ok {
            return failures;
        }
        failures.push(err.trim().to_string());
        let listed = common::weir_cli(addr, &["plugin", "list"], "").1;
        if plugin_block(&listed, "points").is_none() {
            return failures;
        }
        assert!(
            Instant::now() < deadline,
            "points not removed through {addr} within 90 s: {failures:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The deploy of points from the earliest payment to `output` (where it writes its credits,
/// `--config output=`).
pub(super) fn deploy_points_args(wasm: &str, output: &str) -> Vec<String> {
    [
        "plugin",
        "deploy",
        "points",
        "--wasm",
        wasm,
        "--input",
        "order.paid",
        "--output",
        output,
        "--config",
        &format!("output={output}"),
        "--from",
        "earliest",
    ]
    .map(str::to_string)
    .to_vec()
}

/// Deploys points to `output` through `addr` (right after an acknowledged remove) until an
/// attempt is acknowledged (true), or the listing through `addr` shows points writing to
/// `output` or to one of `racing` (false: a failed attempt landed, or a racing deployment
/// did); the failed attempts. Points listed with any other output for 90 s means the removed
/// deployment is back.
pub(super) fn deploy_points(
    addr: &str,
    wasm: &str,
    output: &str,
    racing: &[String],
) -> (bool, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failures = Vec::new();
    loop {
        let args = deploy_points_args(wasm, output);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = common::weir_cli(addr, &args, "");
        if ok {
            return (true, failures);
        }
        failures.push(err.trim().to_string());
        let listed = common::weir_cli(addr, &["plugin", "list"], "").1;
        if let Some(outputs) = outputs_of(&listed, "points") {
            if outputs == [output] || racing.iter().any(|r| outputs == [r.as_str()]) {
                return (false, failures);
            }
        }
        assert!(
            Instant::now() < deadline,
            "points removed (acknowledged) then not deployed to {output} through {addr} within \
             90 s; its deploys answered {failures:?}; it lists:\n{listed}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
