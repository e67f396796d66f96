//! The broker over gRPC: a real server on 127.0.0.1:0 and the Rust client.
//! (Over 500 lines because it is one suite, sharing its helpers.)

use crate::common;

use std::time::Duration;

use common::*;
use tonic::Code;
use weir_api::pb;
use weir_api::Client;
use weir_core::StartAt;
use weir_core::{Record, TopicConfig};

/// A server on a fresh directory, a client, and one topic.
async fn serve_with_topic(
    name: &str,
    partitions: u32,
) -> (
    tempfile::TempDir,
    weir_server::server::RunningServer,
    Client,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig::new(name, partitions))
        .await
        .unwrap();
    (dir, server, client)
}

async fn read_n(
    client: &Client,
    topic: &str,
    start: StartAt,
    group: Option<&str>,
    n: usize,
) -> Vec<weir_core::StoredRecord> {
    let mut sub = client.subscribe(topic, &[], start, group).await.unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("records arrive")
            .unwrap()
            .unwrap();
        out.extend(batch);
    }
    out
}

#[tokio::test]
async fn publish_subscribe_round_trip_across_partitions() {
    let (_dir, server, client) = serve_with_topic("orders", 4).await;
    let records: Vec<Record> = (0..200)
        .map(|i| Record {
            id: Some(format!("o-{i}")),
            headers: vec![("src".into(), "test".into())],
            ..keyed(&format!("user-{}", i % 17), &format!("order-{i}"))
        })
        .collect();
    let acks = client
        .publish("orders", None, records.clone())
        .await
        .unwrap();
    assert!(acks.len() > 1, "keys spread over partitions");
    assert_eq!(acks.iter().map(|a| a.count).sum::<u32>(), 200);

    let got = read_n(&client, "orders", StartAt::Earliest, None, 200).await;
    assert_eq!(got.len(), 200);
    let mut by_key = std::collections::HashMap::<_, Vec<_>>::new();
    for r in &got {
        assert_eq!(
            r.record.headers,
            vec![("src".to_string(), bytes::Bytes::from("test"))]
        );
        assert!(r.record.timestamp_ms > 0, "broker stamped the time");
        by_key
            .entry(r.record.key.clone())
            .or_default()
            .push(r.record.value.clone());
    }
    for (key, values) in by_key {
        let sent: Vec<_> = records
            .iter()
            .filter(|r| r.key == key)
            .map(|r| r.value.clone())
            .collect();
        assert_eq!(values, sent, "per-key order kept");
    }
    let info = client.describe_topic("orders").await.unwrap();
    assert_eq!(
        info.partitions.iter().map(|p| p.end_offset).sum::<u64>(),
        200
    );
    assert!(info
        .partitions
        .iter()
        .all(|p| p.start_offset == 0 && (p.end_offset == 0 || p.size_bytes > 0)));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn subscribe_follows_the_tail() {
    let (_dir, server, client) = serve_with_topic("t", 2).await;
    client
        .publish("t", Some(0), records("old", 3))
        .await
        .unwrap();
    let mut sub = client
        .subscribe("t", &[], StartAt::Latest, None)
        .await
        .unwrap();
    let publisher = client.clone();
    let writer = tokio::spawn(async move {
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            publisher
                .publish("t", Some(i % 2), records(&format!("new{i}"), 2))
                .await
                .unwrap();
        }
    });
    let mut got = Vec::new();
    while got.len() < 10 {
        got.extend(
            tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    writer.await.unwrap();
    assert!(
        got.iter().all(|r| !r.record.value.starts_with(b"old")),
        "latest skips what was there"
    );
    let values: std::collections::BTreeSet<_> = got
        .iter()
        .map(|r| String::from_utf8(r.record.value.to_vec()).unwrap())
        .collect();
    assert_eq!(values.len(), 10);
    // From an explicit offset and from a timestamp.
    let from_1 = read_n(&client, "t", StartAt::Offset(1), None, 1).await;
    assert!(from_1.iter().all(|r| r.offset >= 1));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn consumer_group_resumes_where_it_committed_also_after_restart() {
    let (dir, server, client) = serve_with_topic("t", 2).await;
    client
        .publish("t", Some(0), records("a", 10))
        .await
        .unwrap();
    client
        .publish("t", Some(1), records("b", 10))
        .await
        .unwrap();
    client
        .commit_offsets("data-team", "t", &[(0, 4), (1, 10)])
        .await
        .unwrap();
    let got = read_n(&client, "t", StartAt::Earliest, Some("data-team"), 6).await;
    assert_eq!(
        got.iter()
            .map(|r| (r.partition, r.offset))
            .collect::<Vec<_>>(),
        (4..10).map(|o| (0, o)).collect::<Vec<_>>()
    );
    server.stop().await.unwrap();

    let server = start_server(dir.path()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let mut offsets = client.fetch_offsets("data-team", "t").await.unwrap();
    offsets.sort();
    assert_eq!(offsets, vec![(0, 4), (1, 10)]);
    assert!(client.fetch_offsets("other", "t").await.unwrap().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn idempotent_retry_returns_first_offsets_and_stores_once_across_restart() {
    let (dir, server, client) = serve_with_topic("t", 1).await;
    let (id, epoch) = client.init_producer(None).await.unwrap();
    let publish = |seq: u64, prefix: &str, n: usize| pb::PublishRequest {
        topic: "t".into(),
        partition: Some(0),
        records: records(prefix, n).into_iter().map(Into::into).collect(),
        producer: Some(pb::ProducerFields {
            producer_id: id,
            epoch,
            base_sequence: seq,
        }),
        request_id: seq,
    };
    let mut raw = client.raw();
    let first = raw
        .publish(publish(0, "x", 5))
        .await
        .unwrap()
        .into_inner()
        .acks[0]
        .clone();
    raw.publish(publish(5, "y", 5)).await.unwrap();
    let retry = raw
        .publish(publish(0, "x", 5))
        .await
        .unwrap()
        .into_inner()
        .acks[0]
        .clone();
    assert!(retry.duplicate && retry.base_offset == first.base_offset && !first.duplicate);
    server.stop().await.unwrap();

    let server = start_server(dir.path()).await;
    let mut raw = Client::connect(&server.url()).await.unwrap().raw();
    let again = raw
        .publish(publish(5, "y", 5))
        .await
        .unwrap()
        .into_inner()
        .acks[0]
        .clone();
    assert_eq!(
        (again.base_offset, again.duplicate),
        (5, true),
        "dedup state was recovered"
    );
    let gap = raw.publish(publish(12, "z", 1)).await.unwrap_err();
    assert_eq!(gap.code(), Code::FailedPrecondition);
    assert!(
        gap.message().starts_with("sequence gap") && gap.message().contains("10 was expected"),
        "{}",
        gap.message()
    );
    assert_eq!(weir_api::error_kind(&gap), Some("sequence-gap"));

    let client = Client::connect(&server.url()).await.unwrap();
    client.init_producer(Some(id)).await.unwrap();
    let stale = raw.publish(publish(10, "z", 1)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().starts_with("stale epoch"),
        "{}",
        stale.message()
    );
    assert_eq!(weir_api::error_kind(&stale), Some("stale-epoch"));
    assert_eq!(
        client.describe_topic("t").await.unwrap().partitions[0].end_offset,
        10,
        "stored once"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn producer_helper_partitions_by_key_and_numbers_sequences() {
    let (_dir, server, client) = serve_with_topic("t", 3).await;
    let mut producer = client.producer().await.unwrap();
    let batch: Vec<Record> = (0..30)
        .map(|i| keyed(&format!("k{i}"), &format!("v{i}")))
        .collect();
    let first = producer.send("t", batch.clone()).await.unwrap();
    let second = producer.send("t", batch).await.unwrap();
    for ((p1, o1), (p2, o2)) in first.iter().zip(&second) {
        assert_eq!(p1, p2, "same key, same partition");
        assert!(o2 > o1, "a second send is new data, not a duplicate");
    }
    let all = read_n(&client, "t", StartAt::Earliest, None, 60).await;
    for (i, &(p, o)) in first.iter().enumerate() {
        let r = all
            .iter()
            .find(|r| r.partition == p && r.offset == o)
            .unwrap();
        assert_eq!(r.record.value, format!("v{i}"));
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_clear_statuses_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| c.broker.max_record_bytes = 10_000).await;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig::new("t", 2))
        .await
        .unwrap();
    client
        .publish("t", Some(0), records("keep", 3))
        .await
        .unwrap();
    let check = |e: weir_api::ClientError, code: Code, text: &str| {
        assert_eq!(e.code(), Some(code), "{e}");
        assert!(e.to_string().contains(text), "{e:?} should say {text:?}");
    };
    check(
        client
            .publish("nope", None, records("x", 1))
            .await
            .unwrap_err(),
        Code::NotFound,
        "unknown topic \"nope\"; create it",
    );
    check(
        client
            .create_topic(&TopicConfig::new("no spaces", 1))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "contains ' '",
    );
    check(
        client
            .create_topic(&TopicConfig::new("t", 1))
            .await
            .unwrap_err(),
        Code::AlreadyExists,
        "already exists",
    );
    check(
        client
            .publish("t", Some(7), records("x", 1))
            .await
            .unwrap_err(),
        Code::InvalidArgument,
        "partition 7 does not exist: topic \"t\" has partitions 0..2",
    );
    check(
        client.publish("t", Some(0), vec![]).await.unwrap_err(),
        Code::InvalidArgument,
        "empty batch",
    );
    let big = Record::from_value(vec![1u8; 20_000]);
    check(
        client.publish("t", Some(0), vec![big]).await.unwrap_err(),
        Code::InvalidArgument,
        "the limit is 10000",
    );
    check(
        client
            .subscribe("t", &[], StartAt::Offset(99), None)
            .await
            .err()
            .unwrap(),
        Code::OutOfRange,
        "stored offsets are 0..3",
    );
    check(
        client.describe_topic("gone").await.unwrap_err(),
        Code::NotFound,
        "unknown topic",
    );
    let info = client.describe_topic("t").await.unwrap();
    assert_eq!(
        info.partitions
            .iter()
            .map(|p| p.end_offset)
            .collect::<Vec<_>>(),
        vec![3, 0],
        "nothing stored by refused requests"
    );
    let kept = read_n(&client, "t", StartAt::Earliest, None, 3).await;
    assert_eq!(kept.len(), 3);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn publish_stream_acks_every_batch_in_order_and_reports_errors_inline() {
    let (_dir, server, client) = serve_with_topic("t", 2).await;
    let requests: Vec<pb::PublishRequest> = (0..50u64)
        .map(|i| pb::PublishRequest {
            topic: if i == 25 {
                "missing".into()
            } else {
                "t".into()
            },
            partition: Some((i % 2) as u32),
            records: records(&format!("b{i}"), 10)
                .into_iter()
                .map(Into::into)
                .collect(),
            producer: None,
            request_id: i,
        })
        .collect();
    let mut responses = client
        .raw()
        .publish_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(r) = responses.message().await.unwrap() {
        if r.request_id == 25 {
            assert!(r.error.as_ref().unwrap().message.contains("unknown topic"));
        } else {
            assert!(r.error.is_none());
            let ack = &r.acks[0];
            assert_eq!(
                ack.base_offset,
                (r.request_id / 2 - u64::from(r.request_id > 25 && r.request_id % 2 == 1)) * 10,
                "request {}",
                r.request_id
            );
        }
        seen.push(r.request_id);
    }
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn retention_trims_in_the_background_and_delete_removes_the_topic() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.broker.retention_interval = Duration::from_millis(50)
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig {
            retention_bytes: 64 * 1024,
            ..TopicConfig::new("t", 1)
        })
        .await
        .unwrap();
    for i in 0..10 {
        client
            .publish(
                "t",
                Some(0),
                vec![Record::from_value(vec![i as u8; 30_000])],
            )
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = client.describe_topic("t").await.unwrap().partitions[0];
        if p.size_bytes <= 64 * 1024 {
            assert!(p.start_offset >= 8 && p.end_offset == 10, "{p:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention never trimmed to the bound: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.delete_topic("t").await.unwrap();
    assert_eq!(
        client.describe_topic("t").await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    client
        .create_topic(&TopicConfig::new("t", 1))
        .await
        .unwrap();
    assert_eq!(
        client.describe_topic("t").await.unwrap().partitions[0].end_offset,
        0,
        "a re-created topic starts empty"
    );
    server.stop().await.unwrap();
}

/// Bytes in files under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.unwrap())
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                bytes_under(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// Retention gives disk back: four retention windows published in a row leave about one
/// window in the data directory (Kafka's whole-segment deletion), and what is kept reads.
#[tokio::test(flavor = "multi_thread")]
async fn four_retention_windows_in_a_row_leave_about_one_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.broker.retention_interval = Duration::from_millis(50)
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    let window: u64 = 4 * 1024 * 1024;
    client
        .create_topic(&TopicConfig {
            retention_bytes: window,
            ..TopicConfig::new("t", 1)
        })
        .await
        .unwrap();
    let before = bytes_under(dir.path());
    let value = vec![7u8; 1000];
    let mut sent = 0u64;
    while sent < 4 * window {
        let batch: Vec<Record> = (0..1000)
            .map(|_| Record::from_value(value.clone()))
            .collect();
        client.publish("t", Some(0), batch).await.unwrap();
        sent += 1000 * 1000;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let p = loop {
        let p = client.describe_topic("t").await.unwrap().partitions[0];
        let segments = bytes_under(&dir.path().join("segments/t"));
        if p.size_bytes <= window && segments <= window + window / 4 + 64 * 1024 {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention never gave the disk back: {p:?}, {segments} bytes in segments"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = bytes_under(dir.path());
    assert!(
        after <= before + window * 3 / 2,
        "data directory {before} bytes before, {after} after publishing {sent} bytes with a {window}-byte window"
    );
    let mut sub = client
        .subscribe("t", &[0], StartAt::Earliest, None)
        .await
        .unwrap();
    let mut read = 0;
    while read < p.end_offset - p.start_offset {
        let got = sub.next().await.unwrap().unwrap();
        assert_eq!(got[0].offset, p.start_offset + read);
        read += got.len() as u64;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn producer_retries_through_a_server_restart_with_the_same_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let addr = server.addr;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig::new("t", 1))
        .await
        .unwrap();
    let mut producer = client
        .producer()
        .await
        .unwrap()
        .with_retries(3, Duration::from_millis(150));
    producer
        .send_to("t", 0, records("before", 3))
        .await
        .unwrap();
    server.stop().await.unwrap();

    // The server comes back on the same address while the producer is retrying.
    let path = dir.path().to_path_buf();
    let restarted = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        start_with(&path, |c| c.listen = addr).await
    });
    let ack = producer
        .send_to("t", 0, records("during", 2))
        .await
        .expect("a retry reached the restarted server");
    assert_eq!((ack.base_offset, ack.count), (3, 2));
    let server = restarted.await.unwrap();
    let info = Client::connect(&server.url())
        .await
        .unwrap()
        .describe_topic("t")
        .await
        .unwrap();
    assert_eq!(info.partitions[0].end_offset, 5, "stored once");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn admission_limit_refuses_a_flooding_key_and_stores_every_accepted_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let mut config = TopicConfig::new("seckill.requests", 2);
    config.admission = Some(weir_core::Admission {
        per_key: 3,
        window_ms: 60_000,
    });
    let info = client.create_topic(&config).await.unwrap();
    assert_eq!(info.config.admission, config.admission);

    let mut accepted = Vec::new();
    for i in 0..10 {
        let value = format!("u1-{i}");
        match client
            .publish("seckill.requests", None, vec![keyed("u1", &value)])
            .await
        {
            Ok(_) => accepted.push(value),
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                assert_eq!(e.kind(), Some("admission"));
                assert!(e.to_string().contains("key \"u1\""), "{e}");
            }
        }
    }
    assert_eq!(accepted, vec!["u1-0", "u1-1", "u1-2"]);
    // Other keys and keyless records are not affected by u1's flood.
    for value in ["u2-0", "u2-1"] {
        client
            .publish("seckill.requests", None, vec![keyed("u2", value)])
            .await
            .unwrap();
        accepted.push(value.into());
    }
    client
        .publish("seckill.requests", None, records("anon", 5))
        .await
        .unwrap();
    accepted.extend((0..5).map(|i| format!("anon-{i}")));
    // A request with one key over the limit is refused whole, and charges nobody.
    let mixed = vec![
        keyed("u3", "u3-x"),
        keyed("u1", "u1-x"),
        keyed("u3", "u3-y"),
    ];
    let e = client
        .publish("seckill.requests", None, mixed)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("key \"u1\""), "{e}");
    let three: Vec<_> = (0..3).map(|i| keyed("u3", &format!("u3-{i}"))).collect();
    client
        .publish("seckill.requests", None, three)
        .await
        .unwrap();
    accepted.extend((0..3).map(|i| format!("u3-{i}")));

    let stored = read_n(
        &client,
        "seckill.requests",
        StartAt::Earliest,
        None,
        accepted.len(),
    )
    .await;
    let mut got: Vec<String> = stored
        .iter()
        .map(|r| String::from_utf8_lossy(&r.record.value).into_owned())
        .collect();
    got.sort();
    accepted.sort();
    assert_eq!(got, accepted);
    let info = client.describe_topic("seckill.requests").await.unwrap();
    let total: u64 = info.partitions.iter().map(|p| p.end_offset).sum();
    assert_eq!(
        total as usize,
        accepted.len(),
        "refused records never reached the log"
    );
    server.stop().await.unwrap();
}
