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
        BrokerError::TooManyProducers { .. } => (Code::ResourceExhausted, "producer-limit"),
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

/// A status with its `weir-error` kind. The message is given in words: an I/O error's debug
/// form inside it (see [`plain_io_errors`]) is rewritten as the error's own Display.
pub(crate) fn status(code: Code, kind: &str, message: String) -> Status {
    let message = plain_io_errors(message);
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

/// The start of an OS error's debug form, `Os { code: 5, kind: Uncategorized, message: "…" }`.
const OS_DEBUG: &str = "Os { code: ";

/// Rewrites every OS error's debug form in `message` as that error's Display
/// (`Input/output error (os error 5)`). sled keeps a failed I/O as its global error and hands
/// out clones of it, and its `Clone` builds a new `io::Error` from the old one's `{:?}`: every
/// later call's error then says `Os { code: 5, kind: Uncategorized, … }` even through Display.
/// No client should read Rust's debug text.
pub(crate) fn plain_io_errors(message: String) -> String {
    if !message.contains(OS_DEBUG) {
        return message;
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    while let Some(at) = rest.find(OS_DEBUG) {
        out.push_str(&rest[..at]);
        let from = &rest[at..];
        match os_debug_in_words(from) {
            Some((words, used)) => {
                out.push_str(&words);
                rest = &from[used..];
            }
            None => {
                out.push_str(OS_DEBUG);
                rest = &from[OS_DEBUG.len()..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `Os { code: N, kind: K, message: "M" }` at the start of `s` as `M (os error N)`, with the
/// length of the debug form.
fn os_debug_in_words(s: &str) -> Option<(String, usize)> {
    let body = s.strip_prefix(OS_DEBUG)?;
    let (code, body) = body.split_once(", kind: ")?;
    let code: i32 = code.parse().ok()?;
    let (kind, body) = body.split_once(", message: \"")?;
    if !kind.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let (text, _) = body.split_once("\" }")?;
    let used = s.len() - body.len() + text.len() + "\" }".len();
    Some((format!("{text} (os error {code})"), used))
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

    /// What sled's `Clone` of an I/O error holds: a new error whose text is the old one's
    /// debug form.
    fn sled_clone_of_eio() -> std::io::Error {
        let eio = std::io::Error::from_raw_os_error(5);
        std::io::Error::new(eio.kind(), format!("{eio:?}"))
    }

    #[test]
    fn a_failed_write_reaches_the_client_in_words() {
        let failed = BrokerError::WriteFailed {
            source: weir_log::LogError::Io {
                path: "db".into(),
                source: sled_clone_of_eio(),
            },
        };
        assert!(failed.to_string().contains("Os {"), "the repro holds");
        let status = of_broker(failed);
        assert_eq!(status.code(), Code::Unavailable);
        let message = status.message();
        assert!(
            !message.contains("Os {") && !message.contains("kind:"),
            "{message}"
        );
        let eio = std::io::Error::from_raw_os_error(5).to_string();
        assert!(message.contains(&format!("db: {eio}")), "{message}");
        assert!(message.contains("may or may not be stored"), "{message}");
    }

    #[test]
    fn debug_forms_are_rewritten_and_other_text_is_kept() {
        let eio = std::io::Error::from_raw_os_error(5);
        let text = format!("a: {eio:?}; b: {eio:?} end");
        assert_eq!(plain_io_errors(text), format!("a: {eio}; b: {eio} end"));
        for kept in [
            "no error here",
            "Os { code: x",
            "Os { code: 5, kind: A B, message: \"m\" }",
        ] {
            assert_eq!(plain_io_errors(kept.to_string()), kept);
        }
    }
}
