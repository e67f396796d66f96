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
//! [`demo_cluster`] is `cargo xtask demo --cluster`: one node, then three over JetStream with
//! the nodes running the order and points plugins killed mid-drain ([`cluster`]).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use weir_api::pb;
use weir_api::Code;
use weir_api::StartAt;
use weir_api::PROBE_HEADER;
use weir_api::{Admission, Record, TopicConfig};
use weir_api::{Client, Deploy};

pub mod cluster;
mod demo;
pub mod kafka;
mod payments;
mod server;
mod verify;
pub use demo::{
    demo, demo_cluster, demo_kafka, drain_bench, single_phase, DemoOptions, Server, Via,
};
pub use payments::{pay, payments, Payment};
pub use verify::{verify, verify_settled, Totals};

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
    /// user's first request is the one admitted and the run is deterministic. 0: no limit.
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
            ..Record::from_value(self.value())
        }
    }

    fn value(&self) -> String {
        format!(
            r#"{{"request":"{}","user":"{}","item":"{ITEM}"}}"#,
            self.id, self.user
        )
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
                admission: (name == REQUESTS && sale.admit_window_ms > 0).then_some(Admission {
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
        // A restarted server answers with no rows until its plugins run: that is no sum of
        // 0 to measure progress against.
        if behind < last_behind && !lag.rows.is_empty() {
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
        .map(|p| p.end_offset.saturating_sub(p.start_offset))
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
