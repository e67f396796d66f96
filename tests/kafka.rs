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
use std::time::Duration;

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

/// What kcat reads of `topic` from its beginning to its end, one `format`ted line a record.
fn kcat_read(kafka: &str, topic: &str, extra: &[&str], format: &str) -> Vec<String> {
    let out = Command::new(kcat())
        .args([
            "-b",
            kafka,
            "-C",
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
        ])
        .args(extra)
        .args(["-f", format])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
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
/// reconnect to the address they were told), below the range the kernel hands client sockets,
/// so none takes it while the server is down.
pub(crate) fn free_port() -> u16 {
    weir_cluster::free_ports(1)[0]
}

async fn start(dir: &Path) -> (RunningServer, String) {
    let server = common::start_with(dir, |c| {
        c.kafka_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let kafka = server.kafka_addr.expect("kafka listener").to_string();
    (server, kafka)
}

pub(crate) async fn stored(server: &RunningServer, topic: &str) -> Vec<StoredRecord> {
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
pub(crate) fn acked_lines(path: &Path) -> Vec<(u32, u64, String)> {
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
    let lines = kcat_read(&kafka, "kp", &["-p", "0"], "%k %s %o\n");
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

/// Orders produced through kcat are what the points plugin reads: balances credited once
/// each, and its outputs (written by weir's forwarder) read back through Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_consumes_a_topic_written_through_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kafka) = start(dir.path()).await;
    let client = weir_api::Client::connect(&server.url()).await.unwrap();
    for (topic, partitions) in [("order.paid", 2), ("points.credited", 1)] {
        client
            .create_topic(&TopicConfig::new(topic, partitions))
            .await
            .unwrap();
    }
    client
        .deploy_plugin(weir_api::Deploy {
            name: "points".into(),
            wasm: common::plugin_wasm("points").to_vec(),
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let orders: String = (0..300)
        .map(|i| {
            format!(
                "u{}|{{\"order\":{i},\"user\":\"u{}\",\"amount\":{}.5}}\n",
                i % 3,
                i % 3,
                i % 10
            )
        })
        .collect();
    let mut kcat_p = Command::new(kcat())
        .args([
            "-b",
            &kafka,
            "-P",
            "-t",
            "order.paid",
            "-K",
            "|",
            "-z",
            "gzip",
        ])
        .args(["-X", "enable.idempotence=true"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    kcat_p
        .stdin
        .take()
        .unwrap()
        .write_all(orders.as_bytes())
        .unwrap();
    assert!(kcat_p.wait().unwrap().success());
    // floor(amount) per order: users 0, 1, 2 each paid 100 orders.
    let expected: Vec<u64> = (0..3)
        .map(|u| {
            (0..300)
                .filter(|i| i % 3 == u)
                .map(|i| (i % 10) as u64)
                .sum()
        })
        .collect();
    for (u, want) in expected.iter().enumerate() {
        let user = format!("u{u}");
        let mut got = None;
        for _ in 0..300 {
            got = common::balance(&client, &user).await;
            if got == Some(*want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(got, Some(*want), "{user}");
    }
    let credited = kcat_read(&kafka, "points.credited", &[], "%s\n");
    assert_eq!(
        credited.len(),
        300,
        "one output per order, read through Kafka"
    );
    assert!(credited.iter().all(|l| l.contains("\"points\"")));
    server.stop().await.unwrap();
}

/// With `--tls-cert` the Kafka listener speaks TLS with the same certificate: librdkafka
/// with `security.protocol=SSL` and the CA produces; a plaintext client is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_listener_speaks_tls_with_the_servers_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let port = free_port();
    let server = common::start_with(&dir.path().join("data"), |c| {
        c.tls = Some(weir_server::server::TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
        c.kafka_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.kafka_advertise = Some(("localhost".into(), port));
    })
    .await;
    server
        .broker
        .create_topic(TopicConfig::new("kt", 1))
        .await
        .unwrap();
    let out = run_script(
        "produce.py",
        vec![
            format!("localhost:{port}"),
            "kt".into(),
            "100".into(),
            "--set".into(),
            "security.protocol=SSL".into(),
            "--set".into(),
            format!("ssl.ca.location={}", cert_path.display()),
        ],
    )
    .await;
    assert_eq!(out["acked"], 100, "{out}");
    assert_eq!(stored(&server, "kt").await.len(), 100);
    // A plaintext client gets nothing it can read: kcat fails, nothing stored.
    let plain = Command::new(kcat())
        .args(["-b", &format!("localhost:{port}"), "-L", "-m", "5"])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plaintext client was answered");
    server.stop().await.unwrap();
}
