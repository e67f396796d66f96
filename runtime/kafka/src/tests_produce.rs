//! Produce as an idempotent, pipelining client relies on it: a retried batch answered with
//! the first try's offset and stored once, several batches for one partition in one request,
//! `acks=0` answered with silence, and answers of pipelined produces in request order with
//! their records stored in that order.

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tests::{ask, frame, produce_to_t0, setup};
use crate::{conn, wire::Ctx};

/// One idempotent batch of `n` records from `producer` at `sequence`, values `v<seq+i>`.
fn idempotent_batch(producer: i64, sequence: i32, n: i32) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: producer,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i64::from(i),
            sequence: sequence + i,
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(Bytes::from(format!("v{}", sequence + i))),
            headers: IndexMap::new(),
        })
        .collect();
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::Lz4,
        },
    )
    .unwrap();
    out.freeze()
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
    let served = tokio::spawn(conn::run(
        server,
        ctx.peer,
        ctx.broker.clone(),
        ctx.coordinator.clone(),
        ctx.options.clone(),
        ctx.shutdown.clone(),
    ));
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
