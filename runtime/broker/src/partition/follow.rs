//! Following a shared log: what other nodes appended, and where their retention moved the
//! start.

use std::sync::atomic::Ordering;

use super::{Partition, State};
use crate::producer::ProducerState;
use crate::BrokerError;

impl Partition {
    /// Applies what other writers of a shared log appended since the last look, and lets
    /// readers see it (the engine acknowledged it replicated). Blocking (store reads).
    pub(crate) fn catch_up(&self) -> Result<(), BrokerError> {
        let _writer = self.writer.lock();
        self.catch_up_held()?;
        let end = self.state().next;
        self.publish_visible(end);
        Ok(())
    }

    /// [`Partition::catch_up`] for a caller that holds the writer lock. Fails when the log
    /// could not be read to its end (what was read is applied first).
    pub(super) fn catch_up_held(&self) -> Result<(), BrokerError> {
        if self.rebuild.load(Ordering::Acquire) {
            return self.rebuild_held();
        }
        let tail = self.store.tail(&self.tp)?;
        let partial = tail.partial;
        self.apply_tail(tail)?;
        if partial {
            return Err(BrokerError::Unavailable(format!(
                "this node could not read the rest of {} from the replicated log (it did not answer in time); retry the request",
                self.tp
            )));
        }
        Ok(())
    }

    fn apply_tail(&self, tail: weir_log::Tail) -> Result<(), BrokerError> {
        let mut s = self.state();
        for (base, meta) in tail.chunks {
            if base < s.next {
                continue;
            }
            if base != s.next {
                // Chunks between were removed by another node's retention before this one
                // saw them: rebuild the index from the log. The log's own position has moved
                // past them already, so a rebuild that fails is tried again next time.
                tracing::info!(message = "Rebuilding a partition's index from the shared log.", partition = %self.tp, chunk = base, end = s.next);
                drop(s);
                self.rebuild.store(true, Ordering::Release);
                return self.rebuild_held();
            }
            if s.chunks.is_empty() {
                s.start = base;
            }
            s.chunks.insert(base, meta);
            s.size += u64::from(meta.bytes);
            s.next = base + u64::from(meta.count);
        }
        for (id, bytes) in tail.producers {
            if let Some(state) = ProducerState::decode(&bytes) {
                s.producers.insert(id, state);
            }
        }
        Ok(())
    }

    /// Replaces the index with one rebuilt from the log (the caller holds the writer lock).
    fn rebuild_held(&self) -> Result<(), BrokerError> {
        let recovered = State::from_recovered(self.store.recover_partition(&self.tp)?);
        *self.state() = recovered;
        self.rebuild.store(false, Ordering::Release);
        Ok(())
    }

    /// Moves the start to where another node's retention left the partition (shared logs).
    /// Blocking (store read).
    pub(crate) fn refresh_start(&self) -> Result<(), BrokerError> {
        let _writer = self.writer.lock();
        let Some(first) = self.store.first_offset(&self.tp)? else {
            return Ok(());
        };
        let mut s = self.state();
        if first <= s.start {
            return Ok(());
        }
        let gone: Vec<u64> = s.chunks.range(..first).map(|(b, _)| *b).collect();
        for base in gone {
            if let Some(meta) = s.chunks.remove(&base) {
                s.size -= u64::from(meta.bytes);
            }
        }
        s.start = first.min(s.next);
        Ok(())
    }
}
