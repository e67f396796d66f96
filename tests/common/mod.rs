//! Helpers shared by the integration tests: servers in-process or as a real `weir` process.
#![allow(dead_code)]

pub mod chaos;
pub mod idem;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use weir_api::Client;
use weir_core::Record;
use weir_log::FsyncPolicy;
use weir_server::server::{self, RunningServer, ServerConfig};

/// Starts an in-process server on `127.0.0.1:0` over `dir`.
pub async fn start_server(dir: &Path) -> RunningServer {
    start_with(dir, |_| {}).await
}

/// Starts an in-process server after letting `tweak` adjust its config.
pub async fn start_with(dir: &Path, tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut config = ServerConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.fsync = FsyncPolicy::Always;
    config.cache_bytes = 64 * 1024 * 1024;
    tweak(&mut config);
    server::start(config, CancellationToken::new())
        .await
        .expect("server starts")
}

/// `n` records with values `prefix-i`.
pub fn records(prefix: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::from_value(format!("{prefix}-{i}")))
        .collect()
}

/// A keyed record.
pub fn keyed(key: &str, value: &str) -> Record {
    Record {
        key: Some(Bytes::from(key.to_string())),
        ..Record::from_value(value.to_string())
    }
}

/// Path of the `weir` binary cargo built for this test run.
pub fn weir_bin() -> &'static str {
    env!("CARGO_BIN_EXE_weir")
}

/// A `weir serve` child process.
pub struct WeirProcess {
    pub child: Child,
    pub addr: String,
}

impl WeirProcess {
    /// Spawns `weir serve` on `listen` over `dir` and waits for its "listening" line.
    pub fn spawn(dir: &Path, listen: &str, extra: &[&str]) -> WeirProcess {
        Self::spawn_with(dir, listen, extra, "warn", Stdio::inherit())
    }

    /// Spawns with the server's info-level log written to `log`.
    pub fn spawn_logging(dir: &Path, listen: &str, extra: &[&str], log: &Path) -> WeirProcess {
        let file = std::fs::File::create(log).expect("create the server log");
        Self::spawn_with(dir, listen, extra, "info", Stdio::from(file))
    }

    fn spawn_with(
        dir: &Path,
        listen: &str,
        extra: &[&str],
        level: &str,
        stderr: Stdio,
    ) -> WeirProcess {
        let mut child = Command::new(weir_bin())
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", listen])
            .args(if extra.contains(&"--cache-mb") {
                &[][..]
            } else {
                &["--cache-mb", "64"][..]
            })
            .args(extra)
            .env("WEIR_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn weir serve");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).expect("read weir serve stdout");
        let addr = line
            .trim()
            .strip_prefix("weir listening on ")
            .unwrap_or_else(|| panic!("weir serve did not start: {line:?}"))
            .to_string();
        WeirProcess {
            child,
            addr: format!("http://{addr}"),
        }
    }

    /// Spawns `weir serve` on 127.0.0.1:`port`, trying again for up to 10 s: the ports of a
    /// process just killed may take a moment to be free again.
    pub fn spawn_on_port(dir: &Path, port: u16, extra: &[&str]) -> WeirProcess {
        for _ in 0..100 {
            let attempt =
                std::panic::catch_unwind(|| Self::spawn(dir, &format!("127.0.0.1:{port}"), extra));
            if let Ok(process) = attempt {
                return process;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("weir serve {extra:?} did not start on port {port}");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), 15);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "weir serve did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Runs the `weir` CLI against `server` with `stdin`; returns (exit ok, stdout, stderr).
pub fn weir_cli(server: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(weir_bin())
        .args(args)
        .env("WEIR_SERVER", server)
        .env("WEIR_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weir");
    // Written from its own thread: a CLI that answers as it reads (a line per record
    // published) would fill its stdout pipe while we still write, and both would wait.
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || match input.write_all(stdin.as_bytes()) {
        // The CLI may stop reading early (it failed): its answer says why.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The compiled wasm of an example plugin. `cargo xtask test` builds them first; a missing
/// artifact is a failure that says so, never a skipped test.
pub fn plugin_wasm(name: &str) -> bytes::Bytes {
    let dir = plugin_dir();
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    match std::fs::read(&path) {
        Ok(bytes) => bytes.into(),
        Err(e) => panic!(
            "plugin artifact {} is missing ({e}); run `cargo xtask test`, which builds the plugins for wasm32-wasip2 before the tests",
            path.display()
        ),
    }
}

/// Polls `check` every 20 ms until it is true; fails after `secs` seconds with `what`.
pub async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A paid order as the points and red-envelope plugins read it: keyed by user, id `order-N`.
pub fn paid(order: u64, user: &str, amount: f64) -> Record {
    Record {
        key: Some(Bytes::from(user.to_string())),
        id: Some(format!("order-{order}")),
        ..Record::from_value(format!(
            r#"{{"order":{order},"user":"{user}","amount":{amount}}}"#
        ))
    }
}

/// The component of a Python or JavaScript example plugin (`examples/NAME`), which `cargo
/// xtask test` builds with `weir plugin build`; a missing one fails saying so.
pub fn example_wasm(name: &str) -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .join("target")
        .join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.exists(),
        "plugin artifact {} is missing; run `cargo xtask test`, which builds it with `weir plugin build examples/{name}` before the tests",
        path.display()
    );
    path
}

/// A local runtime running the chaos plugin (misbehaves on request) from `in` to `chaos.out`.
pub async fn local_chaos() -> weir_server::local::LocalRuntime {
    let local = weir_server::local::LocalRuntime::start().await.unwrap();
    local.create_topic("in", 1).await.unwrap();
    local.create_topic("chaos.out", 1).await.unwrap();
    local
        .deploy("chaos", plugin_wasm("chaos"), "in", &["chaos.out"], &[])
        .await
        .unwrap();
    local
}

/// The points plugin's balance of `user`, if it has one.
pub async fn balance(client: &Client, user: &str) -> Option<u64> {
    client
        .get_state("points", format!("balance/{user}").as_bytes())
        .await
        .unwrap()
        .map(|(v, _)| serde_json::from_slice(&v).unwrap())
}

/// The sum of a topic's partition ends: how many records it has ever had.
pub async fn topic_end(client: &Client, topic: &str) -> u64 {
    let info = client.describe_topic(topic).await.unwrap();
    info.partitions.iter().map(|p| p.end_offset).sum()
}

/// The repository's root.
pub fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the CLI against `server` and returns its stdout; fails the test if it fails.
pub fn cli_ok(server: &str, args: &[&str], stdin: &str) -> String {
    let (ok, out, err) = weir_cli(server, args, stdin);
    assert!(ok, "weir {args:?} failed: {err}");
    out
}

/// A chaos test's cycle count and seed from `<prefix>_CYCLES` (default `cycles`) and
/// `<prefix>_SEED` (random), printed so a failing run can be repeated.
pub fn chaos_knobs(prefix: &str, cycles: usize) -> (usize, u64) {
    let var = |name: &str| std::env::var(format!("{prefix}_{name}")).ok();
    let cycles = var("CYCLES").and_then(|v| v.parse().ok()).unwrap_or(cycles);
    let seed = var("SEED")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{prefix}: {cycles} cycles, {prefix}_SEED={seed}");
    (cycles, seed)
}

/// Kills (-9) the leader of `stream` (waiting up to 20 s for the servers to agree on one),
/// keeps it down `down_ms`, restarts it, and returns its name.
pub fn kill_stream_leader(
    nats: &mut weir_cluster::NatsCluster,
    stream: &str,
    down_ms: u64,
) -> String {
    let mut leader = None;
    for _ in 0..200 {
        // Right after an election the servers may not agree on a leader yet.
        leader = nats.stream_leader(stream);
        if leader.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let leader = leader.unwrap_or_else(|| panic!("stream {stream} has no leader within 20 s"));
    nats.kill(leader);
    std::thread::sleep(std::time::Duration::from_millis(down_ms));
    nats.restart(leader).unwrap_or_else(|e| panic!("{e}"));
    nats.nodes[leader].name.clone()
}

/// A 3-node JetStream cluster (R3 streams) on loopback under `dir/nats`, started from the
/// calling thread (the servers die with the test). Needs nats-server: `cargo xtask test`
/// installs it.
pub fn nats_cluster(dir: &Path) -> weir_cluster::NatsCluster {
    let bin = weir_cluster::nats_server_binary(&repo_root()).unwrap_or_else(|e| panic!("{e}"));
    weir_cluster::NatsCluster::start(&bin, &dir.join("nats"), 3, weir_cluster::SyncMode::Default)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Where `cargo xtask test` puts the plugins' wasm (`WEIR_PLUGIN_DIR` overrides).
pub fn plugin_dir() -> std::path::PathBuf {
    std::env::var("WEIR_PLUGIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target/wasm32-wasip2/plugin"))
}

/// The flash sale at CI size against this build's `weir` and plugins.
pub fn small_sale(verbose: bool) -> flash_sale::DemoOptions {
    flash_sale::DemoOptions {
        weir: std::path::PathBuf::from(weir_bin()),
        wasm_dir: plugin_dir(),
        sale: flash_sale::Sale::small(),
        verbose,
    }
}
