//! `cargo xtask bench`'s Kafka produce runs: the publish benchmark's records through a Kafka
//! client (confluent-kafka from Python, and kcat) against `weir serve --kafka-listen`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::bench::{throughput, weir};
use crate::server::Server;

/// The same records as a publish run (`records` of 100 B into 4 partitions) through a Kafka
/// client with acks=all and idempotence, against a fresh `weir serve --fsync always
/// --kafka-listen`: `python`, confluent-kafka's produce_batch in batches of 1,000
/// (`xtask/scripts/kafka_produce.py`); `kcat`, librdkafka from C, reading one record per line
/// of a file, timed as a whole. Prints the run and the server's CPU time; returns records/s.
pub(crate) fn kafka_produce_run(
    bin: &Path,
    client: &str,
    python: &Path,
    round: u32,
    records: &str,
) -> Result<f64> {
    let data = std::env::temp_dir().join(format!(
        "weir-bench-{}-kafka-{client}-{round}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start_with(bin, &data, "always", &["--kafka-listen", "127.0.0.1:0"])?;
    weir(
        bin,
        &server,
        &["topic", "create", "kbench", "--partitions", "4"],
    )?;
    let kafka = server
        .kafka
        .clone()
        .context("the Kafka listener's address")?;
    let lines = if client == "python" {
        None
    } else {
        Some(kcat_lines(records)?)
    };
    let cpu_before = cpu_seconds(server.pid());
    let started = Instant::now();
    let out = if client == "python" {
        let script = crate::workspace_root().join("xtask/scripts/kafka_produce.py");
        Command::new(python)
            .arg(script)
            .args([kafka.as_str(), "kbench", records, "100"])
            .stderr(Stdio::inherit())
            .output()?
    } else {
        Command::new("kcat")
            .args([
                "-b",
                &kafka,
                "-P",
                "-t",
                "kbench",
                "-X",
                "enable.idempotence=true",
            ])
            .args([
                "-X",
                "linger.ms=5",
                "-X",
                "queue.buffering.max.messages=1000000",
                "-l",
            ])
            .arg(lines.as_deref().expect("made above"))
            .stderr(Stdio::inherit())
            .output()?
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    if !out.status.success() {
        bail!(
            "the Kafka producer ({client}) failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Every record stored: the partitions' ends add up.
    let described = weir(bin, &server, &["topic", "describe", "kbench"])?;
    let stored: u64 = described
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum();
    server.stop()?;
    std::fs::remove_dir_all(&data).ok();
    let n: f64 = records.parse()?;
    if stored as f64 != n {
        bail!(
            "the Kafka producer ({client}) was acknowledged for {n} records, weir holds {stored}"
        );
    }
    let rate = match client {
        "python" => throughput(&String::from_utf8_lossy(&out.stdout))?,
        _ => n / elapsed,
    };
    println!(
        "Kafka produce ({client}), fsync always, run {round}: {rate:.0} records/s; server CPU {:.2} µs per record\n",
        cpu / n * 1e6
    );
    Ok(rate)
}

/// A file of `records` lines of 100 printable bytes, for kcat (made once per bench run).
fn kcat_lines(records: &str) -> Result<PathBuf> {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!(
        "weir-bench-{}-kcat-{records}.txt",
        std::process::id()
    ));
    if !path.exists() {
        let n: u64 = records.parse()?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..n {
            writeln!(file, "{:0>100}", i)?;
        }
        file.flush()?;
    }
    Ok(path)
}

/// User + system CPU seconds of a process so far (/proc/PID/stat, at 100 ticks a second).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(") ")?.1.split_whitespace().collect();
            Some(
                (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
                    / 100.0,
            )
        })
        .unwrap_or(0.0)
}
