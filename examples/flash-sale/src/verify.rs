//! [`verify`]: recounting a sale from what was sent and checking weir's state and topics
//! against it (orders never above stock, each paid order credited once, ...).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{ensure, Context as _, Result};
use weir_api::Client;

use crate::*;

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
    /// A digest of who bought (FNV-1a of the sorted buyers): equal totals mean the same
    /// buyers, not only as many.
    pub buyers: u64,
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
        buyers: weir_api::fnv1a(
            buyers
                .iter()
                .copied()
                .collect::<Vec<_>>()
                .join("\0")
                .as_bytes(),
        ),
    })
}

/// [`verify`], again for up to `within` while it fails: a drained plugin has committed every
/// record, but its outputs reach their topics a moment later (the forwarder publishes after
/// the commit; on a cluster, through JetStream). Counts only grow, so an output stored twice
/// fails every attempt.
///
/// # Errors
/// The last attempt's failure.
pub async fn verify_settled(
    client: &Client,
    sale: &Sale,
    burst: &BurstReport,
    payments: &[Payment],
    within: std::time::Duration,
) -> Result<Totals> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match verify(client, sale, burst, payments).await {
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await
            }
            done => return done,
        }
    }
}
