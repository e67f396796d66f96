//! [`ReplicatedKv`]: a [`KvStore`] whose namespaces are changelogs on a [`Changelog`] and whose
//! local store (the node's sled) is a cache of them — cluster mode's plugin store.
//!
//! Every write is one changelog entry (the keys written and deleted, all or nothing), appended
//! only if the changelog still ends where this node last read it, then applied to the cache
//! with the entry's position. Two kinds of namespace:
//!
//! - **owned** (names starting with the owned prefix, a plugin's `plugin/<name>`): only the
//!   node that [`ReplicatedKv::acquire`]d it writes. Acquiring reads the changelog to its end
//!   and appends a takeover entry, so the previous holder's next append — fenced on the
//!   position before the takeover — is refused by the engine. A refused or uncertain append
//!   drops the hold ([`ReplicatedKv::held`] turns false): the holder reacquires (reading
//!   what landed) before it writes again. Reads on a namespace not held read the changelog's
//!   tail first.
//! - **shared** (everything else: the plugin registry, the ownership table): any node writes;
//!   a refused append reads the tail and appends again. [`ReplicatedKv::update`] is a
//!   compare-and-set over the namespace.
//!
//! Once `snapshot_every` entries have landed, a snapshot of the namespace is appended as a
//! rollup entry (the engine deletes the entries before it), so a node with an empty cache
//! reads one snapshot and the entries after it. A shared namespace's writer appends it after
//! its write; an owned namespace's holder only when asked ([`ReplicatedKv::snapshot_if_due`],
//! the plugin compactor's job), not as part of a commit: a snapshot is a scan and an append
//! of the whole namespace, which the commit that happened to be the thousandth paid for.
//! Commits still wait for a snapshot under way (both hold the namespace's lock: two appends
//! fenced on one position would refuse one of them). A cache whose recorded position is past the changelog's
//! end (a changelog deleted and made again) is dropped and read again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::changelog::Changelog;
use crate::{Durable, KvStore, LogError};

/// The cache's own key in each namespace: the changelog position it reflects. Sorts after
/// every key the plugin store writes (all start with an ASCII letter).
const APPLIED: &[u8] = b"\xff\xffapplied";

/// How long [`ReplicatedKv::drop_unless`] tries to land its drop while other writers append.
const DROP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Entries between snapshots, by default.
pub const SNAPSHOT_EVERY: u64 = 1_000;

#[derive(Default)]
struct Space {
    loaded: bool,
    /// The changelog position the cache reflects.
    applied: u64,
    /// Entries since the last snapshot this node knows of.
    since_snapshot: u64,
}

type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

mod entry;
mod group;
mod snapshot;
use entry::{decode, encode};
pub use group::{Landing, GROUP_MAX_BYTES};

/// See the module documentation.
pub struct ReplicatedKv {
    local: Arc<dyn KvStore>,
    log: Arc<dyn Changelog>,
    owned_prefix: String,
    snapshot_every: u64,
    spaces: Mutex<HashMap<String, Arc<Mutex<Space>>>>,
    /// Owned namespaces this node may write: acquired, and no append refused or left
    /// uncertain since (read without waiting for a namespace's lock, which an append holds
    /// across a round trip).
    held: Mutex<std::collections::HashSet<String>>,
    /// Writes queued on owned namespaces, not landed yet (`group`).
    queues: Mutex<HashMap<String, Arc<group::Queue>>>,
    /// How many times each owned namespace was acquired: a write queued under one hold never
    /// lands under a later one (`group`).
    holds: Mutex<HashMap<String, u64>>,
}

impl ReplicatedKv {
    /// Namespaces on `log`, cached in `local`; those starting with `owned_prefix` are owned.
    pub fn new(local: Arc<dyn KvStore>, log: Arc<dyn Changelog>, owned_prefix: &str) -> Self {
        ReplicatedKv {
            local,
            log,
            owned_prefix: owned_prefix.to_string(),
            snapshot_every: SNAPSHOT_EVERY,
            spaces: Mutex::new(HashMap::new()),
            held: Mutex::new(Default::default()),
            queues: Mutex::new(HashMap::new()),
            holds: Mutex::new(HashMap::new()),
        }
    }

    /// Snapshots every `entries` entries instead of [`SNAPSHOT_EVERY`] (tests).
    pub fn with_snapshot_every(mut self, entries: u64) -> Self {
        self.snapshot_every = entries.max(1);
        self
    }

    fn owned(&self, ns: &str) -> bool {
        ns.starts_with(&self.owned_prefix)
    }

    fn space(&self, ns: &str) -> Result<Arc<Mutex<Space>>, LogError> {
        let sp = self
            .spaces
            .lock()
            .entry(ns.to_string())
            .or_default()
            .clone();
        {
            let mut s = sp.lock();
            if !s.loaded {
                s.applied = match self.local.kv_get(ns, APPLIED)? {
                    Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                        LogError::Malformed {
                            what: format!("changelog position of the cache of {ns}"),
                            reason: "not 8 bytes".into(),
                        }
                    })?),
                    None => {
                        if !self.local.kv_scan_first(ns, b"", 1)?.is_empty() {
                            return Err(LogError::Malformed {
                                what: format!("namespace {ns} of the data directory"),
                                reason: "it holds data written without a changelog (plugins of a single node, or of a weir before plugins ran across nodes); move a single node's data with `weir migrate`, or start this node on an empty --data-dir".into(),
                            });
                        }
                        0
                    }
                };
                s.loaded = true;
            }
        }
        Ok(sp)
    }

    /// Applies an entry to the cache and records its position.
    fn apply_local(
        &self,
        ns: &str,
        s: &mut Space,
        seq: u64,
        reset: bool,
        mut writes: Writes,
    ) -> Result<(), LogError> {
        if reset {
            // A crash between the drop and the apply leaves an empty cache at position 0:
            // the next read starts from the changelog's first entry, a rollup.
            self.local.kv_drop(ns)?;
        }
        writes.push((APPLIED.to_vec(), Some(seq.to_be_bytes().to_vec())));
        self.local.kv_apply(ns, &writes)?;
        s.applied = seq;
        s.since_snapshot = if reset { 0 } else { s.since_snapshot + 1 };
        Ok(())
    }

    /// Reads the changelog after the cache's position and applies it.
    fn catch_up(&self, ns: &str, s: &mut Space) -> Result<(), LogError> {
        let last = self.log.last_position(ns)?;
        if last < s.applied {
            // The changelog was deleted and made again: the cache is of another life.
            self.local.kv_drop(ns)?;
            s.applied = 0;
        }
        while s.applied < last {
            let entries = self.log.read_entries(ns, s.applied, 256)?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                if !e.rollup && e.prev != Some(s.applied) {
                    return Err(LogError::Malformed {
                        what: format!("changelog of {ns}"),
                        reason: format!(
                            "entry {} follows {:?}, the cache is at {}",
                            e.seq, e.prev, s.applied
                        ),
                    });
                }
                let (reset, writes) = decode(&e.payload).ok_or_else(|| LogError::Malformed {
                    what: format!("changelog entry {} of {ns}", e.seq),
                    reason: "not a weir key-value entry".into(),
                })?;
                self.apply_local(ns, s, e.seq, reset || e.rollup, writes)?;
            }
        }
        Ok(())
    }

    /// Appends an entry fenced on the cache's position and applies it.
    fn append(&self, ns: &str, s: &mut Space, reset: bool, writes: Writes) -> Result<(), LogError> {
        let seq = self
            .log
            .append_entry(ns, Some(s.applied), &encode(reset, &writes), reset)?;
        self.apply_local(ns, s, seq, reset, writes)?;
        if !self.owned(ns) && s.since_snapshot >= self.snapshot_every {
            // The write landed whatever happens to the snapshot. A refused snapshot means
            // another writer (the next write is refused too); an uncertain one is read back
            // by the next catch-up; either way, try again after another round of entries.
            if let Err(e) = self.snapshot(ns, s) {
                tracing::warn!(message = "A changelog snapshot failed; the changelog keeps growing until the next one.", namespace = ns, error = %e);
                s.since_snapshot = 0;
            }
        }
        Ok(())
    }

    fn write(&self, ns: &str, reset: bool, writes: Writes) -> Result<(), LogError> {
        if self.owned(ns) {
            // Queued and landed with whatever else is queued (`group`).
            let landing = self
                .begin_with(ns, reset, writes)?
                .expect("an owned namespace's write is queued");
            return self.land(&landing);
        }
        let sp = self.space(ns)?;
        let mut s = sp.lock();
        for _ in 0..100 {
            self.catch_up(ns, &mut s)?;
            match self.append(ns, &mut s, reset, writes.clone()) {
                Err(LogError::Conflict { .. }) => continue,
                other => return other,
            }
        }
        Err(LogError::Conflict { what: ns.into() })
    }

    /// Takes an owned namespace over: reads its changelog to the end and appends a takeover
    /// entry, after which a previous holder's appends are refused. Blocking.
    ///
    /// # Errors
    /// The changelog cannot be read or written.
    pub fn acquire(&self, ns: &str) -> Result<(), LogError> {
        let sp = self.space(ns)?;
        let mut s = sp.lock();
        self.release(ns);
        for _ in 0..100 {
            self.catch_up(ns, &mut s)?;
            match self.append(ns, &mut s, false, Vec::new()) {
                Err(LogError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
                Ok(()) => {
                    *self.holds.lock().entry(ns.to_string()).or_default() += 1;
                    self.held.lock().insert(ns.to_string());
                    return Ok(());
                }
            }
        }
        Err(LogError::Conflict { what: ns.into() })
    }

    /// Whether this node still holds an owned namespace as of the changelog's end: a holder
    /// is the changelog's only writer, so an entry after its last one means another node took
    /// the namespace over (or dropped it) and this node has not noticed yet (a paused process
    /// resumed). It then stops holding it, and reads catch up again. One round trip to the
    /// engine; answers to clients rest on it, never on the hold alone. Blocking.
    ///
    /// # Errors
    /// The changelog did not answer.
    pub fn confirm_held(&self, ns: &str) -> Result<bool, LogError> {
        if !self.held(ns) {
            return Ok(false);
        }
        let sp = self.space(ns)?;
        let s = sp.lock();
        if !self.held(ns) {
            return Ok(false);
        }
        if self.log.last_position(ns)? == s.applied {
            return Ok(true);
        }
        tracing::warn!(
            message = "Another node wrote to a namespace this node held: it stops writing it.",
            namespace = ns
        );
        self.release(ns);
        Ok(false)
    }

    /// Stops writing an owned namespace (its next holder acquires it); the writes queued on
    /// it fail.
    pub fn release(&self, ns: &str) {
        self.held.lock().remove(ns);
        self.fail_queued(ns);
    }

    /// Whether this node holds an owned namespace (acquired, and no append refused since).
    pub fn held(&self, ns: &str) -> bool {
        self.held.lock().contains(ns)
    }

    /// Compare-and-set on a shared namespace: `decide` sees the whole namespace as of the
    /// changelog's end and returns the writes to make (`None`: none); if another node wrote
    /// in between, it is asked again. Returns whether it wrote. Blocking.
    ///
    /// # Errors
    /// An owned namespace, or the changelog or the cache failed.
    pub fn update(
        &self,
        ns: &str,
        mut decide: impl FnMut(&BTreeMap<Vec<u8>, Bytes>) -> Option<Writes>,
    ) -> Result<bool, LogError> {
        if self.owned(ns) {
            return Err(LogError::NotHeld { what: ns.into() });
        }
        let sp = self.space(ns)?;
        let mut s = sp.lock();
        for _ in 0..100 {
            self.catch_up(ns, &mut s)?;
            let now: BTreeMap<Vec<u8>, Bytes> = self
                .local
                .kv_scan(ns, b"")?
                .into_iter()
                .filter(|(k, _)| k.as_ref() != APPLIED)
                .map(|(k, v)| (k.to_vec(), v))
                .collect();
            let Some(writes) = decide(&now) else {
                return Ok(false);
            };
            match self.append(ns, &mut s, false, writes) {
                Err(LogError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(true),
            }
        }
        Err(LogError::Conflict { what: ns.into() })
    }

    /// Reads the cache; unless this node holds the namespace, after reading the changelog's
    /// tail into it, under the namespace's lock (a reset being applied is never seen half
    /// done).
    fn fresh<T>(
        &self,
        ns: &str,
        read: impl FnOnce() -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let sp = self.space(ns)?;
        if self.held(ns) {
            return read();
        }
        let mut s = sp.lock();
        self.catch_up(ns, &mut s)?;
        read()
    }

    /// Several reads of one namespace's cache that see one changelog position: after reading
    /// the tail (unless this node holds it), under the namespace's lock. `read` gets the cache
    /// (whose scans include no changelog bookkeeping under the plugin store's prefixes).
    /// Blocking.
    ///
    /// # Errors
    /// The changelog or the cache failed, or `read` did.
    pub fn read_at_once<T>(
        &self,
        ns: &str,
        read: impl FnOnce(&dyn KvStore) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        self.fresh(ns, || read(&*self.local))
    }

    /// Drops an owned namespace this node does not hold (a plugin removed through a node
    /// that does not run it), unless `keep` says otherwise once the tail has been read: the
    /// drop is fenced on that tail, so a writer that appends after `keep` was asked (a new
    /// deployment of the name resetting it) makes the drop ask again instead of wiping what it
    /// wrote. The drop fences the holder, as a takeover does. Returns whether it dropped.
    /// Blocking.
    ///
    /// # Errors
    /// The changelog or the cache failed, or `keep` did.
    pub fn drop_unless(
        &self,
        ns: &str,
        mut keep: impl FnMut() -> Result<bool, LogError>,
    ) -> Result<bool, LogError> {
        let sp = self.space(ns)?;
        let mut s = sp.lock();
        // The holder may keep committing until it notices (its next tick): retry for a
        // while, not a number of times, and back off so its commits leave a gap.
        let deadline = std::time::Instant::now() + DROP_PATIENCE;
        let mut attempt = 0u64;
        loop {
            self.catch_up(ns, &mut s)?;
            if keep()? {
                return Ok(false);
            }
            match self
                .log
                .append_entry(ns, Some(s.applied), &encode(true, &[]), true)
            {
                Err(LogError::Conflict { .. }) if std::time::Instant::now() < deadline => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis((attempt * 7) % 50));
                }
                Err(e) => return Err(e),
                Ok(seq) => {
                    self.apply_local(ns, &mut s, seq, true, Vec::new())?;
                    return Ok(true);
                }
            }
        }
    }

    /// Stores a blob (a plugin's wasm) for every node. Blocking.
    ///
    /// # Errors
    /// The engine failed.
    pub fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), LogError> {
        self.log.put_blob(name, bytes)
    }

    /// A stored blob. Blocking.
    ///
    /// # Errors
    /// The engine failed.
    pub fn get_blob(&self, name: &str) -> Result<Option<Bytes>, LogError> {
        self.log.get_blob(name)
    }
}

impl Durable for ReplicatedKv {
    fn sync(&self) -> Result<(), LogError> {
        // The changelog's acknowledgement is the durability; the cache is synced for speed
        // of the next start only.
        self.local.sync()
    }
}

impl KvStore for ReplicatedKv {
    fn kv_get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>, LogError> {
        self.fresh(ns, || self.local.kv_get(ns, key))
    }

    fn kv_scan_first(
        &self,
        ns: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        let mut out = self.fresh(ns, || {
            self.local
                .kv_scan_first(ns, prefix, limit.saturating_add(1))
        })?;
        out.retain(|(k, _)| k.as_ref() != APPLIED);
        out.truncate(limit);
        Ok(out)
    }

    fn kv_apply(&self, ns: &str, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), LogError> {
        self.write(ns, false, writes.to_vec())
    }

    fn kv_drop(&self, ns: &str) -> Result<(), LogError> {
        if self.owned(ns) && !self.held(ns) {
            self.drop_unless(ns, || Ok(false))?;
            return Ok(());
        }
        self.write(ns, true, Vec::new())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_group;
