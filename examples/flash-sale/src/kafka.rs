//! The sale published through Kafka: the requests and the payments produced by
//! confluent-kafka (librdkafka), a client nobody here wrote, to weir's Kafka listener
//! (`cargo xtask demo --kafka`). The plugins read them exactly as gRPC-published ones.
//!
//! A Kafka producer batches records, and an admission limit refuses a whole batch, so the
//! requests topic has no admission limit on this path: a user's repeats reach the log and
//! the order plugin rejects them ("already bought", "sold out"). The winners are the same —
//! the first request of each user, in each partition's order — so every effect total
//! matches the gRPC run; only where repeats stop (admission or plugin) differs.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};

use crate::{BurstReport, Payment, SeckillRequest, REQUESTS};

/// The producer script, written next to the phase's data.
const SCRIPT: &str = include_str!("../kafka_publish.py");

/// One record for the producer.
struct Produce<'a> {
    topic: &'a str,
    partition: u32,
    key: &'a str,
    id: String,
    value: String,
}

/// A child process killed and waited for when dropped (an error while it runs must not leave
/// a producer sending into a server being torn down).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// confluent-kafka under `python`, producing into `bootstrap`.
pub struct KafkaProducer {
    python: PathBuf,
    script: PathBuf,
    bootstrap: String,
}

impl KafkaProducer {
    /// A producer for the Kafka listener at `bootstrap`; the script goes into `dir`.
    ///
    /// # Errors
    /// `python` is missing, or the script could not be written.
    pub fn new(python: &Path, dir: &Path, bootstrap: &str) -> Result<KafkaProducer> {
        ensure!(
            python.exists(),
            "{} not found: `cargo xtask kafka-clients` installs confluent-kafka there (`cargo xtask demo --kafka` does it first)",
            python.display()
        );
        let script = dir.join("kafka_publish.py");
        std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        Ok(KafkaProducer {
            python: python.to_path_buf(),
            script,
            bootstrap: bootstrap.to_string(),
        })
    }

    /// Produces `records` and returns where each was stored, in input order, calling
    /// `progress` with every 1,000 delivery reports.
    fn produce(
        &self,
        records: &[Produce<'_>],
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<(u32, u64)>> {
        let mut child = Reaped(
            Command::new(&self.python)
                .arg(&self.script)
                .arg(&self.bootstrap)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", self.python.display()))?,
        );
        let mut stdin = child.0.stdin.take().expect("piped");
        let lines: Vec<String> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "topic": r.topic, "partition": r.partition, "key": r.key,
                    "id": r.id, "value": r.value,
                })
                .to_string()
            })
            .collect();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let mut w = std::io::BufWriter::new(&mut stdin);
            for l in lines {
                writeln!(w, "{l}")?;
            }
            w.flush()
        });
        let mut at: Vec<Option<(u32, u64)>> = vec![None; records.len()];
        let mut reports = 0u64;
        for line in BufReader::new(child.0.stdout.take().expect("piped")).lines() {
            let line = line?;
            let mut parts = line.splitn(3, ' ');
            let (Some(n), Some(partition), Some(rest)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("unexpected line from the Kafka producer: {line:?}");
            };
            let n: usize = n.parse().context("record number")?;
            if partition == "error" {
                bail!("the Kafka producer's record {n} was not stored: {rest}");
            }
            *at.get_mut(n).context("record number out of range")? =
                Some((partition.parse()?, rest.parse()?));
            reports += 1;
            if reports.is_multiple_of(1000) {
                progress(1000);
            }
        }
        progress(reports % 1000);
        let wrote = writer.join().expect("writer thread");
        let status = child.0.wait()?;
        ensure!(status.success(), "the Kafka producer failed: {status}");
        wrote.context("feeding the Kafka producer")?;
        at.into_iter()
            .enumerate()
            .map(|(n, a)| a.with_context(|| format!("no delivery report for record {n}")))
            .collect()
    }

    /// The burst, in sending order, each request to its user's partition with its request id
    /// as the message id. Nothing is refused: the topic has no admission limit on this path.
    ///
    /// # Errors
    /// A record the producer could not store, or a broken producer.
    pub fn burst(
        &self,
        requests: &[SeckillRequest],
        partitions: u32,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<BurstReport> {
        let started = Instant::now();
        let records: Vec<Produce<'_>> = requests
            .iter()
            .map(|r| Produce {
                topic: REQUESTS,
                partition: weir_api::partition_for_key(r.user.as_bytes(), partitions),
                key: &r.user,
                id: r.id.clone(),
                value: r.value(),
            })
            .collect();
        let at = self.produce(&records, progress)?;
        let mut report = BurstReport {
            sent: requests.len() as u64,
            accepted: requests.len() as u64,
            ..Default::default()
        };
        for (r, position) in requests.iter().zip(at) {
            report.positions.insert(r.user.clone(), position);
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// The payments (with the payment system's repeats: same message id) to `order.paid`.
    ///
    /// # Errors
    /// As [`KafkaProducer::burst`].
    pub fn pay(&self, payments: &[Payment], partitions: u32) -> Result<()> {
        let records: Vec<Produce<'_>> = crate::payments::with_repeats(payments)
            .map(|p| Produce {
                topic: "order.paid",
                partition: weir_api::partition_for_key(p.user.as_bytes(), partitions),
                key: &p.user,
                id: p.id(),
                value: p.value(),
            })
            .collect();
        self.produce(&records, &|_| {})?;
        Ok(())
    }
}
