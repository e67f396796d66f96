//! weir-api: weir's public API as the protocol (`proto/weir.proto`, the generated code in
//! [`pb`], conversions to weir-core's types) and as a Rust client: [`Client`] and the
//! idempotent [`Producer`]. Applications and the examples depend on this crate alone; with
//! weir-server it is the only crate that knows prost and tonic.

#![deny(missing_docs)]

mod client;
pub mod codec;
pub mod convert;
pub mod lag;
mod plugin_calls;
mod producer;
mod tls;

pub use client::{
    Ack, Client, ClientError, ConnectOptions, Credentials, RawClient, Subscription, DEFAULT_SERVER,
};
pub use plugin_calls::{Deploy, PluginStatus, StateAnswer};
pub use producer::Producer;
/// gRPC status codes, as [`ClientError::code`] returns them.
pub use tonic::Code;
pub use weir_core::{
    fnv1a, partition_for_key, Admission, PartitionStats, Record, StartAt, StoredRecord,
    TopicConfig, TopicInfo, PROBE_HEADER,
};

/// Generated protobuf and tonic types of `proto/weir.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("weir.v1");
}

/// Largest gRPC message accepted or sent: a batch at the record size limit fits with room.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Metadata key of the bearer token (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// Metadata key naming the error kind of a status (`stale-epoch`, `sequence-gap`, ...).
pub const ERROR_KIND_KEY: &str = "weir-error";

/// The `weir-error` kind of a status, if the server set one.
pub fn error_kind(status: &tonic::Status) -> Option<&str> {
    status
        .metadata()
        .get(ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
}
