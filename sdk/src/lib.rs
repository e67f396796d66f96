//! # weir-sdk
//!
//! The crate plugin authors will depend on to write weir consumers in Rust and compile them to
//! WebAssembly (`wasm32-wasip2`). The plugin world, the batch codec and the `#[consumer]`
//! attribute arrive with the plugins work; today the crate only pins the names both sides
//! agree on.
//!
//! The SDK depends on nothing in `weir-runtime`: a plugin never links the host.

#![deny(missing_docs)]

/// The WIT package plugins implement, `weir:plugin` at this version.
pub const WIT_PACKAGE: &str = "weir:plugin@0.1.0";

/// The rustc target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";
