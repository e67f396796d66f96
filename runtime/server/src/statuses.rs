//! Domain errors → gRPC statuses, in one place. Each status carries the error's message and,
//! for errors a client must tell apart programmatically, a `weir-error` metadata entry.
//! Handlers convert with [`ToStatus::or_status`] (the orphan rule keeps `From` impls between
//! other crates' types out of this one).

use tonic::{Code, Status};
use weir_api::ERROR_KIND_KEY;
use weir_broker::BrokerError;
use weir_plugins::{IoError, IoKind, ManagerError, PluginError};

use crate::auth::AuthError;

/// The status code and `weir-error` kind of a broker error.
pub(crate) fn broker_code(e: &BrokerError) -> (Code, &'static str) {
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

/// The seam's kind of a broker error (for the plugin core).
pub(crate) fn io_kind(code: Code) -> IoKind {
    match code {
        Code::NotFound => IoKind::NotFound,
        Code::InvalidArgument | Code::OutOfRange => IoKind::Invalid,
        Code::ResourceExhausted => IoKind::Exhausted,
        Code::Unavailable => IoKind::Unavailable,
        Code::DataLoss => IoKind::Damaged,
        _ => IoKind::Refused,
    }
}

fn io_code(e: &IoError) -> (Code, &'static str) {
    let code = match e.kind {
        IoKind::NotFound => Code::NotFound,
        IoKind::Invalid => Code::InvalidArgument,
        IoKind::Refused => Code::FailedPrecondition,
        IoKind::Exhausted => Code::ResourceExhausted,
        IoKind::Unavailable => Code::Unavailable,
        IoKind::Damaged => Code::DataLoss,
    };
    (code, if e.name.is_empty() { "io" } else { e.name })
}

/// A status with its `weir-error` kind.
pub(crate) fn status(code: Code, kind: &str, message: String) -> Status {
    if code == Code::Internal || code == Code::DataLoss {
        tracing::error!(message = "Request failed inside the server.", error = %message);
    }
    let mut status = Status::new(code, message);
    status
        .metadata_mut()
        .insert(ERROR_KIND_KEY, kind.parse().expect("ascii kind"));
    status
}

/// A broker error as a status.
pub(crate) fn of_broker(e: BrokerError) -> Status {
    let (code, kind) = broker_code(&e);
    status(code, kind, e.to_string())
}

/// A plugin operation's error as a status.
pub(crate) fn of_manager(e: ManagerError) -> Status {
    use ManagerError as M;
    use PluginError as P;
    let (code, kind) = match &e {
        M::Topics(io) => io_code(io),
        M::UnknownPlugin(_) => (Code::NotFound, "unknown-plugin"),
        M::Exists(_) => (Code::AlreadyExists, "plugin-exists"),
        M::Invalid(_) => (Code::InvalidArgument, "invalid-argument"),
        M::Plugin(P::InvalidWasm(_)) => (Code::InvalidArgument, "invalid-wasm"),
        M::Plugin(P::WrongWorld(_)) => (Code::InvalidArgument, "wrong-world"),
        M::Plugin(P::TooLarge { .. }) => (Code::ResourceExhausted, "wasm-too-large"),
        M::Plugin(P::InitFailed(_)) => (Code::FailedPrecondition, "init-failed"),
        M::Quota(_) => (Code::ResourceExhausted, "plugin-quota"),
        M::Storage(e) if e.is_damage() => (Code::DataLoss, "corrupt"),
        // Changed through another node meanwhile: look again, then retry.
        M::Storage(weir_log::LogError::Conflict { .. }) => (Code::Aborted, "conflict"),
        M::Storage(_) | M::Io(_) => (Code::Unavailable, "storage"),
        M::Plugin(_) => (Code::Internal, "internal"),
    };
    status(code, kind, e.to_string())
}

/// A refused authentication or grant as a status.
pub(crate) fn of_auth(e: AuthError) -> Status {
    let (code, kind) = match &e {
        AuthError::Unauthenticated(_) => (Code::Unauthenticated, "unauthenticated"),
        AuthError::Denied { .. } => (Code::PermissionDenied, "permission-denied"),
    };
    status(code, kind, e.to_string())
}

/// A RESOURCE_EXHAUSTED status for a server limit, with its `weir-error` kind.
pub fn limit_status(kind: &str, message: String) -> Status {
    status(Code::ResourceExhausted, kind, message)
}

/// `result.or_status()?` in a handler: the error as its status.
pub(crate) trait ToStatus<T> {
    fn or_status(self) -> Result<T, Status>;
}

impl<T> ToStatus<T> for Result<T, BrokerError> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(of_broker)
    }
}

impl<T> ToStatus<T> for Result<T, ManagerError> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(of_manager)
    }
}

impl<T> ToStatus<T> for Result<T, AuthError> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(of_auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_changed_through_another_node_is_aborted_with_a_retry_hint() {
        let status = of_manager(ManagerError::Storage(weir_log::LogError::Conflict {
            what: "plugin points".into(),
        }));
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(
            status.message(),
            "another weir node changed plugin points at the same moment; retry the request"
        );
    }
}
