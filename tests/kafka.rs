//! The Kafka listener against Kafka clients nobody here wrote: librdkafka through Python's
//! confluent-kafka (2.16.2, librdkafka 2.16.0) and through Debian's kcat (librdkafka 2.0.2).
//! `cargo xtask test` installs both (`cargo xtask kafka-clients`); a missing one fails the
//! test with that command.
//!
//! What is checked is what weir stores, read back through the broker: every acknowledged
//! record once, with its key, headers and timestamp; group offsets in weir's own store.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::WeirProcess;
use rand::Rng;
use tokio::sync::Notify;
use weir_core::{StoredRecord, TopicConfig};
use weir_server::server::RunningServer;

/// The venv python `cargo xtask kafka-clients` installs confluent-kafka into.
pub(crate) fn python() -> PathBuf {
    let p = common::repo_root().join("target/kafka-clients/venv/bin/python");
    assert!(
        p.exists(),
        "confluent-kafka is not installed at {}: run `cargo xtask kafka-clients` (cargo xtask test does it first)",
        p.display()
    );
    p
}

fn kcat() -> &'static str {
    assert!(
        Path::new("/usr/bin/kcat").exists(),
        "kcat is not installed: run `cargo xtask kafka-clients` (as root: apt-get install kcat)"
    );
    "/usr/bin/kcat"
}

fn script(name: &str) -> PathBuf {
    common::repo_root().join("tests/kafka").join(name)
}

/// Runs a client script to its end; its last stdout line is JSON.
pub(crate) async fn run_script(name: &str, args: Vec<String>) -> serde_json::Value {
    let (py, path) = (python(), script(name));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(path)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name} failed: {stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{name} printed {last:?}: {e}"))
}

/// A free loopback port (a Kafka listener must keep its port across restarts: clients
/// reconnect to the address they were told).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(dir: &Path) -> (RunningServer, String) {
    let server = common::start_with(dir, |c| {
        c.kafka_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let kafka = server.kafka_addr.expect("kafka listener").to_string();
    (server, kafka)
}

async fn stored(server: &RunningServer, topic: &str) -> Vec<StoredRecord> {
    let partitions = server.broker.partition_count(topic).unwrap();
    let mut all = Vec::new();
    for p in 0..partitions {
        let mut from = 0;
        loop {
            let batch = server.broker.read(topic, p, from, 10_000).await.unwrap();
            let Some(last) = batch.last() else { break };
            from = last.offset + 1;
            all.extend(batch);
        }
    }
    all
}

/// "partition offset value" lines a producer wrote as acknowledgements arrived.
fn acked_lines(path: &Path) -> Vec<(u32, u64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_produces_idempotently_in_every_compression_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kafka) = start(dir.path()).await;
    server
        .broker
        .create_topic(TopicConfig::new("kp", 3))
        .await
        .unwrap();
    let per = 400;
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let out = run_script(
            "produce.py",
            vec![
                kafka.clone(),
                "kp".into(),
                per.to_string(),
                "--prefix".into(),
                codec.into(),
                "--compression".into(),
                codec.into(),
            ],
        )
        .await;
        assert_eq!(out["acked"], per, "{codec}: {out}");
        assert_eq!(out["errors"].as_array().unwrap().len(), 0, "{codec}: {out}");
    }
    let records = stored(&server, "kp").await;
    assert_eq!(records.len(), 5 * per, "every record once");
    let values: BTreeSet<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.record.value).into_owned())
        .collect();
    assert_eq!(values.len(), 5 * per, "no record twice");
    for r in &records {
        let value = String::from_utf8_lossy(&r.record.value).into_owned();
        let i: i64 = value.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(
            r.record.key.as_deref(),
            Some(format!("k{}", i % 17).as_bytes())
        );
        assert_eq!(
            r.record.headers,
            vec![("n".to_string(), bytes::Bytes::from(i.to_string()))]
        );
        assert_eq!(r.record.timestamp_ms, 1_700_000_000_000 + i, "{value}");
    }
    // kcat (another librdkafka) reads them back from the start of a partition.
    let p0 = records.iter().filter(|r| r.partition == 0).count();
    let out = Command::new(kcat())
        .args([
            "-b",
            &kafka,
            "-C",
            "-t",
            "kp",
            "-p",
            "0",
            "-o",
            "beginning",
            "-e",
            "-q",
        ])
        .args(["-f", "%k %s %o\n"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), p0);
    for (i, r) in records.iter().filter(|r| r.partition == 0).enumerate() {
        let want = format!(
            "{} {} {}",
            String::from_utf8_lossy(r.record.key.as_deref().unwrap()),
            String::from_utf8_lossy(&r.record.value),
            r.offset
        );
        assert_eq!(lines[i], want);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_librdkafka_group_of_two_rebalances_commits_and_resumes_on_weir_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kafka) = start(dir.path()).await;
    server
        .broker
        .create_topic(TopicConfig::new("kg", 4))
        .await
        .unwrap();
    let total = 1200;
    let out = run_script(
        "group.py",
        vec![kafka.clone(), "kg".into(), "4".into(), total.to_string()],
    )
    .await;
    assert_eq!(out["distinct"], total, "every record consumed: {out}");
    let a = out["assignments"]["A"].as_array().unwrap();
    let b = out["assignments"]["B"].as_array().unwrap();
    assert_eq!(
        a[0],
        serde_json::json!([0, 1, 2, 3]),
        "A alone had every partition: {out}"
    );
    assert!(
        a.iter().any(|x| x.as_array().unwrap().len() < 4)
            && b.iter().any(|x| x.as_array().unwrap().len() < 4),
        "B's join split the partitions between them: {out}"
    );
    assert_eq!(
        b.last().unwrap(),
        &serde_json::json!([0, 1, 2, 3]),
        "after A left, B had every partition: {out}"
    );
    // C resumed where the group left off: only the 50 records produced after it.
    let c: Vec<&str> = out["c_values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(c.len(), 50, "{out}");
    assert!(
        c.iter().all(|v| v.starts_with("x-")),
        "C read nothing the group had committed: {out}"
    );
    // The commits are weir's group offsets: the end of every partition.
    let offsets: BTreeMap<u32, u64> = server
        .broker
        .fetch_offsets("kgroup", "kg")
        .await
        .unwrap()
        .into_iter()
        .collect();
    let info = server.broker.describe_topic("kg").unwrap();
    for p in &info.partitions {
        assert_eq!(
            offsets.get(&p.partition),
            Some(&p.end_offset),
            "{offsets:?}"
        );
        assert_eq!(
            out["committed"][p.partition.to_string()],
            p.end_offset,
            "{out}"
        );
    }
    server.stop().await.unwrap();
}

fn spawn_on(dir: &Path, port: u16, kafka_port: u16, advertise: u16) -> WeirProcess {
    let kafka = format!("127.0.0.1:{kafka_port}");
    let advertise = format!("127.0.0.1:{advertise}");
    // The ports of a killed process may take a moment to be free again.
    for _ in 0..50 {
        let result = std::panic::catch_unwind(|| {
            WeirProcess::spawn(
                dir,
                &format!("127.0.0.1:{port}"),
                &[
                    "--fsync",
                    "always",
                    "--kafka-listen",
                    &kafka,
                    "--kafka-advertise",
                    &advertise,
                ],
            )
        });
        if let Ok(process) = result {
            return process;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("weir serve did not restart on port {port}");
}

/// A TCP proxy to `upstream` whose connections are all cut whenever `cut` is notified: what
/// was in flight either way is lost, as in a network failure.
async fn flaky_proxy(listener: tokio::net::TcpListener, upstream: String, cut: Arc<Notify>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        let (upstream, cut) = (upstream.clone(), cut.clone());
        tokio::spawn(async move {
            let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.notified() => {}
            }
        });
    }
}

/// A librdkafka idempotent producer through a network that drops connections (answers of
/// stored batches lost on the way) and a weir that is killed -9 several times: its retries
/// are stored once, and every record it was told was stored is there, at the offset it was
/// told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_librdkafka_producer_retrying_across_kill_9_stores_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (port, kafka_port) = (free_port(), free_port());
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    let cut = Arc::new(Notify::new());
    tokio::spawn(flaky_proxy(
        proxy,
        format!("127.0.0.1:{kafka_port}"),
        cut.clone(),
    ));
    let mut process = spawn_on(&data, port, kafka_port, proxy_port);
    {
        let client = weir_api::Client::connect(&process.addr).await.unwrap();
        client
            .create_topic(&TopicConfig::new("kc", 2))
            .await
            .unwrap();
    }
    let acked = dir.path().join("acked.txt");
    let total = 150_000;
    let producer = tokio::spawn(run_script(
        "produce.py",
        vec![
            format!("127.0.0.1:{proxy_port}"),
            "kc".into(),
            total.to_string(),
            "--acked".into(),
            acked.display().to_string(),
            "--pace".into(),
            "0.05".into(),
            "--set".into(),
            "reconnect.backoff.max.ms=200".into(),
        ],
    ));
    // Connections cut at random moments while batches are in flight (their answers lost),
    // and every third time weir killed -9 as well.
    let mut rng = rand::rng();
    let (mut cuts, mut kills) = (0, 0);
    common::eventually(60, "first acknowledgements", || {
        !acked_lines(&acked).is_empty()
    })
    .await;
    while cuts < 24 && !producer.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        cut.notify_waiters();
        cuts += 1;
        if cuts % 3 == 0 {
            process.kill9();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
            process = spawn_on(&data, port, kafka_port, proxy_port);
        }
    }
    assert!(
        kills >= 2,
        "the producer finished before weir was killed twice: make it longer"
    );
    let out = producer.await.unwrap();
    assert_eq!(out["acked"], total, "{out}");
    assert_eq!(out["unflushed"], 0, "{out}");
    process.terminate(Duration::from_secs(30));
    let server = common::start_server(&data).await;
    let records = stored(&server, "kc").await;
    let mut by_value: BTreeMap<String, Vec<(u32, u64)>> = BTreeMap::new();
    for r in &records {
        by_value
            .entry(String::from_utf8_lossy(&r.record.value).into_owned())
            .or_default()
            .push((r.partition, r.offset));
    }
    let twice: Vec<_> = by_value
        .iter()
        .filter(|(_, at)| at.len() > 1)
        .take(5)
        .collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    assert_eq!(by_value.len(), total, "every record stored");
    for (partition, offset, value) in acked_lines(&acked) {
        assert_eq!(
            by_value.get(&value),
            Some(&vec![(partition, offset)]),
            "{value} acknowledged at {partition}/{offset}"
        );
    }
    server.stop().await.unwrap();
}
