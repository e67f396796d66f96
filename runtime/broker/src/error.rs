//! The broker's error type. The gRPC layer maps each variant to a status code in one place.

use super::producer::SequenceError;
use weir_core::TopicPartition;
use weir_log::LogError;

/// Why a broker operation failed. Messages say what was wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No topic of that name.
    #[error("{}", unknown_topic(.0))]
    UnknownTopic(String),
    /// A topic of that name exists.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// The topic name breaks the naming rule.
    #[error("invalid topic name: {0}")]
    InvalidTopicName(String),
    /// A request field is out of bounds.
    #[error("{0}")]
    InvalidArgument(String),
    /// A partition index past the topic's partition count.
    #[error(
        "partition {partition} does not exist: topic {topic:?} has partitions 0..{partitions}"
    )]
    PartitionOutOfRange {
        /// Topic.
        topic: String,
        /// Requested partition.
        partition: u32,
        /// The topic's partition count.
        partitions: u32,
    },
    /// A record larger than the limit.
    #[error("record {index} is {size} bytes encoded; the limit is {max} (raise `weir serve --max-record-bytes` or split the payload)")]
    RecordTooLarge {
        /// Position in the request.
        index: usize,
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A publish with no records.
    #[error("empty batch: a publish needs at least one record")]
    EmptyBatch,
    /// A key is over the topic's admission limit; nothing of the request was stored.
    #[error("key {key:?} is over the admission limit of topic {topic:?} ({per_key} record(s) per key per {window_ms} ms): {refused} record(s) of this request refused, nothing stored; try again later")]
    Admission {
        /// Topic.
        topic: String,
        /// The first key over its limit.
        key: String,
        /// The limit.
        per_key: u32,
        /// Its window.
        window_ms: u64,
        /// Records over the limit in the request.
        refused: usize,
    },
    /// More records in one request than the server takes.
    #[error("batch of {count} records; the server takes at most {max} per request (--max-batch-records): split it")]
    BatchTooLarge {
        /// Records sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Producer fields without an explicit partition.
    #[error("an idempotent publish needs an explicit partition (sequences are per partition); compute it with weir's key hash")]
    IdempotenceNeedsPartition,
    /// A producer id that was never issued.
    #[error("unknown producer id {0}; call InitProducer first")]
    UnknownProducer(u64),
    /// A batch from an older epoch of a producer that was re-initialised.
    #[error("stale epoch: producer {producer_id} sent epoch {epoch} but epoch {current} is current (a newer instance of this producer took over; this one is fenced)")]
    StaleEpoch {
        /// Producer.
        producer_id: u64,
        /// Its epoch.
        epoch: u32,
        /// The newest epoch.
        current: u32,
    },
    /// A sequence gap: records would be missing.
    #[error("sequence gap: producer {producer_id} sent sequence {got} to {tp} but {expected} was expected (an earlier batch was lost; re-init the producer)")]
    SequenceGap {
        /// Producer.
        producer_id: u64,
        /// Partition.
        tp: TopicPartition,
        /// Expected sequence.
        expected: u64,
        /// Received sequence.
        got: u64,
    },
    /// A retry of a remembered batch with another number of records.
    #[error("sequence count mismatch: producer {producer_id} sent a batch of {got} record(s) at sequence {first_seq} to {tp}, but the batch stored at that sequence has {stored}; a retry must resend the same records")]
    SequenceCountMismatch {
        /// Producer.
        producer_id: u64,
        /// Partition.
        tp: TopicPartition,
        /// The batch's first sequence.
        first_seq: u64,
        /// Records stored at that sequence.
        stored: u64,
        /// Records in the retry.
        got: u64,
    },
    /// A producer id owned by another principal, or by the server (a plugin's).
    #[error("producer {producer_id} belongs to {owner}; {caller} may not use it (init a producer of your own)")]
    ProducerNotOwned {
        /// Producer.
        producer_id: u64,
        /// Who owns it, in words.
        owner: String,
        /// Who asked, in words.
        caller: String,
    },
    /// A producer id that was issued but expired after being idle.
    #[error("producer {producer_id} expired: it was idle for longer than {expiry_ms} ms (weir serve --producer-expiry-ms), so its sequences are forgotten; init a new producer (a retry of an old batch cannot be recognised any more)")]
    ProducerExpired {
        /// Producer.
        producer_id: u64,
        /// The expiry in force.
        expiry_ms: u64,
    },
    /// A principal holds as many producers as it may; no new id was issued.
    #[error("principal {principal:?} holds {held} producer ids, the limit is {max} (weir serve --max-producers-per-principal): reuse a producer id you hold (InitProducer with it bumps its epoch and keeps its sequences apart) instead of making a new one per connection or batch, or wait for idle ones to be forgotten ({expiry_ms} ms after their last use, weir serve --producer-expiry-ms)")]
    TooManyProducers {
        /// The principal.
        principal: String,
        /// Producer ids it holds (on this node's view in cluster mode).
        held: usize,
        /// The limit.
        max: usize,
        /// The expiry in force.
        expiry_ms: u64,
    },
    /// A consumer-group commit past a partition's end.
    #[error("cannot commit offset {offset} for {tp}: the partition ends at {end} (the next record will get offset {end}); commit at most {end}")]
    CommitPastEnd {
        /// Partition.
        tp: TopicPartition,
        /// The offset asked for.
        offset: u64,
        /// The partition's end.
        end: u64,
    },
    /// A sequence below the expected one that is not a retry of a remembered batch.
    #[error("sequence out of order: producer {producer_id} sent sequence {got} to {tp}, which is older than the last batches kept for retries (next expected {expected})")]
    SequenceOutOfOrder {
        /// Producer.
        producer_id: u64,
        /// Partition.
        tp: TopicPartition,
        /// Expected sequence.
        expected: u64,
        /// Received sequence.
        got: u64,
    },
    /// A read position outside the stored range.
    #[error("offset {offset} is out of range for {tp}: stored offsets are {start}..{end}")]
    OffsetOutOfRange {
        /// Partition.
        tp: TopicPartition,
        /// Requested.
        offset: u64,
        /// First stored.
        start: u64,
        /// Next to be written.
        end: u64,
    },
    /// The broker cannot take writes now (sync failure, shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Writing a publish to the store failed; some of it may be stored.
    #[error("the server could not write to its store ({source}); the records may or may not be stored: retry with the idempotent producer (same producer id and sequence), which stores them once")]
    WriteFailed {
        /// What the store said.
        source: LogError,
    },
    /// A publish was written but the store could not be synced: the server stops (fail-stop).
    #[error("{reason}; this publish may or may not be stored: retry once the server is back, with the idempotent producer (same producer id and sequence), which stores it once")]
    NotDurable {
        /// What the syncer said.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] LogError),
}

/// "Unknown topic", with the command that creates it when the name is a valid one.
fn unknown_topic(name: &str) -> String {
    match weir_core::validate_topic_name(name) {
        Ok(()) => format!(
            "unknown topic {name:?}; create it with `weir topic create {name} --partitions N`"
        ),
        Err(why) => format!("unknown topic {name:?} ({why})"),
    }
}

impl BrokerError {
    pub(crate) fn sequence(producer_id: u64, tp: &TopicPartition, e: SequenceError) -> Self {
        match e {
            SequenceError::StaleEpoch { epoch, current } => BrokerError::StaleEpoch {
                producer_id,
                epoch,
                current,
            },
            SequenceError::Gap { expected, got } => BrokerError::SequenceGap {
                producer_id,
                tp: tp.clone(),
                expected,
                got,
            },
            SequenceError::CountMismatch {
                first_seq,
                stored,
                got,
            } => BrokerError::SequenceCountMismatch {
                producer_id,
                tp: tp.clone(),
                first_seq,
                stored,
                got,
            },
            SequenceError::OutOfOrder { expected, got } => BrokerError::SequenceOutOfOrder {
                producer_id,
                tp: tp.clone(),
                expected,
                got,
            },
        }
    }
}
