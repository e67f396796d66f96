//! Domain errors → gRPC statuses, in one place. Each status carries the error's message and,
//! for errors a client must tell apart programmatically, a `weir-error` metadata entry.

use tonic::{Code, Status};

use crate::broker::BrokerError;

/// Metadata key naming the error kind (`stale-epoch`, `sequence-gap`, ...).
pub const ERROR_KIND_KEY: &str = "weir-error";

/// The status code and `weir-error` kind of a broker error.
fn broker_code(e: &BrokerError) -> (Code, &'static str) {
    match e {
        BrokerError::UnknownTopic(_) => (Code::NotFound, "unknown-topic"),
        BrokerError::TopicExists(_) => (Code::AlreadyExists, "topic-exists"),
        BrokerError::InvalidTopicName(_) => (Code::InvalidArgument, "invalid-topic-name"),
        BrokerError::InvalidArgument(_) => (Code::InvalidArgument, "invalid-argument"),
        BrokerError::PartitionOutOfRange { .. } => {
            (Code::InvalidArgument, "partition-out-of-range")
        }
        BrokerError::RecordTooLarge { .. } => (Code::InvalidArgument, "record-too-large"),
        BrokerError::EmptyBatch => (Code::InvalidArgument, "empty-batch"),
        BrokerError::BatchTooLarge { .. } => (Code::ResourceExhausted, "batch-too-large"),
        BrokerError::Admission { .. } => (Code::ResourceExhausted, "admission"),
        BrokerError::IdempotenceNeedsPartition => (Code::InvalidArgument, "partition-required"),
        BrokerError::UnknownProducer(_) => (Code::FailedPrecondition, "unknown-producer"),
        BrokerError::StaleEpoch { .. } => (Code::FailedPrecondition, "stale-epoch"),
        BrokerError::SequenceGap { .. } => (Code::FailedPrecondition, "sequence-gap"),
        BrokerError::SequenceOutOfOrder { .. } => {
            (Code::FailedPrecondition, "sequence-out-of-order")
        }
        BrokerError::SequenceCountMismatch { .. } => {
            (Code::FailedPrecondition, "sequence-count-mismatch")
        }
        BrokerError::ProducerNotOwned { .. } => (Code::PermissionDenied, "producer-not-owned"),
        BrokerError::ProducerExpired { .. } => (Code::FailedPrecondition, "producer-expired"),
        BrokerError::OffsetOutOfRange { .. } => (Code::OutOfRange, "offset-out-of-range"),
        BrokerError::CommitPastEnd { .. } => (Code::OutOfRange, "commit-past-end"),
        BrokerError::Unavailable(_) => (Code::Unavailable, "unavailable"),
        BrokerError::WriteFailed { .. } => (Code::Unavailable, "write-failed"),
        BrokerError::NotDurable { .. } => (Code::Unavailable, "not-durable"),
        BrokerError::Storage(e) if e.is_damage() => (Code::DataLoss, "corrupt"),
        BrokerError::Storage(_) => (Code::Unavailable, "storage"),
    }
}

/// INVALID_ARGUMENT for a request that is not a valid message.
pub fn invalid_message(message: String) -> Status {
    status(Code::InvalidArgument, "malformed-request", message)
}

fn status(code: Code, kind: &str, message: String) -> Status {
    if code == Code::Internal || code == Code::DataLoss {
        tracing::error!(message = "Request failed inside the server.", error = %message);
    }
    let mut status = Status::new(code, message);
    status
        .metadata_mut()
        .insert(ERROR_KIND_KEY, kind.parse().expect("ascii kind"));
    status
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let (code, kind) = broker_code(&e);
        status(code, kind, e.to_string())
    }
}

impl From<crate::plugin::ManagerError> for Status {
    fn from(e: crate::plugin::ManagerError) -> Status {
        use crate::plugin::{ManagerError as M, PluginError as P};
        let (code, kind) = match &e {
            M::Broker(b) => broker_code(b),
            M::UnknownPlugin(_) => (Code::NotFound, "unknown-plugin"),
            M::Exists(_) => (Code::AlreadyExists, "plugin-exists"),
            M::Invalid(_) => (Code::InvalidArgument, "invalid-argument"),
            M::Plugin(P::InvalidWasm(_)) => (Code::InvalidArgument, "invalid-wasm"),
            M::Plugin(P::WrongWorld(_)) => (Code::InvalidArgument, "wrong-world"),
            M::Plugin(P::TooLarge { .. }) => (Code::ResourceExhausted, "wasm-too-large"),
            M::Plugin(P::InitFailed(_)) => (Code::FailedPrecondition, "init-failed"),
            M::Quota(_) => (Code::ResourceExhausted, "plugin-quota"),
            M::Storage(e) if e.is_damage() => (Code::DataLoss, "corrupt"),
            M::Storage(_) | M::Io(_) => (Code::Unavailable, "storage"),
            M::Plugin(_) => (Code::Internal, "internal"),
        };
        status(code, kind, e.to_string())
    }
}

/// The `weir-error` kind of a status, if the server set one.
pub fn error_kind(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get(ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
}

impl From<crate::auth::AuthError> for Status {
    fn from(e: crate::auth::AuthError) -> Status {
        use crate::auth::AuthError as A;
        let (code, kind) = match &e {
            A::Unauthenticated(_) => (Code::Unauthenticated, "unauthenticated"),
            A::Denied { .. } => (Code::PermissionDenied, "permission-denied"),
        };
        status(code, kind, e.to_string())
    }
}

/// A RESOURCE_EXHAUSTED status for a server limit, with its `weir-error` kind.
pub fn limit_status(kind: &str, message: String) -> Status {
    status(Code::ResourceExhausted, kind, message)
}
