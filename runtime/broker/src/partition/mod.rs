//! One partition: its in-memory index over the stored chunks, its producers' sequence states
//! and the offset up to which readers may see records.
//!
//! The index is rebuilt from the store at open. One writer at a time (the writer lock, held
//! across the store's write); the state lock is only ever held briefly, never across store
//! I/O (a write to a replicated log can take seconds while it elects a leader): readers take
//! it to find chunk positions, then read and decode without it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;

use tokio::sync::watch;

mod follow;
mod group;
mod read;

use super::producer::{ProducerState, SequenceCheck};
use super::BrokerError;
use weir_core::{PartitionStats, TopicPartition};
use weir_log::{ChunkMeta, EncodedChunk, Log, LogError};

/// How many times an append fenced by another node's is retried after catching up.
const FENCE_RETRIES: u32 = 50;

/// Producer fields of an idempotent batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerFields {
    /// Producer id from `InitProducer`.
    pub producer_id: u64,
    /// Its epoch.
    pub epoch: u32,
    /// Sequence of the batch's first record in this partition.
    pub base_sequence: u64,
}

pub(crate) struct Partition {
    pub(crate) tp: TopicPartition,
    store: Arc<dyn Log>,
    /// Serialises the partition's writers (append, catch-up, trim, producer removal); taken
    /// before `state`.
    writer: Mutex<()>,
    /// On a shared log, appends waiting for the writer lock: the next writer appends them
    /// all as one write (`group.rs`).
    queue: Mutex<Vec<Arc<group::Queued>>>,
    /// The topic's `publish_log_writes` counter.
    log_writes: weir_metrics::Counter,
    /// The index must be rebuilt from the log before the next catch-up (a rebuild failed).
    rebuild: AtomicBool,
    state: Mutex<State>,
    /// End offset readers may see: synced under fsync `always`, applied otherwise.
    visible: watch::Sender<u64>,
}

struct State {
    start: u64,
    next: u64,
    size: u64,
    chunks: BTreeMap<u64, ChunkMeta>,
    producers: HashMap<u64, ProducerState>,
}

impl State {
    /// Indexes `chunks`, just stored from `base`, and moves the end past them.
    fn index_appended(&mut self, base: u64, chunks: &[EncodedChunk]) {
        let mut offset = base;
        for chunk in chunks {
            let meta = ChunkMeta {
                count: chunk.header.count,
                bytes: chunk.bytes.len() as u32,
                max_timestamp_ms: chunk.header.max_timestamp_ms,
            };
            self.chunks.insert(offset, meta);
            self.size += u64::from(meta.bytes);
            offset += u64::from(meta.count);
        }
        self.next = offset;
    }

    fn from_recovered(recovered: weir_log::RecoveredPartition) -> State {
        let mut chunks = BTreeMap::new();
        let mut size = 0;
        let mut next = recovered.start_offset;
        for (base, meta) in recovered.chunks {
            if base < recovered.start_offset {
                continue; // trimmed in the same batch that moved the start; cannot happen, be safe
            }
            size += u64::from(meta.bytes);
            next = base + u64::from(meta.count);
            chunks.insert(base, meta);
        }
        let producers = recovered
            .producers
            .into_iter()
            .filter_map(|(id, bytes)| ProducerState::decode(&bytes).map(|s| (id, s)))
            .collect();
        State {
            start: chunks.keys().next().copied().unwrap_or(next),
            next,
            size,
            chunks,
            producers,
        }
    }
}

/// What a batch comes to against its producer's state.
enum Sequenced {
    /// A retry of a batch stored already: nothing to append.
    Duplicate(Appended),
    /// To be appended, with its producer's state after it (if it has one).
    Append(Option<(u64, ProducerState)>),
}

/// Result of appending one partition's share of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Records.
    pub count: u32,
    /// A retry of a stored batch: nothing was appended.
    pub duplicate: bool,
}

impl Partition {
    pub(crate) fn recover(store: Arc<dyn Log>, tp: TopicPartition) -> Result<Arc<Self>, LogError> {
        let state = State::from_recovered(store.recover_partition(&tp)?);
        let next = state.next;
        let log_writes = weir_metrics::global()
            .publish_log_writes
            .get_or_create(&weir_metrics::topic(&tp.topic))
            .clone();
        Ok(Arc::new(Partition {
            tp,
            store,
            writer: Mutex::new(()),
            queue: Mutex::new(Vec::new()),
            log_writes,
            rebuild: AtomicBool::new(false),
            state: Mutex::new(state),
            visible: watch::channel(next).0,
        }))
    }

    fn state(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// What clients are shown: the end is the visible end (Kafka's high watermark), never an
    /// offset appended but not yet as durable as promised, so a reader told "4 records" can
    /// read 4.
    pub(crate) fn stats(&self) -> PartitionStats {
        let visible = self.visible_end();
        let s = self.state();
        PartitionStats {
            partition: self.tp.partition,
            start_offset: s.start,
            end_offset: visible.min(s.next).max(s.start),
            size_bytes: s.size,
        }
    }

    /// The offset the next appended record gets (may be ahead of what readers see).
    pub(crate) fn next_offset(&self) -> u64 {
        self.state().next
    }

    /// Whether an idempotent batch is a retry of one already stored (nothing would be appended).
    pub(crate) fn is_duplicate(&self, p: &ProducerFields, count: u32) -> bool {
        let s = self.state();
        matches!(
            ProducerState::check(
                s.producers.get(&p.producer_id),
                p.epoch,
                p.base_sequence,
                u64::from(count),
            ),
            Ok(SequenceCheck::Duplicate { .. })
        )
    }

    /// Appends encoded chunks holding `count` records at `now_ms`, with the idempotence check
    /// when `producer` is given. Blocking (store write). On a shared log, appends waiting for
    /// one another are written together (`group.rs`).
    pub(crate) fn append(
        &self,
        chunks: &[EncodedChunk],
        count: u32,
        producer: Option<ProducerFields>,
        now_ms: i64,
    ) -> Result<Appended, BrokerError> {
        if self.store.shared().is_some() {
            return self.append_grouped(chunks, count, producer, now_ms);
        }
        let _writer = self.writer.lock();
        self.try_append(chunks, count, producer, now_ms)
    }

    /// An append to a log no other process writes; the caller holds the writer lock, so
    /// nothing else changes the state between the check and the update after the write.
    fn try_append(
        &self,
        chunks: &[EncodedChunk],
        count: u32,
        producer: Option<ProducerFields>,
        now_ms: i64,
    ) -> Result<Appended, BrokerError> {
        let (base, new_producer_state) = {
            let s = self.state();
            let current = producer.and_then(|p| s.producers.get(&p.producer_id));
            match self.sequence(current, producer, count, s.next, now_ms)? {
                Sequenced::Duplicate(appended) => return Ok(appended),
                Sequenced::Append(after) => (s.next, after),
            }
        };
        let encoded = new_producer_state
            .as_ref()
            .map(|(id, st)| (*id, st.encode()));
        let producers: Vec<(u64, &[u8])> = encoded
            .as_ref()
            .map(|(id, b)| (*id, b.as_slice()))
            .into_iter()
            .collect();
        self.store
            .append(&self.tp, base, chunks, &producers)
            .map_err(append_error)?;
        let mut s = self.state();
        s.index_appended(base, chunks);
        if let Some((id, st)) = new_producer_state {
            s.producers.insert(id, st);
        }
        Ok(Appended {
            base_offset: base,
            count,
            duplicate: false,
        })
    }

    /// Judges a batch of `count` records that would be stored at `base` against its
    /// producer's `current` state (none for a publish without producer fields).
    ///
    /// # Errors
    /// The producer's sequence or epoch refuses it.
    fn sequence(
        &self,
        current: Option<&ProducerState>,
        producer: Option<ProducerFields>,
        count: u32,
        base: u64,
        now_ms: i64,
    ) -> Result<Sequenced, BrokerError> {
        let Some(p) = producer else {
            return Ok(Sequenced::Append(None));
        };
        let records = u64::from(count);
        match ProducerState::check(current, p.epoch, p.base_sequence, records) {
            Ok(SequenceCheck::Duplicate { base_offset }) => Ok(Sequenced::Duplicate(Appended {
                base_offset,
                count,
                duplicate: true,
            })),
            Ok(SequenceCheck::Append) => Ok(Sequenced::Append(Some((
                p.producer_id,
                ProducerState::after_append(
                    current,
                    p.epoch,
                    p.base_sequence,
                    records,
                    base,
                    now_ms,
                ),
            )))),
            Err(e) => Err(BrokerError::sequence(p.producer_id, &self.tp, e)),
        }
    }

    /// Lets readers see records up to `end` (called once they are as durable as promised).
    pub(crate) fn publish_visible(&self, end: u64) {
        self.visible.send_if_modified(|v| {
            let moved = end > *v;
            *v = (*v).max(end);
            moved
        });
    }

    pub(crate) fn visible_end(&self) -> u64 {
        *self.visible.borrow()
    }

    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.visible.subscribe()
    }

    /// Applies retention: deletes the oldest chunks older than `retention_ms` or beyond
    /// `retention_bytes`. Returns the number of records removed. Blocking.
    pub(crate) fn trim(
        &self,
        now_ms: i64,
        retention_ms: u64,
        retention_bytes: u64,
    ) -> Result<u64, BrokerError> {
        let _writer = self.writer.lock();
        let (remove, new_start) = {
            let s = self.state();
            let mut remove =
                retention_plan(&s.chunks, s.size, now_ms, retention_ms, retention_bytes);
            if self.store.shared().is_some() && remove.len() == s.chunks.len() {
                // A shared log keeps the newest chunk (as Kafka keeps the active segment):
                // its message carries the sequence the next append is fenced on.
                remove.pop();
            }
            let Some(&last) = remove.last() else {
                return Ok(0);
            };
            let new_start = s
                .chunks
                .range(last + 1..)
                .next()
                .map(|(b, _)| *b)
                .unwrap_or(s.next);
            (remove, new_start)
        };
        self.store.trim(&self.tp, &remove, new_start)?;
        let mut s = self.state();
        let removed = new_start.saturating_sub(s.start);
        for base in &remove {
            if let Some(meta) = s.chunks.remove(base) {
                s.size -= u64::from(meta.bytes);
            }
        }
        s.start = new_start;
        Ok(removed)
    }

    /// When each producer with state here last appended (0 for states stored before that was
    /// recorded).
    pub(crate) fn producer_activity(&self) -> Vec<(u64, i64)> {
        self.state()
            .producers
            .iter()
            .map(|(id, st)| (*id, st.last_ms))
            .collect()
    }

    /// Forgets expired producers' sequence states. Blocking (store write).
    pub(crate) fn remove_producers(&self, ids: &[u64]) -> Result<(), BrokerError> {
        let _writer = self.writer.lock();
        let present: Vec<u64> = {
            let s = self.state();
            ids.iter()
                .copied()
                .filter(|id| s.producers.contains_key(id))
                .collect()
        };
        if present.is_empty() {
            return Ok(());
        }
        self.store.remove_producers(&self.tp, &present)?;
        let mut s = self.state();
        for id in present {
            s.producers.remove(&id);
        }
        Ok(())
    }
}

/// The chunks a retention pass removes, oldest first: while the oldest chunk's newest record
/// is older than `retention_ms` (0 = no time bound) or the partition is larger than
/// `retention_bytes` (0 = no size bound). The age is computed without overflow, so no
/// retention value or timestamp can make a young chunk look old.
pub fn retention_plan(
    chunks: &BTreeMap<u64, ChunkMeta>,
    size: u64,
    now_ms: i64,
    retention_ms: u64,
    retention_bytes: u64,
) -> Vec<u64> {
    let mut size = size;
    let mut remove = Vec::new();
    for (&base, meta) in chunks {
        let too_old =
            retention_ms > 0 && weir_core::elapsed_ms(meta.max_timestamp_ms, now_ms) > retention_ms;
        let too_big = retention_bytes > 0 && size > retention_bytes;
        if !(too_old || too_big) {
            break;
        }
        size = size.saturating_sub(u64::from(meta.bytes));
        remove.push(base);
    }
    remove
}

/// What a failed store append means for the publish.
fn append_error(source: LogError) -> BrokerError {
    match source {
        // A limit of the engine: nothing was stored, and a retry would fail the same.
        LogError::TooLarge { .. } => BrokerError::InvalidArgument(source.to_string()),
        // Its deletion (through any node) closed it: nothing was stored.
        LogError::Closed { topic } => BrokerError::UnknownTopic(topic),
        source => BrokerError::WriteFailed { source },
    }
}
