//! `cargo xtask bench`: reproduces BENCHMARKS.md against release `weir serve` child
//! processes (publish under each fsync policy with a raw-disk baseline, the points plugin in
//! three languages against the no-op baseline, the memory soak).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::server::Server;
use crate::{build_example_plugins, build_plugins, build_release};

/// Raw disk bandwidth in the same run, the baseline the publish rates are compared with:
/// 256 MiB written sequentially in 1 MiB writes, then fdatasync, in MB/s.
fn disk_baseline() -> Result<f64> {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("weir-disk-baseline-{}", std::process::id()));
    let block = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..256 {
        file.write_all(&block)?;
    }
    file.sync_data()?;
    let mb_per_s = 256.0 * 1.048_576 / started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(mb_per_s)
}

/// Bytes a process has caused to be written to storage (`/proc/<pid>/io` write_bytes).
fn written_bytes(pid: u32) -> Option<f64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))?
        .trim()
        .parse()
        .ok()
}

pub(crate) fn weir(bin: &Path, server: &Server, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("WEIR_SERVER", &server.url)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("weir {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reproduces BENCHMARKS.md: `weir bench publish` against a release `weir serve` under each
/// fsync policy, three runs each; prints every run and the median.
pub fn bench(args: &[String]) -> Result<()> {
    let usage =
        "usage: cargo xtask bench [--records N] [--plugins-only | --publish-only] [--soak [SECONDS]] [--cluster] [--baseline-bin PATH]";
    let (mut records, mut plugins_only, mut soak) = ("1000000".to_string(), false, None);
    let mut publish_only = false;
    let (mut cluster, mut baseline) = (false, None);
    let mut rest = args.iter().peekable();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--records" => records = rest.next().context(usage)?.clone(),
            "--plugins-only" => plugins_only = true,
            "--publish-only" => publish_only = true,
            "--cluster" => cluster = true,
            // Another weir build measured in the same rounds (before/after a change).
            "--baseline-bin" => baseline = Some(PathBuf::from(rest.next().context(usage)?)),
            "--soak" => {
                soak = Some(match rest.peek().and_then(|s| s.parse::<u64>().ok()) {
                    Some(secs) => {
                        rest.next();
                        secs
                    }
                    None => 600,
                })
            }
            _ => bail!(usage),
        }
    }
    if plugins_only && publish_only {
        bail!("--plugins-only and --publish-only leave nothing to run; {usage}");
    }
    let bin = build_release()?;
    if let Some(secs) = soak {
        return bench_soak(&bin, secs);
    }
    if cluster {
        if !plugins_only {
            crate::bench_cluster::bench_cluster(&bin, &records)?;
        }
        if publish_only {
            return Ok(());
        }
        return crate::bench_cluster::bench_cluster_plugins(&bin, baseline.as_deref(), &records);
    }
    if !plugins_only {
        bench_publish(&bin, baseline.as_deref(), &records)?;
    }
    if publish_only {
        return Ok(());
    }
    bench_plugins(&bin, &records)
}

/// `weir bench publish`, 100-byte records, under fsync always and never, three runs each,
/// after three runs of the no-storage ceiling; with `baseline`, that build runs each policy
/// right after this one in every round (before/after a change, in one run).
fn bench_publish(bin: &Path, baseline: Option<&Path>, records: &str) -> Result<()> {
    let disk = disk_baseline()?;
    println!(
        "baseline: raw sequential write of 256 MiB in 1 MiB writes + fdatasync: {disk:.0} MB/s\n"
    );
    // The first "policy" is no storage at all: `weir bench discard-server` decodes each
    // publish and acknowledges it (issue 23's ceiling for durable publish).
    let kafka_python = crate::kafka_clients::ensure()?;
    let mut medians = Vec::new();
    for fsync in ["discard", "always", "never", "kafka-python", "kafka-kcat"] {
        let mut rates = Vec::new();
        let mut baseline_rates = Vec::new();
        for round in 1..=3 {
            rates.push(match fsync.strip_prefix("kafka-") {
                Some(client) => crate::bench_kafka::kafka_produce_run(
                    bin,
                    client,
                    &kafka_python,
                    round,
                    records,
                )?,
                None => publish_run(bin, "", fsync, round, records)?,
            });
            if let Some(before) =
                baseline.filter(|_| !fsync.starts_with("kafka") && fsync != "discard")
            {
                baseline_rates.push(publish_run(
                    before,
                    "baseline build, ",
                    fsync,
                    round,
                    records,
                )?);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let label = match fsync {
            "discard" => "no storage".to_string(),
            "kafka-python" => "Kafka produce, confluent-kafka (fsync always)".to_string(),
            "kafka-kcat" => "Kafka produce, kcat (fsync always)".to_string(),
            _ => format!("fsync {fsync}"),
        };
        let m = median(rates.clone());
        println!("{label}: median {m:.0} records/s (runs: {rates:?})");
        if !baseline_rates.is_empty() {
            let b = median(baseline_rates.clone());
            println!(
                "{label}, baseline build: median {b:.0} records/s (runs: {baseline_rates:?}); this build / baseline {:.2}x",
                m / b
            );
        }
        println!();
        medians.push(m);
    }
    println!(
        "durable publish / no-storage gRPC ceiling: fsync always {:.2}x, never {:.2}x",
        medians[1] / medians[0],
        medians[2] / medians[0]
    );
    println!(
        "Kafka produce / gRPC publish, both fsync always: confluent-kafka {:.2}x, kcat {:.2}x",
        medians[3] / medians[1],
        medians[4] / medians[1]
    );
    Ok(())
}

/// One `weir bench publish` against a fresh server of `bin` (`discard`: the no-storage
/// server); prints the run and the bytes the server wrote, returns records/s.
fn publish_run(bin: &Path, which: &str, fsync: &str, round: u32, records: &str) -> Result<f64> {
    let data =
        std::env::temp_dir().join(format!("weir-bench-{}-{fsync}-{round}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = if fsync == "discard" {
        Server::start_discard(bin)?
    } else {
        Server::start(bin, &data, fsync)?
    };
    let cpu_before = crate::bench_kafka::cpu_seconds(server.pid());
    let out = weir(bin, &server, &publish_args(records))?;
    let cpu = crate::bench_kafka::cpu_seconds(server.pid()) - cpu_before;
    let written = written_bytes(server.child.id());
    server.stop()?;
    std::fs::remove_dir_all(&data).ok();
    let label = if fsync == "discard" {
        "no storage (weir bench discard-server)".to_string()
    } else {
        format!("{which}fsync {fsync}")
    };
    let n: f64 = records.parse()?;
    println!(
        "{label}, run {round} (server CPU {:.2} µs per record):\n{out}",
        cpu / n * 1e6
    );
    let payload_mb: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{records} records (")))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("parse the payload size")?;
    if let Some(written) = written.filter(|_| fsync != "discard") {
        println!(
            "server wrote {:.0} MB to disk for {payload_mb:.0} MB of keys and values ({:.1}x)",
            written / 1e6,
            written / 1e6 / payload_mb
        );
    }
    throughput(&out)
}

/// The arguments of every publish benchmark run (BENCHMARKS.md).
pub(crate) fn publish_args(records: &str) -> Vec<&str> {
    vec![
        "bench",
        "publish",
        "--records",
        records,
        "--record-size",
        "100",
        "--batch",
        "1000",
        "--partitions",
        "4",
        "--concurrency",
        "8",
        "--quiet",
    ]
}

/// The arguments of every `weir bench plugin` run: `records` orders from 10,000 users on 4
/// partitions through the plugin at `wasm`.
pub(crate) fn plugin_args<'a>(wasm: &'a str, records: &'a str) -> Vec<&'a str> {
    vec![
        "bench",
        "plugin",
        "--wasm",
        wasm,
        "--records",
        records,
        "--users",
        "10000",
        "--partitions",
        "4",
    ]
}

/// The rate a `weir bench publish` or peer run printed.
pub(crate) fn throughput(out: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.split_once("throughput: ").map(|(_, r)| r))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no throughput in {out:?}"))
}

/// A loopback address no one listens on now (for a child server's --metrics).
pub(crate) fn free_local_addr() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `weir bench soak` for `secs` seconds against a release server with bounded caches: orders
/// from 1,000,000 users at 5,000/s through points, red-envelope and analytics-filter, RSS
/// every 30 s (BENCHMARKS.md, "Memory over time").
fn bench_soak(bin: &Path, secs: u64) -> Result<()> {
    let plugins = build_plugins()?;
    let data = std::env::temp_dir().join(format!("weir-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start_with(
        bin,
        &data,
        "always",
        &[
            "--cache-mb",
            "16",
            "--state-cache-mb",
            "16",
            "--retention-check-ms",
            "5000",
        ],
    )?;
    // Streamed: a sample line every 30 s.
    let status = Command::new(bin)
        .env("WEIR_SERVER", &server.url)
        .args([
            "bench",
            "soak",
            "--wasm-dir",
            plugins.to_str().expect("utf-8 path"),
            "--server-pid",
            &server.child.id().to_string(),
            "--duration-s",
            &secs.to_string(),
            "--users",
            "1000000",
            "--rate",
            "5000",
            "--sample-s",
            "30",
            "--budget-mb",
            "600",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--max-log-disk-ratio",
            "2",
            "--max-dir-growth-pct",
            "10",
        ])
        .status()?;
    server.stop()?;
    std::fs::remove_dir_all(&data).ok();
    if !status.success() {
        bail!("weir bench soak failed ({status})");
    }
    Ok(())
}

/// A compiled-component cache (`weir serve --compiled-cache`) holding `wasms`, compiled by
/// `weir test` so no timed run compiles them. The caller deletes it.
pub(crate) fn compiled_cache(bin: &Path, wasms: &[&Path]) -> Result<PathBuf> {
    let compiled = std::env::temp_dir().join(format!("weir-bench-compiled-{}", std::process::id()));
    let sample = compiled.join("sample.jsonl");
    std::fs::create_dir_all(&compiled)?;
    std::fs::write(
        &sample,
        "{\"key\":\"u\",\"value\":{\"order\":1,\"user\":\"u\",\"amount\":1}}\n",
    )?;
    for wasm in wasms {
        let out = Command::new(bin)
            .arg("test")
            .arg(wasm)
            .arg("--input")
            .arg(&sample)
            .args(["--output", "points.credited"])
            .env("WEIR_CACHE_DIR", &compiled)
            .output()?;
        if !out.status.success() {
            bail!(
                "weir test {} failed: {}",
                wasm.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(compiled)
}

/// `weir bench plugin`: the points plugin in Rust, Python and JavaScript, three runs each, each
/// run against the no-op plugin in the same server.
fn bench_plugins(bin: &Path, records: &str) -> Result<()> {
    let plugins = build_plugins()?;
    let noop = plugins.join("noop.wasm");
    // The points plugin in each language; Python and JavaScript built by this weir.
    build_example_plugins(bin)?;
    let languages = [
        ("Rust", plugins.join("points.wasm")),
        (
            "Python",
            PathBuf::from("examples/points-py/target/points_py.wasm"),
        ),
        (
            "JavaScript",
            PathBuf::from("examples/points-js/target/points_js.wasm"),
        ),
    ];
    // One compiled-component cache for every run, filled before timing: a Python component
    // takes seconds to compile, which is deploy cost, not records/s.
    let wasms: Vec<&Path> = languages.iter().map(|(_, w)| w.as_path()).collect();
    let compiled = compiled_cache(bin, &wasms)?;
    for (language, wasm) in &languages {
        for round in 1..=3 {
            let data = std::env::temp_dir()
                .join(format!("weir-bench-plugin-{}-{round}", std::process::id()));
            let _ = std::fs::remove_dir_all(&data);
            // The monitor's page gives each run's commit latency and batches per sync.
            let metrics = free_local_addr()?;
            let server = Server::start_with(
                bin,
                &data,
                "always",
                &[
                    "--compiled-cache",
                    compiled.to_str().expect("utf-8 path"),
                    "--metrics",
                    &metrics,
                ],
            )?;
            let out = weir(bin, &server, &{
                let mut args = plugin_args(wasm.to_str().expect("utf-8 path"), records);
                args.extend(["--baseline-wasm", noop.to_str().expect("utf-8 path")]);
                args.extend(["--metrics", &metrics]);
                args
            })?;
            server.stop()?;
            std::fs::remove_dir_all(&data).ok();
            println!("plugin bench, points in {language}, fsync always, run {round}:\n{out}");
        }
    }
    std::fs::remove_dir_all(&compiled).ok();
    Ok(())
}
