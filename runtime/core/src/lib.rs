//! weir-core: what every weir crate shares and nothing else — records and their size rules,
//! topic configurations with their validation, the key partitioner and the stable hashes, the probe marker, where a
//! read starts, time arithmetic that cannot overflow; and two helpers of the host: the one way
//! blocking work leaves the async workers ([`blocking`]) and retry pacing ([`backoff`]).
//!
//! It knows no storage, no wasm, no gRPC.

#![deny(missing_docs)]

pub mod backoff;
pub mod blocking;
pub mod hash;
pub mod record;
pub mod topic;

/// The principal of a server without `--auth`, and owner of what it deployed (a name an auth
/// file may not give a principal).
pub const ANONYMOUS: &str = "anonymous";

pub use backoff::Backoff;
pub use hash::{fnv1a, rendezvous_rank};
pub use record::{
    cut_text, elapsed_ms, now_ms, partition_for_key, stored_len, ProbeMarker, Record, StoredRecord,
    TopicPartition, PROBE_HEADER,
};
pub use topic::{
    validate_topic_name, Admission, PartitionStats, ReadLimits, StartAt, TopicConfig, TopicInfo,
    MAX_DURATION_MS, MAX_PARTITIONS,
};
