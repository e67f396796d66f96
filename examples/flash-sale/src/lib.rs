//! The seed's flash sale, run for real against a weir server: a burst of seckill requests
//! (with impatient repeats and client retries) far beyond what the order system takes is
//! accepted in milliseconds and queued durably; the admission limit drops a user's repeats
//! within a window before they reach the log; the order plugin drains the queue at a bounded
//! pace on every partition and creates exactly as many orders as there is stock; a share of
//! the orders is paid, which flows to points, red envelopes and analytics. [`verify`] recounts
//! everything from what was sent and checks it against what weir holds.
//!
//! [`demo`] is `cargo xtask demo`: it runs the sale on a fresh `weir serve`, then again with
//! the server killed with `kill -9` twice mid-run, and shows the same verified totals.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use weir_api::pb;
use weir_api::Code;
use weir_api::StartAt;
use weir_api::PROBE_HEADER;
use weir_api::{Admission, Record, TopicConfig};
use weir_api::{Client, Deploy, StateAnswer};

/// The requests topic.
pub const REQUESTS: &str = "seckill.requests";
/// The item on sale.
pub const ITEM: &str = "phone-x";

/// The size and shape of a sale.
#[derive(Clone, Debug)]
pub struct Sale {
    /// Seckill requests in the burst (repeats and retries included).
    pub requests: u64,
    /// Distinct users.
    pub users: u64,
    /// Units of stock.
    pub stock: u64,
    /// Partitions of every topic: the order plugin drains them in parallel.
    pub partitions: u32,
    /// The pace the order system takes, requests per second over all partitions.
    pub order_rate: u64,
    /// Percent of requests followed at once by the same user again (an impatient click).
    pub repeat_percent: u64,
    /// Percent of requests re-sent with the same id (a client retry after a timeout).
    pub retry_percent: u64,
    /// Admission: one request per user per this window. Longer than the burst, so each
    /// user's first request is the one admitted and the run is deterministic.
    pub admit_window_ms: u64,
    /// Percent of created orders that get paid.
    pub pay_percent: u64,
    /// Random seed of the generated load.
    pub seed: u64,
}

impl Sale {
    /// The README demo: 200,000 requests from 50,000 users for 1,000 units.
    pub fn demo() -> Sale {
        Sale {
            requests: 200_000,
            users: 50_000,
            stock: 1_000,
            partitions: 4,
            order_rate: 2_000,
            repeat_percent: 10,
            retry_percent: 3,
            admit_window_ms: 60_000,
            pay_percent: 80,
            seed: 7,
        }
    }

    /// The CI version: the same code path, a tenth of the load.
    pub fn small() -> Sale {
        Sale {
            requests: 20_000,
            users: 5_000,
            stock: 200,
            order_rate: 500,
            ..Sale::demo()
        }
    }
}

/// One seckill request as the load generator sends it.
#[derive(Clone, Debug)]
pub struct SeckillRequest {
    /// Request id (the record's message id; a retry re-sends it).
    pub id: String,
    /// Who asks.
    pub user: String,
}

impl SeckillRequest {
    fn record(&self) -> Record {
        Record {
            key: Some(self.user.clone().into()),
            id: Some(self.id.clone()),
            ..Record::from_value(format!(
                r#"{{"request":"{}","user":"{}","item":"{ITEM}"}}"#,
                self.id, self.user
            ))
        }
    }
}

/// The burst, in sending order: users drawn with a hot set (a fifth of the users send half of
/// the requests), impatient repeats right after a request, retries of the same id.
pub fn requests(sale: &Sale) -> Vec<SeckillRequest> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(sale.seed);
    let mut out = Vec::with_capacity(sale.requests as usize);
    let mut n = 0u64;
    while (out.len() as u64) < sale.requests {
        let user = if rng.random_bool(0.5) {
            rng.random_range(0..(sale.users / 5).max(1))
        } else {
            rng.random_range(0..sale.users)
        };
        let request = SeckillRequest {
            id: format!("req-{n}"),
            user: format!("u{user}"),
        };
        n += 1;
        let repeat = rng.random_range(0..100) < sale.repeat_percent;
        let retry = rng.random_range(0..100) < sale.retry_percent;
        out.push(request.clone());
        if repeat {
            out.push(SeckillRequest {
                id: format!("req-{n}"),
                user: request.user.clone(),
            });
            n += 1;
        }
        if retry {
            out.push(request);
        }
    }
    out.truncate(sale.requests as usize);
    out
}

/// Creates topics of `sale.partitions` partitions; the requests topic gets the admission limit
/// (one request per user per `admit_window_ms`).
async fn create_topics(client: &Client, sale: &Sale, names: &[&str]) -> Result<()> {
    for &name in names {
        client
            .create_topic(&TopicConfig {
                name: name.into(),
                partitions: sale.partitions,
                retention_ms: 0,
                retention_bytes: 0,
                admission: (name == REQUESTS).then_some(Admission {
                    per_key: 1,
                    window_ms: sale.admit_window_ms,
                }),
            })
            .await?;
    }
    Ok(())
}

/// Creates the topics and deploys the four plugins from `wasm_dir`.
///
/// # Errors
/// A topic or plugin the server refused, a missing wasm file.
pub async fn setup(client: &Client, sale: &Sale, wasm_dir: &Path) -> Result<()> {
    create_topics(
        client,
        sale,
        &[
            REQUESTS,
            "order.created",
            "order.rejected",
            "order.paid",
            "points.credited",
            "red-envelope.grants",
            "analytics.purchases",
        ],
    )
    .await?;
    let wasm = |name: &str| -> Result<Vec<u8>> {
        let path = wasm_dir.join(format!("{}.wasm", name.replace('-', "_")));
        std::fs::read(&path).with_context(|| {
            format!(
                "plugin artifact {} is missing: `cargo xtask demo` builds the plugins first",
                path.display()
            )
        })
    };
    let config = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let deploys = [
        Deploy {
            name: "order".into(),
            wasm: wasm("order")?,
            input: REQUESTS.into(),
            outputs: vec!["order.created".into(), "order.rejected".into()],
            config: config(&[
                ("stock", sale.stock.to_string()),
                ("shares", sale.partitions.to_string()),
            ]),
            max_rate: sale.order_rate,
            alert_delay_ms: 30_000,
            ..Default::default()
        },
        Deploy {
            name: "points".into(),
            wasm: wasm("points")?,
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            ..Default::default()
        },
        Deploy {
            name: "red-envelope".into(),
            wasm: wasm("red-envelope")?,
            input: "order.paid".into(),
            outputs: vec!["red-envelope.grants".into()],
            config: config(&[
                ("campaign", "flash-sale".into()),
                ("threshold", "1".into()),
                ("amount", "8".into()),
            ]),
            ..Default::default()
        },
        Deploy {
            name: "analytics-filter".into(),
            wasm: wasm("analytics-filter")?,
            input: "order.paid".into(),
            outputs: vec!["analytics.purchases".into()],
            config: config(&[
                ("fields", "order,user,amount".into()),
                ("min_amount", "100".into()),
            ]),
            ..Default::default()
        },
    ];
    for d in deploys {
        client.deploy_plugin(d).await?;
    }
    Ok(())
}

/// What the burst got back.
#[derive(Clone, Debug, Default)]
pub struct BurstReport {
    /// Requests sent.
    pub sent: u64,
    /// Stored and acknowledged.
    pub accepted: u64,
    /// Refused by the admission limit (never reached the log).
    pub refused: u64,
    /// Where the last accepted request of each user went: (partition, offset).
    pub positions: HashMap<String, (u32, u64)>,
    /// How long the burst took to be acknowledged.
    pub elapsed: Duration,
}

/// Sends the burst over one publish stream per partition (one request per message, as a
/// gateway forwards clicks) and counts acknowledgements and admission refusals.
///
/// # Errors
/// Any refusal other than the admission limit, or a broken stream.
pub async fn burst(
    client: &Client,
    requests: &[SeckillRequest],
    partitions: u32,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BurstReport> {
    let started = Instant::now();
    // One stream per partition, in sending order: each partition's log order is the order
    // the requests were sent in, so which users win does not depend on timing.
    let mut per_partition: Vec<Vec<pb::PublishRequest>> = vec![Vec::new(); partitions as usize];
    for (i, r) in requests.iter().enumerate() {
        let p = weir_api::partition_for_key(r.user.as_bytes(), partitions);
        per_partition[p as usize].push(pb::PublishRequest {
            topic: REQUESTS.into(),
            partition: Some(p),
            records: vec![r.record().into()],
            producer: None,
            request_id: i as u64,
        });
    }
    let mut tasks = Vec::new();
    for part in per_partition {
        let mut raw = client.raw();
        tasks.push(async move {
            let mut responses = raw
                .publish_stream(tokio_stream::iter(part))
                .await?
                .into_inner();
            let mut out = Vec::new();
            while let Some(r) = responses.next().await {
                out.push(r?);
                if out.len() % 1000 == 0 {
                    progress(1000);
                }
            }
            progress((out.len() % 1000) as u64);
            anyhow::Ok(out)
        });
    }
    let mut report = BurstReport {
        sent: requests.len() as u64,
        ..Default::default()
    };
    for responses in futures::future::join_all(tasks).await {
        for r in responses? {
            let request = &requests[r.request_id as usize];
            match (&r.error, r.acks.first()) {
                (None, Some(ack)) => {
                    report.accepted += 1;
                    report
                        .positions
                        .insert(request.user.clone(), (ack.partition, ack.base_offset));
                }
                (Some(e), _) if e.code == Code::ResourceExhausted as i32 => report.refused += 1,
                (Some(e), _) => bail!("request {} refused: {}", request.id, e.message),
                (None, None) => bail!("request {} got an empty ack", request.id),
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Waits until the plugin or group `name` (every one for `""`) has committed past the ends its partitions had when
/// the wait began (probes keep arriving, so "lag 0" may never be seen at a sample), calling
/// `show` with each answer about every `every`.
///
/// # Errors
/// A halted plugin, or no progress for `stuck_after`.
pub async fn drain(
    client: &Client,
    name: &str,
    every: Duration,
    stuck_after: Duration,
    show: &mut dyn FnMut(&pb::GetLagResponse),
) -> Result<pb::GetLagResponse> {
    let key = |r: &pb::LagRow| (r.kind.clone(), r.name.clone(), r.topic.clone(), r.partition);
    let mut targets: HashMap<(String, String, String, u32), u64> = HashMap::new();
    let mut last_behind = u64::MAX;
    let mut last_progress = Instant::now();
    loop {
        let lag = client.lag(name).await.unwrap_or_default();
        if !lag.rows.is_empty() {
            show(&lag);
        }
        if let Some(c) = lag.consumers.iter().find(|c| c.status == "ERROR") {
            bail!("plugin {} halted: see `weir plugin list`", c.name);
        }
        for r in &lag.rows {
            targets.entry(key(r)).or_insert(r.end);
        }
        let behind: u64 = lag
            .rows
            .iter()
            .map(|r| targets[&key(r)].saturating_sub(r.committed))
            .sum();
        if behind == 0 && !lag.rows.is_empty() {
            return Ok(lag);
        }
        if behind < last_behind {
            last_behind = behind;
            last_progress = Instant::now();
        }
        ensure!(
            last_progress.elapsed() < stuck_after,
            "no progress for {stuck_after:?}; {behind} records still to process"
        );
        tokio::time::sleep(every).await;
    }
}

/// Every record of a topic but probes, read from the earliest offset up to the current end.
///
/// # Errors
/// Transport failures.
pub async fn read_all(client: &Client, topic: &str) -> Result<Vec<serde_json::Value>> {
    let info = client.describe_topic(topic).await?;
    let end: u64 = info
        .partitions
        .iter()
        .map(|p| p.end_offset - p.start_offset)
        .sum();
    let mut out = Vec::with_capacity(end as usize);
    let mut seen = 0u64;
    if end == 0 {
        return Ok(out);
    }
    let mut sub = client
        .subscribe(topic, &[], StartAt::Earliest, None)
        .await?;
    while seen < end {
        let batch = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .context("reading a topic timed out")??
            .context("subscription ended")?;
        for r in batch {
            seen += 1;
            if r.record.headers.iter().any(|(k, _)| k == PROBE_HEADER) {
                continue;
            }
            out.push(serde_json::from_slice(&r.record.value)?);
        }
    }
    Ok(out)
}

/// A paid order as the payment system publishes it.
#[derive(Clone, Debug)]
pub struct Payment {
    /// Numeric order id (the request number).
    pub order: u64,
    /// Buyer.
    pub user: String,
    /// Amount.
    pub amount: u64,
}

/// Pays `pay_percent` of the created orders (deterministically by order id) and re-sends a
/// few payments (the payment system's retries: same message id).
///
/// # Errors
/// Reading the orders or publishing failed.
pub async fn pay(client: &Client, sale: &Sale) -> Result<Vec<Payment>> {
    let created = read_all(client, "order.created").await?;
    let mut payments = Vec::new();
    for o in &created {
        let request = o["order"].as_str().context("order id")?;
        let order: u64 = request.trim_start_matches("req-").parse()?;
        if (order.wrapping_mul(2_654_435_761) % 100) < sale.pay_percent {
            payments.push(Payment {
                order,
                user: o["user"].as_str().context("user")?.to_string(),
                amount: 20 + order.wrapping_mul(7_919) % 300,
            });
        }
    }
    let record = |p: &Payment| Record {
        key: Some(p.user.clone().into()),
        id: Some(format!("paid-{}", p.order)),
        ..Record::from_value(format!(
            r#"{{"order":{},"user":"{}","amount":{}}}"#,
            p.order, p.user, p.amount
        ))
    };
    for batch in payments.chunks(500) {
        let mut records: Vec<Record> = batch.iter().map(record).collect();
        // Every tenth payment is delivered twice.
        records.extend(batch.iter().step_by(10).map(record));
        client.publish("order.paid", None, records).await?;
    }
    Ok(payments)
}

/// The verified totals of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Requests sent.
    pub sent: u64,
    /// Accepted into the log.
    pub accepted: u64,
    /// Refused by admission.
    pub refused: u64,
    /// Orders created (= stock).
    pub orders: u64,
    /// Requests answered with a rejection.
    pub rejected: u64,
    /// Accepted retries the order plugin skipped as already processed.
    pub deduplicated: u64,
    /// Paid orders.
    pub paid: u64,
    /// Points credited in all.
    pub points: u64,
    /// Red envelopes granted.
    pub envelopes: u64,
    /// Analytics records.
    pub analytics: u64,
}

/// Recounts everything from what was sent and checks weir's state and topics against it.
///
/// # Errors
/// The first invariant that does not hold, with what was found.
pub async fn verify(
    client: &Client,
    sale: &Sale,
    burst: &BurstReport,
    payments: &[Payment],
) -> Result<Totals> {
    ensure!(
        burst.accepted + burst.refused == burst.sent,
        "accepted {} + refused {} != sent {}",
        burst.accepted,
        burst.refused,
        burst.sent
    );
    let stored = read_all(client, REQUESTS).await?.len() as u64;
    ensure!(
        stored == burst.accepted,
        "{stored} requests stored, {} acknowledged",
        burst.accepted
    );
    let created = read_all(client, "order.created").await?;
    let rejected = read_all(client, "order.rejected").await?;
    ensure!(
        created.len() as u64 == sale.stock,
        "{} orders created for a stock of {}",
        created.len(),
        sale.stock
    );
    let buyers: BTreeSet<&str> = created.iter().filter_map(|o| o["user"].as_str()).collect();
    ensure!(
        buyers.len() == created.len(),
        "a user has two orders: {} orders, {} buyers",
        created.len(),
        buyers.len()
    );
    let plugins = client.list_plugins().await?;
    let order = plugins
        .iter()
        .find(|p| p.name == "order")
        .context("order plugin")?;
    let deduplicated: u64 = order.partitions.iter().map(|p| p.skipped).sum();
    ensure!(
        created.len() as u64 + rejected.len() as u64 + deduplicated == burst.accepted,
        "created {} + rejected {} + deduplicated {deduplicated} != accepted {}",
        created.len(),
        rejected.len(),
        burst.accepted
    );
    // Every buyer's result says ordered; sold-out answers say rejected.
    for user in &buyers {
        let key = format!("result/{ITEM}/{user}");
        let (value, _) = client
            .get_state("order", key.as_bytes())
            .await?
            .with_context(|| format!("no result for buyer {user}"))?;
        let v: serde_json::Value = serde_json::from_slice(&value)?;
        ensure!(v["status"] == "ordered", "buyer {user}'s result is {v}");
    }
    for r in rejected
        .iter()
        .filter(|r| r["reason"] == "sold out")
        .take(200)
    {
        let user = r["user"].as_str().context("user")?;
        if buyers.contains(user) {
            continue;
        }
        let key = format!("result/{ITEM}/{user}");
        let (value, _) = client
            .get_state("order", key.as_bytes())
            .await?
            .with_context(|| format!("no result for {user}"))?;
        let v: serde_json::Value = serde_json::from_slice(&value)?;
        ensure!(v["status"] == "rejected", "{user}'s result is {v}");
    }
    // Paid orders: points = floor(amount) per payment, once; one envelope per buyer who paid;
    // analytics keeps payments of 100 or more.
    let mut expected_points: BTreeMap<&str, u64> = BTreeMap::new();
    for p in payments {
        *expected_points.entry(&p.user).or_default() += p.amount;
    }
    for (user, want) in &expected_points {
        let (value, _) = client
            .get_state("points", format!("balance/{user}").as_bytes())
            .await?
            .with_context(|| format!("no points balance for {user}"))?;
        let got: u64 = serde_json::from_slice(&value)?;
        ensure!(
            got == *want,
            "{user} has {got} points, the recount says {want}"
        );
    }
    let credited = read_all(client, "points.credited").await?;
    ensure!(
        credited.len() == payments.len(),
        "{} points credits for {} payments",
        credited.len(),
        payments.len()
    );
    let grants = read_all(client, "red-envelope.grants").await?;
    let granted: BTreeSet<&str> = grants.iter().filter_map(|g| g["user"].as_str()).collect();
    ensure!(
        grants.len() == expected_points.len() && granted.len() == grants.len(),
        "{} envelopes ({} users) for {} paying users",
        grants.len(),
        granted.len(),
        expected_points.len()
    );
    let analytics = read_all(client, "analytics.purchases").await?;
    let big = payments.iter().filter(|p| p.amount >= 100).count();
    ensure!(
        analytics.len() == big,
        "{} analytics records, {big} payments of 100 or more",
        analytics.len()
    );
    Ok(Totals {
        sent: burst.sent,
        accepted: burst.accepted,
        refused: burst.refused,
        orders: created.len() as u64,
        rejected: rejected.len() as u64,
        deduplicated,
        paid: payments.len() as u64,
        points: expected_points.values().sum(),
        envelopes: grants.len() as u64,
        analytics: analytics.len() as u64,
    })
}

/// A `weir serve` child process of the demo.
pub struct Server {
    child: std::process::Child,
    /// gRPC URL.
    pub url: String,
    /// Status page / metrics address.
    pub metrics: String,
}

impl Server {
    /// Starts `weir serve` on `data_dir` with metrics, fast lag sampling and probes.
    ///
    /// # Errors
    /// The binary did not start or did not print its addresses.
    pub fn start(weir: &Path, data_dir: &Path, log: &Path) -> Result<Server> {
        use std::io::BufRead;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = std::process::Command::new(weir)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--lag-sample-ms", "250", "--probe-interval-ms", "250"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("WEIR_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", weir.display()))?;
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut line = |prefix: &str| -> Result<String> {
            let l = lines.next().context("weir serve exited")??;
            l.strip_prefix(prefix)
                .map(str::to_string)
                .with_context(|| format!("unexpected output of weir serve: {l:?}"))
        };
        let url = format!("http://{}", line("weir listening on ")?);
        let metrics = line("weir metrics on ")?;
        Ok(Server {
            child,
            url,
            metrics,
        })
    }

    /// `kill -9`.
    pub fn kill9(mut self) -> Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -9 failed");
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait (a clean stop).
    pub fn stop(mut self) -> Result<()> {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let first = run_phase(opts, &dir.path().join("phase1"), false).await?;
    say!(
        opts,
        "\n== phase 2: the same sale, with kill -9 twice mid-run"
    );
    let second = run_phase(opts, &dir.path().join("phase2"), true).await?;
    say!(
        opts,
        "\n== verified totals              phase 1   phase 2 (kill -9 ×2)"
    );
    for (name, a, b) in [
        ("requests sent", first.sent, second.sent),
        ("accepted into the log", first.accepted, second.accepted),
        ("refused by admission", first.refused, second.refused),
        ("orders created (= stock)", first.orders, second.orders),
        ("requests rejected", first.rejected, second.rejected),
        ("paid orders", first.paid, second.paid),
        ("points credited", first.points, second.points),
        ("red envelopes", first.envelopes, second.envelopes),
        ("analytics records", first.analytics, second.analytics),
    ] {
        say!(
            opts,
            "   {name:<28} {a:>9} {b:>9}   {}",
            if a == b { "same" } else { "DIFFERENT" }
        );
    }
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

async fn run_phase(opts: &DemoOptions, dir: &Path, crash: bool) -> Result<Totals> {
    let sale = &opts.sale;
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data");
    let log = dir.join("server.log");
    let mut server = Server::start(&opts.weir, &data, &log)?;
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
        let report = burst(&client, &load, sale.partitions, &progress).await;
        watcher.abort();
        report?
    };
    bar.finish();
    say!(
        opts,
        "   burst acknowledged in {:.2?}: {} stored, {} refused by admission (one per user per {} ms)",
        report.elapsed,
        report.accepted,
        report.refused,
        sale.admit_window_ms
    );
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
        server = Server::start(&opts.weir, &data, &log)?;
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
    let payments = pay(&client, sale).await?;
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
        server = Server::start(&opts.weir, &data, &log)?;
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
