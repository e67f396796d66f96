//! weir-plugins: runs plugins exactly once.
//!
//! Every plugin × input partition is a task that reads a batch ([`Input`]), runs it in a
//! [`Processor`] (a WebAssembly instance from weir-wasm, or a fake in tests), and commits the
//! batch's state writes, message ids, outputs and next offset as one atomic write of the
//! [`PluginStore`]; a forwarder per partition publishes the committed outputs ([`Output`]) as
//! an idempotent producer. [`PluginManager`] deploys, upgrades, pauses, resumes and removes.
//! The store owns the key layout and every value codec; nothing else names a key.

#![deny(missing_docs)]

mod cache;
mod calls;
pub mod cluster;
mod commit;
mod committer;
mod dead_letter;
pub mod dedup;
mod forwarder;
mod io;
mod logs;
mod manager;
mod partition;
mod pipeline;
mod processor;
mod request;
mod runtime;
pub mod spec;
pub mod store;

pub use io::{Acked, Input, IoError, IoKind, Output, OutputBatch, ProbeSink};
pub use manager::PluginManager;
pub use partition::MAX_BATCH_BYTES;
pub use processor::{Plugin, Processor, RECYCLE_AFTER_BATCHES};
pub use request::{
    DeployRequest, ManagerError, PluginConfig, PluginInfo, MAX_ATTEMPTS, MAX_BATCH_RECORDS,
};
pub use runtime::{PartitionState, PartitionStatus, Seams};
pub use spec::{
    AlertThresholds, CommitBounds, DedupWindow, OnError, PluginSpec, StartFrom,
    MAX_COMMIT_INTERVAL_MS, MAX_COMMIT_RECORDS,
};
pub use store::{KvPluginStore, PluginStore, ReplicatedPluginStore};
pub use weir_wasm::{CompiledPlugin, Limits, PluginEngine, PluginError};

/// The topics a plugin emits to when it processes `records` as one batch from empty state (a
/// dry run: nothing is stored). `weir test` uses it to accept what a plugin emits when no
/// `--output` is given. Blocking.
///
/// # Errors
/// The plugin fails on the batch, or emits a malformed blob.
pub fn emitted_topics(
    compiled: &CompiledPlugin,
    config: &[(String, String)],
    records: &[weir_core::StoredRecord],
) -> Result<std::collections::BTreeSet<String>, PluginError> {
    let records: Vec<&weir_core::StoredRecord> = records.iter().collect();
    let blob = calls::encode_batch(0, &records);
    let empty: weir_wasm::StateReader = std::sync::Arc::new(|_: &[u8]| Ok(None));
    let never: weir_wasm::Interrupt = std::sync::Arc::new(|| false);
    let mut instance =
        weir_wasm::PluginInstance::new(compiled, Limits::default(), config, empty, never)?;
    let effects = instance.process(&blob, weir_wasm::BatchEffects::default())?;
    let outputs = weir_codec::decode_outputs(&effects.outputs)
        .map_err(|e| PluginError::BadOutput(e.to_string()))?;
    Ok(outputs.iter().map(|o| o.topic.to_string()).collect())
}

#[cfg(test)]
mod tests;
