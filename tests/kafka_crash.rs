//! A librdkafka idempotent producer against weir killed -9 and a network that drops its
//! connections: retries stored once, every acknowledged record where it was acknowledged.

use crate::common;
use crate::kafka::{acked_lines, free_port, run_script, stored};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::WeirProcess;
use rand::Rng;
use tokio::sync::Notify;
use weir_core::TopicConfig;

fn spawn_on(dir: &Path, port: u16, kafka_port: u16, advertise: u16) -> WeirProcess {
    let (kafka, advertise) = (
        format!("127.0.0.1:{kafka_port}"),
        format!("127.0.0.1:{advertise}"),
    );
    let args = [
        "--fsync",
        "always",
        "--kafka-listen",
        &kafka,
        "--kafka-advertise",
        &advertise,
    ];
    WeirProcess::spawn_on_port(dir, port, &args)
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
