//! The wasmtime `Engine` (one per process), the linker with the plugin world's imports, and
//! compile-once: a component is compiled at deploy and its artifact cached on disk, keyed by
//! the wasm's sha256 and the engine's compatibility hash, so a restart deserializes it in
//! milliseconds instead of recompiling.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::Digest;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::instance::{add_to_linker, CompiledPlugin, ConsumerPre, HostState, EPOCH_TICK};
use crate::PluginError;

/// Largest linear memory any plugin may ask for.
pub const MAX_PLUGIN_MEMORY: usize = 1 << 30;
/// Plugin instances (one per plugin × partition) the engine holds at once.
pub const MAX_INSTANCES: u32 = 256;

/// The process-wide engine and linker.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    stop: Arc<AtomicBool>,
}

/// sha256 of bytes, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

impl PluginEngine {
    /// Builds the engine (component model, epoch interruption, pooling allocator) and starts
    /// the epoch ticker. Compiled artifacts are cached in `cache_dir`.
    ///
    /// # Errors
    /// [`PluginError::Engine`] if wasmtime cannot be configured.
    pub fn new(cache_dir: &Path) -> Result<Arc<Self>, PluginError> {
        let engine_err = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .concurrency_support(false);
        let mut pool = PoolingAllocationConfig::default();
        // A Python component instantiates ~39 core modules (CPython, libc, adapters), a Rust
        // or JavaScript one a handful: 48 per component keeps the component count the limit
        // (a halted partition once said "limit of 1024 for core instances" at 26 Python
        // instances). Slots are address space reserved up front, not memory used.
        pool.total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES * 48)
            .total_memories(512)
            .total_tables(512)
            .max_memory_size(MAX_PLUGIN_MEMORY);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::warn!(message = "Pooling allocator unavailable; instantiating on demand.", error = %e);
                config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                Engine::new(&config).map_err(engine_err)?
            }
        };
        let mut linker = Linker::new(&engine);
        add_to_linker(&mut linker).map_err(engine_err)?;
        std::fs::create_dir_all(cache_dir).map_err(|e| {
            PluginError::Engine(format!("cannot create {}: {e}", cache_dir.display()))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, ticker_stop) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Arc::new(PluginEngine {
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
            stop,
        }))
    }

    fn cache_path(&self, sha256: &str) -> PathBuf {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        self.cache_dir
            .join(format!("{sha256}-{:016x}.cwasm", hasher.finish()))
    }

    /// Compiles `wasm` (or loads its cached artifact) and checks it implements the plugin world
    /// with only imports weir provides.
    ///
    /// # Errors
    /// [`PluginError::InvalidWasm`] for bytes that are not a component, [`PluginError::WrongWorld`]
    /// for a component that does not match `weir:plugin/consumer`.
    pub fn compile(&self, wasm: &[u8]) -> Result<CompiledPlugin, PluginError> {
        if !wasm.starts_with(b"\0asm") {
            return Err(PluginError::InvalidWasm(format!(
                "not a WebAssembly file ({} bytes without the \\0asm header); build the plugin with `cargo build --target wasm32-wasip2`",
                wasm.len()
            )));
        }
        let sha256 = sha256_hex(wasm);
        let cached = self.cache_path(&sha256);
        // SAFETY: the file was written by `Component::serialize` of this engine configuration
        // (its name carries the engine's compatibility hash) into a directory only weir writes:
        // DATA_DIR/compiled, `--compiled-cache` or the user's cache. Whoever can write there can
        // run code as weir, as whoever can replace the binary can (docs/security.md).
        let component = match unsafe { Component::deserialize_file(&self.engine, &cached) } {
            Ok(component) => component,
            Err(_) => {
                let component = Component::new(&self.engine, wasm).map_err(|e| {
                    let message = one_line(&format!("{e:#}"));
                    if wasm.starts_with(b"\0asm\x01\0\0\0") {
                        PluginError::InvalidWasm(format!("a core WebAssembly module, not a component ({message}); build the plugin for wasm32-wasip2"))
                    } else {
                        PluginError::InvalidWasm(message)
                    }
                })?;
                if let Ok(bytes) = component.serialize() {
                    // A name of its own per write: servers and `weir test` may share the
                    // directory and compile the same component at once; the rename is atomic.
                    static WRITES: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(0);
                    let tmp = cached.with_extension(format!(
                        "{}-{}.tmp",
                        std::process::id(),
                        WRITES.fetch_add(1, Ordering::Relaxed)
                    ));
                    if std::fs::write(&tmp, bytes)
                        .and_then(|_| std::fs::rename(&tmp, &cached))
                        .is_err()
                    {
                        tracing::warn!(message = "Could not cache a compiled plugin.", path = %cached.display());
                    }
                }
                component
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = ConsumerPre::new(pre).map_err(wrong_world)?;
        Ok(CompiledPlugin::new(self.engine.clone(), pre, sha256))
    }
}

/// A component that is not of this weir's plugin world, with a hint for the two usual causes.
fn wrong_world(e: wasmtime::Error) -> PluginError {
    let message = one_line(&format!("{e:#}"));
    let hint = if message.contains("weir:plugin/") && message.contains("@0.1.0") {
        " (it was built for weir:plugin@0.1.0, whose `init` export is now `configure`: rebuild \
         it with this weir's SDK)"
    } else if message.contains("no export") {
        " (a Rust plugin needs #[weir_sdk::consumer] on its function)"
    } else {
        ""
    };
    PluginError::WrongWorld(format!("{message}{hint}"))
}

/// wasmtime's messages can span lines (debug dumps); statuses and CLI errors are one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_of_the_old_world_is_told_to_rebuild() {
        // What wasmtime says when a 0.1.0 component's imports find nothing in the linker.
        let old = wasmtime::Error::msg(
            "component imports instance `weir:plugin/state@0.1.0`, but a matching \
             implementation was not found in the linker",
        );
        let message = wrong_world(old).to_string();
        assert!(
            message.contains("weir:plugin/consumer@0.2.0")
                && message.contains("rebuild it with this weir's SDK"),
            "{message}"
        );
        let other = wrong_world(wasmtime::Error::msg("no export `configure` found")).to_string();
        assert!(other.contains("#[weir_sdk::consumer]"), "{other}");
    }
}
