//! `cargo xtask bench --cluster` (BENCHMARKS.md "Cluster mode" and "Plugins on a cluster"):
//! publish through weir nodes on a local JetStream cluster against sled and JetStream's own
//! publish; the points plugin on sled against one and two weir nodes on JetStream; failover.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::bench::{
    compiled_cache, free_local_addr, median, plugin_args, publish_args, throughput, weir,
};
use crate::server::Server;
use crate::{build_plugins, run};

/// A fresh 3-node JetStream cluster in a temporary directory named after `what`.
fn local_cluster(what: &str) -> Result<(std::path::PathBuf, weir_cluster::NatsCluster)> {
    let nats = crate::nats::ensure()?;
    let dir = std::env::temp_dir().join(format!("weir-bench-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = weir_cluster::NatsCluster::start(
        &nats,
        &dir.join("nats"),
        3,
        weir_cluster::SyncMode::Default,
    )
    .map_err(anyhow::Error::msg)?;
    Ok((dir, cluster))
}

/// `count` weir nodes on the cluster at `urls`, sharing the log prefix `prefix`; the first
/// serves its monitoring page at `metrics` if given (the node a plugin is deployed through,
/// which runs it: its commit latency).
fn cluster_nodes(
    bin: &Path,
    dir: &Path,
    urls: &str,
    prefix: &str,
    count: usize,
    extra: &[&str],
    metrics: Option<&str>,
) -> Result<Vec<Server>> {
    (0..count)
        .map(|n| {
            let mut args = vec!["--log", urls, "--log-prefix", prefix];
            args.extend(extra);
            if let (0, Some(addr)) = (n, metrics) {
                args.extend(["--metrics", addr]);
            }
            Server::start_with(bin, &dir.join(format!("{prefix}-{n}")), "always", &args)
        })
        .collect()
}

/// Prints each setup's median rate and its ratio to the first setup's (`base`).
fn print_medians(title: &str, names: &[&str], rates: &[Vec<f64>], base: &str) {
    let base_rate = median(rates[0].clone());
    println!("\nmedians of 3 ({title}):");
    for (name, r) in names.iter().zip(rates) {
        let m = median(r.clone());
        println!(
            "  {name:<44} {m:>10.0} records/s  ({:.2}x {base}; runs {:?})",
            m / base_rate,
            r.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
    }
}

/// BENCHMARKS.md "Cluster mode": `weir bench publish` through two weir nodes on a local
/// 3-node JetStream cluster (R3), through one single-node weir on sled (fsync always and
/// never), and JetStream's own publish of the same records (packed in 128 KiB messages, and
/// one message per record) — three interleaved rounds in one run, medians and ratios.
pub(crate) fn bench_cluster(bin: &Path, records: &str) -> Result<()> {
    run(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "weir-jetstream",
        "--example",
        "jetstream_publish",
    ]))?;
    let peer = crate::workspace_root().join("target/release/examples/jetstream_publish");
    let (dir, cluster) = local_cluster("cluster")?;
    let urls = cluster.url_list();
    let names = [
        "weir, 2 nodes on JetStream R3",
        "weir, 1 node on sled, fsync always",
        "weir, 1 node on sled, fsync never",
        "JetStream alone, packed 128 KiB messages",
        "JetStream alone, one message per record",
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 1..=3 {
        let nodes = cluster_nodes(bin, &dir, &urls, &format!("bench{round}"), 2, &[], None)?;
        // Nodes that have been up a while, as users publish to them: publishing within a
        // second of their start once measured a faster mode than the steady one (BENCHMARKS.md,
        // "the two-node ~89k mode").
        std::thread::sleep(std::time::Duration::from_secs(5));
        let via = format!("{},{}", nodes[0].url, nodes[1].url);
        let mut args = publish_args(records);
        args.extend(["--via", &via]);
        let out = weir(bin, &nodes[0], &args)?;
        println!("round {round}, {}:\n{out}", names[0]);
        rates[0].push(throughput(&out)?);
        for node in nodes {
            node.stop()?;
        }
        for (i, fsync) in [(1, "always"), (2, "never")] {
            let data = dir.join(format!("sled-{round}-{fsync}"));
            let server = Server::start(bin, &data, fsync)?;
            let out = weir(bin, &server, &publish_args(records))?;
            server.stop()?;
            std::fs::remove_dir_all(&data).ok();
            println!("round {round}, {}:\n{out}", names[i]);
            rates[i].push(throughput(&out)?);
        }
        for (i, mode) in [(3, "packed"), (4, "per-record")] {
            let out = Command::new(&peer)
                .args(["--servers", &urls, "--records", records, "--mode", mode])
                .output()?;
            if !out.status.success() {
                bail!(
                    "{} failed: {}",
                    peer.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            println!("round {round}, {}: {}", names[i], out.trim());
            rates[i].push(throughput(&out)?);
        }
    }
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    print_medians(
        &format!("{records} records of 100 B, 16 B keys"),
        &names,
        &rates,
        "weir on JetStream",
    );
    Ok(())
}

/// BENCHMARKS.md "Plugins on a cluster": the points plugin draining `records` orders on one
/// weir node on sled (fsync always), one weir node on JetStream R3 and two weir nodes on
/// JetStream R3 (deployed through one), with each node's CPU time per record; then two copies
/// of points (`records` / 2 orders each) on one weir node against one copy on each of two
/// nodes; three interleaved rounds. Then the failover time (`flash-sale failover-bench`: kill
/// -9 of the node running points → first commit on the other), three runs.
pub(crate) fn bench_cluster_plugins(
    bin: &Path,
    baseline: Option<&Path>,
    records: &str,
) -> Result<()> {
    let plugins = build_plugins()?;
    let points = plugins.join("points.wasm");
    let compiled = compiled_cache(bin, &[&points])?;
    let cache = ["--compiled-cache", compiled.to_str().expect("utf-8 path")];
    let points = points.to_str().expect("utf-8 path");
    let (dir, cluster) = local_cluster("plugins")?;
    let urls = cluster.url_list();
    let setups = [
        "points, 1 weir node on sled, fsync always",
        "points, 1 weir node on JetStream R3",
        "points, 2 weir nodes on JetStream R3",
    ];
    let spread = [
        "2x points, both on 1 weir node on JetStream R3",
        "2x points, one on each of 2 weir nodes",
    ];
    // With --baseline-bin, the first setups run with both builds in each round (the copies
    // are this build's: an older one may not have --copies).
    let mut builds = vec![("", bin)];
    if let Some(baseline) = baseline {
        builds.insert(0, ("baseline: ", baseline));
    }
    let mut names: Vec<String> = builds
        .iter()
        .flat_map(|(label, _)| setups.iter().map(move |s| format!("{label}{s}")))
        .collect();
    names.extend(spread.iter().map(|s| s.to_string()));
    let half = (records.parse::<u64>().context("--records")? / 2).to_string();
    let (whole, halves) = (plugin_args(points, records), plugin_args(points, &half));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // The nats-servers' CPU time per record over the same span (JetStream setups).
    let mut nats_cpus: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let nats_pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    let nats_pids = nats_pids.join(",");
    // Each copy of the spread setups drains half the orders, so every setup drains `records`.
    let mut measure = |i: usize,
                       round: u32,
                       build: &Path,
                       nodes: &[Server],
                       extra: &[&str],
                       metrics: Option<&str>| {
        let pids: Vec<String> = nodes.iter().map(|n| n.pid().to_string()).collect();
        let pids = pids.join(",");
        let mut args = if extra.is_empty() {
            whole.clone()
        } else {
            halves.clone()
        };
        args.extend(extra);
        // Commit latency and commits per durable step, from the node running the plugin.
        if let Some(addr) = metrics {
            args.extend(["--metrics", addr]);
        }
        // The CPU time is this build's (an older one may not have --server-pid).
        let on_nats = !names[i].contains("sled");
        if build == bin {
            args.extend(["--server-pid", &pids]);
            if on_nats {
                args.extend(["--log-pid", &nats_pids]);
            }
        }
        let out = weir(build, &nodes[0], &args)?;
        println!("round {round}, {}:\n{}", names[i], out.trim());
        rates[i].push(rate(&out)?);
        if build == bin {
            cpus[i].push(cpu_per_record(&out)?);
            if on_nats {
                nats_cpus[i].push(log_cpu_per_record(&out)?);
            }
        }
        anyhow::Ok(())
    };
    for round in 1..=3 {
        for (b, (_, build)) in builds.iter().enumerate() {
            let at = b * setups.len();
            let data = dir.join(format!("sled-{round}-{b}"));
            let metrics = free_local_addr()?;
            let mut args = cache.to_vec();
            args.extend(["--metrics", &metrics]);
            let server = Server::start_with(build, &data, "always", &args)?;
            measure(
                at,
                round,
                build,
                std::slice::from_ref(&server),
                &[],
                Some(&metrics),
            )?;
            server.stop()?;
            std::fs::remove_dir_all(&data).ok();
            for (i, count) in [(1, 1), (2, 2)] {
                let prefix = format!("plugins{round}b{b}n{count}");
                let metrics = free_local_addr()?;
                let nodes =
                    cluster_nodes(build, &dir, &urls, &prefix, count, &cache, Some(&metrics))?;
                measure(at + i, round, build, &nodes, &[], Some(&metrics))?;
                stop_all(nodes)?;
            }
        }
        let at = builds.len() * setups.len();
        for (i, count) in [(0, 1), (1, 2)] {
            let prefix = format!("spread{round}n{count}");
            let nodes = cluster_nodes(bin, &dir, &urls, &prefix, count, &cache, None)?;
            let via: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
            let via = via.join(",");
            let mut extra = vec!["--copies", "2", "--via", &via];
            if count == 2 {
                extra.push("--one-per-node");
            }
            measure(at + i, round, bin, &nodes, &extra, None)?;
            stop_all(nodes)?;
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    print_medians(
        &format!("{records} orders from 10,000 users, 4 partitions"),
        &names,
        &rates,
        "the first",
    );
    print_cpu("weir nodes' CPU time (user+sys) per record", &names, &cpus);
    print_cpu(
        "the 3 nats-servers' CPU time (user+sys) per record over the same span",
        &names,
        &nats_cpus,
    );
    run(Command::new("target/release/flash-sale").args([
        "failover-bench",
        "--weir",
        bin.to_str().expect("utf-8 path"),
        "--wasm-dir",
        plugins.to_str().expect("utf-8 path"),
        "--cluster",
        &urls,
        "--records",
        records,
    ]))?;
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&compiled).ok();
    Ok(())
}

/// A table of CPU time per record, medians of 3, for the setups that measured it.
fn print_cpu(title: &str, names: &[&str], cpus: &[Vec<f64>]) {
    println!("\n{title}, medians of 3:");
    for (name, c) in names.iter().zip(cpus).filter(|(_, c)| !c.is_empty()) {
        println!(
            "  {name:<48} {:>7.2} µs  (runs {:?})",
            median(c.clone()),
            c.iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
}

fn stop_all(nodes: Vec<Server>) -> Result<()> {
    for node in nodes {
        node.stop()?;
    }
    Ok(())
}

/// The rate a `weir bench plugin` run printed ("… = N records/s …").
fn rate(out: &str) -> Result<f64> {
    number_before(out, " records/s")
}

/// The servers' CPU time per record a `weir bench plugin --server-pid` run printed.
fn cpu_per_record(out: &str) -> Result<f64> {
    number_before(out, " µs per record")
}

/// The log servers' CPU time per record a `weir bench plugin --log-pid` run printed.
fn log_cpu_per_record(out: &str) -> Result<f64> {
    let line = out
        .lines()
        .find(|l| l.contains("log servers' CPU"))
        .with_context(|| format!("no log servers' CPU line in {out:?}"))?;
    number_before(line, " µs per record")
}

/// The number printed just before the first `unit` in `out`.
fn number_before(out: &str, unit: &str) -> Result<f64> {
    out.split(unit)
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no number before {unit:?} in {out:?}"))
}
