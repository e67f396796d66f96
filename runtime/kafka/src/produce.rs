//! Produce: Kafka record batches (v2, any of the four compressions) into weir records.
//!
//! Each batch is one weir publish to its partition, applied in the order the request names
//! them before the next request is read, so a producer's batches keep their order. An
//! idempotent batch carries its producer id, epoch and base sequence into weir's producer
//! check: a retry of a stored batch is answered with the first try's offset and stores
//! nothing. Every `acks` value waits for weir's durable acknowledgement before answering
//! (`acks=0` answers nothing, as Kafka); `acks=1` and `acks=all` mean the same on weir.

use std::future::Future;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::TimestampType;
use weir_broker::{BrokerError, Caller, PendingPublish, ProducerFields, Publish};
use weir_core::Record;

use crate::wire::Ctx;
use crate::{access, batches, errors, TopicOp};

/// A `weir-id` header's value as the record's message id: UTF-8 text, not empty.
fn message_id(value: Option<Bytes>) -> Result<String, (ResponseError, String)> {
    let bad = |what: &str| {
        (
            ResponseError::InvalidRecord,
            format!(
                "a record's {} header {what}: it is weir's message id (docs/kafka.md), UTF-8 text of 1 to 65,535 bytes",
                crate::ID_HEADER
            ),
        )
    };
    let value = value.unwrap_or_default();
    if value.is_empty() {
        return Err(bad("is empty"));
    }
    if value.len() > usize::from(u16::MAX) {
        return Err(bad("is too long"));
    }
    String::from_utf8(value.to_vec()).map_err(|_| bad("is not UTF-8"))
}

/// One partition's answer being made.
enum Outcome {
    Done(Result<i64, (ResponseError, String)>),
    /// Stored; waits for durability, then answers with the first batch's offset, or with the
    /// refusal of a later batch of the same partition (the earlier ones are stored).
    Pending(Vec<PendingPublish>, Option<(ResponseError, String)>),
}

/// Applies every batch of the request, then returns the wait for their acknowledgements.
pub(crate) async fn produce(
    ctx: &Ctx,
    request: ProduceRequest,
    version: i16,
) -> impl Future<Output = ProduceResponse> + Send + 'static {
    let transactional = request
        .transactional_id
        .as_ref()
        .is_some_and(|t| !t.0.is_empty());
    let who = access::who(ctx);
    let mut topics = Vec::with_capacity(request.topic_data.len());
    for t in request.topic_data {
        let mut partitions = Vec::with_capacity(t.partition_data.len());
        for p in t.partition_data {
            let outcome = if !who.may(TopicOp::Publish, &t.name.0) {
                Outcome::Done(Err((
                    ResponseError::TopicAuthorizationFailed,
                    access::denied(ctx, TopicOp::Publish, &t.name.0),
                )))
            } else if transactional {
                Outcome::Done(Err((
                    ResponseError::TransactionalIdAuthorizationFailed,
                    "weir has no Kafka transactions (docs/kafka.md): use an idempotent producer"
                        .into(),
                )))
            } else {
                apply(ctx, who.caller(), &t.name.0, p.index, p.records).await
            };
            partitions.push((p.index, outcome));
        }
        topics.push((t.name, partitions));
    }
    async move {
        let mut responses = Vec::with_capacity(topics.len());
        for (name, partitions) in topics {
            let mut answers = Vec::with_capacity(partitions.len());
            for (index, outcome) in partitions {
                let result = match outcome {
                    Outcome::Done(r) => r,
                    Outcome::Pending(pending, refused) => {
                        let stored = acked(pending).await;
                        match refused {
                            Some(refused) => Err(refused),
                            None => stored,
                        }
                    }
                };
                let answer = PartitionProduceResponse::default().with_index(index);
                answers.push(match result {
                    Ok(base) => answer.with_base_offset(base),
                    // v8+ carry the message.
                    Err((code, why)) if version >= 8 => answer
                        .with_error_code(code.code())
                        .with_base_offset(-1)
                        .with_error_message(Some(StrBytes::from_string(why))),
                    Err((code, _)) => answer.with_error_code(code.code()).with_base_offset(-1),
                });
            }
            responses.push(
                TopicProduceResponse::default()
                    .with_name(name)
                    .with_partition_responses(answers),
            );
        }
        ProduceResponse::default().with_responses(responses)
    }
}

/// The first batch's base offset once every batch is durable.
async fn acked(pending: Vec<PendingPublish>) -> Result<i64, (ResponseError, String)> {
    let mut base = None;
    for p in pending {
        let acks = p.acked().await.map_err(refusal)?;
        if let (None, Some(a)) = (base, acks.first()) {
            base = Some(a.appended.base_offset as i64);
        }
    }
    base.ok_or((ResponseError::InvalidRecord, "no records".into()))
}

fn refusal(e: BrokerError) -> (ResponseError, String) {
    (errors::code(&e), e.to_string())
}

/// Decodes one partition's batches and stores each; the first refusal stops the rest (a
/// producer's later batches would be out of sequence anyway).
async fn apply(
    ctx: &Ctx,
    caller: Caller,
    topic: &str,
    partition: i32,
    records: Option<Bytes>,
) -> Outcome {
    let Ok(partition) = u32::try_from(partition) else {
        return Outcome::Done(Err((
            ResponseError::UnknownTopicOrPartition,
            format!("partition {partition} does not exist"),
        )));
    };
    // Every batch is decoded and checked before any is stored: a malformed batch refuses the
    // partition's data whole, as Kafka validates it. What the decoded batches hold beyond the
    // request's own bytes (their decompressed records) is bounded as one batch is.
    let mut bytes = records.unwrap_or_default();
    let mut publishes = Vec::new();
    let mut decompressed = 0usize;
    while !bytes.is_empty() {
        let set = match batches::decode(&mut bytes, ctx.broker.config().max_batch_records) {
            Ok(d) => {
                // The decompressed buffers the decoded records hold, whatever the records' own
                // lengths (padding after them is kept alive with them).
                decompressed += d.decompressed;
                d.set
            }
            Err(refused) => return Outcome::Done(Err(refused)),
        };
        if decompressed > batches::MAX_DECOMPRESSED_BYTES {
            return Outcome::Done(Err((
                ResponseError::RecordListTooLarge,
                format!(
                    "a partition's record batches decompress to more than {} bytes in all",
                    batches::MAX_DECOMPRESSED_BYTES
                ),
            )));
        }
        let Some(first) = set.records.first() else {
            continue;
        };
        if first.transactional || first.control {
            return Outcome::Done(Err((
                ResponseError::TransactionalIdAuthorizationFailed,
                "transactional batches are not supported by weir (docs/kafka.md)".into(),
            )));
        }
        let producer = match (first.producer_id, first.producer_epoch, first.sequence) {
            (id, epoch, seq) if id >= 0 && seq >= 0 => Some(ProducerFields {
                producer_id: id as u64,
                epoch: epoch.max(0) as u32,
                base_sequence: seq as u64,
            }),
            _ => None,
        };
        let mut records = Vec::with_capacity(set.records.len());
        for r in set.records {
            let mut id = None;
            let mut headers = Vec::with_capacity(r.headers.len());
            for (name, value) in r.headers {
                if &*name == crate::ID_HEADER {
                    match message_id(value) {
                        Ok(v) => id = Some(v),
                        Err(refused) => return Outcome::Done(Err(refused)),
                    }
                } else {
                    headers.push((name.to_string(), value.unwrap_or_default()));
                }
            }
            records.push(Record {
                key: r.key,
                value: r.value.unwrap_or_default(),
                headers,
                // A log-append-time batch, or a record without a time, is stamped by weir.
                timestamp_ms: match r.timestamp_type {
                    TimestampType::Creation if r.timestamp >= 0 => r.timestamp,
                    _ => 0,
                },
                id,
            });
        }
        publishes.push(Publish {
            topic: topic.to_string(),
            partition: Some(partition),
            records,
            producer,
            caller: caller.clone(),
        });
    }
    if publishes.is_empty() {
        return Outcome::Done(Err((
            ResponseError::InvalidRecord,
            "a produce without records".into(),
        )));
    }
    let mut pending = Vec::with_capacity(publishes.len());
    for publish in publishes {
        match ctx.broker.append(publish).await {
            Ok(p) => pending.push(p),
            Err(e) if pending.is_empty() => return Outcome::Done(Err(refusal(e))),
            // Earlier batches are stored: their durability is waited for beside the reading,
            // then the refusal answered.
            Err(e) => return Outcome::Pending(pending, Some(refusal(e))),
        }
    }
    Outcome::Pending(pending, None)
}
