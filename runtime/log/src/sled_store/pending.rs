//! Index entries waiting for their bytes to be durable.
//!
//! Under a syncing fsync policy an append writes its chunks to the segment files at once but
//! keeps their index entries (and the producer states written with them) here until the next
//! [`Durable::sync`](crate::Durable::sync) has fdatasynced the segments; only then are they
//! written to sled, which that same sync then makes durable. So a durable index entry always
//! points at durable bytes, and a producer state is never durable without the records it
//! counts: a crash anywhere leaves at most unindexed bytes at a segment's end, which recovery
//! cuts off. Until then the entries here serve reads.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};

use super::segment::Loc;
use weir_core::TopicPartition;

/// One append's index entries and producer states.
pub(super) struct PendingAppend {
    pub tp: TopicPartition,
    pub chunks: Vec<(u64, Loc)>,
    pub producers: Vec<(u64, Bytes)>,
}

#[derive(Default)]
struct Inner {
    /// In append order.
    queue: Vec<PendingAppend>,
    /// Where each queued (or taken, not yet applied) chunk is, for reads.
    locs: HashMap<TopicPartition, BTreeMap<u64, Loc>>,
}

/// The appends whose index entries are not in sled yet.
#[derive(Default)]
pub(super) struct Pending {
    inner: Mutex<Inner>,
}

impl Pending {
    pub fn push(&self, append: PendingAppend) {
        let mut inner = self.inner.lock();
        let locs = inner.locs.entry(append.tp.clone()).or_default();
        for (base, loc) in &append.chunks {
            locs.insert(*base, *loc);
        }
        inner.queue.push(append);
    }

    /// Takes the queue for a sync; their entries still serve reads until
    /// [`Pending::applied`].
    pub fn take(&self) -> Vec<PendingAppend> {
        std::mem::take(&mut self.inner.lock().queue)
    }

    /// Forgets the read entries of appends now written to sled.
    pub fn applied(&self, appends: &[PendingAppend]) {
        let mut inner = self.inner.lock();
        for append in appends {
            if let Some(locs) = inner.locs.get_mut(&append.tp) {
                for (base, _) in &append.chunks {
                    locs.remove(base);
                }
                if locs.is_empty() {
                    inner.locs.remove(&append.tp);
                }
            }
        }
    }

    /// Where a chunk not yet in sled's index is.
    pub fn loc(&self, tp: &TopicPartition, base: u64) -> Option<Loc> {
        self.inner.lock().locs.get(tp)?.get(&base).copied()
    }

    /// Whether a partition has entries here.
    pub fn holds(&self, tp: &TopicPartition) -> bool {
        self.inner.lock().locs.contains_key(tp)
    }

    /// Drops queued entries of chunks retention removed (so a later sync does not index them
    /// again).
    pub fn forget_chunks(&self, tp: &TopicPartition, bases: &[u64]) {
        let mut inner = self.inner.lock();
        for append in inner.queue.iter_mut().filter(|a| &a.tp == tp) {
            append.chunks.retain(|(b, _)| !bases.contains(b));
        }
        if let Some(locs) = inner.locs.get_mut(tp) {
            for base in bases {
                locs.remove(base);
            }
        }
    }

    /// Drops queued states of expired producers.
    pub fn forget_producers(&self, tp: &TopicPartition, ids: &[u64]) {
        for append in self.inner.lock().queue.iter_mut().filter(|a| &a.tp == tp) {
            append.producers.retain(|(id, _)| !ids.contains(id));
        }
    }

    /// Drops everything of a topic (deleted, or created anew).
    pub fn forget_topic(&self, topic: &str) {
        let mut inner = self.inner.lock();
        inner.queue.retain(|a| a.tp.topic != topic);
        inner.locs.retain(|tp, _| tp.topic != topic);
    }
}
