//! A running plugin: what its tasks share — the spec, the seams, the committer, the status
//! operators see, the log — and the compactor task.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use weir_log::{Durability, LogError};

use crate::committer::Committer;
use crate::io::{Input, Output, ProbeSink};
use crate::logs::LogRing;
use crate::processor::Plugin;
use crate::spec::PluginSpec;
use crate::store::{Cursor, PluginStore};

/// What a partition of a plugin is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PartitionState {
    /// Processing (or waiting for records).
    #[default]
    Running,
    /// Paused by the operator.
    Paused,
    /// A batch failed and is retried: why.
    Retrying(String),
    /// Waiting for the server (its store, room in the instance pool): why. No attempt is
    /// spent while waiting.
    Waiting(String),
    /// Stopped on a record that failed every attempt (or its input is gone): why.
    Halted(String),
    /// Cluster mode: another node runs it (which), or none does yet.
    Standby(String),
}

impl PartitionState {
    /// Whether the partition stopped for good (until resumed or upgraded).
    pub fn is_halted(&self) -> bool {
        matches!(self, PartitionState::Halted(_))
    }
}

impl std::fmt::Display for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartitionState::Running => f.write_str("running"),
            PartitionState::Paused => f.write_str("paused"),
            PartitionState::Retrying(why) => write!(f, "retrying: {why}"),
            PartitionState::Waiting(why) => write!(f, "waiting: {why}"),
            PartitionState::Halted(why) => write!(f, "halted: {why}"),
            PartitionState::Standby(where_) => write!(f, "standby: {where_}"),
        }
    }
}

/// What an operator sees of a partition of a plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStatus {
    /// Next input offset to process.
    pub committed: u64,
    /// Records whose effects were committed (since deploy; kept across restarts).
    pub processed: u64,
    /// Records skipped as already processed (dedup).
    pub skipped: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// What the partition is doing.
    pub state: PartitionState,
    /// Why committed outputs are not reaching their topics, when they are not
    /// (`retrying: …` may pass; `blocked: …` needs an operator).
    pub forwarding: Option<String>,
}

/// The seams a plugin runs against.
#[derive(Clone)]
pub struct Seams {
    /// Where its input comes from.
    pub input: Arc<dyn Input>,
    /// Where its outputs go.
    pub output: Arc<dyn Output>,
    /// What it keeps.
    pub store: Arc<dyn PluginStore>,
    /// When its commits are durable (the store's group commit).
    pub durability: Arc<Durability>,
    /// Where its probes are reported.
    pub probes: Arc<dyn ProbeSink>,
    /// Cluster mode: this node's membership (which node runs which plugin).
    pub cluster: Option<Arc<crate::cluster::Membership>>,
}

/// A plugin's running state, shared by its tasks.
pub(crate) struct PluginRuntime {
    pub(crate) spec: PluginSpec,
    pub(crate) plugin: Arc<dyn Plugin>,
    pub(crate) seams: Seams,
    pub(crate) committer: Committer,
    pub(crate) logs: LogRing,
    pub(crate) status: Mutex<Vec<PartitionStatus>>,
    /// Wakes a partition's forwarder after a commit is durable.
    pub(crate) outbox: Vec<Notify>,
    /// Per partition, the commit sequence below which every commit is durable: the forwarder
    /// forwards outbox entries below it only (commits are pipelined, see `partition`).
    pub(crate) durable_seq: Vec<AtomicU64>,
    /// A durability ticket taken at open, after the cursors were read: once it is durable, so
    /// is every commit the cursors cover (a previous runtime of the plugin on this node may
    /// have left commits in flight).
    pub(crate) opened: u64,
    pub(crate) paused: watch::Sender<bool>,
    /// Each partition's cursor as stored at open; the partition task owns it from then on.
    pub(crate) cursors: Vec<Cursor>,
    /// `plugin` label of its metrics.
    pub(crate) label: weir_metrics::PluginLabel,
}

impl PluginRuntime {
    /// Loads the plugin's cursors, message ids and log position, and (when this node runs
    /// it: `active`) folds state deltas left by a crash before anything reads state. A
    /// plugin another node runs is opened to answer queries only. Blocking.
    pub(crate) fn open(
        spec: PluginSpec,
        plugin: Arc<dyn Plugin>,
        seams: Seams,
        state_cache_bytes: usize,
        active: bool,
    ) -> Result<Arc<Self>, LogError> {
        let partitions = spec.partitions();
        let loaded = seams.store.load(&spec.name, partitions)?;
        let status = loaded
            .cursors
            .iter()
            .map(|c| PartitionStatus {
                committed: c.next,
                processed: c.processed,
                skipped: c.skipped,
                dead_lettered: c.dead_lettered,
                state: if !active {
                    PartitionState::Standby("waiting for a node to take it".into())
                } else if spec.paused {
                    PartitionState::Paused
                } else {
                    PartitionState::Running
                },
                forwarding: None,
            })
            .collect();
        let committer = Committer::new(state_cache_bytes, loaded.next_delta, loaded.dedup);
        let opened = seams.durability.written();
        let runtime = Arc::new(PluginRuntime {
            label: weir_metrics::plugin(&spec.name),
            paused: watch::channel(spec.paused).0,
            outbox: (0..partitions).map(|_| Notify::new()).collect(),
            logs: LogRing::new(loaded.log_range.1),
            status: Mutex::new(status),
            durable_seq: loaded
                .cursors
                .iter()
                .map(|c| AtomicU64::new(c.seq))
                .collect(),
            opened,
            cursors: loaded.cursors,
            committer,
            spec,
            plugin,
            seams,
        });
        if active {
            runtime.compact()?;
        }
        Ok(runtime)
    }

    /// Appends a line to the plugin's log (kept in the store, the newest lines only).
    pub(crate) fn log(&self, line: String) {
        self.logs.push(line);
    }

    /// The plugin's log lines, oldest first. Blocking.
    pub(crate) fn log_lines(&self) -> Result<Vec<String>, LogError> {
        self.logs.lines(&*self.seams.store, &self.spec.name)
    }

    pub(crate) fn set_state(&self, partition: u32, state: PartitionState) {
        self.status.lock()[partition as usize].state = state;
    }

    /// Folds state deltas into per-key entries. Blocking.
    pub(crate) fn compact(&self) -> Result<(), LogError> {
        if let Some(below) = self.seams.store.compact(&self.spec.name)? {
            self.committer.cache.compacted_below(below);
        }
        Ok(())
    }

    /// Writes buffered log lines to the store.
    pub(crate) async fn flush_logs(self: &Arc<Self>) {
        let this = self.clone();
        let flushed =
            weir_core::blocking::run(move || this.logs.flush(&*this.seams.store, &this.spec.name))
                .await;
        if let Ok(Err(e)) = flushed {
            tracing::debug!(message = "Plugin log lines not written yet.", plugin = %self.spec.name, error = %e);
        }
    }

    /// Compacts state deltas and writes buffered log lines every 200 ms until cancelled.
    pub(crate) async fn run_compactor(self: Arc<Self>, cancel: CancellationToken) {
        // The last failure warned of: the same one again, every 200 ms until the manager
        // stops a runtime that lost its plugin (10 s and more while its cluster loop fails),
        // is logged at debug level.
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = cancel.cancelled() => break,
            }
            let this = self.clone();
            let error = match weir_core::blocking::run(move || this.compact()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("failed: {e}")),
                Err(e) => Some(format!("panicked: {e}")),
            };
            match (&error, &failing) {
                (Some(e), Some(before)) if e == before => {
                    tracing::debug!(message = "State compaction still fails; will retry.", plugin = %self.spec.name, error = %e)
                }
                (Some(e), _) => {
                    tracing::warn!(message = "State compaction failed; will retry.", plugin = %self.spec.name, error = %e)
                }
                (None, Some(_)) => {
                    tracing::info!(message = "State compaction works again.", plugin = %self.spec.name)
                }
                (None, None) => {}
            }
            failing = error;
            self.flush_logs().await;
        }
        self.flush_logs().await;
    }
}
