//! weir's host runtime: a durable, partitioned log on sled with an idempotent producer,
//! served over gRPC, and the client and CLI that use it.
//!
//! Start at [`server::run`] (what `weir serve` calls), [`broker::Broker`] (topics, publish,
//! reads, offsets) and [`client::Client`]. ARCHITECTURE.md has the code map and invariants.

#![deny(missing_docs)]

pub mod auth;
pub mod backoff;
pub mod blocking;
pub mod broker;
pub mod cli;
pub mod client;
pub mod durability;
pub mod grpc;
pub mod local;
pub mod log;
pub mod metrics;
pub mod monitor;
pub mod plugin;
pub mod record;
pub mod server;

pub use record::{Record, StoredRecord, TopicConfig, TopicPartition};
