//! The [`Context`] a plugin function gets: state, outputs, config and logs.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Serialize};

use crate::{Error, Result};

/// Log levels for [`Context::log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Detail for debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something to look at.
    Warn,
    /// Something failed.
    Error,
}

/// Where state lives: the host when running as WebAssembly, memory in native tests.
pub trait StateBackend {
    /// The value and its version (≥ 1) of a key.
    fn get(&mut self, key: &[u8]) -> Option<(Vec<u8>, u64)>;
    /// Writes a key (its version increases).
    fn put(&mut self, key: &[u8], value: &[u8]);
    /// Removes a key.
    fn delete(&mut self, key: &[u8]);
    /// Writes if the version matches (0 = absent); the new version, or `None`.
    fn compare_and_set(&mut self, key: &[u8], expected_version: u64, value: &[u8]) -> Option<u64>;
    /// A line for the plugin's log.
    fn log(&mut self, level: Level, message: &str);
}

/// State in memory, for native unit tests of plugin logic (no wasm, no server).
#[derive(Clone, Debug, Default)]
pub struct MemoryState {
    /// Key → (value, version).
    pub entries: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    /// Log lines written.
    pub logs: Vec<(Level, String)>,
}

impl MemoryState {
    /// A state value decoded from JSON.
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.entries
            .get(key.as_bytes())
            .and_then(|(v, _)| serde_json::from_slice(v).ok())
    }
}

impl StateBackend for MemoryState {
    fn get(&mut self, key: &[u8]) -> Option<(Vec<u8>, u64)> {
        self.entries.get(key).cloned()
    }
    fn put(&mut self, key: &[u8], value: &[u8]) {
        let version = self.entries.get(key).map_or(0, |(_, v)| *v) + 1;
        self.entries.insert(key.to_vec(), (value.to_vec(), version));
    }
    fn delete(&mut self, key: &[u8]) {
        self.entries.remove(key);
    }
    fn compare_and_set(&mut self, key: &[u8], expected_version: u64, value: &[u8]) -> Option<u64> {
        let current = self.entries.get(key).map_or(0, |(_, v)| *v);
        (current == expected_version).then(|| {
            self.entries
                .insert(key.to_vec(), (value.to_vec(), current + 1));
            current + 1
        })
    }
    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}

/// State through the host's `weir:plugin/state` imports.
pub(crate) struct HostState;

impl StateBackend for HostState {
    fn get(&mut self, key: &[u8]) -> Option<(Vec<u8>, u64)> {
        crate::bindings::weir::plugin::state::get(key).map(|v| (v.value, v.version))
    }
    fn put(&mut self, key: &[u8], value: &[u8]) {
        crate::bindings::weir::plugin::state::put(key, value)
    }
    fn delete(&mut self, key: &[u8]) {
        crate::bindings::weir::plugin::state::delete(key)
    }
    fn compare_and_set(&mut self, key: &[u8], expected_version: u64, value: &[u8]) -> Option<u64> {
        crate::bindings::weir::plugin::state::compare_and_set(key, expected_version, value)
    }
    fn log(&mut self, level: Level, message: &str) {
        use crate::bindings::weir::plugin::log;
        let level = match level {
            Level::Debug => log::Level::Debug,
            Level::Info => log::Level::Info,
            Level::Warn => log::Level::Warn,
            Level::Error => log::Level::Error,
        };
        log::write(level, message)
    }
}

/// An output record emitted by the plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Vec<u8>,
}

/// What a plugin function works with: state, outputs, config, logs.
pub struct Context<'a> {
    state: &'a mut dyn StateBackend,
    config: &'a BTreeMap<String, String>,
    outputs: Vec<Output>,
}

impl<'a> Context<'a> {
    /// A context over a state backend and config (the runtime glue and native tests use this).
    pub fn new(state: &'a mut dyn StateBackend, config: &'a BTreeMap<String, String>) -> Self {
        Context {
            state,
            config,
            outputs: Vec::new(),
        }
    }

    /// A state value, decoded from JSON.
    ///
    /// # Errors
    /// The stored value is not JSON of that type.
    pub fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        Ok(self.get_versioned(key)?.map(|(v, _)| v))
    }

    /// A state value and its version (for [`Context::compare_and_set`]).
    ///
    /// # Errors
    /// The stored value is not JSON of that type.
    pub fn get_versioned<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<(T, u64)>> {
        match self.state.get(key.as_bytes()) {
            None => Ok(None),
            Some((bytes, version)) => serde_json::from_slice(&bytes)
                .map(|v| Some((v, version)))
                .map_err(|e| Error::new(format!("state {key:?} is not the expected JSON: {e}"))),
        }
    }

    /// Writes a state value as JSON.
    ///
    /// # Errors
    /// The value cannot be serialised.
    pub fn put<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value)?;
        self.state.put(key.as_bytes(), &bytes);
        Ok(())
    }

    /// Deletes a state key.
    pub fn delete(&mut self, key: &str) {
        self.state.delete(key.as_bytes());
    }

    /// Writes `value` only if the key's version is still `expected_version` (0 = absent): the
    /// optimistic-lock pattern. Returns whether it was written.
    ///
    /// # Errors
    /// The value cannot be serialised.
    pub fn compare_and_set<T: Serialize + ?Sized>(
        &mut self,
        key: &str,
        expected_version: u64,
        value: &T,
    ) -> Result<bool> {
        let bytes = serde_json::to_vec(value)?;
        Ok(self
            .state
            .compare_and_set(key.as_bytes(), expected_version, &bytes)
            .is_some())
    }

    /// Emits a record to an output topic.
    pub fn emit(&mut self, topic: &str, key: Option<&[u8]>, value: impl Into<Vec<u8>>) {
        self.outputs.push(Output {
            topic: topic.to_string(),
            key: key.map(<[u8]>::to_vec),
            value: value.into(),
        });
    }

    /// Emits a record whose value is `value` as JSON.
    ///
    /// # Errors
    /// The value cannot be serialised.
    pub fn emit_json<T: Serialize + ?Sized>(
        &mut self,
        topic: &str,
        key: Option<&str>,
        value: &T,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(value)?;
        self.emit(topic, key.map(str::as_bytes), bytes);
        Ok(())
    }

    /// A config value given at deploy (`--config key=value`).
    pub fn config(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }

    /// A config value parsed, or `default` when absent.
    ///
    /// # Errors
    /// The value does not parse as `T`.
    pub fn config_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.config(key) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|_| {
                Error::new(format!(
                    "config {key}={raw:?} is not a valid {}",
                    std::any::type_name::<T>()
                ))
            }),
        }
    }

    /// Writes a line to the plugin's log (`weir plugin logs`).
    pub fn log(&mut self, level: Level, message: &str) {
        self.state.log(level, message);
    }

    /// Outputs emitted so far.
    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    /// The outputs as a blob for the host.
    pub fn into_outputs(self) -> Vec<u8> {
        let mut w = weir_codec::Writer::new();
        for o in &self.outputs {
            w.push_out(&weir_codec::OutRecord {
                topic: &o.topic,
                key: o.key.as_deref(),
                value: &o.value,
                headers: Vec::new(),
            });
        }
        w.finish()
    }
}
