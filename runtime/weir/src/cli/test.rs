//! `weir test`: runs a plugin against JSON-lines input in the local runtime (no server) and
//! prints its outputs and state.

use std::io::{BufRead, Write};

use weir_core::Record;
use weir_server::local::{LocalError, LocalRuntime};

/// Arguments of `weir test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// The plugin component (.wasm).
    pub wasm: std::path::PathBuf,
    /// JSON lines, one record each: {"key":..,"value":..,"id":..,"headers":{..},"timestamp_ms":..}.
    #[arg(long)]
    pub input: std::path::PathBuf,
    /// `key=value` for the plugin's configure (repeatable).
    #[arg(long, value_parser = super::plugin::parse_kv)]
    pub config: Vec<(String, String)>,
    /// A topic the plugin emits to (repeatable), as at deploy. Without any, the topics it
    /// emits to in a dry run over the input are accepted.
    #[arg(long)]
    pub output: Vec<String>,
    /// Also print the state the plugin wrote.
    #[arg(long)]
    pub state_out: bool,
    /// Run the input twice, showing that dedup makes the second run a no-op.
    #[arg(long)]
    pub replay_twice: bool,
}

fn bytes_json(b: &[u8]) -> serde_json::Value {
    match serde_json::from_slice::<serde_json::Value>(b) {
        Ok(v) => v,
        Err(_) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
    }
}

/// Reads the input; records without an id get `line-<n>` so replays are recognised.
fn read_input(path: &std::path::Path) -> anyhow::Result<Vec<(usize, Record)>> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let mut record = super::publish::from_json_line(&line).map_err(|e| {
            anyhow::anyhow!("{}:{}: invalid JSON record: {e}", path.display(), i + 1)
        })?;
        record.id.get_or_insert_with(|| format!("line-{}", i + 1));
        records.push((i + 1, record));
    }
    anyhow::ensure!(!records.is_empty(), "{} has no records", path.display());
    Ok(records)
}

pub(super) async fn run(args: TestArgs) -> anyhow::Result<()> {
    let wasm = std::fs::read(&args.wasm)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.wasm.display()))?;
    let input = read_input(&args.input)?;
    let local = LocalRuntime::start().await?;
    let result = run_local(&local, &args, wasm, &input).await;
    local.close().await;
    result
}

async fn run_local(
    local: &LocalRuntime,
    args: &TestArgs,
    wasm: Vec<u8>,
    input: &[(usize, Record)],
) -> anyhow::Result<()> {
    local.create_topic("input", 1).await?;
    let config: Vec<(&str, &str)> = args
        .config
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let records: Vec<Record> = input.iter().map(|(_, r)| r.clone()).collect();
    let declared = if args.output.is_empty() {
        // As a newcomer runs it: accept whatever the plugin emits (if the dry run fails, the
        // real run below reports the failure with its input line).
        let found = local
            .emitted_topics(wasm.clone(), &config, &records)
            .await
            .unwrap_or_default();
        if !found.is_empty() {
            eprintln!(
                "outputs: {} (what the plugin emits; deploy it with {})",
                found.join(", "),
                found
                    .iter()
                    .map(|t| format!("--output {t}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        found
    } else {
        args.output.clone()
    };
    for topic in &declared {
        if topic != "input" {
            local.create_topic(topic, 1).await?;
        }
    }
    let outputs: Vec<&str> = declared.iter().map(String::as_str).collect();
    local
        .deploy("plugin", wasm, "input", &outputs, &config)
        .await?;
    let runs = if args.replay_twice { 2 } else { 1 };
    let mut out = std::io::stdout().lock();
    let mut printed = 0;
    for run in 1..=runs {
        local.publish("input", records.clone()).await?;
        if let Err(e) = local.run_until_idle().await {
            if let LocalError::Halted { reason, .. } = &e {
                // One input partition: offset n of run r is input record n − (r − 1) × count.
                let offset = reason
                    .split("offset ")
                    .nth(1)
                    .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some((line, _)) = offset.and_then(|o| input.get(o % input.len())) {
                    anyhow::bail!(
                        "the plugin failed on input line {line} ({}): {reason}",
                        args.input.display()
                    );
                }
            }
            return Err(e.into());
        }
        let info = local.info("plugin")?;
        let (processed, skipped) = info
            .partitions
            .iter()
            .fold((0, 0), |(p, s), q| (p + q.processed, s + q.skipped));
        let mut all = Vec::new();
        for topic in &declared {
            for r in local.read(topic).await? {
                all.push((topic.clone(), r));
            }
        }
        let new = all.len() - printed;
        for (topic, r) in &all[printed..] {
            let line = serde_json::json!({
                "topic": topic,
                "key": r.record.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
                "value": bytes_json(&r.record.value),
            });
            writeln!(out, "{line}")?;
        }
        printed = all.len();
        eprintln!("run {run}: {} record(s) in, {processed} processed in all, {skipped} skipped as already processed, {new} new output(s)", records.len());
    }
    if args.state_out {
        for (key, value, version) in local.state_entries("plugin").await? {
            let line = serde_json::json!({ "state": String::from_utf8_lossy(&key), "value": bytes_json(&value), "version": version });
            writeln!(out, "{line}")?;
        }
    }
    for line in local.logs("plugin").await? {
        eprintln!("plugin log: {line}");
    }
    Ok(())
}
