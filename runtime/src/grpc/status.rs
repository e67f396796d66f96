//! Domain errors → gRPC statuses, in one place. Each status carries the error's message and,
//! for errors a client must tell apart programmatically, a `weir-error` metadata entry.

use tonic::{Code, Status};

use crate::broker::BrokerError;
use crate::log::LogError;

/// Metadata key naming the error kind (`stale-epoch`, `sequence-gap`, ...).
pub const ERROR_KIND_KEY: &str = "weir-error";

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let (code, kind) = match &e {
            BrokerError::UnknownTopic(_) => (Code::NotFound, "unknown-topic"),
            BrokerError::TopicExists(_) => (Code::AlreadyExists, "topic-exists"),
            BrokerError::InvalidTopicName(_) => (Code::InvalidArgument, "invalid-topic-name"),
            BrokerError::InvalidArgument(_) => (Code::InvalidArgument, "invalid-argument"),
            BrokerError::PartitionOutOfRange { .. } => {
                (Code::InvalidArgument, "partition-out-of-range")
            }
            BrokerError::RecordTooLarge { .. } => (Code::InvalidArgument, "record-too-large"),
            BrokerError::EmptyBatch => (Code::InvalidArgument, "empty-batch"),
            BrokerError::IdempotenceNeedsPartition => (Code::InvalidArgument, "partition-required"),
            BrokerError::UnknownProducer(_) => (Code::FailedPrecondition, "unknown-producer"),
            BrokerError::StaleEpoch { .. } => (Code::FailedPrecondition, "stale-epoch"),
            BrokerError::SequenceGap { .. } => (Code::FailedPrecondition, "sequence-gap"),
            BrokerError::SequenceOutOfOrder { .. } => {
                (Code::FailedPrecondition, "sequence-out-of-order")
            }
            BrokerError::OffsetOutOfRange { .. } => (Code::OutOfRange, "offset-out-of-range"),
            BrokerError::Unavailable(_) => (Code::Unavailable, "unavailable"),
            BrokerError::Storage(LogError::Corrupt { .. }) => (Code::DataLoss, "corrupt"),
            BrokerError::Storage(_) => (Code::Internal, "storage"),
        };
        if code == Code::Internal || code == Code::DataLoss {
            tracing::error!(message = "Request failed in storage.", error = %e);
        }
        let mut status = Status::new(code, e.to_string());
        status
            .metadata_mut()
            .insert(ERROR_KIND_KEY, kind.parse().expect("ascii kind"));
        status
    }
}

/// The `weir-error` kind of a status, if the server set one.
pub fn error_kind(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get(ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
}
