//! `weir publish`: one record from the argument, or one per stdin line (plain or JSON), sent
//! through an idempotent producer so the client's retries never store a record twice.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::Context;
use bytes::Bytes;

use crate::client::Client;
use crate::record::Record;

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

/// Reads every input record first, so that a malformed line fails the command before anything
/// is published.
fn read_records(args: &PublishArgs, input: impl BufRead) -> anyhow::Result<Vec<Record>> {
    if let Some(value) = &args.value {
        anyhow::ensure!(
            !args.json,
            "--json reads records from stdin; drop the VALUE argument or --json"
        );
        return Ok(vec![Record {
            key: args.key.clone().map(Bytes::from),
            id: args.id.clone(),
            ..Record::from_value(value.clone())
        }]);
    }
    let mut records = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("reading stdin line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut record = if args.json {
            from_json_line(&line).map_err(|e| anyhow::anyhow!("line {n}: invalid JSON record: {e}; expected {{\"key\":..,\"value\":..,\"id\":..,\"headers\":{{..}}}}"))?
        } else {
            Record::from_value(line)
        };
        if record.key.is_none() {
            record.key = args.key.clone().map(Bytes::from);
        }
        if record.id.is_none() {
            record.id = args.id.as_ref().map(|id| format!("{id}-{n}"));
        }
        records.push(record);
    }
    anyhow::ensure!(
        !records.is_empty(),
        "nothing to publish: give a VALUE or pipe lines on stdin"
    );
    Ok(records)
}

pub(super) async fn run(client: &Client, args: PublishArgs) -> anyhow::Result<()> {
    let records = read_records(&args, std::io::stdin().lock())?;
    let mut producer = client.producer().await?;
    let mut out = std::io::stdout().lock();
    let mut records = records.into_iter().peekable();
    while records.peek().is_some() {
        let batch: Vec<Record> = records.by_ref().take(args.batch.max(1)).collect();
        let positions = match args.partition {
            Some(p) => {
                let n = batch.len() as u64;
                let ack = producer.send_to(&args.topic, p, batch).await?;
                (0..n).map(|i| (p, ack.base_offset + i)).collect()
            }
            None => producer.send(&args.topic, batch).await?,
        };
        for (partition, offset) in positions {
            use std::io::Write;
            writeln!(out, "partition {partition} offset {offset}")?;
        }
    }
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
        }
    }

    #[test]
    fn json_lines_and_errors_name_the_line() {
        let input = "{\"key\":\"u1\",\"value\":\"hello\",\"headers\":{\"h\":\"v\"}}\n\n{\"value\":{\"amount\":5},\"id\":\"o-2\"}\n";
        let records = read_records(&args(true), input.as_bytes()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].key.as_deref(), Some(&b"u1"[..]));
        assert_eq!(records[0].id.as_deref(), Some("run-1"));
        assert_eq!(records[1].value, Bytes::from_static(br#"{"amount":5}"#));
        assert_eq!(records[1].id.as_deref(), Some("o-2"));
        let err = read_records(
            &args(true),
            "{\"value\":\"a\"}\n{\"value\": nope}\n".as_bytes(),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("line 2: invalid JSON record"),
            "{err}"
        );
        let err = read_records(&args(true), "{\"valu\":\"a\"}\n".as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
