//! weir's broker errors as Kafka error codes, in one place. The message (weir's own, which
//! says what was wrong and how to fix it) goes with the code wherever the response has room.

use kafka_protocol::error::ResponseError;
use weir_broker::BrokerError;

/// The Kafka error code a broker error is answered with.
pub(crate) fn code(e: &BrokerError) -> ResponseError {
    use BrokerError as B;
    use ResponseError as K;
    match e {
        B::UnknownTopic(_) | B::PartitionOutOfRange { .. } => K::UnknownTopicOrPartition,
        B::TopicExists(_) => K::TopicAlreadyExists,
        B::InvalidTopicName(_) => K::InvalidTopicException,
        B::InvalidArgument(_) | B::EmptyBatch | B::IdempotenceNeedsPartition => K::InvalidRecord,
        B::RecordTooLarge { .. } => K::MessageTooLarge,
        B::BatchTooLarge { .. } => K::RecordListTooLarge,
        B::Admission { .. } => K::PolicyViolation,
        B::UnknownProducer(_) | B::ProducerExpired { .. } => K::UnknownProducerId,
        B::StaleEpoch { .. } => K::InvalidProducerEpoch,
        B::SequenceGap { .. } | B::SequenceCountMismatch { .. } => K::OutOfOrderSequenceNumber,
        // Older than the batches kept for retries: a duplicate of something long stored.
        B::SequenceOutOfOrder { .. } => K::DuplicateSequenceNumber,
        B::ProducerNotOwned { .. } => K::ClusterAuthorizationFailed,
        B::TooManyProducers { .. } => K::ThrottlingQuotaExceeded,
        B::OffsetOutOfRange { .. } => K::OffsetOutOfRange,
        B::CommitPastEnd { .. } => K::OffsetOutOfRange,
        // "May be stored": retriable, and the idempotent producer's retry stores it once.
        B::Unavailable(_) | B::WriteFailed { .. } | B::NotDurable { .. } | B::Storage(_) => {
            K::KafkaStorageError
        }
    }
}

/// [`code`] as the wire's `i16`.
pub(crate) fn wire(e: &BrokerError) -> i16 {
    code(e).code()
}
