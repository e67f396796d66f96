//! Project tasks: `cargo xtask test` (the one test command, also what CI runs),
//! `cargo xtask demo` (the README's first command), `cargo xtask bench` (BENCHMARKS.md) and
//! `cargo xtask nats-server` (installs the pinned NATS server) and `cargo xtask cluster` (a
//! local JetStream cluster with two weir nodes).
//!
//! Each task installs what it needs first (the `wasm32-wasip2` target for plugins; for the
//! tests, Debian's `chromium` for the status-page test), so a fresh machine with only rustup
//! and cargo can run them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod bench;
mod bench_cluster;
mod bench_kafka;
mod check;
mod cluster;
mod kafka_clients;
mod nats;
mod server;

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("check") => check::check(),
        Some("demo") => demo(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("nats-server") => nats::install(),
        Some("kafka-clients") => kafka_clients::install(),
        Some("cluster") => cluster::cluster(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <test [cargo test args]|check|demo [--cluster|--kafka]|bench [--records N]|nats-server|kafka-clients|cluster [--sync-always] [--fresh]>");
            std::process::exit(2);
        }
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Installs the wasm target plugins are built for, if it is missing.
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == WASM_TARGET) =>
        {
            Ok(())
        }
        Ok(_) => run(Command::new("rustup").args(["target", "add", WASM_TARGET])),
        Err(e) => bail!("rustup is needed to install the {WASM_TARGET} target: {e}"),
    }
}

/// Finds headless Chromium for the status-page test, installing Debian's `chromium` package
/// when it is missing and this is root with apt-get. When that cannot be done the test itself
/// fails with a message saying what to install.
fn ensure_chromium() -> Result<()> {
    if std::env::var_os("WEIR_CHROMIUM").is_some()
        || ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .any(|p| Path::new(p).exists())
    {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !Path::new("/usr/bin/apt-get").exists() {
        eprintln!("warning: chromium is missing and cannot be installed here (needs root and apt-get); the status-page test will fail and say so");
        return Ok(());
    }
    apt_install("chromium")
}

/// `apt-get install -y PACKAGE` (a `name=version` pins it), updating the package lists first
/// if the install fails without them (a fresh machine).
fn apt_install(package: &str) -> Result<()> {
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("{package} is missing and apt-get is not here to install it: install it by hand");
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    eprintln!("+ apt-get install -y {package}");
    if !install().is_ok_and(|s| s.success()) {
        run(Command::new("apt-get").arg("update"))?;
        if !install().is_ok_and(|s| s.success()) {
            bail!("apt-get install {package} failed (as root: apt-get install {package})");
        }
    }
    Ok(())
}

/// Builds every crate under `plugins/` for wasm32-wasip2 (profile `plugin`); returns the
/// directory holding the `.wasm` files.
fn build_plugins() -> Result<PathBuf> {
    ensure_wasm_target()?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir("plugins")? {
        let path = entry?.path();
        if path.join("Cargo.toml").exists() {
            names.push(
                path.file_name()
                    .expect("dir name")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    names.sort();
    let mut cmd = cargo();
    cmd.args(["build", "--target", WASM_TARGET, "--profile", "plugin"]);
    for name in &names {
        cmd.args(["-p", name]);
    }
    run(&mut cmd)?;
    let dir = std::env::current_dir()?
        .join("target")
        .join(WASM_TARGET)
        .join("plugin");
    for name in &names {
        let wasm = dir.join(format!("{}.wasm", name.replace('-', "_")));
        if !wasm.exists() {
            bail!("building plugin {name} produced no {}", wasm.display());
        }
    }
    Ok(dir)
}

/// The Python and JavaScript plugins under `examples/` the tests and benchmarks deploy next to
/// the Rust ones, built by `weir` (`plugin build` installs componentize-py / componentize-qjs
/// into each project, pinned) into `examples/NAME/target/`.
fn build_example_plugins(weir: &Path) -> Result<()> {
    if !weir.exists() {
        bail!("{} has not been built", weir.display());
    }
    for example in ["examples/points-py", "examples/points-js"] {
        run(Command::new(weir).args(["plugin", "build", example]))?;
    }
    Ok(())
}

/// The one test command: set-up, then every test of the workspace. Ends with one summary
/// line (`weir: N passed, N failed`) counted over every test binary cargo ran.
fn test(extra: &[String]) -> Result<()> {
    let started = Instant::now();
    check::check()?;
    ensure_chromium()?;
    // The cluster tests run weir over a local JetStream cluster of the pinned nats-server.
    nats::ensure()?;
    // The Kafka-protocol tests run real Kafka clients: confluent-kafka and kcat.
    kafka_clients::ensure()?;
    let plugin_dir = build_plugins()?;
    // Build the tests (and the `weir` binary they run) first: that binary builds the Python
    // and JavaScript example plugins, as a plugin author would.
    run(cargo()
        .args(["test", "--workspace", "--no-run"])
        .args(extra.iter().take_while(|a| *a != "--")))?;
    build_example_plugins(Path::new("target/debug/weir"))?;
    // The memory soak measures the server's RSS: run beside 80 other tests on two cores, it
    // measured their contention (plugins lagging, buffers growing) as much as the server.
    // The full suite skips it and it runs alone afterwards (and must have run: one test
    // passed); with any extra arguments everything runs as asked, in one `cargo test`.
    let mut runs: Vec<Vec<String>> = Vec::new();
    if extra.is_empty() {
        runs.push(
            ["--", "--skip", SOAK_TEST]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        runs.push(
            ["--test", "integration", "--", "--exact", SOAK_TEST]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
    } else {
        runs.push(extra.to_vec());
    }
    let (mut passed, mut failed, mut ok) = (0u64, 0u64, true);
    let alone = runs.len() > 1;
    for (i, args) in runs.into_iter().enumerate() {
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--no-fail-fast"])
            .args(&args)
            .env("WEIR_PLUGIN_DIR", &plugin_dir)
            .stdout(Stdio::piped());
        let (p, f, success) = run_counting(cmd)?;
        if alone && i == 1 && p + f != 1 {
            bail!("{SOAK_TEST} did not run ({p} passed, {f} failed): was it renamed? update SOAK_TEST in xtask/src/main.rs");
        }
        passed += p;
        failed += f;
        ok &= success;
    }
    println!("weir: {passed} passed, {failed} failed");
    if !ok || failed > 0 {
        bail!("tests failed after {:.0?}", started.elapsed());
    }
    if passed == 0 {
        bail!("no test ran");
    }
    eprintln!("all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The memory soak's short version, run alone (see `test`).
const SOAK_TEST: &str = "hardening::memory_stays_flat_under_a_steady_load";

/// Runs `cargo test` streaming its output; the passed and failed counts and whether it succeeded.
fn run_counting(mut cmd: Command) -> Result<(u64, u64, bool)> {
    eprintln!("+ {cmd:?}");
    let mut child = cmd.spawn().context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split("; ").find_map(|part| {
                    part.trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .strip_suffix(word)?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            };
            passed += count(" passed").unwrap_or(0);
            failed += count(" failed").unwrap_or(0);
        }
    }
    Ok((passed, failed, child.wait()?.success()))
}

fn build_release() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "weir",
        "-p",
        "quickstart",
        "-p",
        "flash-sale",
    ]))?;
    Ok(PathBuf::from("target/release/weir"))
}

/// The README's first command: builds weir, the plugins and the flash-sale load generator
/// (release), then runs the seed's flash sale twice on fresh data directories: once clean and
/// once with `kill -9` mid-run, printing the verified totals of both (examples/flash-sale).
/// With `--cluster`, the second run is on three weir nodes over a 3-node JetStream cluster it
/// starts on loopback (in `target/demo-nats`, installing the pinned nats-server), with the
/// nodes running the order and points plugins killed mid-drain. With `--kafka`, the second
/// run's requests and payments are produced through weir's Kafka listener by confluent-kafka
/// (installed as `cargo xtask kafka-clients` does).
fn demo(args: &[String]) -> Result<()> {
    let (cluster, kafka) = match args {
        [] => (false, false),
        [a] if a == "--cluster" => (true, false),
        [a] if a == "--kafka" => (false, true),
        _ => bail!("usage: cargo xtask demo [--cluster|--kafka]"),
    };
    let nats_bin = if cluster { Some(nats::ensure()?) } else { None };
    let python = if kafka {
        Some(kafka_clients::ensure_confluent_kafka()?)
    } else {
        None
    };
    let plugins = build_plugins()?;
    build_release()?;
    let mut cmd = Command::new("target/release/flash-sale");
    cmd.args([
        "demo",
        "--weir",
        "target/release/weir",
        "--wasm-dir",
        plugins.to_str().expect("utf-8 path"),
    ]);
    if let Some(python) = python {
        cmd.arg("--kafka").arg(python);
    }
    let _nats = match nats_bin {
        Some(bin) => {
            let dir = workspace_root().join("target/demo-nats");
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            eprintln!(
                "Starting 3 nats-server nodes (JetStream, R3) in {} ...",
                dir.display()
            );
            let nats =
                weir_cluster::NatsCluster::start(&bin, &dir, 3, weir_cluster::SyncMode::Default)
                    .map_err(anyhow::Error::msg)?;
            cmd.args(["--cluster", &nats.url_list()]);
            Some(nats)
        }
        None => None,
    };
    run(&mut cmd)
}
