//! Snapshots of a namespace: its whole content as one rollup entry, after which the engine
//! deletes the entries before it.

use super::entry::encode;
use super::{ReplicatedKv, Space, Writes, APPLIED};
use crate::LogError;

impl ReplicatedKv {
    /// An owned namespace this node holds: appends its snapshot if `snapshot_every` entries
    /// have landed since the last one. Returns whether it did. A refused or uncertain
    /// snapshot drops the hold, as a refused write does. Blocking.
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
        match self.snapshot(ns, &mut s) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.release(ns);
                match e {
                    LogError::Conflict { .. } => Err(LogError::NotHeld { what: ns.into() }),
                    e => Err(e),
                }
            }
        }
    }

    /// Appends the whole namespace as a rollup entry.
    pub(super) fn snapshot(&self, ns: &str, s: &mut Space) -> Result<(), LogError> {
        let writes: Writes = self
            .local
            .kv_scan(ns, b"")?
            .into_iter()
            .filter(|(k, _)| k.as_ref() != APPLIED)
            .map(|(k, v)| (k.to_vec(), Some(v.to_vec())))
            .collect();
        let seq = self
            .log
            .append_entry(ns, Some(s.applied), &encode(true, &writes), true)?;
        self.local
            .kv_apply(ns, &[(APPLIED.to_vec(), Some(seq.to_be_bytes().to_vec()))])?;
        s.applied = seq;
        s.since_snapshot = 0;
        Ok(())
    }
}
