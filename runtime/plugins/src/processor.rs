//! The seam to the code a plugin runs: a [`Plugin`] (a compiled component) makes
//! [`Processor`]s (instances) that turn a batch blob into effects. weir-wasm's types are the
//! real ones; tests run the partition loop with plain Rust processors, no wasm artifact.

use weir_wasm::{
    BatchEffects, CompiledPlugin, Interrupt, Limits, LogLevel, PluginError, PluginInstance,
    StateReader,
};

/// Batches an instance runs before it is replaced (wasmtime never frees instances a Store
/// created, and a fresh one bounds any leak in the plugin).
pub const RECYCLE_AFTER_BATCHES: u64 = 10_000;

/// Code that can be instantiated to process batches.
pub trait Plugin: Send + Sync + 'static {
    /// A new instance with `limits`, configured with `config`, reading committed state
    /// through `reader` and stopped by `interrupt`.
    ///
    /// # Errors
    /// Instantiation or `configure` failed, or there is no room for another instance.
    fn instantiate(
        &self,
        limits: Limits,
        config: &[(String, String)],
        reader: StateReader,
        interrupt: Interrupt,
    ) -> Result<Box<dyn Processor>, PluginError>;
}

/// A live instance: batch blob in, effects out.
pub trait Processor: Send {
    /// Runs a batch (docs/batch-encoding.md) after the calls whose state effects `carried`
    /// holds (one commit covers them all): reads see their writes. Returns the effects so
    /// far with this call's outputs. On any failure nothing is kept and the processor must be
    /// dropped.
    ///
    /// # Errors
    /// The plugin failed, trapped, ran out of time or memory, or was interrupted.
    fn process(&mut self, batch: &[u8], carried: BatchEffects)
        -> Result<BatchEffects, PluginError>;
    /// Whether it should be replaced before the next batch (batches run, output buffered).
    fn worn_out(&self) -> bool;
    /// What it printed and logged since the last call, as log lines.
    fn drain_log(&mut self) -> Vec<String>;
}

impl Plugin for CompiledPlugin {
    fn instantiate(
        &self,
        limits: Limits,
        config: &[(String, String)],
        reader: StateReader,
        interrupt: Interrupt,
    ) -> Result<Box<dyn Processor>, PluginError> {
        Ok(Box::new(PluginInstance::new(
            self, limits, config, reader, interrupt,
        )?))
    }
}

impl Processor for PluginInstance {
    fn process(
        &mut self,
        batch: &[u8],
        carried: BatchEffects,
    ) -> Result<BatchEffects, PluginError> {
        PluginInstance::process(self, batch, carried)
    }

    fn worn_out(&self) -> bool {
        self.batches >= RECYCLE_AFTER_BATCHES || self.output_nearly_full()
    }

    fn drain_log(&mut self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .take_output()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| format!("[stdout] {l}"))
            .collect();
        for (level, message) in self.take_logs() {
            let level = match level {
                LogLevel::Debug => "debug",
                LogLevel::Info => "info",
                LogLevel::Warn => "warn",
                LogLevel::Error => "error",
            };
            lines.push(format!("[{level}] {message}"));
        }
        lines
    }
}
