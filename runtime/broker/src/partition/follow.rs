//! Following a shared log: what other nodes appended, and where their retention moved the
//! start.

use std::sync::atomic::Ordering;

use std::collections::HashMap;

use bytes::Bytes;

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
        let Some(shared) = self.store.shared() else {
            return Ok(());
        };
        let tail = shared.tail(&self.tp)?;
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
        apply_producers(&mut s.producers, tail.producers);
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
        let Some(shared) = self.store.shared() else {
            return Ok(());
        };
        let Some(first) = shared.first_offset(&self.tp)? else {
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

/// Applies producer states read from the log's tail, each only if it is at least as new as
/// the one this node has: a tail read that stopped early, or this node's own append racing
/// the walk, can hand back a state older than one already applied, and applying it would
/// forget the newer batches (a client's retry of one of them would be stored again).
fn apply_producers(known: &mut HashMap<u64, ProducerState>, read: Vec<(u64, Bytes)>) {
    for (id, bytes) in read {
        let Some(state) = ProducerState::decode(&bytes) else {
            continue;
        };
        match known.get(&id) {
            Some(have) if state.position() < have.position() => {
                tracing::debug!(
                    message = "Skipped an older producer state read from the log.",
                    producer = id
                );
            }
            _ => {
                known.insert(id, state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::SequenceCheck;

    fn after(state: Option<&ProducerState>, epoch: u32, seq: u64, offset: u64) -> ProducerState {
        ProducerState::after_append(state, epoch, seq, 10, offset, 1)
    }

    #[test]
    fn an_older_state_read_late_never_replaces_a_newer_one() {
        // Batches 0..10 and 10..20 are stored; this node applied the newer state, then a tail
        // read that stopped early hands back the state written with the first batch.
        let s1 = after(None, 0, 0, 100);
        let s2 = after(Some(&s1), 0, 10, 110);
        let mut known = HashMap::from([(7, s2.clone())]);
        apply_producers(&mut known, vec![(7, Bytes::from(s1.encode()))]);
        assert_eq!(known[&7], s2, "the newer state stays");
        // So a client's retry of the second batch is answered with its offsets, not stored twice.
        assert_eq!(
            ProducerState::check(known.get(&7), 0, 10, 10),
            Ok(SequenceCheck::Duplicate { base_offset: 110 })
        );
        // A newer state (here a new epoch) does replace it.
        let s3 = after(Some(&s2), 1, 0, 120);
        apply_producers(&mut known, vec![(7, Bytes::from(s3.encode()))]);
        assert_eq!(known[&7], s3);
    }
}
