//! Data directories written by earlier weirs (tests/fixtures/make-fixture.sh: weir-log/1 from
//! before the crate split, commit 504c982; weir-log/2 from before segment files, commit
//! 2eb85d9, records inside sled; weir-log/3 from before redb, commit 667509b, plugins' state
//! in sled trees) open with this weir and carry on exactly once: topics and
//! records, the idempotent producer's states (a retry is still recognised), a consumer
//! group's offsets, the points plugin's state, and the outputs its outbox still held. Old
//! records stay readable where they are, new ones go to segment files; the key-value
//! namespaces move to redb. The directory is
//! marked with this weir's format, which the old weirs refuse.

use std::time::{Duration, Instant};

use tonic::Code;
use weir_api::{pb, Client};
use weir_core::Record;

use crate::common::{self, balance, paid};

fn unpack(into: &std::path::Path, fixture: &str) -> std::path::PathBuf {
    let fixture = format!(
        "{}/../../tests/fixtures/{fixture}.tar.gz",
        env!("CARGO_MANIFEST_DIR")
    );
    let status = std::process::Command::new("tar")
        .args(["-xzf", &fixture, "-C"])
        .arg(into)
        .status()
        .expect("run tar");
    assert!(status.success(), "unpacking {fixture}");
    into.join("data")
}

async fn outputs(client: &Client) -> Vec<(String, u64)> {
    let mut sub = client
        .subscribe("points.credited", &[], weir_core::StartAt::Earliest, None)
        .await
        .unwrap();
    let end: u64 = client
        .describe_topic("points.credited")
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end_offset)
        .sum();
    let mut got = Vec::new();
    while (got.len() as u64) < end {
        for r in sub.next().await.unwrap().unwrap() {
            let key = String::from_utf8_lossy(r.record.key.as_deref().unwrap()).into_owned();
            let credited: serde_json::Value = serde_json::from_slice(&r.record.value).unwrap();
            got.push((key, credited["balance"].as_u64().unwrap()));
        }
    }
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn a_weir_log_1_directory_carries_on_exactly_once() {
    carries_on("weir-log-1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_weir_log_2_directory_carries_on_exactly_once() {
    carries_on("weir-log-2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_weir_log_3_directory_carries_on_exactly_once() {
    carries_on("weir-log-3").await;
}

async fn carries_on(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = unpack(dir.path(), fixture);
    let server = common::start_server(&data).await;
    let client = Client::connect(&server.url()).await.unwrap();

    // Topics and records.
    let orders = client.describe_topic("order.paid").await.unwrap();
    let ends: Vec<u64> = orders.partitions.iter().map(|p| p.end_offset).collect();
    assert_eq!(ends.iter().sum::<u64>(), 6, "{ends:?}");
    let audit = client.describe_topic("audit").await.unwrap();
    assert_eq!(audit.partitions[0].end_offset, 3);
    // The consumer group's offsets.
    assert_eq!(
        client.fetch_offsets("auditors", "audit").await.unwrap(),
        vec![(0, 2)]
    );
    // The plugin's state, and its outbox forwarded now, each output once.
    assert_eq!(balance(&client, "ann").await, Some(90));
    assert_eq!(balance(&client, "bob").await, Some(80));
    assert_eq!(balance(&client, "cat").await, Some(40));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = outputs(&client).await;
        if out.len() == 6 {
            assert_eq!(
                out,
                vec![
                    ("ann".into(), 10),
                    ("ann".into(), 40),
                    ("ann".into(), 90),
                    ("bob".into(), 20),
                    ("bob".into(), 80),
                    ("cat".into(), 40)
                ]
            );
            break;
        }
        assert!(
            out.len() < 6 && Instant::now() < deadline,
            "outputs: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The CLI's producer (id 3; 1 and 2 are the plugin's, now the server's): a retry of its
    // first batch to each partition is still recognised, with the first write's offsets.
    let mut raw = client.raw();
    for (p, &end) in ends.iter().enumerate() {
        if end == 0 {
            continue;
        }
        let retry = pb::PublishRequest {
            topic: "order.paid".into(),
            partition: Some(p as u32),
            records: (0..end)
                .map(|_| Record::from_value("retry").into())
                .collect(),
            producer: Some(pb::ProducerFields {
                producer_id: 3,
                epoch: 0,
                base_sequence: 0,
            }),
            request_id: 0,
        };
        let ack = raw.publish(retry).await.unwrap().into_inner().acks[0];
        assert!(
            ack.duplicate && ack.base_offset == 0,
            "partition {p}: {ack:?}"
        );
        let forged = pb::PublishRequest {
            topic: "order.paid".into(),
            partition: Some(p as u32),
            records: vec![Record::from_value("x").into()],
            producer: Some(pb::ProducerFields {
                producer_id: 1,
                epoch: 0,
                base_sequence: 0,
            }),
            request_id: 0,
        };
        let refused = raw.publish(forged).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "the plugin's producer is the server's"
        );
    }
    // It carries on: new orders and a redelivered one.
    let mut producer = client.producer().await.unwrap();
    producer
        .send(
            "order.paid",
            vec![paid(7, "cat", 5.0), paid(1, "ann", 10.0)],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while balance(&client, "cat").await != Some(45) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        balance(&client, "ann").await,
        Some(90),
        "order-1 again is skipped"
    );
    // Every record reads back, the old ones from sled and the new ones from segment files,
    // and so after a restart.
    assert_eq!(all_orders(&client).await, 8);
    server.stop().await.unwrap();
    let server = common::start_server(&data).await;
    let client = Client::connect(&server.url()).await.unwrap();
    assert_eq!(all_orders(&client).await, 8);
    server.stop().await.unwrap();

    // The directory is in this weir's format now: the weir that wrote it would not see the
    // records in segment files, and refuses it.
    let marker = {
        let _blocking = weir_core::blocking::allow();
        let store = weir_log::SledStore::open(&data, &Default::default()).unwrap();
        drop(store);
        std::fs::read(data.join("db")).unwrap()
    };
    let current = format!("weir-log/{}", weir_log::sled_store::FORMAT_VERSION);
    assert!(
        marker.windows(10).any(|w| w == current.as_bytes()),
        "the format marker moved on"
    );
}

/// How many records order.paid holds, read from the earliest offset.
async fn all_orders(client: &Client) -> usize {
    let end: u64 = client
        .describe_topic("order.paid")
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end_offset - p.start_offset)
        .sum();
    let mut sub = client
        .subscribe("order.paid", &[], weir_core::StartAt::Earliest, None)
        .await
        .unwrap();
    let mut got = 0;
    while (got as u64) < end {
        got += sub.next().await.unwrap().unwrap().len();
    }
    got
}
