//! Fetch: visible records from any offset as one uncompressed v2 record batch per partition,
//! within the request's byte bounds, long-polling up to `max_wait_ms` when there are fewer
//! than `min_bytes`.
//!
//! Copies: weir reads a partition's chunks with one `pread` each into a buffer whose records
//! are slices; the batch encoder copies each key, value and header once into the batch, and
//! the batch is written to the socket as it is. Fetch sessions (KIP-227) are not kept:
//! every answer has session id 0, which tells a client to send full fetches.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse};
use kafka_protocol::records::{
    Compression, Record as KafkaRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio_util::sync::CancellationToken;
use weir_broker::{Broker, BrokerError, ReadLimits, StartAt};
use weir_core::StoredRecord;

use crate::{errors, Principal, TopicOp};
use kafka_protocol::error::ResponseError;

/// Longest long poll honoured, whatever a client asks.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Records read per partition per fetch at most (the byte bounds usually end it first).
const MAX_RECORDS: usize = 10_000;

/// One requested partition.
struct Want {
    topic: usize,
    partition: i32,
    offset: i64,
    max_bytes: usize,
}

pub(crate) async fn fetch(
    broker: Arc<Broker>,
    who: Arc<dyn Principal>,
    request: FetchRequest,
    version: i16,
    shutdown: CancellationToken,
) -> FetchResponse {
    let names: Vec<_> = request.topics.iter().map(|t| t.topic.clone()).collect();
    let wants: Vec<Want> = request
        .topics
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            t.partitions.iter().map(move |p| Want {
                topic: i,
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes.max(0) as usize,
            })
        })
        .collect();
    let max_bytes = match request.max_bytes {
        b if b > 0 => b as usize,
        _ => usize::MAX,
    };
    let min_bytes = request.min_bytes.max(0) as usize;
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(request.max_wait_ms.max(0) as u64).min(MAX_WAIT);
    // Subscribed before the first read, so a record landing between the read and the wait
    // is not missed.
    let mut watches = Vec::new();
    for w in &wants {
        if let Ok(p) = u32::try_from(w.partition) {
            if let Ok(rx) = broker.watch(&names[w.topic].0, p) {
                watches.push(rx);
            }
        }
    }
    loop {
        for rx in &mut watches {
            rx.borrow_and_update();
        }
        let (answers, bytes) = read_all(&broker, &*who, &names, &wants, max_bytes, version).await;
        let waited_out = tokio::time::Instant::now() >= deadline;
        // As Kafka: answered at once when enough is there, when a partition has an error
        // (out of range, not allowed), or when the client asked not to wait.
        let failed = answers.iter().any(|(_, a)| a.error_code != 0);
        if bytes >= min_bytes.max(1) || min_bytes == 0 || failed || waited_out || watches.is_empty()
        {
            return respond(&names, answers);
        }
        let closed = {
            let changed =
                futures::future::select_all(watches.iter_mut().map(|rx| Box::pin(rx.changed())));
            tokio::select! {
                (changed, _, _) = changed => changed.is_err(),
                _ = tokio::time::sleep_until(deadline) => false,
                _ = shutdown.cancelled() => return respond(&names, answers),
            }
        };
        // A partition whose topic was deleted never changes again: stop watching it rather
        // than wake at once on every round.
        if closed {
            watches.retain(|rx| rx.has_changed().is_ok());
        }
    }
}

/// Reads every wanted partition once: each one's answer, and the record bytes read in all.
async fn read_all(
    broker: &Broker,
    who: &dyn Principal,
    names: &[kafka_protocol::messages::TopicName],
    wants: &[Want],
    max_bytes: usize,
    version: i16,
) -> (Vec<(usize, PartitionData)>, usize) {
    let mut left = max_bytes;
    let mut total = 0;
    let mut answers = Vec::with_capacity(wants.len());
    for w in wants {
        let topic = &names[w.topic].0;
        let answer = PartitionData::default().with_partition_index(w.partition);
        if !who.may(TopicOp::Subscribe, topic) {
            answers.push((
                w.topic,
                answer
                    .with_error_code(ResponseError::TopicAuthorizationFailed.code())
                    .with_high_watermark(-1),
            ));
            continue;
        }
        let read = read_one(broker, topic, w, left).await;
        answers.push((
            w.topic,
            match read {
                Ok((records, start, end)) => {
                    let bytes = records.as_ref().map_or(0, |r| r.len());
                    total += bytes;
                    left = left.saturating_sub(bytes);
                    let answer = answer
                        .with_high_watermark(end)
                        .with_last_stable_offset(end)
                        .with_records(records);
                    // v5+ carry the log start.
                    if version >= 5 {
                        answer.with_log_start_offset(start)
                    } else {
                        answer
                    }
                }
                Err(e) => answer
                    .with_error_code(errors::wire(&e))
                    .with_high_watermark(-1),
            },
        ));
    }
    (answers, total)
}

/// One partition's records from the wanted offset (encoded), its start and its visible end.
async fn read_one(
    broker: &Broker,
    topic: &str,
    want: &Want,
    budget: usize,
) -> Result<(Option<Bytes>, i64, i64), BrokerError> {
    let partition =
        u32::try_from(want.partition).map_err(|_| BrokerError::PartitionOutOfRange {
            topic: topic.to_string(),
            partition: 0,
            partitions: broker.partition_count(topic).unwrap_or(0),
        })?;
    let start = broker
        .resolve_start(topic, partition, StartAt::Earliest)
        .await?;
    let offset = u64::try_from(want.offset).unwrap_or(u64::MAX);
    if offset < start {
        return Err(BrokerError::OffsetOutOfRange {
            tp: weir_core::TopicPartition::new(topic, partition),
            offset,
            start,
            end: start,
        });
    }
    // Past this node's end: on a shared log another node may have written that far, so the
    // broker catches up before it calls the offset out of range.
    broker
        .resolve_start(topic, partition, StartAt::Offset(offset))
        .await?;
    let end = broker
        .resolve_start(topic, partition, StartAt::Latest)
        .await?;
    let limit = want.max_bytes.min(budget);
    if offset == end || limit == 0 {
        return Ok((Some(Bytes::new()), start as i64, end as i64));
    }
    let records = broker
        .read_limited(
            topic,
            partition,
            offset,
            ReadLimits {
                max_records: MAX_RECORDS,
                max_bytes: limit,
            },
        )
        .await?;
    Ok((encode(&records), start as i64, end as i64))
}

/// The records as one v2 batch (empty for none: clients refuse a null record set).
fn encode(records: &[StoredRecord]) -> Option<Bytes> {
    if records.is_empty() {
        return Some(Bytes::new());
    }
    let kafka: Vec<KafkaRecord> = records
        .iter()
        .map(|r| KafkaRecord {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: r.offset as i64,
            sequence: -1,
            timestamp: r.record.timestamp_ms,
            key: r.record.key.clone(),
            value: Some(r.record.value.clone()),
            headers: headers(&r.record.headers, r.record.id.as_deref()),
        })
        .collect();
    let mut out = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    match RecordBatchEncoder::encode(&mut out, kafka.iter(), &options) {
        Ok(()) => Some(out.freeze()),
        Err(e) => {
            tracing::error!(message = "Kafka fetch: a record batch did not encode.", error = %e);
            None
        }
    }
}

fn respond(
    names: &[kafka_protocol::messages::TopicName],
    answers: Vec<(usize, PartitionData)>,
) -> FetchResponse {
    let mut topics: Vec<FetchableTopicResponse> = names
        .iter()
        .map(|n| FetchableTopicResponse::default().with_topic(n.clone()))
        .collect();
    for (topic, answer) in answers {
        topics[topic].partitions.push(answer);
    }
    FetchResponse::default().with_responses(topics)
}

/// weir's headers as the batch encoder's map (a repeated name keeps its last value there),
/// with the message id as the `weir-id` header.
fn headers(
    headers: &[(String, Bytes)],
    id: Option<&str>,
) -> kafka_protocol::indexmap::IndexMap<kafka_protocol::protocol::StrBytes, Option<Bytes>> {
    use kafka_protocol::protocol::StrBytes;
    let mut map: kafka_protocol::indexmap::IndexMap<StrBytes, Option<Bytes>> = headers
        .iter()
        .map(|(k, v)| (StrBytes::from_string(k.clone()), Some(v.clone())))
        .collect();
    if let Some(id) = id {
        map.insert(
            StrBytes::from_static_str(crate::ID_HEADER),
            Some(Bytes::copy_from_slice(id.as_bytes())),
        );
    }
    map
}
