//! `weir bench soak`: a steady flow of paid orders from many distinct users through the
//! points, red-envelope and analytics-filter plugins for a long time, sampling the server's
//! resident memory and its plugins' state caches. A server runs for months: after a warm-up
//! its memory must stay flat whatever the number of records and producers it has seen; what
//! the store keeps per stored key grows with the keys (BENCHMARKS.md, "Memory over time").
//! Exits with an error when memory kept growing after the warm-up (or passed `--budget-mb`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use weir_api::{Client, Deploy};
use weir_core::{Record, TopicConfig};

/// Arguments of `weir bench soak`.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakBench {
    /// Directory with points.wasm, red_envelope.wasm and analytics_filter.wasm.
    #[arg(long)]
    pub wasm_dir: PathBuf,
    /// Process id of the `weir serve` under test (its RSS is read from /proc).
    #[arg(long)]
    pub server_pid: u32,
    /// How long to publish, seconds.
    #[arg(long, default_value_t = 600)]
    pub duration_s: u64,
    /// Distinct users the orders come from.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: u64,
    /// Orders per second.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 30)]
    pub sample_s: u64,
    /// Samples in the first this many seconds are warm-up (default: a third of the run).
    #[arg(long)]
    pub warmup_s: Option<u64>,
    /// Message ids each plugin remembers (its dedup window bounds that memory).
    #[arg(long, default_value_t = 100_000)]
    pub dedup_ids: u64,
    /// Fail when RSS grew by more than this share after the warm-up, percent.
    #[arg(long, default_value_t = 10.0)]
    pub max_growth_pct: f64,
    /// Fail when RSS ever exceeds this, MiB.
    #[arg(long)]
    pub budget_mb: Option<f64>,
    /// Bound every topic to this many bytes per partition (0 = keep everything); the default
    /// is reached in ~2 minutes at 5,000 orders/s, inside the warm-up.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub retention_bytes: u64,
    /// The server's data directory: each sample then also shows its size on disk (segment
    /// files, sled's file) against the log's live bytes.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Fail when, at the end, the segment files hold more than this many times the log's live
    /// bytes (retention must give disk back); needs `--data-dir`.
    #[arg(long)]
    pub max_log_disk_ratio: Option<f64>,
    /// Fail when the data directory's size grew by more than this share after the warm-up,
    /// percent (by a fitted slope, as RSS); needs `--data-dir`.
    #[arg(long)]
    pub max_dir_growth_pct: Option<f64>,
}

/// Bytes in the files under `dir` (0 when it does not exist).
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The bytes every topic's partitions hold (what retention keeps; the same topics as the
/// segment files on disk, dead-letter topics included).
async fn log_live_bytes(client: &Client) -> anyhow::Result<u64> {
    Ok(client
        .list_topics()
        .await?
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| p.size_bytes)
        .sum())
}

/// The data directory's size on disk, MB, and a sample line's tail: the whole, the segment
/// files, sled's file (the log's index), redb's (the plugins' store), and the log's live bytes.
async fn disk_sample(client: &Client, dir: &std::path::Path) -> anyhow::Result<(f64, String)> {
    let live = log_live_bytes(client).await?;
    let mb = |b: u64| b as f64 / 1e6;
    let file = |name: &str| mb(std::fs::metadata(dir.join(name)).map_or(0, |m| m.len()));
    let whole = mb(bytes_under(dir));
    Ok((
        whole,
        format!(
            " dir={whole:.1} MB (segments={:.1} sled={:.1} kv={:.1}) log-live={:.1} MB",
            mb(bytes_under(&dir.join("segments"))),
            file("db"),
            file("kv.redb"),
            mb(live)
        ),
    ))
}

/// Resident memory of a process, bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid}/status ({e}): is --server-pid the weir serve process on this machine?"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no VmRSS line"))?;
    Ok(kb * 1024)
}

/// The least-squares slope of `points` (x, y).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// What the samples after the warm-up say.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    /// RSS when the warm-up ended, MB.
    pub start_mb: f64,
    /// Highest RSS after it, MB.
    pub max_mb: f64,
    /// Growth over the post-warm-up window by the fitted slope, percent of `start_mb`.
    pub growth_pct: f64,
}

/// Judges (seconds, MB) samples: growth after `warmup_s` by a least-squares fit, so one
/// allocator burst at the end does not decide alone.
pub fn judge(samples: &[(f64, f64)], warmup_s: f64) -> Option<Verdict> {
    let after: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= warmup_s)
        .collect();
    let (first, last) = (after.first()?, after.last()?);
    let window = last.0 - first.0;
    let fitted = slope(&after) * window;
    Some(Verdict {
        start_mb: first.1,
        max_mb: after.iter().map(|(_, m)| *m).fold(0.0, f64::max),
        growth_pct: fitted / first.1 * 100.0,
    })
}

pub(super) async fn run(client: &Client, args: SoakBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users > 0 && args.rate > 0 && args.duration_s > 0 && args.sample_s > 0,
        "--users, --rate, --duration-s and --sample-s must be positive"
    );
    anyhow::ensure!(
        (args.max_log_disk_ratio.is_none() && args.max_dir_growth_pct.is_none())
            || args.data_dir.is_some(),
        "--max-log-disk-ratio and --max-dir-growth-pct need --data-dir (the server's data directory)"
    );
    let topics = [
        ("order.paid", 4),
        ("points.credited", 4),
        ("red-envelope.grants", 4),
        ("analytics.purchases", 4),
    ];
    for (name, partitions) in topics {
        let config = TopicConfig::new(name, partitions).with_retention_bytes(args.retention_bytes);
        if let Err(e) = client.create_topic(&config).await {
            if e.code() != Some(weir_api::Code::AlreadyExists) {
                return Err(e.into());
            }
        }
    }
    let plugins = [
        (
            "points",
            "points.wasm",
            "points.credited",
            vec![("output", "points.credited")],
        ),
        (
            "red-envelope",
            "red_envelope.wasm",
            "red-envelope.grants",
            vec![("threshold", "3")],
        ),
        (
            "analytics-filter",
            "analytics_filter.wasm",
            "analytics.purchases",
            vec![("fields", "user,amount")],
        ),
    ];
    for (name, file, output, config) in &plugins {
        let path = args.wasm_dir.join(file);
        let wasm = std::fs::read(&path).map_err(|e| {
            anyhow::anyhow!("cannot read {} ({e}): build the plugins first (cargo xtask test or cargo xtask bench)", path.display())
        })?;
        let deploy = Deploy {
            name: name.to_string(),
            wasm,
            input: "order.paid".into(),
            outputs: vec![output.to_string()],
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dedup_ids: args.dedup_ids,
            on_error: "dlq".into(),
            ..Deploy::default()
        };
        if let Err(e) = client.deploy_plugin(deploy).await {
            if e.code() != Some(weir_api::Code::AlreadyExists) {
                return Err(e.into());
            }
        }
    }
    println!(
        "soak: {} orders/s from {} users for {} s through points, red-envelope and analytics-filter; RSS every {} s",
        args.rate, args.users, args.duration_s, args.sample_s
    );
    let mut producer = client.producer().await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let started = Instant::now();
    let tick = Duration::from_millis(100);
    let per_tick = (args.rate / 10).max(1);
    let mut next_tick = tokio::time::Instant::now();
    let mut next_sample = Duration::ZERO;
    let (mut order, mut samples, mut dir_samples) = (0u64, Vec::new(), Vec::new());
    loop {
        let elapsed = started.elapsed();
        if elapsed >= next_sample {
            let rss = rss_bytes(args.server_pid)? as f64 / 1e6;
            let (mut cache, mut lag) = (0u64, 0u64);
            for p in client.list_plugins().await? {
                cache += p.state_cache_bytes;
            }
            for row in client.lag("").await?.rows {
                lag += row.lag;
            }
            let disk = match &args.data_dir {
                Some(dir) => {
                    let (whole, line) = disk_sample(client, dir).await?;
                    dir_samples.push((elapsed.as_secs_f64(), whole));
                    line
                }
                None => String::new(),
            };
            println!(
                "t={:>5.0}s rss={rss:>7.1} MB state-cache={:>6.1} MB orders={order} lag={lag}{disk}",
                elapsed.as_secs_f64(),
                cache as f64 / 1e6
            );
            samples.push((elapsed.as_secs_f64(), rss));
            next_sample += Duration::from_secs(args.sample_s);
        }
        if elapsed >= Duration::from_secs(args.duration_s) {
            break;
        }
        let batch: Vec<Record> = (0..per_tick)
            .map(|_| {
                order += 1;
                let user = format!("u{}", rng.random_range(0..args.users));
                let amount = rng.random_range(1..500);
                Record {
                    key: Some(user.clone().into()),
                    id: Some(format!("order-{order}")),
                    ..Record::from_value(format!(
                        r#"{{"order":{order},"user":"{user}","amount":{amount}}}"#
                    ))
                }
            })
            .collect();
        producer.send("order.paid", batch).await?;
        next_tick += tick;
        tokio::time::sleep_until(next_tick).await;
    }
    // What retention left on disk against what it keeps, judged after the memory verdict.
    let log_disk = match (&args.data_dir, args.max_log_disk_ratio) {
        (Some(dir), Some(limit)) => {
            let live = log_live_bytes(client).await?;
            let on_disk = bytes_under(&dir.join("segments"));
            let ratio = on_disk as f64 / live.max(1) as f64;
            println!(
                "log on disk: {:.1} MB of segment files for {:.1} MB the log holds ({ratio:.2}x, limit {limit}x)",
                on_disk as f64 / 1e6,
                live as f64 / 1e6
            );
            Some((ratio, limit))
        }
        _ => None,
    };
    let warmup = args.warmup_s.unwrap_or(args.duration_s / 3) as f64;
    let verdict = judge(&samples, warmup).ok_or_else(|| {
        anyhow::anyhow!("no sample after the warm-up: run longer or sample more often")
    })?;
    println!(
        "after the {warmup:.0} s warm-up: RSS {:.1} MB → max {:.1} MB; fitted growth {:+.1}% (limit {}%)",
        verdict.start_mb, verdict.max_mb, verdict.growth_pct, args.max_growth_pct
    );
    let dir_verdict = judge(&dir_samples, warmup);
    if let Some(dir) = &dir_verdict {
        println!(
            "after the warm-up: data directory {:.1} MB → max {:.1} MB; fitted growth {:+.1}%{}",
            dir.start_mb,
            dir.max_mb,
            dir.growth_pct,
            args.max_dir_growth_pct
                .map_or(String::new(), |l| format!(" (limit {l}%)"))
        );
    }
    anyhow::ensure!(
        verdict.growth_pct <= args.max_growth_pct,
        "memory kept growing after the warm-up: {:+.1}% > {}%",
        verdict.growth_pct,
        args.max_growth_pct
    );
    if let Some(budget) = args.budget_mb {
        let max = samples.iter().map(|(_, m)| *m).fold(0.0, f64::max);
        anyhow::ensure!(
            max <= budget * 1.048_576,
            "RSS reached {max:.1} MB, over the {budget} MiB budget"
        );
    }
    println!("memory flat after warm-up: ok");
    if let (Some(dir), Some(limit)) = (&dir_verdict, args.max_dir_growth_pct) {
        anyhow::ensure!(
            dir.growth_pct <= limit,
            "the data directory kept growing after the warm-up: {:+.1}% > {limit}%",
            dir.growth_pct
        );
    }
    if let Some((ratio, limit)) = log_disk {
        anyhow::ensure!(
            ratio <= limit,
            "retention did not give the log's disk back: {ratio:.2}x its live bytes > {limit}x"
        );
        println!("log's disk bounded by retention: ok");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_judged_by_the_fitted_slope_after_the_warm_up() {
        let flat: Vec<(f64, f64)> = (0..20)
            .map(|i| {
                (
                    i as f64 * 10.0,
                    if i < 5 {
                        50.0 + i as f64 * 20.0
                    } else {
                        150.0 + (i % 2) as f64
                    },
                )
            })
            .collect();
        let v = judge(&flat, 50.0).unwrap();
        assert!(v.growth_pct.abs() < 2.0, "{v:?}");
        let growing: Vec<(f64, f64)> = (0..20)
            .map(|i| (i as f64 * 10.0, 100.0 + i as f64 * 5.0))
            .collect();
        let v = judge(&growing, 50.0).unwrap();
        assert!(v.growth_pct > 40.0, "{v:?}");
        assert_eq!(judge(&growing, 1000.0), None);
    }
}
