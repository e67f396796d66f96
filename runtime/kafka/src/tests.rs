//! Every API at every version weir advertises: a request encoded as a client would, handled
//! by a broker on the memory store, answered with a frame the client's decoder reads. The
//! codec refuses fields a version does not have, so an answer built for the wrong version
//! fails here instead of closing a client's connection. The group APIs are in `tests_groups.rs`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio_util::sync::CancellationToken;
use weir_broker::{Broker, BrokerConfig};
use weir_core::TopicConfig;
use weir_log::{Durability, FsyncPolicy, MemoryStore};

use crate::coordinator::Coordinator;
use crate::wire::Ctx;
use crate::{apis, conn, KafkaOptions};

pub(super) fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// A record as a client's batch holds it: at `offset`, from `producer` (-1: none) at
/// `sequence`, with these headers.
pub(super) fn record(
    offset: i64,
    producer: i64,
    sequence: i32,
    value: Bytes,
    headers: IndexMap<StrBytes, Option<Bytes>>,
) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: producer,
        producer_epoch: if producer < 0 { -1 } else { 0 },
        timestamp_type: TimestampType::Creation,
        offset,
        sequence,
        timestamp: 1_700_000_000_000,
        key: None,
        value: Some(value),
        headers,
    }
}

/// `records` as v2 batches (the encoder starts a new batch where offsets and sequences stop
/// stepping together).
pub(super) fn encode(records: &[Record], compression: Compression) -> Bytes {
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    out.freeze()
}

pub(super) fn batch(compression: Compression) -> Bytes {
    let record = Record {
        key: Some(Bytes::from_static(b"k")),
        ..record(
            0,
            -1,
            -1,
            Bytes::from_static(b"v"),
            IndexMap::from([(s("h"), Some(Bytes::from_static(b"x")))]),
        )
    };
    encode(&[record], compression)
}

/// A produce (acks=all) of `records` to partition 0 of topic `t`.
pub(super) fn produce_to_t0(records: Bytes) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(s("t")))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records))])])
}

pub(super) fn frame<R: Encodable>(key: ApiKey, version: i16, body: &R) -> Bytes {
    let mut out = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(s("test")))
        .encode(&mut out, key.request_header_version(version))
        .unwrap();
    body.encode(&mut out, version).unwrap();
    out.freeze()
}

/// The answer's body, checked to decode; its correlation id must be the request's.
pub(super) async fn ask<R: Encodable, A: Decodable>(
    ctx: &Ctx,
    key: ApiKey,
    version: i16,
    body: &R,
) -> A {
    let answer = conn::handle(frame(key, version, body), ctx)
        .await
        .unwrap_or_else(|e| panic!("{key:?} v{version}: {e}"));
    let mut bytes = answer
        .await
        .unwrap_or_else(|e| panic!("{key:?} v{version}: {e}"))
        .expect("an answer");
    let len = i32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len() - 4, "{key:?} v{version}: length prefix");
    let _ = bytes.split_to(4);
    let header = ResponseHeader::decode(&mut bytes, key.response_header_version(version)).unwrap();
    assert_eq!(header.correlation_id, 7);
    let body = A::decode(&mut bytes, version)
        .unwrap_or_else(|e| panic!("{key:?} v{version}: the answer does not decode: {e}"));
    assert!(bytes.is_empty(), "{key:?} v{version}: bytes left over");
    body
}

pub(super) struct Setup {
    pub(super) ctx: Ctx,
    _syncer: std::thread::JoinHandle<()>,
}

pub(super) async fn setup() -> Setup {
    let store = Arc::new(MemoryStore::new());
    let (durability, syncer) = Durability::start(store.clone(), FsyncPolicy::Always);
    let broker = {
        let _blocking = weir_core::blocking::allow();
        Broker::open(store, durability, BrokerConfig::default()).unwrap()
    };
    broker.create_topic(TopicConfig::new("t", 2)).await.unwrap();
    Setup {
        ctx: Ctx {
            broker,
            coordinator: Arc::new(Coordinator::default()),
            options: Arc::new(KafkaOptions {
                advertised: ("127.0.0.1".into(), 9092),
                cluster_id: "weir".into(),
                tls: None,
                access: None,
                placement: None,
            }),
            shutdown: CancellationToken::new(),
            peer: "127.0.0.1:5555".parse().unwrap(),
            login: Default::default(),
            closing: Default::default(),
        },
        _syncer: syncer,
    }
}

/// Serves one connection over `stream` with the listener's own loop, as `serve` does.
pub(super) fn serve<S>(ctx: &Ctx, stream: S) -> tokio::task::JoinHandle<Result<(), String>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(conn::run(
        stream,
        ctx.peer,
        ctx.broker.clone(),
        ctx.coordinator.clone(),
        ctx.options.clone(),
        ctx.shutdown.clone(),
    ))
}

/// Stores `n` records (values "0".."n-1") in partition 0 of topic `t`.
pub(super) async fn fill_t0(ctx: &Ctx, n: usize) {
    ctx.broker
        .publish(weir_broker::Publish {
            topic: "t".into(),
            partition: Some(0),
            records: (0..n)
                .map(|i| weir_core::Record::from_value(format!("{i}")))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

pub(super) fn versions(key: ApiKey) -> std::ops::RangeInclusive<i16> {
    let (min, max) = apis::versions(key).expect("advertised");
    min..=max
}

#[tokio::test]
async fn every_advertised_version_of_every_api_is_answered_in_a_frame_clients_decode() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    let mut produced = 0;
    for v in versions(ApiKey::ApiVersions) {
        let r: ApiVersionsResponse = ask(
            ctx,
            ApiKey::ApiVersions,
            v,
            &ApiVersionsRequest::default()
                .with_client_software_name(s("t"))
                .with_client_software_version(s("1")),
        )
        .await;
        assert_eq!((r.error_code, r.api_keys.len()), (0, apis::SUPPORTED.len()));
    }
    for v in versions(ApiKey::Metadata) {
        let r: MetadataResponse = ask(
            ctx,
            ApiKey::Metadata,
            v,
            &MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(TopicName(s("t")))),
                MetadataRequestTopic::default().with_name(Some(TopicName(s("absent")))),
            ])),
        )
        .await;
        assert_eq!(r.topics[0].partitions.len(), 2, "v{v}");
        assert_eq!(
            r.topics[1].error_code, 3,
            "v{v}: UNKNOWN_TOPIC_OR_PARTITION"
        );
    }
    let compressions = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];
    for v in versions(ApiKey::Produce) {
        for &c in &compressions {
            let r: ProduceResponse = ask(ctx, ApiKey::Produce, v, &produce_to_t0(batch(c))).await;
            let p = &r.responses[0].partition_responses[0];
            assert_eq!((p.error_code, p.base_offset), (0, produced), "v{v} {c:?}");
            produced += 1;
        }
    }
    let stored = ctx.broker.read("t", 0, 0, 1000).await.unwrap();
    assert_eq!(stored.len() as i64, produced);
    assert!(stored.iter().all(|r| r.record.value == "v"
        && r.record.key.as_deref() == Some(&b"k"[..])
        && r.record.headers == vec![("h".to_string(), Bytes::from_static(b"x"))]
        && r.record.timestamp_ms == 1_700_000_000_000));
    for v in versions(ApiKey::Fetch) {
        let r: FetchResponse = ask(
            ctx,
            ApiKey::Fetch,
            v,
            &FetchRequest::default()
                .with_max_wait_ms(0)
                .with_min_bytes(1)
                .with_max_bytes(1 << 20)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(TopicName(s("t")))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(0)
                            .with_partition_max_bytes(1 << 20),
                        FetchPartition::default()
                            .with_partition(1)
                            .with_fetch_offset(0)
                            .with_partition_max_bytes(1 << 20),
                    ])]),
        )
        .await;
        let p = &r.responses[0].partitions;
        assert_eq!(
            (p[0].error_code, p[0].high_watermark),
            (0, produced),
            "v{v}"
        );
        let mut records = p[0].records.clone().unwrap();
        let sets = kafka_protocol::records::RecordBatchDecoder::decode_all(&mut records).unwrap();
        let n: usize = sets.iter().map(|s| s.records.len()).sum();
        assert_eq!(n as i64, produced, "v{v}");
        assert_eq!(
            p[1].records.as_ref().map(|r| r.len()),
            Some(0),
            "v{v}: empty, not null"
        );
    }
    for v in versions(ApiKey::ListOffsets) {
        let r: ListOffsetsResponse = ask(
            ctx,
            ApiKey::ListOffsets,
            v,
            &ListOffsetsRequest::default().with_topics(vec![ListOffsetsTopic::default()
                .with_name(TopicName(s("t")))
                .with_partitions(vec![
                    ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_timestamp(-1),
                    ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_timestamp(-2),
                ])]),
        )
        .await;
        let p = &r.topics[0].partitions;
        assert_eq!((p[0].offset, p[1].offset), (produced, 0), "v{v}");
    }
    for v in versions(ApiKey::CreateTopics) {
        let r: CreateTopicsResponse = ask(
            ctx,
            ApiKey::CreateTopics,
            v,
            &CreateTopicsRequest::default().with_topics(vec![
                CreatableTopic::default()
                    .with_name(TopicName(s(&format!("c{v}"))))
                    .with_num_partitions(3)
                    .with_replication_factor(-1)
                    .with_configs(vec![CreatableTopicConfig::default()
                        .with_name(s("retention.ms"))
                        .with_value(Some(s("60000")))]),
                CreatableTopic::default()
                    .with_name(TopicName(s("t")))
                    .with_num_partitions(1)
                    .with_replication_factor(1),
            ]),
        )
        .await;
        assert_eq!(r.topics[0].error_code, 0, "v{v}");
        assert_eq!(r.topics[1].error_code, 36, "v{v}: TOPIC_ALREADY_EXISTS");
        let made = ctx.broker.describe_topic(&format!("c{v}")).unwrap().config;
        assert_eq!((made.partitions, made.retention_ms), (3, 60_000));
    }
    for v in versions(ApiKey::DeleteTopics) {
        let name = TopicName(s(&format!("c{}", v + 1)));
        let r: DeleteTopicsResponse = ask(
            ctx,
            ApiKey::DeleteTopics,
            v,
            &if v >= 6 {
                DeleteTopicsRequest::default()
                    .with_topics(vec![DeleteTopicState::default().with_name(Some(name))])
            } else {
                DeleteTopicsRequest::default().with_topic_names(vec![name])
            },
        )
        .await;
        assert_eq!(r.responses[0].error_code, 0, "v{v}");
    }
    for v in versions(ApiKey::InitProducerId) {
        let r: InitProducerIdResponse = ask(
            ctx,
            ApiKey::InitProducerId,
            v,
            &InitProducerIdRequest::default()
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
                .with_transaction_timeout_ms(60_000),
        )
        .await;
        assert_eq!(r.error_code, 0, "v{v}");
        assert!(r.producer_id.0 >= 0);
        let fenced: InitProducerIdResponse = ask(
            ctx,
            ApiKey::InitProducerId,
            v,
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(s("tx"))))
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        )
        .await;
        assert_ne!(fenced.error_code, 0, "v{v}: transactions are refused");
    }
}

#[tokio::test]
async fn frames_that_do_not_decode_close_the_connection_with_a_reason() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    let cases: Vec<(Bytes, &str)> = vec![
        (Bytes::from_static(b"\x00"), "shorter than its header"),
        (
            Bytes::from_static(b"\x7f\x00\x00\x00\x00\x00\x00\x01"),
            "unknown API key",
        ),
        // Produce v2 (message sets before v2) is not spoken.
        (
            Bytes::from_static(b"\x00\x00\x00\x02\x00\x00\x00\x01\xff\xff"),
            "not supported",
        ),
        // A Metadata v1 header, then a body cut short.
        (
            Bytes::from_static(b"\x00\x03\x00\x01\x00\x00\x00\x01\xff\xff\x00\x00\x00\x05"),
            "request",
        ),
    ];
    for (frame, why) in cases {
        match conn::handle(frame, ctx).await {
            Ok(_) => panic!("{why}: answered"),
            Err(e) => assert!(e.contains(why), "{e:?} should say {why:?}"),
        }
    }
    // A produce batch that is not a record batch is a refusal, not a dropped connection.
    let r: ProduceResponse = ask(
        ctx,
        ApiKey::Produce,
        9,
        &produce_to_t0(Bytes::from_static(&[0u8; 70])),
    )
    .await;
    let p = &r.responses[0].partition_responses[0];
    assert_eq!(p.error_code, 2, "CORRUPT_MESSAGE");
    assert!(p.error_message.as_ref().unwrap().contains("record batch"));
}
