//! Broker unit tests on the in-memory and sled stores. (Over 500 lines because it is one
//! suite: one subject, the broker's contract, sharing its helpers.)

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::tests_suite::{broker_on, broker_with, Backend, TestBroker};
use weir_core::Record;
use weir_log::FsyncPolicy;
use weir_log::{MemoryStore, SledStore};

fn sled_broker(dir: &std::path::Path) -> TestBroker {
    let _blocking = weir_core::blocking::allow();
    // A reopen may find the previous broker's last task still dropping its store handle.
    let mut tries = 0;
    let store = loop {
        match SledStore::open(dir, &Default::default()) {
            Ok(store) => break store,
            Err(e) if tries < 50 && e.to_string().contains("lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    broker_on(Arc::new(store))
}

pub(crate) fn values(range: std::ops::Range<u32>) -> Vec<Record> {
    range.map(|i| Record::from_value(format!("v{i}"))).collect()
}

pub(crate) fn to(topic: &str, partition: u32, records: Vec<Record>) -> Publish {
    Publish {
        topic: topic.into(),
        partition: Some(partition),
        records,
        producer: None,
        caller: Caller::default(),
    }
}

fn idem(
    topic: &str,
    partition: u32,
    records: Vec<Record>,
    producer_id: u64,
    epoch: u32,
    base_sequence: u64,
) -> Publish {
    Publish {
        producer: Some(ProducerFields {
            producer_id,
            epoch,
            base_sequence,
        }),
        ..to(topic, partition, records)
    }
}

async fn all(b: &Broker, topic: &str, partition: u32) -> Vec<String> {
    b.read(topic, partition, 0, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r.record.value.to_vec()).unwrap())
        .collect()
}

async fn publish_then_read_keeps_order_and_offsets(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig::new("t", 2)).await.unwrap();
    let acks = b.publish(to("t", 1, values(0..3))).await.unwrap();
    assert_eq!(
        acks,
        vec![PartitionAck {
            partition: 1,
            appended: Appended {
                base_offset: 0,
                count: 3,
                duplicate: false
            }
        }]
    );
    let acks = b.publish(to("t", 1, values(3..5))).await.unwrap();
    assert_eq!(acks[0].appended.base_offset, 3);
    assert_eq!(all(&b, "t", 1).await, vec!["v0", "v1", "v2", "v3", "v4"]);
    let from_3: Vec<u64> = b
        .read("t", 1, 3, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.offset)
        .collect();
    assert_eq!(from_3, vec![3, 4]);
    assert!(all(&b, "t", 0).await.is_empty());
}

async fn keyed_records_follow_the_key_hash_and_keyless_stick_together(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig::new("t", 4)).await.unwrap();
    let records: Vec<Record> = (0..40)
        .map(|i| Record {
            key: Some(Bytes::from(format!("user-{i}"))),
            ..Record::from_value("x")
        })
        .collect();
    let acks = b
        .publish(Publish {
            topic: "t".into(),
            records: records.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(acks.iter().map(|a| a.appended.count).sum::<u32>(), 40);
    for p in 0..4 {
        for r in b.read("t", p, 0, 1000).await.unwrap() {
            assert_eq!(
                weir_core::partition_for_key(r.record.key.as_ref().unwrap(), 4),
                p
            );
        }
    }
    let acks = b
        .publish(Publish {
            topic: "t".into(),
            records: values(0..10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        acks.len(),
        1,
        "keyless records of one request go to one partition"
    );
}

async fn bad_publishes_are_refused_and_store_nothing(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig::new("t", 2)).await.unwrap();
    let err = |r: Result<Vec<PartitionAck>, BrokerError>| r.unwrap_err().to_string();
    assert!(err(b.publish(to("nope", 0, values(0..1))).await).contains("unknown topic \"nope\""));
    assert!(err(b.publish(to("t", 2, values(0..1))).await).contains("partition 2 does not exist"));
    assert!(err(b.publish(to("t", 0, vec![])).await).contains("empty batch"));
    let big = Record::from_value(vec![0u8; 2 * 1024 * 1024]);
    assert!(err(b
        .publish(to("t", 0, vec![Record::from_value("ok"), big]))
        .await)
    .contains("record 1 is 2097"));
    let no_partition = Publish {
        producer: Some(ProducerFields {
            producer_id: 1,
            epoch: 0,
            base_sequence: 0,
        }),
        ..Publish {
            topic: "t".into(),
            records: values(0..1),
            ..Default::default()
        }
    };
    assert!(err(b.publish(no_partition).await).contains("explicit partition"));
    assert!(err(b.publish(idem("t", 0, values(0..1), 99, 0, 0)).await)
        .contains("unknown producer id 99"));
    for p in 0..2 {
        assert_eq!(b.describe_topic("t").unwrap().partitions[p].end_offset, 0);
    }
    assert!(b
        .create_topic(TopicConfig::new("t", 1))
        .await
        .unwrap_err()
        .to_string()
        .contains("already exists"));
    assert!(b
        .create_topic(TopicConfig::new("bad/name", 1))
        .await
        .unwrap_err()
        .to_string()
        .contains("'/'"));
    assert!(b
        .create_topic(TopicConfig::new("zero", 0))
        .await
        .unwrap_err()
        .to_string()
        .contains("1 to 1024 partitions"));
}

async fn idempotent_retries_store_once_and_sequence_errors_say_which(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    let (id, epoch) = b.init_producer(None, &Caller::default()).await.unwrap();
    let first = b
        .publish(idem("t", 0, values(0..3), id, epoch, 0))
        .await
        .unwrap();
    b.publish(idem("t", 0, values(3..5), id, epoch, 3))
        .await
        .unwrap();
    let retry = b
        .publish(idem("t", 0, values(0..3), id, epoch, 0))
        .await
        .unwrap();
    assert_eq!(
        retry[0].appended,
        Appended {
            base_offset: first[0].appended.base_offset,
            count: 3,
            duplicate: true
        }
    );
    assert_eq!(all(&b, "t", 0).await.len(), 5, "the retry stored nothing");

    let gap = b
        .publish(idem("t", 0, values(5..6), id, epoch, 7))
        .await
        .unwrap_err();
    assert!(
        matches!(
            gap,
            BrokerError::SequenceGap {
                expected: 5,
                got: 7,
                ..
            }
        ),
        "{gap}"
    );
    assert!(gap.to_string().starts_with("sequence gap"));

    let (same, newer) = b.init_producer(Some(id), &Caller::default()).await.unwrap();
    assert_eq!((same, newer), (id, epoch + 1));
    let stale = b
        .publish(idem("t", 0, values(5..6), id, epoch, 5))
        .await
        .unwrap_err();
    assert!(matches!(stale, BrokerError::StaleEpoch { .. }), "{stale}");
    assert!(stale.to_string().starts_with("stale epoch"));
    // The new epoch starts its sequence at 0.
    b.publish(idem("t", 0, values(5..6), id, newer, 0))
        .await
        .unwrap();
    assert_eq!(all(&b, "t", 0).await.len(), 6);
}

#[tokio::test]
async fn sled_reopen_recovers_offsets_producers_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (id, epoch, first) = {
        let b = sled_broker(dir.path());
        b.create_topic(TopicConfig::new("t", 2)).await.unwrap();
        let (id, epoch) = b.init_producer(None, &Caller::default()).await.unwrap();
        let first = b
            .publish(idem("t", 1, values(0..1000), id, epoch, 0))
            .await
            .unwrap();
        b.publish(to("t", 0, values(0..10))).await.unwrap();
        b.commit_offsets("g", "t", vec![(0, 7)]).await.unwrap();
        (id, epoch, first)
    };
    let b = sled_broker(dir.path());
    let info = b.describe_topic("t").unwrap();
    assert_eq!(
        (info.partitions[0].end_offset, info.partitions[1].end_offset),
        (10, 1000)
    );
    assert!(info.partitions[1].size_bytes > 1000 * 20);
    let retry = b
        .publish(idem("t", 1, values(0..1000), id, epoch, 0))
        .await
        .unwrap();
    assert_eq!(
        retry[0].appended,
        Appended {
            duplicate: true,
            ..first[0].appended
        },
        "dedup state survives a restart"
    );
    assert_eq!(
        b.publish(to("t", 1, values(0..1))).await.unwrap()[0]
            .appended
            .base_offset,
        1000
    );
    assert_eq!(b.fetch_offsets("g", "t").await.unwrap(), vec![(0, 7)]);
    let values: Vec<String> = all(&b, "t", 1).await;
    assert_eq!(values.len(), 1001);
    assert_eq!(values[999], "v999");
    let (_, next_epoch) = b.init_producer(Some(id), &Caller::default()).await.unwrap();
    assert_eq!(next_epoch, epoch + 1);
}

#[tokio::test]
async fn big_records_are_split_into_fragments_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let b = sled_broker(dir.path());
    b.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    let big: Vec<u8> = (0..900_000u32).map(|i| (i % 251) as u8).collect();
    b.publish(to(
        "t",
        0,
        vec![
            Record::from_value("small"),
            Record::from_value(big.clone()),
            Record::from_value("after"),
        ],
    ))
    .await
    .unwrap();
    drop(b);
    let b = sled_broker(dir.path());
    let read = b.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(read.len(), 3);
    assert_eq!(read[1].record.value.as_ref(), &big[..]);
    assert_eq!(read[2].record.value.as_ref(), b"after");
}

#[tokio::test]
async fn sled_writes_no_blob_files_so_one_fdatasync_covers_everything() {
    // sled never fsyncs blob files; pages that big must not exist (see log::sled_store).
    let dir = tempfile::tempdir().unwrap();
    let b = sled_broker(dir.path());
    b.create_topic(TopicConfig::new("t", 2)).await.unwrap();
    for i in 0..300u32 {
        let records = (0..1000)
            .map(|j| Record::from_value(format!("{i:05}-{j:05}-{}", "x".repeat(100))))
            .collect();
        b.publish(to("t", i % 2, records)).await.unwrap();
    }
    for _ in 0..5 {
        b.publish(to("t", 0, vec![Record::from_value(vec![9u8; 1_000_000])]))
            .await
            .unwrap();
    }
    drop(b);
    let blobs: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(
        blobs.is_empty(),
        "{} blob files were written: {:?}",
        blobs.len(),
        blobs.first().map(|e| e.path())
    );
    let b = sled_broker(dir.path());
    assert_eq!(
        b.describe_topic("t").unwrap().partitions[0].end_offset,
        150_005
    );
}

async fn retention_by_bytes_and_age_trims_oldest_chunks(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig {
        retention_bytes: 100_000,
        ..TopicConfig::new("bytes", 1)
    })
    .await
    .unwrap();
    for i in 0..20 {
        b.publish(to(
            "bytes",
            0,
            vec![Record::from_value(vec![i as u8; 20_000])],
        ))
        .await
        .unwrap();
    }
    let removed = b.apply_retention().await.unwrap();
    let p = b.describe_topic("bytes").unwrap().partitions[0];
    assert_eq!(removed, p.start_offset);
    assert!(
        p.size_bytes <= 100_000 && p.start_offset > 0 && p.end_offset == 20,
        "{p:?}"
    );
    let first = b.read("bytes", 0, 0, 1).await.unwrap();
    assert_eq!(
        first[0].offset, p.start_offset,
        "a read before the start begins at the start"
    );

    b.create_topic(TopicConfig {
        retention_ms: 60_000,
        ..TopicConfig::new("age", 1)
    })
    .await
    .unwrap();
    let old = Record {
        timestamp_ms: now_ms() - 120_000,
        ..Record::from_value("old")
    };
    b.publish(to("age", 0, vec![old])).await.unwrap();
    b.publish(to("age", 0, values(0..2))).await.unwrap();
    b.apply_retention().await.unwrap();
    let p = b.describe_topic("age").unwrap().partitions[0];
    assert_eq!((p.start_offset, p.end_offset), (1, 3));
}

async fn start_positions_resolve(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    let at = |ms| Record {
        timestamp_ms: ms,
        ..Record::from_value("x")
    };
    b.publish(to("t", 0, vec![at(1_000), at(2_000), at(3_000)]))
        .await
        .unwrap();
    assert_eq!(b.resolve_start("t", 0, StartAt::Earliest).await.unwrap(), 0);
    assert_eq!(b.resolve_start("t", 0, StartAt::Latest).await.unwrap(), 3);
    assert_eq!(
        b.resolve_start("t", 0, StartAt::Timestamp(1_500))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        b.resolve_start("t", 0, StartAt::Timestamp(9_000))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        b.resolve_start("t", 0, StartAt::Offset(2)).await.unwrap(),
        2
    );
    let err = b
        .resolve_start("t", 0, StartAt::Offset(4))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

/// Publishes from 4 concurrent tasks, cuts the power at a moment chosen while they run, and
/// returns (acked before the cut, acked found after the cut).
async fn power_cut_during_publishes(policy: FsyncPolicy) -> (usize, usize) {
    let store = Arc::new(MemoryStore::new());
    let b = broker_with(store.clone(), policy);
    b.create_topic(TopicConfig::new("t", 2)).await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let (b, acked, stop) = (b.broker.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let ack = b.publish(to("t", w % 2, values(i..i + 50))).await.unwrap()[0];
                acked.lock().push(ack);
                i += 50;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Snapshot the acknowledgements first: everything acknowledged by now must survive.
    let acked_before_cut: Vec<PartitionAck> = acked.lock().clone();
    let after_cut = Arc::new(store.power_cut());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    drop(b);
    let recovered = broker_on(after_cut);
    let mut survived = 0;
    for ack in &acked_before_cut {
        let read = recovered
            .read("t", ack.partition, ack.appended.base_offset, 50)
            .await
            .unwrap();
        if read.first().map(|r| r.offset) == Some(ack.appended.base_offset)
            && read.len() >= ack.appended.count as usize
        {
            survived += 1;
        }
    }
    (acked_before_cut.len(), survived)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_fsync_always_every_acknowledged_publish_survives_a_power_cut() {
    let (acked, survived) = power_cut_during_publishes(FsyncPolicy::Always).await;
    assert!(acked > 20, "the test published too little: {acked}");
    assert_eq!(
        survived, acked,
        "acknowledged publishes lost in a power cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_fsync_never_a_power_cut_loses_acknowledged_publishes() {
    // The same test with syncing off must see losses, or it could not see a missing sync.
    let (acked, survived) = power_cut_during_publishes(FsyncPolicy::Never).await;
    assert!(
        acked > 20 && survived < acked,
        "{survived} of {acked} survived without any sync"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_fsync_interval_acknowledged_publishes_are_synced_within_the_interval() {
    let store = Arc::new(MemoryStore::new());
    let b = broker_with(
        store.clone(),
        FsyncPolicy::Interval(Duration::from_millis(50)),
    );
    b.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    b.publish(to("t", 0, values(0..100))).await.unwrap();
    // A power cut right after the ack can lose it (that is the policy's trade-off) ...
    // ... but one interval later it is on disk.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let recovered = broker_on(Arc::new(store.power_cut()));
    assert_eq!(recovered.read("t", 0, 0, 1000).await.unwrap().len(), 100);
}

async fn admission_does_not_charge_the_retry_of_a_stored_idempotent_batch(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig {
        admission: Some(weir_core::Admission {
            per_key: 1,
            window_ms: 60_000,
        }),
        ..TopicConfig::new("seckill", 1)
    })
    .await
    .unwrap();
    let keyed = |v: &str| Record {
        key: Some(Bytes::from_static(b"u1")),
        ..Record::from_value(v.to_string())
    };
    let (id, epoch) = b.init_producer(None, &Caller::default()).await.unwrap();
    let first = b
        .publish(idem("seckill", 0, vec![keyed("a")], id, epoch, 0))
        .await
        .unwrap();
    // The client did not see the ack and retries with the same sequence: answered with the
    // first write's offsets, not refused as u1's second record.
    let retry = b
        .publish(idem("seckill", 0, vec![keyed("a")], id, epoch, 0))
        .await
        .unwrap();
    assert!(retry[0].appended.duplicate);
    assert_eq!(retry[0].appended.base_offset, first[0].appended.base_offset);
    // A new record of the same key is a second one, and refused.
    let e = b
        .publish(idem("seckill", 0, vec![keyed("b")], id, epoch, 1))
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::Admission { .. }), "{e}");
    assert_eq!(b.read("seckill", 0, 0, 10).await.unwrap().len(), 1);
}

on_both_stores!(
    publish_then_read_keeps_order_and_offsets,
    keyed_records_follow_the_key_hash_and_keyless_stick_together,
    bad_publishes_are_refused_and_store_nothing,
    idempotent_retries_store_once_and_sequence_errors_say_which,
    retention_by_bytes_and_age_trims_oldest_chunks,
    start_positions_resolve,
    admission_does_not_charge_the_retry_of_a_stored_idempotent_batch,
);
