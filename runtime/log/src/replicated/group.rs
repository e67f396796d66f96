//! Group commit of an owned namespace: a write is queued ([`ReplicatedKv::begin`]) and lands
//! later ([`ReplicatedKv::land`]), in one changelog entry with every write queued before the
//! append started. Whoever lands first appends for the others (a leader, as in a database's
//! group commit): one fenced append, one round trip, for what several partitions of a plugin
//! (and several batches of each, pipelined) committed meanwhile. The entry applies the writes
//! in the order they were queued, so it reads as the entries one at a time would have.
//!
//! The holder's memory runs ahead of the changelog while its writes are queued. A queued write
//! that fails to land (refused, uncertain) drops the hold, and fails every write queued after
//! it: they were decided on a state that may not exist. The writer must then start again from
//! what the changelog holds (the plugin runtime is reopened after a takeover).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{ReplicatedKv, Writes};
use crate::LogError;

/// Bytes of queued writes one entry carries at most (a larger single write goes alone): the
/// engine splits an entry into 512 KiB messages of one atomic batch.
pub const GROUP_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Writes queued on an owned namespace, oldest first.
pub(super) type Queue = Mutex<VecDeque<Arc<Pending>>>;

/// What became of a queued write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Landed,
    Failed,
}

/// A queued write.
pub(super) struct Pending {
    /// The hold it was queued under (how many times the namespace had been acquired).
    hold: u64,
    reset: bool,
    bytes: usize,
    /// Taken by the leader that appends it.
    writes: Mutex<Option<Writes>>,
    outcome: Mutex<Option<Outcome>>,
    settled: Condvar,
}

impl Pending {
    fn settle(&self, outcome: Outcome) {
        let mut o = self.outcome.lock();
        if o.is_none() {
            *o = Some(outcome);
        }
        self.settled.notify_all();
    }

    fn outcome(&self) -> Option<Outcome> {
        *self.outcome.lock()
    }
}

/// Fails a group and drops the hold unless disarmed (a leader that panicked mid-append).
struct Unsettled<'a> {
    kv: &'a ReplicatedKv,
    ns: &'a str,
    group: &'a [Arc<Pending>],
    armed: bool,
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.kv.release(self.ns);
            for p in self.group {
                p.settle(Outcome::Failed);
            }
        }
    }
}

/// A write queued on an owned namespace, to be landed with [`ReplicatedKv::land`].
pub struct Landing {
    ns: String,
    pending: Arc<Pending>,
}

impl Landing {
    /// Whether it landed already (without waiting).
    pub fn is_landed(&self) -> bool {
        self.pending.outcome() == Some(Outcome::Landed)
    }
}

impl std::fmt::Debug for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Landing")
            .field("ns", &self.ns)
            .field("outcome", &self.pending.outcome())
            .finish()
    }
}

impl ReplicatedKv {
    fn queue(&self, ns: &str) -> Arc<Queue> {
        self.queues
            .lock()
            .entry(ns.to_string())
            .or_default()
            .clone()
    }

    /// Queues `writes` on a namespace this node holds; they land with the next append
    /// ([`ReplicatedKv::land`]). A shared namespace's write is made at once (`None`).
    ///
    /// # Errors
    /// The namespace is owned and not held; a shared namespace's write failed.
    pub fn begin(&self, ns: &str, writes: Writes) -> Result<Option<Landing>, LogError> {
        self.begin_with(ns, false, writes)
    }

    pub(super) fn begin_with(
        &self,
        ns: &str,
        reset: bool,
        writes: Writes,
    ) -> Result<Option<Landing>, LogError> {
        if !self.owned(ns) {
            self.write(ns, reset, writes)?;
            return Ok(None);
        }
        let hold = self.hold_of(ns);
        if !self.held(ns) {
            return Err(LogError::NotHeld { what: ns.into() });
        }
        let bytes = writes
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        let pending = Arc::new(Pending {
            hold,
            reset,
            bytes,
            writes: Mutex::new(Some(writes)),
            outcome: Mutex::new(None),
            settled: Condvar::new(),
        });
        self.queue(ns).lock().push_back(pending.clone());
        // Released between the check and the push: the release failed what it found queued,
        // not this one.
        if !self.held(ns) {
            self.fail_queued(ns);
        }
        Ok(Some(Landing {
            ns: ns.to_string(),
            pending,
        }))
    }

    /// Waits until a queued write landed, appending it (with the writes queued before and
    /// after it, up to [`GROUP_MAX_BYTES`]) unless another writer already is. Blocking.
    ///
    /// # Errors
    /// It did not land, or may not have: the hold is dropped ([`LogError::NotHeld`] for a
    /// write another writer appended, the append's own error for the one that appended it).
    pub fn land(&self, landing: &Landing) -> Result<(), LogError> {
        let (ns, mine) = (landing.ns.as_str(), &landing.pending);
        let not_held = || LogError::NotHeld { what: ns.into() };
        loop {
            match mine.outcome() {
                Some(Outcome::Landed) => return Ok(()),
                Some(Outcome::Failed) => return Err(not_held()),
                None => {}
            }
            let sp = self.space(ns)?;
            let mut s = sp.lock();
            match mine.outcome() {
                Some(Outcome::Landed) => return Ok(()),
                Some(Outcome::Failed) => return Err(not_held()),
                None => {}
            }
            // The leader: the queue's front is this write or one queued before it.
            let group = self.take_group(ns);
            if group.is_empty() {
                // Another lander took it and has not settled it yet (it settles before it
                // lets the namespace go, so only in a moment): wait for it, do not spin.
                drop(s);
                let mut outcome = mine.outcome.lock();
                if outcome.is_none() {
                    mine.settled
                        .wait_for(&mut outcome, std::time::Duration::from_millis(100));
                }
                continue;
            }
            // Settled before the namespace is let go, whatever happens: a lander waiting for
            // the lock must never append the writes queued after a group whose fate is not
            // known yet (fenced on the same position, they would land without it). A panic
            // below fails the group and drops the hold.
            let mut unsettled = Unsettled {
                kv: self,
                ns,
                group: &group,
                armed: true,
            };
            let reset = group[0].reset;
            let mut writes = Vec::new();
            for p in &group {
                writes.extend(p.writes.lock().take().unwrap_or_default());
            }
            let result = if self.held(ns) {
                self.append(ns, &mut s, reset, writes)
            } else {
                Err(not_held())
            };
            match result {
                Ok(()) => {
                    for p in &group {
                        p.settle(Outcome::Landed);
                    }
                    unsettled.armed = false;
                    drop(s);
                }
                Err(e) => {
                    // Refused (another node took it over) or uncertain (it may have landed):
                    // the cache may be behind the changelog, and every write queued after
                    // these was decided on them. Reacquire before writing again.
                    self.release(ns);
                    for p in &group {
                        p.settle(Outcome::Failed);
                    }
                    unsettled.armed = false;
                    drop(s);
                    if group.iter().any(|p| Arc::ptr_eq(p, mine)) {
                        return Err(match e {
                            LogError::Conflict { .. } => not_held(),
                            other => other,
                        });
                    }
                    return Err(not_held());
                }
            }
        }
    }

    /// The writes the next append carries: the queue's oldest, and those after it up to the
    /// size bound and the next reset (a reset starts an entry of its own).
    fn take_group(&self, ns: &str) -> Vec<Arc<Pending>> {
        let hold = self.hold_of(ns);
        let queue = self.queue(ns);
        let mut q = queue.lock();
        let mut group: Vec<Arc<Pending>> = Vec::new();
        let mut bytes = 0;
        while let Some(next) = q.front() {
            if next.hold != hold {
                // Queued under an earlier hold (released and acquired again since): decided
                // on a state this hold does not build on.
                q.pop_front().expect("a front").settle(Outcome::Failed);
                continue;
            }
            if !group.is_empty() && (next.reset || bytes + next.bytes > GROUP_MAX_BYTES) {
                break;
            }
            bytes += next.bytes;
            group.push(q.pop_front().expect("a front"));
        }
        group
    }

    /// How many times `ns` was acquired.
    fn hold_of(&self, ns: &str) -> u64 {
        self.holds.lock().get(ns).copied().unwrap_or(0)
    }

    /// Fails every write queued on `ns` (the hold was dropped).
    pub(super) fn fail_queued(&self, ns: &str) {
        let queued: Vec<Arc<Pending>> = self.queue(ns).lock().drain(..).collect();
        for p in queued {
            p.settle(Outcome::Failed);
        }
    }
}
