//! weir's integration tests, one binary (each test binary links wasmtime and the whole
//! server): the `weir` binary as users run it, servers in-process and as processes, plugins
//! in three languages, kill -9 and power cuts. `cargo xtask test` builds the plugin artifacts
//! first; a missing one fails with a message saying so.

mod common;

mod broker;
mod cli;
mod cluster;
mod cluster_admin;
mod cluster_placement;
mod cluster_plugins;
mod cluster_zombie;
mod crash;
mod fuzz;
mod hardening;
mod kafka;
mod kafka_auth;
mod kafka_cluster;
mod kafka_crash;
mod local;
mod migrate;
mod monitor;
mod plugin_chaos;
mod plugin_crash;
mod plugin_guide;
mod plugin_pipeline_crash;
mod plugins;
mod sdk_languages;
mod security;
mod upgrade;
