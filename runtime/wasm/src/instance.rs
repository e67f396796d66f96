//! One plugin instance: a wasmtime `Store` with its limits, the host side of the plugin's
//! `state` and `log` imports, and a sandboxed WASI context (no files, network, environment;
//! clocks frozen and randomness seeded, so a replay computes the same thing).
//!
//! State writes of a batch go to an overlay; reads see the overlay first, then the committed
//! state. What was read (version and value fingerprint, [`ReadStamp`]) is remembered so the
//! commit can check nobody changed it (optimistic concurrency between partitions of the same
//! plugin).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::PluginError;

/// Host bindings of `sdk/wit/world.wit`.
mod bindings {
    #![allow(missing_docs)]
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "consumer",
        // A host import can fail (the store cannot be read): it traps the guest with that
        // error instead of answering as if the key were absent.
        imports: { default: trappable },
    });
}

use bindings::weir;
pub use bindings::weir::plugin::log::Level as LogLevel;
use bindings::weir::plugin::state::Versioned;
pub(crate) use bindings::{Consumer, ConsumerPre};

/// Epoch ticker period: the granularity of per-batch CPU bounds and of interrupts.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A component compiled for this engine, ready to instantiate many times.
#[derive(Clone)]
pub struct CompiledPlugin {
    engine: Engine,
    pre: ConsumerPre<HostState>,
    /// sha256 of the wasm, hex.
    pub sha256: String,
}

impl CompiledPlugin {
    pub(crate) fn new(engine: Engine, pre: ConsumerPre<HostState>, sha256: String) -> Self {
        CompiledPlugin {
            engine,
            pre,
            sha256,
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }
    pub(crate) fn pre(&self) -> &ConsumerPre<HostState> {
        &self.pre
    }
}

/// Bytes of stdout + stderr kept per instance before it is recycled.
const OUTPUT_PIPE_BYTES: usize = 256 * 1024;

/// Reads committed state: key → (value, version); `Err` when the store cannot be read (the
/// batch stops and its partition loop waits for the store, it is not the record's fault).
pub type StateReader = Arc<dyn Fn(&[u8]) -> Result<Option<(Vec<u8>, u64)>, String> + Send + Sync>;

/// Asked every epoch tick while a guest runs: `true` stops it at once (pause, remove,
/// upgrade, shutdown), whatever its time limit.
pub type Interrupt = Arc<dyn Fn() -> bool + Send + Sync>;

/// A commit's state writes: key → new (value, version), `None` for a delete.
pub type StateWrites = HashMap<Vec<u8>, Option<(Vec<u8>, u64)>, foldhash::fast::RandomState>;

/// The guest was stopped by its [`Interrupt`].
#[derive(Debug)]
pub(crate) struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by pause, stop or shutdown")
    }
}

impl std::error::Error for Interrupted {}

/// A state read failed in the store while the guest ran.
#[derive(Debug)]
pub(crate) struct StateUnavailable(pub String);

impl std::fmt::Display for StateUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading plugin state failed: {}", self.0)
    }
}

impl std::error::Error for StateUnavailable {}

/// Limits of one plugin's instances, set at deploy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Linear memory cap in bytes.
    pub memory_bytes: usize,
    /// CPU time bound per batch.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 * 1024 * 1024,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The effects of one successful batch, not yet committed.
#[derive(Debug, Default)]
pub struct BatchEffects {
    /// Encoded outputs (weir-codec outputs blob).
    pub outputs: Vec<u8>,
    /// Key → new (value, version), or `None` for a delete (looked up on every state call, and
    /// holding every key a commit's calls wrote: hashed, not ordered).
    pub writes: StateWrites,
    /// Key → what the batch first read of it, to validate at commit (looked up on every
    /// state call: foldhash, as the state cache).
    pub reads: HashMap<Vec<u8>, ReadStamp, foldhash::fast::RandomState>,
}

impl BatchEffects {
    /// The version a put or delete of `key` builds on, if this batch already knows it: its own
    /// write, else its first read (0: absent). `None`: the committed state must be read.
    pub fn known_version(&self, key: &[u8]) -> Option<u64> {
        match self.writes.get(key) {
            Some(w) => Some(w.as_ref().map_or(0, |(_, v)| *v)),
            None => self.reads.get(key).map(|read| read.version),
        }
    }

    /// Records the first read of `key` (later reads of it keep the first).
    pub fn record_read(&mut self, key: &[u8], found: Option<&(Vec<u8>, u64)>) {
        if !self.reads.contains_key(key) {
            self.reads.insert(key.to_vec(), ReadStamp::of(found));
        }
    }
}

/// What a batch read of a key, as its commit checks it: the version and a fingerprint of the
/// value. The version alone is not enough: it restarts at 1 after a delete, so two commits of
/// other partitions (a delete, then a put) can bring a key back to a version a batch read with
/// another value, and the batch would overwrite what it never saw (a lost update).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadStamp {
    /// The version read (0: absent).
    pub version: u64,
    /// A hash of the value read (0: absent), seeded at random per process.
    pub fingerprint: u64,
}

impl ReadStamp {
    /// The stamp of a committed entry (`None`: absent).
    pub fn of(entry: Option<&(Vec<u8>, u64)>) -> ReadStamp {
        static SEED: std::sync::OnceLock<foldhash::quality::RandomState> =
            std::sync::OnceLock::new();
        match entry {
            None => ReadStamp {
                version: 0,
                fingerprint: 0,
            },
            Some((value, version)) => ReadStamp {
                version: *version,
                fingerprint: std::hash::BuildHasher::hash_one(
                    SEED.get_or_init(Default::default),
                    value.as_slice(),
                ),
            },
        }
    }
}

/// What the store of an instance holds.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    reader: StateReader,
    effects: BatchEffects,
    /// Log lines the plugin wrote through the `log` import during this batch.
    pub logs: Vec<(LogLevel, String)>,
    /// Checked every epoch tick.
    interrupt: Interrupt,
    /// Epoch ticks the running call may still take before it times out.
    ticks_left: u64,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    /// Current version and value of a key as this batch sees it.
    fn current(&mut self, key: &[u8]) -> wasmtime::Result<Option<(Vec<u8>, u64)>> {
        if let Some(w) = self.effects.writes.get(key) {
            return Ok(w.clone());
        }
        let found = (self.reader)(key).map_err(|e| wasmtime::Error::new(StateUnavailable(e)))?;
        self.effects.record_read(key, found.as_ref());
        Ok(found)
    }

    /// The version a put or delete builds on (0: absent). A key this batch read already is
    /// not looked up again: its commit checks that version is still the stored one, so a
    /// newer one stored meanwhile makes the batch conflict and run again whatever is written
    /// here (and a put or delete answers the plugin nothing). `compare_and_set` reads
    /// `current`, as `get` does.
    fn version(&mut self, key: &[u8]) -> wasmtime::Result<u64> {
        match self.effects.known_version(key) {
            Some(version) => Ok(version),
            None => Ok(self.current(key)?.map_or(0, |(_, v)| v)),
        }
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> wasmtime::Result<u64> {
        let version = self.version(&key)? + 1;
        self.effects.writes.insert(key, value.map(|v| (v, version)));
        Ok(version)
    }
}

impl weir::plugin::state::Host for HostState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Versioned>> {
        Ok(self
            .current(&key)?
            .map(|(value, version)| Versioned { value, version }))
    }
    fn get_many(&mut self, keys: Vec<Vec<u8>>) -> wasmtime::Result<Vec<Option<Versioned>>> {
        keys.into_iter().map(|k| self.get(k)).collect()
    }
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<()> {
        self.write(key, Some(value)).map(drop)
    }
    fn put_many(&mut self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> wasmtime::Result<()> {
        for (k, v) in entries {
            self.write(k, Some(v))?;
        }
        Ok(())
    }
    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<()> {
        self.write(key, None).map(drop)
    }
    fn compare_and_set(
        &mut self,
        key: Vec<u8>,
        expected_version: u64,
        value: Vec<u8>,
    ) -> wasmtime::Result<Option<u64>> {
        // What `get` would answer now, as before: a key another partition committed since
        // this batch read it is compared at its new version (the commit then conflicts and the
        // batch runs again), never refused against the version read first.
        let current = self.current(&key)?.map_or(0, |(_, v)| v);
        if current == expected_version {
            let version = current + 1;
            self.effects.writes.insert(key, Some((value, version)));
            Ok(Some(version))
        } else {
            Ok(None)
        }
    }
}

/// Most log messages kept from one batch, and bytes kept of each: a guest's strings must not
/// grow the host (weir-plugins keeps 4 KiB lines in its ring).
const LOG_MESSAGES: usize = 1000;
const LOG_MESSAGE_BYTES: usize = 4096;
/// Bytes kept of a plugin's error (it goes into statuses and dead-letter headers).
const ERROR_BYTES: usize = 16 * 1024;

/// `text` cut to at most `max` bytes at a character boundary (weir-core's `cut_text`, which
/// this crate does not depend on).
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl weir::plugin::log::Host for HostState {
    fn write(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        if self.logs.len() < LOG_MESSAGES {
            self.logs.push((level, cut(message, LOG_MESSAGE_BYTES)));
        }
        Ok(())
    }
}

struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Adds the plugin world's imports (state, log) and WASI p2 to a linker.
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    Consumer::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
}

/// A live instance of a plugin, reused across batches until it traps or is recycled.
pub struct PluginInstance {
    store: Store<HostState>,
    bindings: Consumer,
    output: MemoryOutputPipe,
    output_seen: usize,
    limits: Limits,
    /// Batches run in this instance (recycled after a maximum, see weir-plugins' partition loop).
    pub batches: u64,
}

impl PluginInstance {
    /// Instantiates `plugin` and calls its `configure` with `config`. `interrupt` is asked
    /// every epoch tick while the guest runs.
    pub fn new(
        plugin: &CompiledPlugin,
        limits: Limits,
        config: &[(String, String)],
        reader: StateReader,
        interrupt: Interrupt,
    ) -> Result<Self, PluginError> {
        use rand_0_10::SeedableRng;
        let output = MemoryOutputPipe::new(OUTPUT_PIPE_BYTES);
        let wasi = WasiCtx::builder()
            .stdout(output.clone())
            .stderr(output.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(rand_0_10::rngs::StdRng::seed_from_u64(0))
            .insecure_random(rand_0_10::rngs::StdRng::seed_from_u64(1))
            .insecure_random_seed(0)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .trap_on_grow_failure(true)
                .instances(256)
                .build(),
            reader,
            effects: BatchEffects::default(),
            logs: Vec::new(),
            interrupt,
            ticks_left: ticks(limits.timeout),
        };
        let mut store = Store::new(plugin.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Woken every tick: an interrupt stops the guest within a tick whatever its time
        // limit; the limit itself is counted down here.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if (state.interrupt)() {
                return Err(wasmtime::Error::new(Interrupted));
            }
            if state.ticks_left <= 1 {
                return Err(wasmtime::Trap::Interrupt.into());
            }
            state.ticks_left -= 1;
            Ok(wasmtime::UpdateDeadline::Continue(1))
        });
        let bindings = plugin
            .pre()
            .instantiate(&mut store)
            .map_err(|e| PluginError::from_trap(e, ""))?;
        let mut instance = PluginInstance {
            store,
            bindings,
            output,
            output_seen: 0,
            limits,
            batches: 0,
        };
        instance.arm();
        let result = instance
            .bindings
            .call_configure(&mut instance.store, config);
        let stderr = instance.take_output();
        match result {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(message)) => Err(PluginError::InitFailed(message)),
            Err(e) => Err(PluginError::from_trap(e, &stderr)),
        }
    }

    /// Runs `process` on a batch blob, after the calls whose state effects `carried` holds
    /// (their writes are what this call reads; their first reads stay the ones the commit
    /// checks). On success the effects so far are returned, with this call's outputs; on any
    /// failure nothing is kept and the instance must be dropped (a trapped instance is not
    /// reusable).
    pub fn process(
        &mut self,
        batch: &[u8],
        carried: BatchEffects,
    ) -> Result<BatchEffects, PluginError> {
        self.batches += 1;
        self.store.data_mut().effects = BatchEffects {
            outputs: Vec::new(),
            ..carried
        };
        self.arm();
        let result = self.bindings.call_process(&mut self.store, batch);
        let effects = std::mem::take(&mut self.store.data_mut().effects);
        match result {
            Ok(Ok(outputs)) => Ok(BatchEffects { outputs, ..effects }),
            Ok(Err(message)) => Err(PluginError::Failed(cut(message, ERROR_BYTES))),
            Err(e) => {
                let output = self.take_output();
                Err(PluginError::from_trap(e, &output))
            }
        }
    }

    /// Gives the next guest call its whole time limit.
    fn arm(&mut self) {
        self.store.data_mut().ticks_left = ticks(self.limits.timeout);
        self.store.set_epoch_deadline(1);
    }

    /// stdout/stderr written since the last call, and log-import lines.
    pub fn take_output(&mut self) -> String {
        let all = self.output.contents();
        let new = String::from_utf8_lossy(&all[self.output_seen.min(all.len())..]).into_owned();
        self.output_seen = all.len();
        new
    }

    /// Log-import lines written during the last call.
    pub fn take_logs(&mut self) -> Vec<(LogLevel, String)> {
        std::mem::take(&mut self.store.data_mut().logs)
    }

    /// Whether the output pipe is nearly full (recycle the instance to keep logging).
    pub fn output_nearly_full(&self) -> bool {
        self.output_seen > OUTPUT_PIPE_BYTES * 3 / 4
    }
}

fn ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}

#[cfg(test)]
mod tests;
