//! The demo around the sale: the two phases (a clean run, then one with the server killed
//! with `kill -9` mid-run, or produced through Kafka) and the order plugin's drain benchmark.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use weir_api::pb;
use weir_api::{Client, Deploy, StateAnswer};

pub use crate::server::Server;
use crate::*;

/// How a phase's requests and payments reach weir.
#[derive(Clone, Debug)]
pub enum Via {
    /// weir's gRPC API (the requests topic has the admission limit).
    Grpc,
    /// Kafka, produced by confluent-kafka under this Python (see [`crate::kafka`]).
    Kafka(PathBuf),
}

/// Where the demo runs and how loud it is.
pub struct DemoOptions {
    /// The `weir` binary.
    pub weir: PathBuf,
    /// Directory of the plugin `.wasm` files.
    pub wasm_dir: PathBuf,
    /// Sale size.
    pub sale: Sale,
    /// Progress bars and lag tables (off in tests).
    pub verbose: bool,
}

/// Prints to stdout when verbose.
macro_rules! say {
    ($opts:expr, $($arg:tt)*) => { if $opts.verbose { println!($($arg)*) } };
}

/// Both phases: a clean run, then a run with `kill -9` during the drain and again while the
/// paid orders flow; returns both verified totals.
///
/// # Errors
/// Any failed step or verification.
pub async fn demo(opts: &DemoOptions) -> Result<(Totals, Totals)> {
    let dir = tempfile::tempdir()?;
    say!(opts, "\n== phase 1: the flash sale");
    let first = run_phase(opts, &dir.path().join("phase1"), false, &Via::Grpc).await?;
    say!(
        opts,
        "\n== phase 2: the same sale, with kill -9 twice mid-run"
    );
    let second = run_phase(opts, &dir.path().join("phase2"), true, &Via::Grpc).await?;
    print_totals(
        opts,
        "phase 1   phase 2 (kill -9 ×2)",
        &first,
        &second,
        false,
    );
    ensure!(
        first == second,
        "the run with kill -9 differs: {first:?} vs {second:?}"
    );
    say!(
        opts,
        "\n== exactly once: a crashed and restarted weir reached the same totals"
    );
    Ok((first, second))
}

/// Two runs' verified totals side by side, each line marked same or DIFFERENT. With
/// `repeats_moved` (a gRPC run beside a Kafka one) the lines of where repeats stop are marked
/// as such: admission in one, the order plugin in the other.
fn print_totals(opts: &DemoOptions, columns: &str, a: &Totals, b: &Totals, repeats_moved: bool) {
    say!(opts, "\n== verified totals              {columns}");
    for (name, x, y, moved) in [
        ("requests sent", a.sent, b.sent, false),
        ("accepted into the log", a.accepted, b.accepted, true),
        ("refused by admission", a.refused, b.refused, true),
        ("orders created (= stock)", a.orders, b.orders, false),
        ("requests rejected", a.rejected, b.rejected, true),
        (
            "retries skipped by id",
            a.deduplicated,
            b.deduplicated,
            true,
        ),
        ("paid orders", a.paid, b.paid, false),
        ("points credited", a.points, b.points, false),
        ("red envelopes", a.envelopes, b.envelopes, false),
        ("analytics records", a.analytics, b.analytics, false),
    ] {
        let mark = match (x == y, moved && repeats_moved) {
            (true, _) => "same",
            (false, true) => "repeats stopped by the plugin, not admission",
            (false, false) => "DIFFERENT",
        };
        say!(opts, "   {name:<28} {x:>9} {y:>9}   {mark}");
    }
}

/// The sale through gRPC, then the same sale with its requests and payments produced through
/// Kafka by confluent-kafka under `python`, with kill -9 twice mid-run; both verified, and
/// every effect compared.
///
/// # Errors
/// Any failed step or verification, or different effects.
pub async fn demo_kafka(opts: &DemoOptions, python: &Path) -> Result<(Totals, Totals)> {
    let dir = tempfile::tempdir()?;
    say!(opts, "\n== phase 1: the flash sale, published through gRPC");
    let grpc = run_phase(opts, &dir.path().join("grpc"), false, &Via::Grpc).await?;
    say!(
        opts,
        "\n== phase 2: the same sale produced through Kafka (confluent-kafka), with kill -9 twice mid-run"
    );
    let kafka = run_phase(
        opts,
        &dir.path().join("kafka"),
        true,
        &Via::Kafka(python.to_path_buf()),
    )
    .await?;
    print_totals(opts, "gRPC      Kafka (kill -9 ×2)", &grpc, &kafka, true);
    let effects = |t: &Totals| {
        let counts = (t.sent, t.orders, t.paid, t.points, t.envelopes, t.analytics);
        (counts, t.buyers)
    };
    ensure!(
        effects(&grpc) == effects(&kafka),
        "the Kafka run's effects differ: {grpc:?} vs {kafka:?}"
    );
    ensure!(
        kafka.accepted == kafka.sent
            && kafka.rejected + kafka.deduplicated
                == grpc.rejected + grpc.refused + grpc.deduplicated,
        "the Kafka run's repeats do not add up: {grpc:?} vs {kafka:?}"
    );
    say!(
        opts,
        "\n== the same orders, points, envelopes and analytics whichever protocol the services speak"
    );
    Ok((grpc, kafka))
}

/// The sale on one node, then on three weir nodes over the JetStream cluster at `nats` with
/// two of them killed mid-drain; both verified, and their totals compared.
///
/// # Errors
/// Any failed step or verification, or different totals.
pub async fn demo_cluster(
    opts: &DemoOptions,
    nats: &str,
    prefix: &str,
) -> Result<(Totals, crate::cluster::ClusterReport)> {
    let dir = tempfile::tempdir()?;
    say!(opts, "\n== phase 1: the flash sale on one node");
    let single = run_phase(opts, &dir.path().join("single"), false, &Via::Grpc).await?;
    say!(
        opts,
        "\n== phase 2: the same sale on 3 weir nodes over JetStream, two of them killed with kill -9"
    );
    let cluster =
        crate::cluster::cluster_phase(opts, &dir.path().join("cluster"), nats, prefix, 3).await?;
    print_totals(
        opts,
        "one node   cluster (2 nodes killed)",
        &single,
        &cluster.totals,
        false,
    );
    for (plugin, took) in &cluster.failovers {
        say!(
            opts,
            "   failover of {plugin:<16} kill -9 → first commit on the new node: {took:.2?}"
        );
    }
    ensure!(
        single == cluster.totals,
        "the cluster run differs: {single:?} vs {:?}",
        cluster.totals
    );
    say!(
        opts,
        "\n== exactly once across nodes: the cluster with two nodes killed reached the same totals"
    );
    Ok((single, cluster))
}

/// The sale on one fresh node, without crashes: the totals every other run must reach.
///
/// # Errors
/// Any failed step or verification.
pub async fn single_phase(opts: &DemoOptions, dir: &Path) -> Result<Totals> {
    run_phase(opts, dir, false, &Via::Grpc).await
}

async fn run_phase(opts: &DemoOptions, dir: &Path, crash: bool, via: &Via) -> Result<Totals> {
    // Through Kafka, no admission limit: it would refuse a client's whole batch (crate::kafka).
    let kafka_sale;
    let (sale, extra): (&Sale, &[&str]) = match via {
        Via::Grpc => (&opts.sale, &[]),
        Via::Kafka(_) => {
            kafka_sale = Sale {
                admit_window_ms: 0,
                ..opts.sale.clone()
            };
            (&kafka_sale, &["--kafka-listen", "127.0.0.1:0"])
        }
    };
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data");
    let log = dir.join("server.log");
    let mut server = Server::start_with(&opts.weir, &data, &log, extra)?;
    // A producer for the server's Kafka listener (its port changes with each start).
    let producer = |server: &Server| -> Result<Option<crate::kafka::KafkaProducer>> {
        match (via, &server.kafka) {
            (Via::Grpc, _) => Ok(None),
            (Via::Kafka(python), Some(bootstrap)) => Ok(Some(crate::kafka::KafkaProducer::new(
                python, dir, bootstrap,
            )?)),
            (Via::Kafka(_), None) => anyhow::bail!("weir serve did not start its Kafka listener"),
        }
    };
    say!(
        opts,
        "   weir serve on {} · status page http://{}/ · server log {}",
        server.url,
        server.metrics,
        log.display()
    );
    let mut client = Client::connect(&server.url).await?;
    setup(&client, sale, &opts.wasm_dir).await?;
    let load = requests(sale);
    say!(
        opts,
        "   {} seckill requests from {} users for {} units; the order system takes {}/s on {} partitions",
        load.len(),
        sale.users,
        sale.stock,
        sale.order_rate,
        sale.partitions
    );
    let bar = if opts.verbose {
        indicatif::ProgressBar::new(load.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "   burst  [{bar:40}] {pos}/{len} acked · {per_sec} · {msg}",
        )?
        .progress_chars("=> "),
    );
    let report = {
        let lag_bar = bar.clone();
        let bar = bar.clone();
        let progress = move |n: u64| bar.inc(n);
        let lag_client = client.clone();
        let watcher = tokio::spawn(async move {
            loop {
                if let Ok(l) = lag_client.lag("order").await {
                    if let Some(c) = l.consumers.first() {
                        lag_bar.set_message(format!("order lag {}", c.lag));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let report = match producer(&server)? {
            None => burst(&client, &load, sale.partitions, &progress).await,
            Some(kafka) => {
                let load = load.clone();
                let partitions = sale.partitions;
                tokio::task::spawn_blocking(move || kafka.burst(&load, partitions, &progress))
                    .await?
            }
        };
        watcher.abort();
        report?
    };
    bar.finish();
    match via {
        Via::Grpc => say!(
            opts,
            "   burst acknowledged in {:.2?}: {} stored, {} refused by admission (one per user per {} ms)",
            report.elapsed,
            report.accepted,
            report.refused,
            sale.admit_window_ms
        ),
        Via::Kafka(_) => say!(
            opts,
            "   burst produced through Kafka in {:.2?}: {} stored (idempotent producer, acks=all); no admission limit on this path: repeats go to the order plugin",
            report.elapsed,
            report.accepted,
        ),
    }
    // The seed's 秒杀结果计算中: a late requester asks for the result right away.
    if let Some((user, &(partition, offset))) = report.positions.iter().max_by_key(|(_, p)| p.1) {
        let key = format!("result/{ITEM}/{user}");
        let answer = client
            .get_state_after("order", key.as_bytes(), partition, offset)
            .await?;
        say!(
            opts,
            "   result for {user} (request at {partition}:{offset}) right after the ack: {}",
            match answer {
                StateAnswer::Pending => "pending (秒杀结果计算中)".to_string(),
                StateAnswer::Value(v, _) => String::from_utf8_lossy(&v).into_owned(),
                StateAnswer::Absent => "processed, no result".into(),
            }
        );
    }
    let mut shown = Instant::now() - Duration::from_secs(10);
    let mut show = |l: &pb::GetLagResponse| {
        if opts.verbose && shown.elapsed() >= Duration::from_secs(2) {
            shown = Instant::now();
            println!("   $ weir lag");
            for line in weir_api::lag::table(l).lines() {
                println!("   {line}");
            }
        }
    };
    if crash {
        // Let the order plugin get part-way, then pull the plug.
        let half = report.accepted / 3;
        loop {
            let l = client.lag("order").await?;
            let done: u64 = l.rows.iter().map(|r| r.committed).sum();
            if done >= half {
                say!(
                    opts,
                    "   kill -9 while the order plugin drains ({done} of {} requests processed)",
                    report.accepted
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill9()?;
        server = Server::start_with(&opts.weir, &data, &log, extra)?;
        client = Client::connect(&server.url).await?;
        say!(opts, "   restarted on {}", server.url);
    }
    drain(
        &client,
        "order",
        Duration::from_millis(250),
        Duration::from_secs(60),
        &mut show,
    )
    .await?;
    say!(opts, "   drained: every request answered");
    let payments = match producer(&server)? {
        None => pay(&client, sale).await?,
        Some(kafka) => {
            let payments = crate::payments(&client, sale).await?;
            let sent = payments.clone();
            let partitions = sale.partitions;
            tokio::task::spawn_blocking(move || kafka.pay(&sent, partitions)).await??;
            payments
        }
    };
    say!(
        opts,
        "   {} orders paid (a tenth of the payments delivered twice)",
        payments.len()
    );
    if crash {
        tokio::time::sleep(Duration::from_millis(100)).await;
        say!(
            opts,
            "   kill -9 while points, red envelopes and analytics drain"
        );
        server.kill9()?;
        server = Server::start_with(&opts.weir, &data, &log, extra)?;
        client = Client::connect(&server.url).await?;
    }
    let lag = drain(
        &client,
        "",
        Duration::from_millis(250),
        Duration::from_secs(60),
        &mut |_| {},
    )
    .await?;
    let totals = verify(&client, sale, &report, &payments).await?;
    say!(opts, "   verified:");
    say!(
        opts,
        "     requests   {} sent = {} stored + {} refused by admission",
        totals.sent,
        totals.accepted,
        totals.refused
    );
    say!(
        opts,
        "     orders     {} created = stock, no user twice; {} rejected; {} retries skipped by id",
        totals.orders,
        totals.rejected,
        totals.deduplicated
    );
    say!(opts, "     payments   {} paid → {} points (recount matches every balance), {} red envelopes, {} analytics records", totals.paid, totals.points, totals.envelopes, totals.analytics);
    for c in &lag.consumers {
        if c.probes_seen > 0 {
            say!(
                opts,
                "     delay      {:<16} probes p50 {:.0} ms, p99 {:.0} ms ({} probes, {} lost)",
                c.name,
                c.probe_p50_ms,
                c.probe_p99_ms,
                c.probes_seen,
                c.probes_lost
            );
        }
    }
    server.stop()?;
    Ok(totals)
}

/// Drains the demo's accepted burst through an unthrottled order plugin on `partitions`
/// partitions: (requests, seconds from first deploy to drained). The requests are published
/// first, then the plugin is deployed, so only the drain is timed.
///
/// # Errors
/// Server or verification failures.
pub async fn drain_bench(weir: &Path, wasm_dir: &Path, partitions: u32) -> Result<(u64, f64)> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(
        weir,
        &dir.path().join("data"),
        &dir.path().join("server.log"),
    )?;
    let client = Client::connect(&server.url).await?;
    let sale = Sale {
        partitions,
        order_rate: 0,
        ..Sale::demo()
    };
    create_topics(
        &client,
        &sale,
        &[REQUESTS, "order.created", "order.rejected"],
    )
    .await?;
    let report = burst(&client, &requests(&sale), partitions, &|_| {}).await?;
    let wasm = std::fs::read(wasm_dir.join("order.wasm")).context("order.wasm")?;
    let started = Instant::now();
    client
        .deploy_plugin(Deploy {
            name: "order".into(),
            wasm,
            input: REQUESTS.into(),
            outputs: vec!["order.created".into(), "order.rejected".into()],
            config: vec![
                ("stock".into(), sale.stock.to_string()),
                ("shares".into(), partitions.to_string()),
            ],
            ..Default::default()
        })
        .await?;
    loop {
        let plugins = client.list_plugins().await?;
        let done: u64 = plugins[0].partitions.iter().map(|p| p.committed).sum();
        if done >= report.accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let created = read_all(&client, "order.created").await?.len() as u64;
    ensure!(
        created == sale.stock,
        "{created} orders for a stock of {}",
        sale.stock
    );
    server.stop()?;
    Ok((report.accepted, secs))
}
