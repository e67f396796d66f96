//! weir-server: `weir serve` — the gRPC service over a broker and plugin manager, principals
//! and grants, API limits, the lag monitor with its metrics and status page, and the core that
//! wires a store, the syncer, the broker and the plugins together ([`server::Core`]). The
//! local runtime ([`local::LocalRuntime`]) is the same core without the network.
//!
//! Start at [`server::run`] (what `weir serve` calls). ARCHITECTURE.md has the crate graph.

#![deny(missing_docs)]

pub mod auth;
mod background;
mod config;
pub mod discard;
mod io;
mod kafka_access;
mod kafka_placement;
pub mod limits;
pub mod local;
pub mod migrate;
pub mod monitor;
mod open;
mod plugin_rpc;
mod rpc_convert;
pub mod server;
mod service;
pub mod statuses;
mod streams;

pub use limits::ApiLimits;
pub use service::WeirService;
