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
        // Older than the batches kept for retries is out of order too, as Kafka answers it:
        // DUPLICATE_SEQUENCE_NUMBER would tell a client its batch is stored, and a Kafka
        // sequence that wrapped past 2^31 (weir's do not wrap) would then be acknowledged
        // and dropped.
        B::SequenceGap { .. } | B::SequenceCountMismatch { .. } | B::SequenceOutOfOrder { .. } => {
            K::OutOfOrderSequenceNumber
        }
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
