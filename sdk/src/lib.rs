//! # weir-sdk: write weir consumer plugins in Rust
//!
//! A weir plugin is a plain function that gets each record of its input topic and a
//! [`Context`]. Through the context it reads and writes its own state and emits records to
//! its output topics. weir commits the state writes, the outputs and the input offset of one
//! or more batches atomically, and skips records whose message id it has already processed, so every
//! record's effects happen exactly once, across crashes, restarts and upgrades.
//!
//! ## A complete plugin
//!
//! ```
//! use weir_sdk::{consumer, Context, Record, Result};
//!
//! #[derive(serde::Deserialize)]
//! struct Paid { user: String, amount: f64 }
//!
//! /// Credits floor(amount × rate) points per paid order.
//! #[consumer]
//! fn credit(record: &Record, ctx: &mut Context) -> Result<()> {
//!     let paid: Paid = record.json()?;
//!     let rate: f64 = ctx.config_or("rate", 1.0)?;
//!     let key = format!("balance/{}", paid.user);
//!     let balance = ctx.get::<u64>(&key)?.unwrap_or(0) + (paid.amount * rate).floor() as u64;
//!     ctx.put(&key, &balance)?;
//!     ctx.emit_json("points.credited", Some(&paid.user), &balance)?;
//!     Ok(())
//! }
//! # fn main() {}
//! ```
//!
//! ## Start, test, build, deploy
//!
//! `weir plugin new NAME` generates a crate like the one above with a unit test and sample
//! input. Unit-test the function natively — no wasm, no server — with [`MemoryState`]:
//!
//! ```
//! # use weir_sdk::{consumer, Context, Record, Result};
//! # #[consumer]
//! # fn credit(record: &Record, ctx: &mut Context) -> Result<()> { ctx.put("seen", &true) }
//! use std::collections::BTreeMap;
//! use weir_sdk::{codec::InRecord, MemoryState};
//!
//! let (config, mut state) = (BTreeMap::new(), MemoryState::default());
//! let mut ctx = Context::new(&mut state, &config);
//! let record = InRecord { offset: 0, timestamp_ms: 0, partition: 0, key: None, value: b"{}", id: None, headers: vec![] };
//! credit(&Record::new(record), &mut ctx).unwrap();
//! drop(ctx);
//! assert_eq!(state.get_json::<bool>("seen"), Some(true));
//! ```
//!
//! `weir plugin build` makes the `.wasm`; `weir test PLUGIN.wasm --input input.jsonl` runs it in an
//! in-process weir and prints its outputs and state (docs/plugin-guide.md has the whole path).
//! Build it for `wasm32-wasip2` (`cargo build --release --target wasm32-wasip2`), then deploy:
//! `weir plugin deploy points --wasm target/wasm32-wasip2/release/points.wasm --input order.paid
//! --output points.credited --config rate=0.1`.
//!
//! ## What a plugin can do
//! - **State** ([`Context::get`], [`Context::put`], [`Context::delete`],
//!   [`Context::compare_and_set`]): values are JSON (serde), keys are strings. Reads see the
//!   plugin's writes not committed yet (this batch's and those of earlier batches its commit
//!   covers). Each value has a version for optimistic locking.
//! - **Outputs** ([`Context::emit`], [`Context::emit_json`]): only to the topics the plugin was
//!   deployed with (`--output`); anything else fails the batch.
//! - **Logs** ([`Context::log`]) and `println!`/`eprintln!` go to the plugin's bounded log.
//! - **Time** is the record's [`Record::timestamp_ms`]: a plugin has no clock, network, files or
//!   randomness, so a replay computes the same thing.
//!
//! Returning an error (or panicking) fails the whole batch, and the batches before it that its
//! commit covers: nothing of them is committed and weir runs them again, retries the failing
//! batch, then, per the deploy's `--on-error`, halts the plugin or sends the failing
//! record to the dead-letter topic.

#![deny(missing_docs)]

mod context;

pub use context::{Context, Level, MemoryState, StateBackend};
pub use weir_codec as codec;
pub use weir_sdk_macros::consumer;

/// The WIT package plugins implement.
pub const WIT_PACKAGE: &str = "weir:plugin@0.2.0";

/// The rustc target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// An input record, borrowed from the batch weir passed in (no copy).
#[derive(Clone, Debug)]
pub struct Record<'a> {
    inner: weir_codec::InRecord<'a>,
}

impl<'a> Record<'a> {
    /// Wraps a decoded record (used by the runtime glue and by tests).
    pub fn new(inner: weir_codec::InRecord<'a>) -> Self {
        Record { inner }
    }

    /// The record's value.
    pub fn value(&self) -> &'a [u8] {
        self.inner.value
    }

    /// The record's key, if any.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.inner.key
    }

    /// The key as UTF-8 text, if it is.
    pub fn key_str(&self) -> Option<&'a str> {
        self.inner.key.and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The message id, if the producer set one.
    pub fn id(&self) -> Option<&'a str> {
        self.inner.id
    }

    /// Offset in its partition.
    pub fn offset(&self) -> u64 {
        self.inner.offset
    }

    /// Partition of the input topic.
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    /// The record's timestamp in ms since the epoch: the plugin's notion of "now".
    pub fn timestamp_ms(&self) -> i64 {
        self.inner.timestamp_ms
    }

    /// A header's value by name.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.inner
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// The value parsed as JSON.
    ///
    /// # Errors
    /// The value is not JSON of that shape.
    pub fn json<T: serde::Deserialize<'a>>(&self) -> Result<T> {
        serde_json::from_slice(self.inner.value)
            .map_err(|e| Error::new(format!("value is not the expected JSON: {e}")))
    }
}

/// A plugin error: fails the batch; its message reaches the operator (status, logs, DLQ).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error { message }
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error {
            message: message.into(),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error {
            message: format!("JSON: {e}"),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Host bindings generated from `wit/world.wit` (used by `#[consumer]`).
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "consumer",
        pub_export_macro: true,
        default_bindings_module: "weir_sdk::bindings",
    });
}

/// Glue called by the code `#[consumer]` generates. Not part of the API.
#[doc(hidden)]
pub mod __private {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use crate::context::HostState;
    use crate::{Context, Record};

    thread_local! {
        static CONFIG: RefCell<BTreeMap<String, String>> = RefCell::new(BTreeMap::new());
    }

    /// Stores the deploy's config for [`Context::config`].
    pub fn configure(config: Vec<(String, String)>) -> Result<(), String> {
        CONFIG.with(|c| *c.borrow_mut() = config.into_iter().collect());
        Ok(())
    }

    /// Runs `f` over every record of a batch blob; returns the outputs blob. An error names
    /// the failing record as `offset=N: message` so the host can dead-letter exactly it.
    pub fn process(
        batch: &[u8],
        f: fn(&Record, &mut Context) -> crate::Result<()>,
    ) -> Result<Vec<u8>, String> {
        let records = weir_codec::decode_batch(batch).map_err(|e| e.to_string())?;
        CONFIG.with(|config| {
            let config = config.borrow();
            let mut state = HostState;
            let mut ctx = Context::new(&mut state, &config);
            for record in records {
                let offset = record.offset;
                f(&Record::new(record), &mut ctx).map_err(|e| format!("offset={offset}: {e}"))?;
            }
            Ok(ctx.into_outputs())
        })
    }
}
