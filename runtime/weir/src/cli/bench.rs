//! `weir bench publish`: a load generator in the spirit of kafka-producer-perf-test and
//! `fluvio benchmark`. Prints records/s, MB/s and per-batch acknowledgement latency.

use anyhow::Context as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Subcommand;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use weir_api::pb;
use weir_api::Client;
use weir_core::TopicConfig;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Publish records as fast as the server acknowledges them.
    Publish(PublishBench),
    /// Exactly-once plugin throughput: orders published first, then drained by the plugin.
    Plugin(super::bench_plugin::PluginBench),
    /// Memory over a long steady load: orders from many users through three plugins, the
    /// server's RSS sampled; fails if it keeps growing after the warm-up.
    Soak(super::soak::SoakBench),
    /// Serve weir's publish API with nothing behind it (records decoded and discarded): the
    /// gRPC ceiling to measure `weir serve` against with `weir bench publish`.
    DiscardServer(super::bench_ceiling::DiscardServer),
}

/// Arguments of `weir bench publish`.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishBench {
    /// Topic (created with --partitions if missing).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Records to publish in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Key size in bytes (0 = keyless).
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,
    /// Records per publish request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Publish requests in flight at once (each on its own partition in turn).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Send over one PublishStream per worker (16 requests in flight each) instead of unary calls.
    #[arg(long)]
    pub stream: bool,
    /// No progress bar (for logs).
    #[arg(long)]
    pub quiet: bool,
    /// Spread the workers over these servers (weir nodes of one cluster, comma-separated)
    /// instead of --server: worker i publishes through server i mod N.
    #[arg(long, value_delimiter = ',')]
    pub via: Vec<String>,
}

pub(super) async fn run(
    client: &Client,
    cmd: BenchCommand,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Publish(args) => {
            let mut clients = Vec::new();
            for server in &args.via {
                clients.push(Client::connect(server).await?);
            }
            if clients.is_empty() {
                clients.push(client.clone());
            }
            println!("{}", publish_via(&clients, &args, shutdown).await?)
        }
        BenchCommand::Soak(args) => super::soak::run(client, args).await?,
        BenchCommand::Plugin(args) => super::bench_plugin::run(client, args).await?,
        BenchCommand::DiscardServer(args) => super::bench_ceiling::run(args, shutdown).await?,
    }
    Ok(())
}

/// Results of a publish benchmark.
#[derive(Debug, Clone)]
pub struct PublishReport {
    /// Records acknowledged.
    pub records: u64,
    /// Payload bytes (keys + values) acknowledged.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Per-request acknowledgement latencies, sorted.
    pub latencies: Vec<Duration>,
}

impl std::fmt::Display for PublishReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 * p).ceil() as usize)
                .clamp(1, self.latencies.len().max(1))
                - 1;
            self.latencies
                .get(i)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        writeln!(
            f,
            "{} records ({:.1} MB) in {:.2} s",
            self.records,
            self.bytes as f64 / 1e6,
            secs
        )?;
        writeln!(
            f,
            "throughput: {:.0} records/s, {:.1} MB/s",
            self.records as f64 / secs,
            self.bytes as f64 / 1e6 / secs
        )?;
        write!(
            f,
            "ack latency per request: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        )
    }
}

fn batches(args: &PublishBench, worker: usize) -> Vec<Vec<pb::Record>> {
    let mut rng = rand::rng();
    (0..4)
        .map(|b| {
            (0..args.batch)
                .map(|i| {
                    let mut value = vec![0u8; args.record_size];
                    rng.fill_bytes(&mut value);
                    let key = (args.key_size > 0).then(|| {
                        let mut k = format!("w{worker}-b{b}-{i}").into_bytes();
                        k.resize(args.key_size, b'.');
                        Bytes::from(k)
                    });
                    pb::Record {
                        key,
                        value: Bytes::from(value),
                        ..Default::default()
                    }
                })
                .collect()
        })
        .collect()
}

/// Runs a publish benchmark with the workers spread over `clients` (one server, or the
/// nodes of one cluster: worker i publishes through client i mod N).
///
/// # Errors
/// Connection failures, topic creation failures, a refused publish.
pub async fn publish_via(
    clients: &[Client],
    args: &PublishBench,
    shutdown: CancellationToken,
) -> anyhow::Result<PublishReport> {
    let client = clients.first().context("no server to publish to")?;
    anyhow::ensure!(
        args.batch > 0 && args.concurrency > 0 && args.records > 0,
        "--records, --batch and --concurrency must be positive"
    );
    let partitions = match client.describe_topic(&args.topic).await {
        Ok(info) => info.config.partitions,
        Err(e) if e.code() == Some(weir_api::Code::NotFound) => {
            let config = TopicConfig::new(args.topic.clone(), args.partitions);
            client.create_topic(&config).await?.config.partitions
        }
        Err(e) => return Err(e.into()),
    };
    let total_requests = args.records.div_ceil(args.batch as u64);
    let next_request = Arc::new(AtomicU64::new(0));
    let done_records = Arc::new(AtomicU64::new(0));
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.records)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} records  {per_sec}  eta {eta}",
        )
        .expect("template"),
    );
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let (client, args, next_request, done_records, bar, shutdown) = (
            clients[worker % clients.len()].clone(),
            args.clone(),
            next_request.clone(),
            done_records.clone(),
            bar.clone(),
            shutdown.clone(),
        );
        workers.push(tokio::spawn(async move {
            let payloads = batches(&args, worker);
            let mut latencies = Vec::new();
            let mut bytes = 0u64;
            let mut raw = client.raw();
            // Stream mode: one PublishStream per worker with up to `window` requests in flight.
            let window = if args.stream { 16 } else { 1 };
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(window);
            let mut inbound = if args.stream {
                Some(
                    raw.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner(),
                )
            } else {
                None
            };
            let mut in_flight = std::collections::VecDeque::new();
            loop {
                let n = next_request.fetch_add(1, Ordering::Relaxed);
                let done = n >= total_requests || shutdown.is_cancelled();
                if !done {
                    let count =
                        (args.records - n * args.batch as u64).min(args.batch as u64) as usize;
                    let records: Vec<pb::Record> =
                        payloads[n as usize % payloads.len()][..count].to_vec();
                    bytes += records
                        .iter()
                        .map(|r| (r.value.len() + r.key.as_ref().map_or(0, |k| k.len())) as u64)
                        .sum::<u64>();
                    let request = pb::PublishRequest {
                        topic: args.topic.clone(),
                        partition: Some((n % u64::from(partitions)) as u32),
                        records,
                        producer: None,
                        request_id: n,
                    };
                    in_flight.push_back((Instant::now(), count));
                    match &mut inbound {
                        Some(_) => tx
                            .send(request)
                            .await
                            .map_err(|_| anyhow::anyhow!("publish stream closed"))?,
                        None => {
                            raw.publish(request).await?;
                        }
                    }
                }
                // Collect acks: unary calls are already acked; a stream keeps `window` in flight.
                while in_flight.len() >= window || (done && !in_flight.is_empty()) {
                    if let Some(stream) = &mut inbound {
                        let response = stream
                            .message()
                            .await?
                            .ok_or_else(|| anyhow::anyhow!("publish stream ended early"))?;
                        if let Some(e) = response.error {
                            anyhow::bail!("publish refused: {}", e.message);
                        }
                    }
                    let (sent, count) = in_flight.pop_front().expect("in flight");
                    latencies.push(sent.elapsed());
                    done_records.fetch_add(count as u64, Ordering::Relaxed);
                    bar.inc(count as u64);
                }
                if done {
                    break;
                }
            }
            Ok::<_, anyhow::Error>((latencies, bytes))
        }));
    }
    let mut latencies = Vec::new();
    let mut bytes = 0;
    for w in workers {
        let (l, b) = w.await??;
        latencies.extend(l);
        bytes += b;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    latencies.sort();
    Ok(PublishReport {
        records: done_records.load(Ordering::Relaxed),
        bytes,
        elapsed,
        latencies,
    })
}
