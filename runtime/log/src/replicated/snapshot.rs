//! Snapshots of a namespace: its whole content as one rollup entry, after which the engine
//! deletes the entries before it.

use super::entry::encode;
use super::{ReplicatedKv, Space, Writes, APPLIED};
use crate::LogError;

impl ReplicatedKv {
    /// An owned namespace this node holds: appends its snapshot if `snapshot_every` entries
    /// have landed since the last one. Returns whether it did. A refused append drops the
    /// hold, as a refused write does; an uncertain one leaves it to the next commit's fence.
    /// Blocking.
    ///
    /// # Errors
    /// The namespace is not held (or not owned), or the changelog or the cache failed.
    pub fn snapshot_if_due(&self, ns: &str) -> Result<bool, LogError> {
        if !self.owned(ns) || !self.held(ns) {
            return Err(LogError::NotHeld { what: ns.into() });
        }
        let sp = self.space(ns)?;
        let mut s = sp.lock();
        if !self.held(ns) {
            return Err(LogError::NotHeld { what: ns.into() });
        }
        if s.since_snapshot < self.snapshot_every {
            return Ok(false);
        }
        // Commits wait for the namespace's lock meanwhile: a snapshot appended beside a
        // commit, both fenced on the same position, would refuse one of them.
        let writes = self.snapshot_writes(ns)?;
        match self.append_snapshot(ns, &mut s, &writes) {
            Ok(()) => Ok(true),
            Err(LogError::Conflict { .. }) => {
                // Another node took the namespace over.
                self.release(ns);
                Err(LogError::NotHeld { what: ns.into() })
            }
            Err(e) => {
                // Uncertain or failed: the hold stays (if the snapshot landed after all, the
                // next commit, fenced on the position before it, is refused and drops the
                // hold then). Dropping it here would make every takeover, whose open
                // compacts, fail on the same snapshot again. Tried again a round later.
                s.since_snapshot = 0;
                Err(e)
            }
        }
    }

    /// Appends the whole namespace as a rollup entry.
    pub(super) fn snapshot(&self, ns: &str, s: &mut Space) -> Result<(), LogError> {
        let writes = self.snapshot_writes(ns)?;
        self.append_snapshot(ns, s, &writes)
    }

    /// The namespace's content as the cache holds it, as a snapshot's writes.
    fn snapshot_writes(&self, ns: &str) -> Result<Writes, LogError> {
        Ok(self
            .local
            .kv_scan(ns, b"")?
            .into_iter()
            .filter(|(k, _)| k.as_ref() != APPLIED)
            .map(|(k, v)| (k.to_vec(), Some(v.to_vec())))
            .collect())
    }

    /// Appends `writes` as a rollup entry fenced on the cache's position.
    fn append_snapshot(&self, ns: &str, s: &mut Space, writes: &Writes) -> Result<(), LogError> {
        let seq = self
            .log
            .append_entry(ns, Some(s.applied), &encode(true, writes), true)?;
        self.local
            .kv_apply(ns, &[(APPLIED.to_vec(), Some(seq.to_be_bytes().to_vec()))])?;
        s.applied = seq;
        s.since_snapshot = 0;
        Ok(())
    }
}
