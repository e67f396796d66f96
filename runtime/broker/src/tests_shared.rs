//! Two brokers on one JetStream log: two weir nodes of one cluster.

use std::collections::BTreeMap;

use weir_core::{Record, TopicConfig};

use crate::tests::{to, values};
use crate::tests_suite::{fresh_prefix, jetstream_broker, TestBroker};
use crate::{Broker, BrokerError, Caller, ProducerFields, Publish};

fn two_nodes() -> (TestBroker, TestBroker) {
    let prefix = fresh_prefix();
    (jetstream_broker(&prefix), jetstream_broker(&prefix))
}

async fn read_all(b: &Broker, topic: &str, partition: u32) -> Vec<(u64, String)> {
    b.read(topic, partition, 0, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.offset,
                String::from_utf8(r.record.value.to_vec()).unwrap(),
            )
        })
        .collect()
}

/// Both nodes, caught up, read the same `records` records of `topic`'s partition 0 at dense
/// offsets, and each acknowledged `(base offset, first value)` is where its ack said.
async fn assert_both_read(
    a: &Broker,
    b: &Broker,
    topic: &str,
    records: usize,
    acked: &[(u64, String)],
) {
    b.follow_shared(true).await.unwrap();
    a.follow_shared(true).await.unwrap();
    let (on_a, on_b) = (read_all(a, topic, 0).await, read_all(b, topic, 0).await);
    assert_eq!(on_a, on_b, "both nodes read the same log");
    assert_eq!(on_a.len(), records, "every batch once");
    assert!(
        on_a.iter().enumerate().all(|(i, (o, _))| *o == i as u64),
        "dense offsets"
    );
    let by_offset: BTreeMap<u64, String> = on_a.into_iter().collect();
    for (offset, value) in acked {
        assert_eq!(
            &by_offset[offset], value,
            "the ack said where the batch went"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_through_two_nodes_keep_offsets_dense_and_acks_true() {
    let (a, b) = two_nodes();
    a.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    // B has not seen the topic yet: the publish finds it in the store.
    let mut tasks = Vec::new();
    for (w, node) in [
        (0, a.clone()),
        (1, b.clone()),
        (2, a.clone()),
        (3, b.clone()),
    ] {
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..25 {
                let records: Vec<Record> = (0..3)
                    .map(|j| Record::from_value(format!("w{w}-{i}-{j}")))
                    .collect();
                let ack = node.publish(to("t", 0, records)).await.unwrap();
                acked.push((ack[0].appended.base_offset, format!("w{w}-{i}-0")));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_both_read(&a, &b, "t", 300, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_queued_behind_a_write_share_the_next_one_and_are_each_answered_as_alone() {
    let (a, b) = two_nodes();
    // A name no other test uses: the write counter is per topic name, for the process.
    let topic = "grouped-writes";
    a.create_topic(TopicConfig::new(topic, 1)).await.unwrap();
    // Eight idempotent producers through A, each sending every batch twice at once (a
    // retry racing its first try, likely queued in the same write), and plain publishes
    // through B racing them for the same partition.
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let node = a.clone();
        let (id, epoch) = node.init_producer(None, &Caller::default()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10u64 {
                let batch = || Publish {
                    producer: Some(ProducerFields {
                        producer_id: id,
                        epoch,
                        base_sequence: i * 5,
                    }),
                    ..to(
                        topic,
                        0,
                        (0..5)
                            .map(|j| Record::from_value(format!("p{w}-{i}-{j}")))
                            .collect(),
                    )
                };
                let (first, retry) = tokio::join!(node.publish(batch()), node.publish(batch()));
                let (first, retry) = (first.unwrap()[0].appended, retry.unwrap()[0].appended);
                assert_eq!(
                    first.base_offset, retry.base_offset,
                    "a retry is answered with the first offsets"
                );
                assert!(
                    first.duplicate != retry.duplicate,
                    "stored once: {first:?} {retry:?}"
                );
                acked.push((first.base_offset, format!("p{w}-{i}-0")));
            }
            acked
        }));
    }
    for w in 0..4u32 {
        let node = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10 {
                let records = (0..3)
                    .map(|j| Record::from_value(format!("b{w}-{i}-{j}")))
                    .collect();
                let ack = node.publish(to(topic, 0, records)).await.unwrap();
                assert!(!ack[0].appended.duplicate);
                acked.push((ack[0].appended.base_offset, format!("b{w}-{i}-0")));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_both_read(&a, &b, topic, 8 * 10 * 5 + 4 * 10 * 3, &acked).await;
    // 120 batches stored; through A, sixteen publishes at a time queue behind each write.
    let writes = weir_metrics::global()
        .publish_log_writes
        .get_or_create(&weir_metrics::topic(topic))
        .get();
    assert!(
        writes < acked.len() as u64,
        "{writes} writes for {} batches: publishes queued behind a write were not grouped",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_publishes_past_one_writes_bytes_wait_for_the_next_write_in_order() {
    let (a, _b) = two_nodes();
    let topic = "grouped-big";
    a.create_topic(TopicConfig::new(topic, 1)).await.unwrap();
    // Eight publishes of 3 MiB at once: a write carries at most 8 MiB, so the shares queued
    // behind one write do not all fit in the next; the rest go back to the queue.
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let node = a.clone();
        tasks.push(tokio::spawn(async move {
            let records: Vec<Record> = (0..30)
                .map(|j| Record::from_value(format!("w{w}-{j}-{}", "x".repeat(100_000))))
                .collect();
            let ack = node.publish(to(topic, 0, records)).await.unwrap();
            (ack[0].appended.base_offset, w)
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let stored = read_all(&a, topic, 0).await;
    assert_eq!(stored.len(), 8 * 30, "every publish once");
    assert!(
        stored.iter().enumerate().all(|(i, (o, _))| *o == i as u64),
        "dense offsets"
    );
    for (base, w) in acked {
        for j in 0..30 {
            let (offset, value) = &stored[(base + j) as usize];
            assert_eq!(*offset, base + j);
            assert!(
                value.starts_with(&format!("w{w}-{j}-")),
                "{offset}: {}",
                &value[..10]
            );
        }
    }
    let writes = weir_metrics::global()
        .publish_log_writes
        .get_or_create(&weir_metrics::topic(topic))
        .get();
    assert!(
        writes >= 3,
        "{writes} writes carried 24 MiB: more than 8 MiB in one"
    );
    assert!(
        writes < 8,
        "{writes} writes for 8 publishes queued at once: none grouped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_through_the_other_node_returns_the_first_offsets_and_groups_are_shared() {
    let (a, b) = two_nodes();
    a.create_topic(TopicConfig::new("t", 2)).await.unwrap();
    let (id, epoch) = a.init_producer(None, &Caller::default()).await.unwrap();
    // B issues its own producer: a different id.
    let (other, _) = b.init_producer(None, &Caller::default()).await.unwrap();
    assert_ne!(id, other);
    let idem = |records, seq| Publish {
        producer: Some(ProducerFields {
            producer_id: id,
            epoch,
            base_sequence: seq,
        }),
        ..to("t", 1, records)
    };
    a.publish(to("t", 1, values(0..4))).await.unwrap();
    let first = a.publish(idem(values(10..13), 0)).await.unwrap();
    assert_eq!(first[0].appended.base_offset, 4);
    // The client lost the ack and retries through B, which never saw the producer.
    let retry = b.publish(idem(values(10..13), 0)).await.unwrap();
    assert!(retry[0].appended.duplicate);
    assert_eq!(retry[0].appended.base_offset, 4);
    let next = b.publish(idem(values(13..14), 3)).await.unwrap();
    assert_eq!(next[0].appended.base_offset, 7);
    // A sequence gap is refused on either node.
    a.follow_shared(false).await.unwrap();
    let gap = a.publish(idem(values(20..21), 9)).await.unwrap_err();
    assert!(matches!(gap, BrokerError::SequenceGap { .. }), "{gap}");
    assert_eq!(read_all(&a, "t", 1).await.len(), 8);

    a.commit_offsets("g", "t", vec![(0, 0), (1, 5)])
        .await
        .unwrap();
    assert_eq!(
        b.fetch_offsets("g", "t").await.unwrap(),
        vec![(0, 0), (1, 5)]
    );
    // Deleting on one node removes the topic for the other.
    a.delete_topic("t").await.unwrap();
    b.refresh_topics().await.unwrap();
    assert!(matches!(
        b.describe_topic("t"),
        Err(BrokerError::UnknownTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_another_nodes_retention_rebuilds_and_appends_at_the_end() {
    let (a, b) = two_nodes();
    a.create_topic(TopicConfig {
        retention_bytes: 50_000,
        ..TopicConfig::new("r", 1)
    })
    .await
    .unwrap();
    a.publish(to("r", 0, values(0..1))).await.unwrap();
    // B appends and trims while A does not look.
    b.ensure_topic("r").await.unwrap();
    for i in 0..20u8 {
        let big = vec![Record::from_value(vec![i; 20_000])];
        b.publish(to("r", 0, big)).await.unwrap();
    }
    b.apply_retention().await.unwrap();
    let on_b = b.describe_topic("r").unwrap().partitions[0];
    assert!(on_b.start_offset > 1, "{on_b:?}");
    // A's view ends at 1 and the chunks after it are gone: its append is fenced, it finds the
    // gap, rebuilds, and appends at the real end.
    let ack = a.publish(to("r", 0, values(100..101))).await.unwrap();
    assert_eq!(ack[0].appended.base_offset, 21);
    let p = a.describe_topic("r").unwrap().partitions[0];
    assert_eq!((p.start_offset, p.end_offset), (on_b.start_offset, 22));
    let last = a.read("r", 0, 21, 10).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(&last[0].record.value[..], b"v100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_bumps_through_two_nodes_never_issue_an_epoch_twice() {
    let (a, b) = two_nodes();
    let (id, _) = a.init_producer(None, &Caller::default()).await.unwrap();
    let mut tasks = Vec::new();
    for node in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            let mut epochs = Vec::new();
            for _ in 0..5 {
                epochs.push(
                    node.init_producer(Some(id), &Caller::default())
                        .await
                        .unwrap()
                        .1,
                );
            }
            epochs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=20).collect::<Vec<u32>>(),
        "each epoch issued once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_and_created_again_is_seen_new_by_the_other_node() {
    let (a, b) = two_nodes();
    a.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    a.publish(to("t", 0, values(0..5))).await.unwrap();
    b.ensure_topic("t").await.unwrap();
    assert_eq!(b.describe_topic("t").unwrap().partitions[0].end_offset, 5);
    a.delete_topic("t").await.unwrap();
    a.create_topic(TopicConfig::new("t", 3)).await.unwrap();
    a.publish(to("t", 2, values(0..1))).await.unwrap();
    b.refresh_topics().await.unwrap();
    let info = b.describe_topic("t").unwrap();
    assert_eq!(info.config.partitions, 3);
    assert_eq!(info.partitions[0].end_offset, 0, "the old records are gone");
    b.follow_shared(false).await.unwrap();
    assert_eq!(read_all(&b, "t", 2).await, vec![(0, "v0".to_string())]);
}

/// The same with the same configuration, faster than a refresh: it is another creation, and
/// the other node opens it anew (it used to keep the old topic's offsets and states: a
/// publish through it failed or landed at a stale offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_with_the_same_config_is_seen_new_by_the_other_node() {
    let (a, b) = two_nodes();
    a.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    a.publish(to("t", 0, values(0..5))).await.unwrap();
    b.ensure_topic("t").await.unwrap();
    b.follow_shared(false).await.unwrap();
    assert_eq!(b.describe_topic("t").unwrap().partitions[0].end_offset, 5);
    a.delete_topic("t").await.unwrap();
    a.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    a.publish(to("t", 0, values(0..1))).await.unwrap();
    b.refresh_topics().await.unwrap();
    b.follow_shared(false).await.unwrap();
    assert_eq!(read_all(&b, "t", 0).await, vec![(0, "v0".to_string())]);
    let ack = b.publish(to("t", 0, values(1..2))).await.unwrap();
    assert_eq!(
        ack[0].appended.base_offset, 1,
        "after the new topic's record"
    );
    a.follow_shared(false).await.unwrap();
    assert_eq!(
        read_all(&a, "t", 0).await,
        vec![(0, "v0".to_string()), (1, "v1".to_string())]
    );
}

/// A name the shared log has no configuration of is absent after one look (a deploy naming a
/// misspelt topic is refused at once, not after the retries meant for a topic being created);
/// a topic another node created is open after one look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_shared_log_lacks_is_absent_at_once_and_one_another_node_made_is_open() {
    use crate::TopicLookup;
    let (a, b) = two_nodes();
    a.create_topic(TopicConfig::new("orders", 1)).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        b.look_up_topic("ordres").await.unwrap(),
        TopicLookup::Absent
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "one look, not retries: {:?}",
        started.elapsed()
    );
    assert_eq!(b.look_up_topic("orders").await.unwrap(), TopicLookup::Open);
}
