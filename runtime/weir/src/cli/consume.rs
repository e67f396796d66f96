//! `weir consume`: prints records as they arrive; with `--group`, resumes from and commits the
//! group's offsets.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use base64::Engine;
use tokio_util::sync::CancellationToken;

use weir_api::Client;
use weir_core::StartAt;
use weir_core::StoredRecord;

/// Arguments of `weir consume`.
#[derive(clap::Args, Debug)]
pub struct ConsumeArgs {
    /// Topic to read.
    pub topic: String,
    /// Where to start without a committed group offset: earliest, latest, an offset, or
    /// time:<ms> (the first record stamped at or after that time).
    #[arg(long, default_value = "latest", value_parser = parse_start)]
    pub from: StartAt,
    /// Consumer group: start at its committed offsets and commit as records are printed.
    #[arg(long)]
    pub group: Option<String>,
    /// Read only these partitions (repeatable; default all).
    #[arg(long)]
    pub partition: Vec<u32>,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Stop when no record arrives for this many milliseconds.
    #[arg(long)]
    pub idle_ms: Option<u64>,
    /// Print each record as a JSON line with its partition, offset, key, id and headers.
    #[arg(long)]
    pub json: bool,
}

fn parse_start(s: &str) -> Result<StartAt, String> {
    let bad = || format!("{s:?} is not earliest, latest, an offset or time:<ms since the epoch>");
    match s {
        "earliest" => Ok(StartAt::Earliest),
        "latest" => Ok(StartAt::Latest),
        _ => match s.strip_prefix("time:") {
            Some(ms) => ms.parse().map(StartAt::Timestamp).map_err(|_| bad()),
            None => s.parse().map(StartAt::Offset).map_err(|_| bad()),
        },
    }
}

/// A byte string as JSON: text when it is UTF-8, `{"base64": ..}` otherwise.
fn bytes_json(b: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(b) {
        Ok(s) => serde_json::Value::String(s.into()),
        Err(_) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}

fn json_line(r: &StoredRecord) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = r
        .record
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), bytes_json(v)))
        .collect();
    serde_json::json!({
        "partition": r.partition,
        "offset": r.offset,
        "timestamp_ms": r.record.timestamp_ms,
        "key": r.record.key.as_deref().map(bytes_json),
        "value": bytes_json(&r.record.value),
        "id": r.record.id,
        "headers": headers,
    })
}

pub(super) async fn run(
    client: &Client,
    args: ConsumeArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut subscription = client
        .subscribe(
            &args.topic,
            &args.partition,
            args.from,
            args.group.as_deref(),
        )
        .await?;
    let mut printed = 0u64;
    let mut next_offsets: BTreeMap<u32, u64> = BTreeMap::new();
    let mut out = std::io::stdout().lock();
    let idle = args
        .idle_ms
        .map(Duration::from_millis)
        .unwrap_or(Duration::MAX);
    'outer: loop {
        if args.max.is_some_and(|m| printed >= m) {
            break;
        }
        let batch = tokio::select! {
            batch = tokio::time::timeout(idle, subscription.next()) => match batch {
                Ok(batch) => batch?,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(batch) = batch else { break };
        for record in batch {
            if args.max.is_some_and(|m| printed >= m) {
                break 'outer;
            }
            if args.json {
                writeln!(out, "{}", json_line(&record))?;
            } else {
                writeln!(out, "{}", String::from_utf8_lossy(&record.record.value))?;
            }
            printed += 1;
            next_offsets.insert(record.partition, record.offset + 1);
        }
        out.flush()?;
        if let Some(group) = &args.group {
            commit(client, group, &args.topic, &next_offsets).await?;
        }
    }
    out.flush()?;
    if let Some(group) = &args.group {
        commit(client, group, &args.topic, &next_offsets).await?;
    }
    Ok(())
}

async fn commit(
    client: &Client,
    group: &str,
    topic: &str,
    offsets: &BTreeMap<u32, u64>,
) -> anyhow::Result<()> {
    if !offsets.is_empty() {
        let offsets: Vec<(u32, u64)> = offsets.iter().map(|(p, o)| (*p, *o)).collect();
        client.commit_offsets(group, topic, &offsets).await?;
    }
    Ok(())
}
