//! `weir publish`: one record from the argument, or one per stdin line (plain or JSON), sent
//! through an idempotent producer so the client's retries never store a record twice. Lines
//! are sent as they come: a batch goes when it is full or `--linger-ms` after its first line
//! (like kafka-console-producer), so `tail -f log | weir publish t` publishes as the log grows.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::Context;
use bytes::Bytes;

use weir_api::Client;
use weir_core::Record;

/// Arguments of `weir publish`.
#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// Topic to publish to.
    pub topic: String,
    /// The record's value; without it, every stdin line is a record.
    pub value: Option<String>,
    /// Key (partitions by its hash). Applies to every record of this command.
    #[arg(long)]
    pub key: Option<String>,
    /// Message id, used by consumers to drop duplicates. With stdin input, `ID-<line>`.
    #[arg(long)]
    pub id: Option<String>,
    /// Send to this partition instead of partitioning by key.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Read stdin lines as JSON: {"key":..,"value":..,"id":..,"headers":{..},"timestamp_ms":..}.
    /// A string value is sent as its text; any other JSON value as its JSON text.
    #[arg(long)]
    pub json: bool,
    /// Records per request when reading stdin.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// With stdin input, send a batch at the latest this long after its first line, ms.
    #[arg(long, default_value_t = 100)]
    pub linger_ms: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    key: Option<String>,
    value: serde_json::Value,
    id: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timestamp_ms: i64,
}

pub(super) fn from_json_line(line: &str) -> Result<Record, String> {
    let r: JsonRecord = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let value = match r.value {
        serde_json::Value::String(s) => Bytes::from(s),
        other => Bytes::from(other.to_string()),
    };
    Ok(Record {
        key: r.key.map(Bytes::from),
        value,
        headers: r
            .headers
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect(),
        timestamp_ms: r.timestamp_ms,
        id: r.id,
    })
}

/// The record of stdin line `n` (1-based), with the command's key and id applied.
fn line_record(args: &PublishArgs, n: usize, line: &str) -> anyhow::Result<Record> {
    let mut record = if args.json {
        from_json_line(line).map_err(|e| anyhow::anyhow!("line {n}: invalid JSON record: {e}; expected {{\"key\":..,\"value\":..,\"id\":..,\"headers\":{{..}}}}"))?
    } else {
        Record::from_value(line.to_string())
    };
    if record.key.is_none() {
        record.key = args.key.clone().map(Bytes::from);
    }
    if record.id.is_none() {
        record.id = args.id.as_ref().map(|id| format!("{id}-{n}"));
    }
    Ok(record)
}

/// Publishes `batch` and prints where each record went.
async fn flush(
    producer: &mut weir_api::Producer,
    args: &PublishArgs,
    batch: &mut Vec<Record>,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let records = std::mem::take(batch);
    let positions = match args.partition {
        Some(p) => {
            let n = records.len() as u64;
            let ack = producer.send_to(&args.topic, p, records).await?;
            (0..n).map(|i| (p, ack.base_offset + i)).collect()
        }
        None => producer.send(&args.topic, records).await?,
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for (partition, offset) in positions {
        writeln!(out, "partition {partition} offset {offset}")?;
    }
    out.flush()?;
    Ok(())
}

pub(super) async fn run(client: &Client, args: PublishArgs) -> anyhow::Result<()> {
    if let Some(value) = &args.value {
        anyhow::ensure!(
            !args.json,
            "--json reads records from stdin; drop the VALUE argument or --json"
        );
        let mut producer = client.producer().await?;
        let mut batch = vec![Record {
            key: args.key.clone().map(Bytes::from),
            id: args.id.clone(),
            ..Record::from_value(value.clone())
        }];
        return flush(&mut producer, &args, &mut batch).await;
    }
    // Lines are read on a thread of their own (stdin blocks) and batched here.
    let (tx, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<String>>(4096);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let mut producer = client.producer().await?;
    let linger = std::time::Duration::from_millis(args.linger_ms);
    let (mut batch, mut n, mut published) = (Vec::new(), 0usize, 0usize);
    // The stdin line of the batch's first record.
    let mut batch_line = 1usize;
    let mut deadline = tokio::time::Instant::now();
    loop {
        let line = tokio::select! {
            line = lines.recv() => line,
            _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                published += batch.len();
                flush(&mut producer, &args, &mut batch).await?;
                continue;
            }
        };
        let Some(line) = line else { break };
        n += 1;
        let line = line.with_context(|| format!("reading stdin line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = match line_record(&args, n, &line) {
            // The batch it would have joined is not sent either. Batches sent before it stay
            // published (a file longer than --batch lines is not all or nothing); the error
            // says from which line nothing was.
            Err(e) if published == 0 => anyhow::bail!("{e}; nothing was published"),
            Err(e) => anyhow::bail!(
                "{e}; the {published} record(s) before line {batch_line} were published, \
                 nothing from line {batch_line} on"
            ),
            Ok(r) => r,
        };
        if batch.is_empty() {
            deadline = tokio::time::Instant::now() + linger;
            batch_line = n;
        }
        batch.push(record);
        if batch.len() >= args.batch.max(1) {
            published += batch.len();
            flush(&mut producer, &args, &mut batch).await?;
        }
    }
    published += batch.len();
    flush(&mut producer, &args, &mut batch).await?;
    anyhow::ensure!(
        published > 0,
        "nothing to publish: give a VALUE or pipe lines on stdin"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(json: bool) -> PublishArgs {
        PublishArgs {
            topic: "t".into(),
            value: None,
            key: None,
            id: Some("run".into()),
            partition: None,
            json,
            batch: 1000,
            linger_ms: 100,
        }
    }

    #[test]
    fn json_lines_and_errors_name_the_line() {
        let r = line_record(
            &args(true),
            1,
            "{\"key\":\"u1\",\"value\":\"hello\",\"headers\":{\"h\":\"v\"}}",
        )
        .unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"u1"[..]));
        assert_eq!(r.id.as_deref(), Some("run-1"));
        let r = line_record(&args(true), 3, "{\"value\":{\"amount\":5},\"id\":\"o-2\"}").unwrap();
        assert_eq!(r.value, Bytes::from_static(br#"{"amount":5}"#));
        assert_eq!(r.id.as_deref(), Some("o-2"));
        let err = line_record(&args(true), 2, "{\"value\": nope}").unwrap_err();
        assert!(
            err.to_string().starts_with("line 2: invalid JSON record"),
            "{err}"
        );
        let err = line_record(&args(true), 1, "{\"valu\":\"a\"}").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(
            line_record(&args(false), 4, "plain").unwrap().value,
            Bytes::from("plain")
        );
    }
}
