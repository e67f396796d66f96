//! [`Changelog`]: named, replicated, append-only logs whose appends are fenced on the log's
//! last entry — the seam cluster mode keeps plugins' state on ([`crate::ReplicatedKv`]).
//! JetStream implements it (weir-jetstream: a subject per log, an atomic batch per entry with
//! `Nats-Expected-Last-Subject-Sequence`, `Nats-Rollup: sub` for an entry that replaces the
//! log); [`MemoryChangelog`] models it for tests. A Kafka backend would use a compacted topic
//! partition per log with a transactional producer whose epoch is the fence.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::LogError;

/// One entry of a changelog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its position: what the next append expects to follow.
    pub seq: u64,
    /// The position it was appended after (`None`: appended unconditionally).
    pub prev: Option<u64>,
    /// It replaced everything before it (a snapshot or a reset).
    pub rollup: bool,
    /// The bytes appended.
    pub payload: Bytes,
}

/// Replicated, append-only logs by name, and blobs by name. Every method blocks.
pub trait Changelog: Send + Sync + 'static {
    /// Appends `payload` as one entry, all or nothing. With `expect`, only if the log's last
    /// entry is still at that position (0: empty); otherwise [`LogError::Conflict`] and
    /// nothing is stored. A `rollup` entry deletes every entry before it.
    fn append_entry(
        &self,
        log: &str,
        expect: Option<u64>,
        payload: &[u8],
        rollup: bool,
    ) -> Result<u64, LogError>;
    /// The position of the log's last entry (0: empty).
    fn last_position(&self, log: &str) -> Result<u64, LogError>;
    /// Up to `limit` entries after position `after`, oldest first.
    fn read_entries(&self, log: &str, after: u64, limit: usize) -> Result<Vec<Entry>, LogError>;
    /// Stores a blob under `name` (replacing one of the name).
    fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), LogError>;
    /// A stored blob.
    fn get_blob(&self, name: &str) -> Result<Option<Bytes>, LogError>;
}

/// [`Changelog`] in memory, shared by the "nodes" of a test through an `Arc`.
#[derive(Default)]
pub struct MemoryChangelog {
    inner: Mutex<MemoryInner>,
}

impl MemoryChangelog {
    /// The next append is stored but reported as failed (an acknowledgement lost in a
    /// leader election).
    pub fn lose_next_ack(&self) {
        self.inner.lock().lose_ack = true;
    }

    /// The next append fails without landing (a leader that went away before storing it).
    pub fn fail_next_append(&self) {
        self.inner.lock().fail_next = true;
    }

    /// Runs `hook` just before the next append to `log` (a race between nodes made to happen
    /// at one point: the hook may append through another node).
    pub fn before_next_append(&self, log: &str, hook: impl FnOnce() + Send + 'static) {
        self.before_next_append_where(log, |_| true, hook);
    }

    /// As [`MemoryChangelog::before_next_append`], for the next append to `log` whose payload
    /// `matches` (one kind of writer's entries among several).
    pub fn before_next_append_where(
        &self,
        log: &str,
        matches: impl Fn(&[u8]) -> bool + Send + 'static,
        hook: impl FnOnce() + Send + 'static,
    ) {
        self.inner.lock().hook = Some((log.to_string(), Box::new(matches), Box::new(hook)));
    }

    /// The next `n` reads of any log (its last position or its entries) fail without an
    /// answer (a stream whose leader is still being elected).
    pub fn fail_next_reads(&self, n: usize) {
        self.inner.lock().failing_reads = n;
    }

    fn read_fails(&self, log: &str) -> Result<(), LogError> {
        let mut inner = self.inner.lock();
        if inner.failing_reads == 0 {
            return Ok(());
        }
        inner.failing_reads -= 1;
        Err(LogError::Engine {
            op: format!("read {log}"),
            reason: "request timed out: the stream has no leader yet (test)".into(),
        })
    }

    /// Whether a hook set with [`MemoryChangelog::before_next_append`] is still waiting.
    pub fn hook_pending(&self) -> bool {
        self.inner.lock().hook.is_some()
    }
}

type Hook = (
    String,
    Box<dyn Fn(&[u8]) -> bool + Send>,
    Box<dyn FnOnce() + Send>,
);

#[derive(Default)]
struct MemoryInner {
    lose_ack: bool,
    fail_next: bool,
    failing_reads: usize,
    hook: Option<Hook>,
    next_seq: u64,
    logs: HashMap<String, BTreeMap<u64, Entry>>,
    blobs: HashMap<String, Bytes>,
}

impl Changelog for MemoryChangelog {
    fn append_entry(
        &self,
        log: &str,
        expect: Option<u64>,
        payload: &[u8],
        rollup: bool,
    ) -> Result<u64, LogError> {
        let hook = {
            let mut inner = self.inner.lock();
            match &inner.hook {
                Some((l, matches, _)) if l == log && matches(payload) => inner.hook.take(),
                _ => None,
            }
        };
        if let Some((_, _, hook)) = hook {
            hook();
        }
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        if std::mem::take(&mut inner.fail_next) {
            return Err(LogError::Engine {
                op: format!("append to {log}"),
                reason: "the leader went away before storing it (test)".into(),
            });
        }
        let entries = inner.logs.entry(log.to_string()).or_default();
        let last = entries.keys().next_back().copied().unwrap_or(0);
        if expect.is_some_and(|e| e != last) {
            return Err(LogError::Conflict {
                what: format!("changelog {log}"),
            });
        }
        inner.next_seq += 1;
        let seq = inner.next_seq;
        if rollup {
            entries.clear();
        }
        entries.insert(
            seq,
            Entry {
                seq,
                prev: expect,
                rollup,
                payload: Bytes::copy_from_slice(payload),
            },
        );
        if std::mem::take(&mut inner.lose_ack) {
            return Err(LogError::Engine {
                op: format!("append to {log}"),
                reason: "no acknowledgement (test)".into(),
            });
        }
        Ok(seq)
    }

    fn last_position(&self, log: &str) -> Result<u64, LogError> {
        self.read_fails(log)?;
        Ok(self
            .inner
            .lock()
            .logs
            .get(log)
            .and_then(|e| e.keys().next_back().copied())
            .unwrap_or(0))
    }

    fn read_entries(&self, log: &str, after: u64, limit: usize) -> Result<Vec<Entry>, LogError> {
        self.read_fails(log)?;
        Ok(self.inner.lock().logs.get(log).map_or_else(Vec::new, |e| {
            e.range(after + 1..)
                .take(limit)
                .map(|(_, v)| v.clone())
                .collect()
        }))
    }

    fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), LogError> {
        self.inner
            .lock()
            .blobs
            .insert(name.to_string(), Bytes::copy_from_slice(bytes));
        Ok(())
    }

    fn get_blob(&self, name: &str) -> Result<Option<Bytes>, LogError> {
        Ok(self.inner.lock().blobs.get(name).cloned())
    }
}
