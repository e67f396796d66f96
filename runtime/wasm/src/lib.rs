//! weir-wasm: runs weir plugins, WebAssembly components of the `weir:plugin/consumer` world
//! (sdk/wit/world.wit), and knows nothing else: no storage, no topics, no offsets.
//!
//! [`PluginEngine`] is the one wasmtime engine of a process (component model, epoch
//! interruption with a 10 ms ticker, pooling allocator) with its compile cache; a
//! [`CompiledPlugin`] instantiates [`PluginInstance`]s, each with a memory cap, a CPU bound
//! and an [`Interrupt`]; `process(batch blob) -> effects` runs a batch against a
//! [`StateReader`] and returns its state writes, the versions it read and its outputs blob,
//! for the caller to commit. The only crate that depends on wasmtime.

#![deny(missing_docs)]

mod engine;
mod instance;

pub use engine::{sha256_hex, PluginEngine, MAX_INSTANCES, MAX_PLUGIN_MEMORY};
pub use instance::{
    BatchEffects, CompiledPlugin, Interrupt, Limits, LogLevel, PluginInstance, ReadStamp,
    StateReader, StateWrites, EPOCH_TICK,
};

/// Why a plugin could not be deployed or a batch failed. Messages are for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a valid WebAssembly component.
    #[error("invalid plugin wasm: {0}")]
    InvalidWasm(String),
    /// The component does not implement the `weir:plugin/consumer` world, or imports
    /// something weir does not provide.
    #[error("the component does not implement weir:plugin/consumer@0.2.0: {0}")]
    WrongWorld(String),
    /// The wasm is larger than allowed.
    #[error("plugin wasm is {size} bytes; the limit is {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The batch ran past its CPU bound.
    #[error("batch exceeded its time limit of {limit_ms} ms (is the plugin looping?)")]
    Timeout {
        /// The bound in ms.
        limit_ms: u64,
    },
    /// The plugin tried to grow its memory past the cap.
    #[error("plugin exceeded its memory limit of {limit_bytes} bytes")]
    MemoryLimit {
        /// The cap.
        limit_bytes: usize,
    },
    /// The plugin trapped (a panic, an unreachable, an out-of-bounds access).
    #[error("plugin trapped: {message}{}", if .output.is_empty() { String::new() } else { format!("; plugin output: {}", .output.trim_end()) })]
    Trap {
        /// wasmtime's description.
        message: String,
        /// What the plugin printed before it trapped (its panic message).
        output: String,
    },
    /// The plugin returned an error for the batch.
    #[error("plugin failed: {0}")]
    Failed(String),
    /// `configure` returned an error.
    #[error("plugin configure failed: {0}")]
    InitFailed(String),
    /// The engine's instance pool is full: not the plugin's fault, so partition loops wait for room
    /// instead of counting it as a failed attempt.
    #[error("no room for another plugin instance ({0}); the server runs at most {max} plugin × partition instances: pause or remove plugins, or use fewer partitions", max = engine::MAX_INSTANCES)]
    NoInstanceRoom(String),
    /// The plugin emitted something it may not (undeclared topic, malformed blob).
    #[error("plugin output refused: {0}")]
    BadOutput(String),
    /// Pause, remove, upgrade or shutdown stopped the batch: not a failure of the plugin,
    /// nothing of the batch is committed and no attempt is counted.
    #[error("interrupted by pause, stop or shutdown")]
    Interrupted,
    /// The store could not be read while the plugin ran: the server's condition, not the
    /// record's; the partition waits and retries.
    #[error("plugin state unavailable: {0}")]
    StateUnavailable(String),
    /// The engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
}

impl PluginError {
    pub(crate) fn from_trap(e: wasmtime::Error, output: &str) -> Self {
        let message = format!("{e:#}");
        // The trap itself, without wasmtime's wasm backtrace; the plugin's own words (a panic
        // message) on one line, without Rust's RUST_BACKTRACE hint.
        let trap = e
            .downcast_ref::<wasmtime::Trap>()
            .map(|t| t.to_string())
            .unwrap_or_else(|| e.root_cause().to_string());
        let output: String = output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ");
        if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            return PluginError::NoInstanceRoom(trap);
        }
        if e.downcast_ref::<instance::Interrupted>().is_some() {
            return PluginError::Interrupted;
        }
        if let Some(instance::StateUnavailable(why)) = e.downcast_ref() {
            return PluginError::StateUnavailable(why.clone());
        }
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => PluginError::Timeout { limit_ms: 0 },
            _ if message.contains("forcing trap when growing memory")
                || message.contains("memory size") =>
            {
                PluginError::MemoryLimit { limit_bytes: 0 }
            }
            _ => PluginError::Trap {
                message: trap,
                output,
            },
        }
    }
}
