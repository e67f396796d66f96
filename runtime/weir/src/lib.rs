//! The `weir` command line as a library: [`cli::run`] is what the binary calls after parsing.
//! Every command but `serve` and `test` is a client of the gRPC API (weir-api); `serve` runs
//! weir-server; `test` runs a plugin in the local runtime.

#![deny(missing_docs)]

pub mod cli;
