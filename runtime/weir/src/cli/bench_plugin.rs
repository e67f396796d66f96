//! `weir bench plugin`: exactly-once plugin throughput, in the spirit of Kafka Streams'
//! benchmarks. Orders are published first, then drained by the plugin; the rate is records
//! committed per second. With `--copies` or `--via`, several copies run at once, each on the
//! cluster node that holds it, and the drain is timed once their placement has settled; with
//! `--server-pid`, the servers' CPU time per record is printed too.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;

use weir_api::Client;
use weir_core::TopicConfig;

/// Arguments of `weir bench plugin`.
#[derive(clap::Args, Debug, Clone)]
pub struct PluginBench {
    /// The plugin to measure (the points plugin: emits to points.credited).
    #[arg(long)]
    pub wasm: std::path::PathBuf,
    /// A baseline plugin measured in the same run (e.g. the no-op plugin).
    #[arg(long)]
    pub baseline_wasm: Option<std::path::PathBuf>,
    /// Orders to process (per copy).
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Distinct users the orders are spread over.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Partitions of the input topic (one partition loop each).
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// The server's monitoring address (`weir serve --metrics ADDR`): print each run's commit
    /// latency (written → durable, p50/p99) and commits per durable step.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Copies of the plugin run at once, each on an input topic of its own with --records
    /// orders; copy i is deployed through --via server i mod N. The drain is timed from just
    /// before the first copy is resumed where it runs, after placement settled.
    #[arg(long, default_value_t = 1)]
    pub copies: usize,
    /// The weir nodes of one cluster (comma-separated): list every node, so the bench can
    /// pause and resume each copy through the node that runs it. Topics are created and
    /// orders published through the first; --token and --tls-ca are not passed to them.
    #[arg(long, value_delimiter = ',')]
    pub via: Vec<String>,
    /// With --via: deploy copies under new names until each runs on a node of its own (the
    /// cluster places a plugin by a hash of its name over the live nodes).
    #[arg(long)]
    pub one_per_node: bool,
    /// The `weir serve` processes on this machine (comma-separated pids): print their CPU time
    /// (user + system, from /proc/PID/stat) per record, from the start of the timed drain until
    /// the outputs are forwarded.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// The replicated log's servers on this machine (comma-separated pids, e.g. the
    /// nats-servers a cluster's weir nodes use): print their CPU time per record too, over
    /// the same span.
    #[arg(long, value_delimiter = ',')]
    pub log_pid: Vec<u32>,
    /// Most records one commit covers (the deploy's --commit-records; 0: the server's
    /// default). 500, the plugin's batch, runs one call per commit, as before issue 22.
    #[arg(long, default_value_t = 0)]
    pub commit_records: u32,
}

pub(super) async fn run(client: &Client, args: PluginBench) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for server in &args.via {
        clients.push(
            Client::connect(server)
                .await
                .with_context(|| format!("connecting to --via server {server}"))?,
        );
    }
    if clients.is_empty() {
        clients.push(client.clone());
    }
    anyhow::ensure!(args.copies >= 1, "--copies must be at least 1");
    anyhow::ensure!(
        !args.one_per_node || args.copies <= clients.len(),
        "--one-per-node needs at least as many --via nodes as --copies ({} nodes, {} copies)",
        clients.len(),
        args.copies
    );
    let placed = args.copies > 1 || !args.via.is_empty();
    let measure = |wasm: std::path::PathBuf, label: &'static str| {
        let (clients, args) = (&clients, &args);
        async move {
            if placed {
                super::bench_placed::placed_run(clients, args, &wasm, label).await
            } else {
                plugin_run(&clients[0], args, &wasm, label).await
            }
        }
    };
    let main = measure(args.wasm.clone(), "main").await?;
    if let Some(baseline) = args.baseline_wasm.clone() {
        let base = measure(baseline, "baseline").await?;
        println!(
            "ratio: the plugin runs at {:.2}x the baseline's rate",
            main / base
        );
    }
    Ok(())
}

/// Publishes the orders, deploys the plugin from the earliest offset, and times the drain.
/// Returns records/s.
async fn plugin_run(
    client: &Client,
    args: &PluginBench,
    wasm: &std::path::Path,
    label: &str,
) -> anyhow::Result<f64> {
    let wasm_bytes = read_wasm(wasm)?;
    let input = format!("bench.orders.{label}");
    let name = format!("bench-{label}");
    let _ = client.remove_plugin(&name).await;
    fresh_topic(client, &input, args.partitions).await?;
    let out_before = output_end(client, args.partitions).await?;
    publish_orders(client, &input, args).await?;
    let cpu = Cpu::start(args)?;
    let started = Instant::now();
    client
        .deploy_plugin(deploy(&name, &input, &wasm_bytes, args.commit_records))
        .await?;
    let committed_at = wait_committed(&[(client, &name)], args.records).await? - started;
    let forwarded_at = outputs_done(client, out_before, args.records, started).await?;
    let cpu = cpu.per_record(args.records)?;
    let rate = args.records as f64 / committed_at.as_secs_f64();
    let file = file_name(wasm);
    println!(
        "{file}: {} records committed exactly-once in {:.2} s = {rate:.0} records/s (deploy and compile included); outputs forwarded after {:.2} s",
        args.records,
        committed_at.as_secs_f64(),
        forwarded_at.as_secs_f64()
    );
    for line in cpu {
        println!("{file}: {line} (deploy included)");
    }
    if let Some(metrics) = &args.metrics {
        let page = super::scrape::page(metrics).await?;
        println!("{file}: {}", super::scrape::commit_summary(&page, &name));
    }
    client.remove_plugin(&name).await?;
    Ok(rate)
}

/// How long a run may go without any copy committing more before the bench gives up.
const STALL: Duration = Duration::from_secs(120);

/// Waits until every `(client, plugin)` has committed `records`; returns when the last did.
/// Fails when none committed anything more for [`STALL`] (halted, paused, or gone from the
/// node asked).
pub(super) async fn wait_committed(
    runs: &[(&Client, &str)],
    records: u64,
) -> anyhow::Result<Instant> {
    let mut seen = vec![0; runs.len()];
    let mut progress = Instant::now();
    loop {
        for (i, (client, name)) in runs.iter().enumerate() {
            if seen[i] < records {
                let now = committed(client, name).await?;
                if now > seen[i] {
                    (seen[i], progress) = (now, Instant::now());
                }
            }
        }
        if seen.iter().all(|&n| n >= records) {
            return Ok(Instant::now());
        }
        if progress.elapsed() > STALL {
            let names: Vec<&str> = runs.iter().map(|(_, name)| *name).collect();
            anyhow::bail!(
                "nothing more was committed for {} s ({names:?} committed {seen:?} of {records} each); `weir plugin status NAME` says why",
                STALL.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The servers' CPU time (user + system) at the start of a measurement.
pub(super) struct Cpu {
    /// What, which processes, their ticks at the start.
    groups: Vec<(&'static str, Vec<u32>, u64)>,
}

impl Cpu {
    /// Starts counting the `--server-pid` and `--log-pid` processes' CPU time.
    pub(super) fn start(args: &PluginBench) -> anyhow::Result<Cpu> {
        let mut groups = Vec::new();
        for (what, pids) in [
            ("server CPU", &args.server_pid),
            ("log servers' CPU", &args.log_pid),
        ] {
            if !pids.is_empty() {
                groups.push((what, pids.clone(), cpu_ticks(pids)?));
            }
        }
        Ok(Cpu { groups })
    }

    /// The lines to print: each group's CPU time per record since the start (the servers'
    /// first; none without pids).
    pub(super) fn per_record(&self, records: u64) -> anyhow::Result<Vec<String>> {
        self.groups
            .iter()
            .map(|(what, pids, ticks)| {
                let spent = (cpu_ticks(pids)? - ticks) as f64 / ticks_per_second();
                Ok(format!(
                    "{what} (user+sys, pids {pids:?}): {spent:.2} s = {:.2} µs per record",
                    spent * 1e6 / records as f64
                ))
            })
            .collect()
    }
}

/// The clock ticks /proc counts CPU time in (USER_HZ; 100 on Linux's common architectures).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// utime + stime of each process, summed, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| {
            anyhow::anyhow!("cannot read /proc/{pid}/stat ({e}): is each --server-pid and --log-pid a process on this machine?")
        })?;
        // After the command name in parentheses: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i - 3)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("/proc/{pid}/stat has no field {i}"))
        };
        sum += field(14)? + field(15)?;
    }
    Ok(sum)
}

pub(super) fn read_wasm(wasm: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(wasm).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", wasm.display()))
}

pub(super) fn file_name(wasm: &std::path::Path) -> String {
    wasm.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The points-style deploy every run uses: from the earliest offset into points.credited.
pub(super) fn deploy(
    name: &str,
    input: &str,
    wasm: &[u8],
    commit_records: u32,
) -> weir_api::Deploy {
    weir_api::Deploy {
        name: name.to_string(),
        wasm: wasm.to_vec(),
        input: input.to_string(),
        outputs: vec!["points.credited".into()],
        config: vec![("rate".into(), "0.1".into())],
        commit_records,
        ..Default::default()
    }
}

/// Creates `topic` anew (deleting what an earlier run left).
pub(super) async fn fresh_topic(
    client: &Client,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<()> {
    let _ = client.delete_topic(topic).await;
    client
        .create_topic(&TopicConfig {
            name: topic.to_string(),
            partitions,
            retention_ms: 0,
            retention_bytes: 0,
            admission: None,
        })
        .await?;
    Ok(())
}

/// The output topic's end offsets summed (created if missing).
pub(super) async fn output_end(client: &Client, partitions: u32) -> anyhow::Result<u64> {
    if client.describe_topic("points.credited").await.is_err() {
        client
            .create_topic(&TopicConfig {
                name: "points.credited".into(),
                partitions,
                retention_ms: 0,
                retention_bytes: 0,
                admission: None,
            })
            .await?;
    }
    Ok(client
        .describe_topic("points.credited")
        .await?
        .partitions
        .iter()
        .map(|p| p.end_offset)
        .sum())
}

/// Publishes `args.records` orders from `args.users` users into `topic`, 1,000 per request.
pub(super) async fn publish_orders(
    client: &Client,
    topic: &str,
    args: &PluginBench,
) -> anyhow::Result<()> {
    let mut i = 0;
    while i < args.records {
        let n = (args.records - i).min(1000);
        let records = (i..i + n)
            .map(|o| {
                let user = format!("user-{}", o % args.users);
                weir_core::Record {
                    key: Some(Bytes::from(user.clone())),
                    id: Some(format!("order-{o}")),
                    ..weir_core::Record::from_value(format!(
                        r#"{{"order":{o},"user":"{user}","amount":{}}}"#,
                        10 + o % 90
                    ))
                }
            })
            .collect();
        client.publish(topic, None, records).await?;
        i += n;
    }
    Ok(())
}

/// Records `name` has committed over all partitions (an error once it halted).
pub(super) async fn committed(client: &Client, name: &str) -> anyhow::Result<u64> {
    let plugins = client.list_plugins().await?;
    let p = plugins
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| anyhow::anyhow!("plugin {name} vanished"))?;
    if let Some(halted) = p.partitions.iter().find(|s| s.state.starts_with("halted")) {
        anyhow::bail!("plugin {name} halted: {}", halted.state);
    }
    Ok(p.partitions.iter().map(|s| s.committed).sum())
}

/// When the outputs were done, counted from `started`: once there is one per record (points)
/// or none arrived for 500 ms.
pub(super) async fn outputs_done(
    client: &Client,
    before: u64,
    records: u64,
    started: Instant,
) -> anyhow::Result<Duration> {
    let (mut last, mut last_change) = (u64::MAX, Instant::now());
    loop {
        let out = output_end(client, 1).await? - before;
        if out != last {
            (last, last_change) = (out, Instant::now());
        }
        if out >= records || last_change.elapsed() > Duration::from_millis(500) {
            return Ok(last_change.duration_since(started));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
