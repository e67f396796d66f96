//! The gRPC API (tonic/prost). The only module that knows the generated protobuf types: it
//! converts them to domain types at the boundary ([`convert`]) and maps every domain error to
//! a status in one place ([`status`]).

pub mod codec;
pub mod convert;
pub mod limits;
mod plugins;
mod service;
pub mod status;

pub use limits::ApiLimits;
pub use service::WeirService;

/// Generated protobuf and tonic types of `proto/weir.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("weir.v1");
}

/// Largest gRPC message accepted or sent: a batch at the record size limit fits with room.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
