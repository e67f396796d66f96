//! The sale on a cluster: three `weir serve --log nats://...` nodes over a JetStream cluster
//! the caller started (`cargo xtask demo --cluster` starts one on loopback). The plugins are
//! deployed through one node and spread over the three; the node running the order plugin is
//! killed with `kill -9` while it drains, and the node running points while the paid orders
//! flow. A survivor takes each plugin over from its changelog; the totals are verified as on
//! one node, and the failover times printed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use weir_api::Client;

use crate::*;

/// What the cluster phase measured.
#[derive(Clone, Debug)]
pub struct ClusterReport {
    /// The verified totals.
    pub totals: Totals,
    /// Per killed node: the plugin it ran, and the time from `kill -9` to the first commit
    /// of that plugin on the node that took it over.
    pub failovers: Vec<(String, Duration)>,
}

/// Prints to stdout when verbose.
macro_rules! say {
    ($opts:expr, $($arg:tt)*) => { if $opts.verbose { println!($($arg)*) } };
}

/// The node running `plugin` as the cluster reports it ("id (address)" → the URL).
async fn owner(client: &Client, plugin: &str) -> Result<Option<String>> {
    let plugins = client.list_plugins().await?;
    let node = plugins
        .iter()
        .find(|p| p.name == plugin)
        .map(|p| p.node.clone())
        .unwrap_or_default();
    Ok(node
        .split_once('(')
        .map(|(_, addr)| format!("http://{}", addr.trim_end_matches(')'))))
}

/// Records `plugin` committed over all partitions, as `client`'s node sees them.
async fn committed(client: &Client, plugin: &str) -> u64 {
    client
        .list_plugins()
        .await
        .ok()
        .and_then(|ps| ps.into_iter().find(|p| p.name == plugin))
        .map_or(0, |p| p.partitions.iter().map(|q| q.committed).sum())
}

/// Kills the node running `plugin` and waits until another node commits for it: returns the
/// time that took and a client of a survivor.
async fn kill_owner(
    opts: &DemoOptions,
    servers: &mut Vec<Server>,
    client: &Client,
    plugin: &str,
) -> Result<(Duration, Client)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        if let Some(url) = owner(client, plugin).await? {
            break url;
        }
        ensure!(Instant::now() < deadline, "no node runs {plugin}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let i = servers
        .iter()
        .position(|s| s.url == url)
        .with_context(|| format!("{plugin} runs on {url}, not a node of this demo"))?;
    let survivor = servers[(i + 1) % servers.len()].url.clone();
    let client = Client::connect(&survivor).await?;
    let before = committed(&client, plugin).await;
    say!(
        opts,
        "   kill -9 the node running {plugin} ({url}); {before} records committed"
    );
    let killed = Instant::now();
    servers.remove(i).kill9()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A survivor's view of a plugin it does not run is refreshed every second: ask the
        // survivors which of them runs it, and that one for its commits.
        if let Some(new) = owner(&client, plugin).await? {
            if new != url {
                let c = Client::connect(&new).await?;
                if committed(&c, plugin).await > before {
                    let took = killed.elapsed();
                    say!(
                        opts,
                        "   {plugin} taken over by {new}: first commit {:.2?} after the kill",
                        took
                    );
                    return Ok((took, client));
                }
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no node took {plugin} over within a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sale on `nodes` weir nodes over the JetStream cluster at `nats` (names under
/// `prefix`, so runs sharing a NATS cluster do not meet), with the owners of the order and
/// the points plugins killed mid-drain.
///
/// # Errors
/// Any failed step or verification.
pub async fn cluster_phase(
    opts: &DemoOptions,
    dir: &Path,
    nats: &str,
    prefix: &str,
    nodes: usize,
) -> Result<ClusterReport> {
    let sale = &opts.sale;
    std::fs::create_dir_all(dir)?;
    let mut servers = Vec::new();
    for n in 0..nodes {
        servers.push(Server::start_with(
            &opts.weir,
            &dir.join(format!("node{n}")),
            &dir.join(format!("node{n}.log")),
            &["--log", nats, "--log-prefix", prefix],
        )?);
    }
    say!(
        opts,
        "   {} weir nodes on JetStream ({nats}): {}",
        nodes,
        servers
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let client = Client::connect(&servers[0].url).await?;
    setup(&client, sale, &opts.wasm_dir).await?;
    let load = requests(sale);
    let report = burst(&client, &load, sale.partitions, &|_| {}).await?;
    say!(
        opts,
        "   burst through {}: {} stored, {} refused by admission in {:.2?}",
        servers[0].url,
        report.accepted,
        report.refused,
        report.elapsed
    );
    let third = report.accepted / 3;
    while committed(&client, "order").await < third {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut failovers = Vec::new();
    let (took, client) = kill_owner(opts, &mut servers, &client, "order").await?;
    failovers.push(("order".to_string(), took));
    drain(
        &client,
        "order",
        Duration::from_millis(250),
        Duration::from_secs(60),
        &mut |_| {},
    )
    .await?;
    if let Some((user, &at)) = report.positions.iter().max_by_key(|(_, p)| p.1) {
        same_result_everywhere(opts, &servers, user, at).await?;
    }
    let payments = pay(&client, sale).await?;
    say!(opts, "   {} orders paid", payments.len());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (took, client) = kill_owner(opts, &mut servers, &client, "points").await?;
    failovers.push(("points".to_string(), took));
    drain(
        &client,
        "",
        Duration::from_millis(250),
        Duration::from_secs(90),
        &mut |_| {},
    )
    .await?;
    let totals = verify_settled(&client, sale, &report, &payments, Duration::from_secs(30)).await?;
    for s in servers {
        s.stop()?;
    }
    Ok(ClusterReport { totals, failovers })
}

/// Failover of the points plugin on two weir nodes over the JetStream cluster at `nats`:
/// `records` paid orders are published, points is deployed and drains them; when a third is
/// committed the node running it is killed with `kill -9`. Returns the time from the kill to
/// the first commit on the other node, after checking that every order was credited once.
///
/// # Errors
/// A failed step, or credits that are not one per order.
pub async fn failover_bench(
    weir: &Path,
    wasm_dir: &Path,
    nats: &str,
    prefix: &str,
    records: u64,
) -> Result<Duration> {
    let opts = DemoOptions {
        weir: weir.to_path_buf(),
        wasm_dir: wasm_dir.to_path_buf(),
        sale: Sale::small(),
        verbose: false,
    };
    let dir = tempfile::tempdir()?;
    let mut servers = (0..2)
        .map(|n| {
            Server::start_with(
                weir,
                &dir.path().join(format!("node{n}")),
                &dir.path().join(format!("node{n}.log")),
                &["--log", nats, "--log-prefix", prefix],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let client = Client::connect(&servers[0].url).await?;
    for (name, partitions) in [("order.paid", 4), ("points.credited", 4)] {
        client
            .create_topic(&weir_api::TopicConfig {
                name: name.into(),
                partitions,
                retention_ms: 0,
                retention_bytes: 0,
                admission: None,
            })
            .await?;
    }
    let mut n = 0;
    while n < records {
        let batch = (n..(n + 1000).min(records))
            .map(|o| {
                let user = format!("u{}", o % 10_000);
                weir_api::Record {
                    key: Some(user.clone().into()),
                    id: Some(format!("paid-{o}")),
                    ..weir_api::Record::from_value(format!(
                        r#"{{"order":{o},"user":"{user}","amount":{}}}"#,
                        10 + o % 90
                    ))
                }
            })
            .collect::<Vec<_>>();
        n += batch.len() as u64;
        client.publish("order.paid", None, batch).await?;
    }
    let wasm = std::fs::read(wasm_dir.join("points.wasm")).context("points.wasm")?;
    client
        .deploy_plugin(weir_api::Deploy {
            name: "points".into(),
            wasm,
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            ..Default::default()
        })
        .await?;
    while committed(&client, "points").await < records / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (took, client) = kill_owner(&opts, &mut servers, &client, "points").await?;
    if let Err(e) = drain(
        &client,
        "points",
        Duration::from_millis(100),
        Duration::from_secs(60),
        &mut |_| {},
    )
    .await
    {
        let listed = client.list_plugins().await.unwrap_or_default();
        let states: Vec<String> = listed
            .iter()
            .flat_map(|p| {
                p.partitions
                    .iter()
                    .map(|q| format!("{} {}: {} {}", p.name, q.partition, q.state, q.forwarding))
            })
            .collect();
        let mut logs = String::new();
        for n in 0..2 {
            let log = std::fs::read_to_string(dir.path().join(format!("node{n}.log")))
                .unwrap_or_default();
            for l in log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            {
                logs.push_str(&format!("node{n}: {l}\n"));
            }
        }
        anyhow::bail!("{e}\n{}\n{logs}", states.join("\n"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let credited = read_all(&client, "points.credited").await?.len() as u64;
        if credited == records {
            break;
        }
        ensure!(
            credited < records && Instant::now() < deadline,
            "{credited} credits for {records} orders"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in servers {
        s.stop()?;
    }
    Ok(took)
}

/// `--after` through every surviving node, whichever runs the order plugin: `user`'s result
/// after their request at `(partition, offset)` is processed and the same everywhere.
async fn same_result_everywhere(
    opts: &DemoOptions,
    servers: &[Server],
    user: &str,
    (partition, offset): (u32, u64),
) -> Result<()> {
    let key = format!("result/{ITEM}/{user}");
    let mut answers = Vec::new();
    for s in servers {
        let c = Client::connect(&s.url).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c
                .get_state_after("order", key.as_bytes(), partition, offset)
                .await?
            {
                weir_api::StateAnswer::Pending if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                answer => {
                    answers.push(answer);
                    break;
                }
            }
        }
    }
    ensure!(
        answers
            .iter()
            .all(|a| matches!(a, weir_api::StateAnswer::Value(..)) && *a == answers[0]),
        "{user}'s result after {partition}:{offset} differs between nodes: {answers:?}"
    );
    say!(
        opts,
        "   {user}'s result (--after {partition}:{offset}) is the same through every node"
    );
    Ok(())
}
