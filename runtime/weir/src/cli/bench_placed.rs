//! `weir bench plugin --copies N --via A,B`: several copies of the plugin at once, each timed
//! on the cluster node that runs it once their placement has settled.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use weir_api::Client;

use super::bench_plugin::{
    deploy, file_name, fresh_topic, output_end, outputs_done, publish_orders, read_wasm,
    wait_committed, Cpu, PluginBench,
};

/// A node keeps a plugin it took at a deploy for 10 s before it hands it to the node preferred
/// for it (`MIN_HOLD` in the plugin manager's cluster loop), which takes it at its next look
/// (every second): placement has settled after this long.
const SETTLE: Duration = Duration::from_secs(14);
/// How many names `--one-per-node` tries for a copy before it gives up.
const PLACEMENT_TRIES: usize = 8;

/// One copy of the plugin in a placed run.
struct Placed {
    name: String,
    input: String,
    /// The index of the client of the node that runs it.
    home: usize,
}

/// Deploys the copies on empty inputs, waits until the cluster has placed them, pauses each
/// where it runs, publishes every copy's orders, resumes them and times the drain. Returns
/// the records/s of all copies together.
pub(super) async fn placed_run(
    clients: &[Client],
    args: &PluginBench,
    wasm: &std::path::Path,
    label: &str,
) -> anyhow::Result<f64> {
    let wasm_bytes = read_wasm(wasm)?;
    let first = &clients[0];
    let out_before = output_end(first, args.partitions).await?;
    let mut copies = Vec::new();
    for i in 0..args.copies {
        let (name, input) = (
            format!("bench-{label}-{i}"),
            format!("bench.orders.{label}-{i}"),
        );
        let _ = first.remove_plugin(&name).await;
        fresh_topic(first, &input, args.partitions).await?;
        let via = &clients[i % clients.len()];
        via.deploy_plugin(deploy(&name, &input, &wasm_bytes, args.commit_records))
            .await?;
        copies.push(Placed {
            name,
            input,
            home: 0,
        });
    }
    if let Err(e) = settle(clients, args, &wasm_bytes, label, &mut copies).await {
        for copy in &copies {
            let _ = first.remove_plugin(&copy.name).await;
        }
        return Err(e);
    }
    // A pause or resume through the node that runs a copy acts there at once (through another
    // node, a resume restarts the plugin on its node at that node's next look).
    for copy in &copies {
        clients[copy.home].pause_plugin(&copy.name, true).await?;
    }
    for copy in &copies {
        publish_orders(first, &copy.input, args).await?;
    }
    let cpu = Cpu::start(args)?;
    let started = Instant::now();
    for copy in &copies {
        clients[copy.home].pause_plugin(&copy.name, false).await?;
    }
    let runs: Vec<(&Client, &str)> = copies
        .iter()
        .map(|c| (&clients[c.home], c.name.as_str()))
        .collect();
    let elapsed = wait_committed(&runs, args.records).await? - started;
    let total = args.records * copies.len() as u64;
    let forwarded_at = outputs_done(first, out_before, total, started).await?;
    let cpu = cpu.per_record(total)?;
    let moved: Vec<&str> = {
        let now = placement(clients, &args.via, &copies).await?;
        copies
            .iter()
            .zip(now)
            .filter(|(c, home)| *home != Some(c.home))
            .map(|(c, _)| c.name.as_str())
            .collect()
    };
    let rate = total as f64 / elapsed.as_secs_f64();
    let file = file_name(wasm);
    let homes: Vec<String> = copies
        .iter()
        .map(|c| format!("{} on node {}", c.name, c.home + 1))
        .collect();
    println!(
        "{file} ×{}: {total} records committed exactly-once in {:.2} s = {rate:.0} records/s (from the resume; {}); outputs forwarded after {:.2} s",
        copies.len(),
        elapsed.as_secs_f64(),
        homes.join(", "),
        forwarded_at.as_secs_f64()
    );
    if !moved.is_empty() {
        println!(
            "{file}: warning: moved to another node during the run: {}",
            moved.join(", ")
        );
    }
    for line in cpu {
        println!("{file}: {line}");
    }
    if let Some(metrics) = &args.metrics {
        let page = super::scrape::page(metrics).await?;
        for copy in &copies {
            println!(
                "{file} {}: {}",
                copy.name,
                super::scrape::commit_summary(&page, &copy.name)
            );
        }
    }
    for copy in &copies {
        clients[copy.home].remove_plugin(&copy.name).await?;
    }
    Ok(rate)
}

/// Waits until every copy runs where the cluster means it to (on one node: two equal looks), with
/// `--one-per-node` deploying a copy that shares a node under a new name until each has its
/// own. Sets each copy's `home`.
async fn settle(
    clients: &[Client],
    args: &PluginBench,
    wasm: &[u8],
    label: &str,
    copies: &mut [Placed],
) -> anyhow::Result<()> {
    for attempt in 0..=PLACEMENT_TRIES {
        if clients.len() > 1 {
            tokio::time::sleep(SETTLE).await;
        }
        let homes = stable_placement(clients, &args.via, copies).await?;
        for (copy, home) in copies.iter_mut().zip(&homes) {
            copy.home = *home;
        }
        let shared = (1..copies.len()).find(|&j| homes[..j].contains(&homes[j]));
        let Some(j) = shared.filter(|_| args.one_per_node) else {
            return Ok(());
        };
        if attempt == PLACEMENT_TRIES {
            break;
        }
        // Another name hashes anew; deployed through a node with no copy, it runs there
        // until the hand-over, if any.
        let copy = &mut copies[j];
        clients[copy.home].remove_plugin(&copy.name).await?;
        copy.name = format!("bench-{label}-{j}-{}", attempt + 1);
        let _ = clients[0].remove_plugin(&copy.name).await;
        let free = (0..clients.len())
            .find(|n| !homes.contains(n))
            .unwrap_or_default();
        clients[free]
            .deploy_plugin(deploy(&copy.name, &copy.input, wasm, args.commit_records))
            .await?;
    }
    anyhow::bail!(
        "--one-per-node: {PLACEMENT_TRIES} names did not give every copy a node of its own; are all --via nodes live members of one cluster?"
    )
}

/// Each copy's node (an index into `clients`), read twice a couple of seconds apart until
/// the two agree and every copy runs somewhere.
async fn stable_placement(
    clients: &[Client],
    vias: &[String],
    copies: &[Placed],
) -> anyhow::Result<Vec<usize>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let now = placement(clients, vias, copies).await?;
        if now.iter().all(Option::is_some) && last.as_ref() == Some(&now) {
            return Ok(now.into_iter().flatten().collect());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the copies did not settle on nodes within 60 s (placement: {now:?})"
        );
        last = Some(now);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Where each copy runs now: the index of its node among `clients` (`None`: no node runs it).
async fn placement(
    clients: &[Client],
    vias: &[String],
    copies: &[Placed],
) -> anyhow::Result<Vec<Option<usize>>> {
    let plugins = clients[0].list_plugins().await?;
    copies
        .iter()
        .map(|copy| {
            let node = plugins
                .iter()
                .find(|p| p.name == copy.name)
                .map(|p| p.node.clone())
                .unwrap_or_default();
            // One server not in cluster mode runs every plugin it has (and names no node).
            if node.is_empty() && clients.len() == 1 {
                return Ok(Some(0));
            }
            if vias.is_empty() {
                anyhow::bail!(
                    "the server is a cluster node ({} runs on {node}): pass every node of the cluster with --via",
                    copy.name
                );
            }
            // "<node id> (<address it listens on>)"; empty while no node runs it.
            let Some(addr) = node
                .rsplit_once('(')
                .and_then(|(_, a)| a.strip_suffix(')'))
            else {
                return Ok(None);
            };
            node_of(vias, addr).map(Some).with_context(|| {
                format!(
                    "{} runs on node {node}, and no --via address ({}) has that address or port: list every node of the cluster",
                    copy.name,
                    vias.join(", ")
                )
            })
        })
        .collect()
}

/// The `--via` entry of the node listening on `addr`: the same host and port, or else the
/// only entry with its port (a node listening on 0.0.0.0, or reached by a host name).
fn node_of(vias: &[String], addr: &str) -> Option<usize> {
    let host_port = |v: &str| -> String {
        let v = v
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        v.trim_end_matches('/').to_string()
    };
    let port = |v: &str| v.rsplit_once(':').map(|(_, p)| p.to_string());
    if let Some(i) = vias.iter().position(|v| host_port(v) == addr) {
        return Some(i);
    }
    let same_port: Vec<usize> = (0..vias.len())
        .filter(|&i| port(&host_port(&vias[i])) == port(addr))
        .collect();
    (same_port.len() == 1).then(|| same_port[0])
}
