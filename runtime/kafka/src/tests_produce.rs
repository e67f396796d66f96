//! Produce as an idempotent, pipelining client relies on it: a retried batch answered with
//! the first try's offset and stored once, several batches for one partition in one request,
//! `acks=0` answered with silence, and answers of pipelined produces in request order with
//! their records stored in that order.

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable};
use kafka_protocol::records::{Compression, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tests::{ask, encode, frame, produce_to_t0, record, s, setup};
use crate::{conn, wire::Ctx};

/// One idempotent batch of `n` records from `producer` at `sequence`, values `v<seq+i>`.
fn idempotent_batch(producer: i64, sequence: i32, n: i32) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let value = Bytes::from(format!("v{}", sequence + i));
            record(i64::from(i), producer, sequence + i, value, IndexMap::new())
        })
        .collect();
    encode(&records, Compression::Lz4)
}

async fn producer_id(ctx: &Ctx) -> i64 {
    let r: InitProducerIdResponse = ask(
        ctx,
        ApiKey::InitProducerId,
        4,
        &InitProducerIdRequest::default()
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
    )
    .await;
    assert_eq!(r.producer_epoch, 0);
    r.producer_id.0
}

async fn values(ctx: &Ctx) -> Vec<String> {
    ctx.broker
        .read("t", 0, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.record.value).into_owned())
        .collect()
}

#[tokio::test]
async fn a_retried_idempotent_batch_is_answered_with_its_first_offset_and_stored_once() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    let id = producer_id(ctx).await;
    let first: ProduceResponse = ask(
        ctx,
        ApiKey::Produce,
        9,
        &produce_to_t0(idempotent_batch(id, 0, 3)),
    )
    .await;
    let second: ProduceResponse = ask(
        ctx,
        ApiKey::Produce,
        9,
        &produce_to_t0(idempotent_batch(id, 3, 2)),
    )
    .await;
    let retry: ProduceResponse = ask(
        ctx,
        ApiKey::Produce,
        9,
        &produce_to_t0(idempotent_batch(id, 0, 3)),
    )
    .await;
    let at = |r: &ProduceResponse| {
        let p = &r.responses[0].partition_responses[0];
        (p.error_code, p.base_offset)
    };
    assert_eq!(
        (at(&first), at(&second), at(&retry)),
        ((0, 0), (0, 3), (0, 0))
    );
    assert_eq!(values(ctx).await, ["v0", "v1", "v2", "v3", "v4"]);
    // A gap is refused, nothing stored.
    let gap: ProduceResponse = ask(
        ctx,
        ApiKey::Produce,
        9,
        &produce_to_t0(idempotent_batch(id, 9, 1)),
    )
    .await;
    assert_eq!(at(&gap).0, 45, "OUT_OF_ORDER_SEQUENCE_NUMBER");
    assert_eq!(values(ctx).await.len(), 5);
}

#[tokio::test]
async fn several_batches_for_one_partition_are_stored_in_order_and_answered_with_the_first_offset()
{
    let setup = setup().await;
    let ctx = &setup.ctx;
    let id = producer_id(ctx).await;
    let mut both = BytesMut::new();
    both.extend_from_slice(&idempotent_batch(id, 0, 2));
    both.extend_from_slice(&idempotent_batch(id, 2, 2));
    let r: ProduceResponse = ask(ctx, ApiKey::Produce, 9, &produce_to_t0(both.freeze())).await;
    let p = &r.responses[0].partition_responses[0];
    assert_eq!((p.error_code, p.base_offset), (0, 0));
    assert_eq!(values(ctx).await, ["v0", "v1", "v2", "v3"]);
}

#[tokio::test]
async fn a_produce_with_acks_0_is_stored_and_not_answered() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    let request = produce_to_t0(idempotent_batch(producer_id(ctx).await, 0, 1)).with_acks(0);
    let answer = conn::handle(frame(ApiKey::Produce, 9, &request), ctx)
        .await
        .unwrap();
    assert_eq!(answer.await.unwrap(), None);
    assert_eq!(values(ctx).await, ["v0"]);
}

/// Twenty produces written back to back on one connection before any answer is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_produces_are_stored_and_answered_in_request_order() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    let id = producer_id(ctx).await;
    let (client, server) = tokio::io::duplex(1 << 20);
    let served = crate::tests::serve(ctx, server);
    let (mut rd, mut wr) = tokio::io::split(client);
    for i in 0..20 {
        let mut f = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(9)
            .with_correlation_id(i)
            .encode(&mut f, ApiKey::Produce.request_header_version(9))
            .unwrap();
        produce_to_t0(idempotent_batch(id, i, 1))
            .encode(&mut f, 9)
            .unwrap();
        wr.write_all(&(f.len() as i32).to_be_bytes()).await.unwrap();
        wr.write_all(&f).await.unwrap();
    }
    for i in 0..20 {
        let mut len = [0u8; 4];
        rd.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; i32::from_be_bytes(len) as usize];
        rd.read_exact(&mut body).await.unwrap();
        let mut body = Bytes::from(body);
        let header =
            ResponseHeader::decode(&mut body, ApiKey::Produce.response_header_version(9)).unwrap();
        assert_eq!(header.correlation_id, i, "answers in request order");
        let r = ProduceResponse::decode(&mut body, 9).unwrap();
        let p = &r.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, i64::from(i)));
    }
    let expected: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
    assert_eq!(values(ctx).await, expected);
    drop(wr);
    drop(rd);
    served.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_epoch_bump_naming_an_old_epoch_is_fenced() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    let id = producer_id(ctx).await;
    let bump = |epoch: i16| {
        InitProducerIdRequest::default()
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(epoch)
    };
    let live: InitProducerIdResponse = ask(ctx, ApiKey::InitProducerId, 4, &bump(0)).await;
    assert_eq!((live.error_code, live.producer_epoch), (0, 1));
    // A zombie that still holds epoch 0 cannot take the producer back.
    let zombie: InitProducerIdResponse = ask(ctx, ApiKey::InitProducerId, 4, &bump(0)).await;
    assert_eq!(zombie.error_code, 47, "INVALID_PRODUCER_EPOCH");
    let again: InitProducerIdResponse = ask(ctx, ApiKey::InitProducerId, 4, &bump(1)).await;
    assert_eq!((again.error_code, again.producer_epoch), (0, 2));
}

/// One plain batch whose records carry these `weir-id` header values (None: no header).
fn batch_with_ids(ids: &[Option<&[u8]>]) -> Bytes {
    let records: Vec<Record> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut headers = IndexMap::from([(s("h"), Some(Bytes::from_static(b"x")))]);
            if let Some(id) = id {
                headers.insert(s(crate::ID_HEADER), Some(Bytes::copy_from_slice(id)));
            }
            // Offsets and sequences in step keep the records in one batch (base sequence
            // -1: no producer).
            let value = Bytes::from(format!("v{i}"));
            record(i as i64, -1, i as i32 - 1, value, headers)
        })
        .collect();
    encode(&records, Compression::None)
}

#[tokio::test]
async fn the_weir_id_header_is_the_message_id_both_ways() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    let r: ProduceResponse = ask(
        ctx,
        ApiKey::Produce,
        9,
        &produce_to_t0(batch_with_ids(&[Some(b"req-1"), None])),
    )
    .await;
    assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
    let stored = ctx.broker.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(stored[0].record.id.as_deref(), Some("req-1"));
    assert_eq!(stored[1].record.id, None);
    // Taken out of the headers: a gRPC consumer sees the id once, as the id.
    for r in &stored {
        assert_eq!(
            r.record.headers,
            vec![("h".to_string(), Bytes::from_static(b"x"))]
        );
    }
    // A gRPC-published id comes back to a Kafka consumer as the header.
    let grpc = weir_broker::Publish {
        topic: "t".into(),
        partition: Some(0),
        records: vec![weir_core::Record {
            id: Some("paid-7".into()),
            ..weir_core::Record::from_value("g")
        }],
        producer: None,
        caller: weir_broker::Caller::default(),
    };
    ctx.broker
        .append(grpc)
        .await
        .unwrap()
        .acked()
        .await
        .unwrap();
    let fetched: FetchResponse = ask(
        ctx,
        ApiKey::Fetch,
        12,
        &FetchRequest::default()
            .with_max_wait_ms(0)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(s("t")))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20)])]),
    )
    .await;
    let mut bytes = fetched.responses[0].partitions[0].records.clone().unwrap();
    let sets = kafka_protocol::records::RecordBatchDecoder::decode_all(&mut bytes).unwrap();
    let ids: Vec<Option<Bytes>> = sets
        .iter()
        .flat_map(|s| &s.records)
        .map(|r| {
            r.headers
                .get(crate::ID_HEADER.as_bytes())
                .cloned()
                .flatten()
        })
        .collect();
    assert_eq!(
        ids,
        vec![
            Some(Bytes::from_static(b"req-1")),
            None,
            Some(Bytes::from_static(b"paid-7"))
        ]
    );
    // An id that is not text, or empty, refuses the partition's data and stores nothing of it,
    // a well-formed batch before the bad one included.
    let long = vec![b'a'; 65_536];
    for bad in [&b"\xff\xfe"[..], b"", &long[..]] {
        let mut two = BytesMut::from(&batch_with_ids(&[None])[..]);
        two.extend_from_slice(&batch_with_ids(&[None, Some(bad)]));
        let r: ProduceResponse = ask(ctx, ApiKey::Produce, 9, &produce_to_t0(two.freeze())).await;
        let p = &r.responses[0].partition_responses[0];
        assert_eq!(p.error_code, 87, "INVALID_RECORD");
        assert!(p.error_message.as_ref().unwrap().contains("weir-id"));
    }
    let after = ctx.broker.read("t", 0, 0, 10).await.unwrap();
    assert_eq!(after.len(), 3, "{after:?}");
}

/// Each batch decompresses within the limit, but a partition's batches, all decoded before
/// any is stored, must too: a frame of small compressed batches cannot make the server hold
/// many times the limit.
#[tokio::test]
async fn a_partitions_batches_are_bounded_in_all_when_decompressed() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    // 65 records of 512 KiB (each within the broker's record limit): just over half the limit.
    let value = Bytes::from(vec![0u8; 512 * 1024]);
    let records: Vec<Record> = (0..65)
        .map(|i| record(i, -1, i as i32 - 1, value.clone(), IndexMap::new()))
        .collect();
    let one = encode(&records, Compression::Zstd);
    assert!(
        one.len() < 64 * 1024,
        "compressed small: {} bytes",
        one.len()
    );
    refuses_two_as_too_large(ctx, &one).await;
    // One of them alone is taken.
    let r: ProduceResponse = ask(ctx, ApiKey::Produce, 9, &produce_to_t0(one)).await;
    assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
}

/// A produce of `batch` twice in one partition's data is refused RECORD_LIST_TOO_LARGE and
/// stores nothing.
pub(super) async fn refuses_two_as_too_large(ctx: &Ctx, batch: &Bytes) {
    let mut two = BytesMut::from(&batch[..]);
    two.extend_from_slice(batch);
    let r: ProduceResponse = ask(ctx, ApiKey::Produce, 9, &produce_to_t0(two.freeze())).await;
    let p = &r.responses[0].partition_responses[0];
    assert_eq!(
        p.error_code, 18,
        "RECORD_LIST_TOO_LARGE: {:?}",
        p.error_message
    );
    assert!(ctx.broker.read("t", 0, 0, 10).await.unwrap().is_empty());
}
