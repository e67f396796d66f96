//! Quickstart: publish paid orders with an idempotent producer, read them back with a consumer
//! group, and check that every order arrived exactly once.
//!
//! ```text
//! weir serve &                     # embedded store, fsync always
//! weir topic create order.paid --partitions 4
//! cargo run -p quickstart -- --server http://127.0.0.1:7070
//! ```

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use weir_api::Record;
use weir_api::StartAt;
use weir_api::{Client, DEFAULT_SERVER};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let server = match args.iter().position(|a| a == "--server") {
        Some(i) => args.get(i + 1).context("--server needs a URL")?.clone(),
        None => DEFAULT_SERVER.to_string(),
    };
    let client = Client::connect(&server).await?;
    let orders = 10_000;

    // Each order is keyed by user (so one user's orders stay in order) and carries an id that
    // consumers use to drop redeliveries.
    let mut producer = client.producer().await?;
    let started = std::time::Instant::now();
    for chunk in (0..orders).collect::<Vec<u32>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| Record {
                key: Some(format!("user-{}", i % 500).into()),
                id: Some(format!("order-{i}")),
                ..Record::from_value(format!(
                    r#"{{"order":{i},"user":"user-{}","amount":{}}}"#,
                    i % 500,
                    10 + i % 90
                ))
            })
            .collect();
        producer.send("order.paid", batch).await?;
    }
    println!(
        "published {orders} orders in {:.0?} (each acknowledged after fsync)",
        started.elapsed()
    );

    // A consumer group reads them back; its offsets are committed so a restart resumes.
    let mut subscription = client
        .subscribe("order.paid", &[], StartAt::Earliest, Some("quickstart"))
        .await?;
    let mut seen = HashSet::new();
    let mut positions = std::collections::BTreeMap::new();
    while seen.len() < orders as usize {
        let batch = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .context("waiting for records")??
            .context("stream ended")?;
        for r in batch {
            ensure!(
                seen.insert(r.record.id.clone().context("order without id")?),
                "order delivered twice"
            );
            positions.insert(r.partition, r.offset + 1);
        }
    }
    let committed: Vec<(u32, u64)> = positions.into_iter().collect();
    client
        .commit_offsets("quickstart", "order.paid", &committed)
        .await?;
    println!(
        "consumed {} distinct orders; committed group offsets {committed:?}",
        seen.len()
    );
    Ok(())
}
