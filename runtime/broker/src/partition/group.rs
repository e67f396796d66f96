//! Group commit of a partition's appends on a shared log. A write to the replicated engine is a
//! round trip, and the fence lets one be in flight per partition: a publish that finds the
//! writer lock taken queues its share of the partition, and whoever takes the lock next
//! appends every share queued by then as one fenced write. Each share is judged in queue
//! order exactly as if it were alone — its base offset follows the shares before it, its
//! producer's sequence is checked against the state they leave — so offsets stay dense and an
//! idempotent retry is answered the same whether or not it was grouped.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{append_error, Appended, Partition, ProducerFields, Sequenced, FENCE_RETRIES};
use crate::producer::ProducerState;
use crate::BrokerError;
use weir_log::{EncodedChunk, LogError, GROUP_MAX_BYTES};

/// One publish's share of a partition, waiting for the writer lock.
pub(super) struct Queued {
    chunks: Vec<EncodedChunk>,
    count: u32,
    producer: Option<ProducerFields>,
    now_ms: i64,
    /// Set, under the writer lock, by the writer that appended (or refused) it.
    outcome: Mutex<Option<Result<Appended, BrokerError>>>,
}

/// What a share comes to, judged after the shares before it.
enum Judged {
    /// Appended at this base offset.
    Append(u64),
    /// A retry of a batch stored already, or earlier in the same write.
    Duplicate(Appended),
    /// Refused (its producer's sequence): nothing of it is stored.
    Refused(BrokerError),
}

/// The write a group comes to: the shares it covers (a prefix of the group), their chunks
/// from `base` to `end`, and the producers' states after them.
struct Write {
    judged: Vec<Judged>,
    chunks: Vec<EncodedChunk>,
    producers: HashMap<u64, ProducerState>,
    base: u64,
    end: u64,
    /// The chunks' encoded bytes.
    bytes: usize,
}

impl Partition {
    /// [`Partition::append`] on a shared log: queued, and appended with every share queued
    /// by the time a writer takes the lock.
    pub(super) fn append_grouped(
        &self,
        chunks: &[EncodedChunk],
        count: u32,
        producer: Option<ProducerFields>,
        now_ms: i64,
    ) -> Result<Appended, BrokerError> {
        let mine = Arc::new(Queued {
            chunks: chunks.to_vec(),
            count,
            producer,
            now_ms,
            outcome: Mutex::new(None),
        });
        self.queue.lock().push(mine.clone());
        let _writer = self.writer.lock();
        loop {
            if let Some(outcome) = mine.outcome.lock().take() {
                return outcome;
            }
            let group = {
                let mut queue = self.queue.lock();
                if queue.iter().any(|q| Arc::ptr_eq(q, &mine)) {
                    std::mem::take(&mut *queue)
                } else {
                    Vec::new()
                }
            };
            if group.is_empty() {
                // Taken by a writer that panicked before it answered: whether the write
                // landed is unknown, as after a lost acknowledgement. (The shares queued
                // since stay for their own writers.)
                return Err(BrokerError::WriteFailed {
                    source: LogError::Engine {
                        op: format!("append to {}", self.tp),
                        reason: "the write it was grouped with failed".into(),
                    },
                });
            }
            self.append_group(group);
            // What the engine acknowledged is replicated, and what a catch-up read was
            // appended by others: readers may see it.
            let end = self.state().next;
            self.publish_visible(end);
        }
    }

    /// Appends `group` as one write and answers each share it covers; shares past what one
    /// write takes go back to the front of the queue. The caller holds the writer lock.
    fn append_group(&self, mut group: Vec<Arc<Queued>>) {
        let mut attempt = 0u32;
        let mut caught_up = false;
        loop {
            let write = self.judge(&group);
            if write.judged.len() < group.len() {
                let rest = group.split_off(write.judged.len());
                self.queue.lock().splice(0..0, rest);
            }
            // This node's view of a producer may be behind what other nodes appended for
            // it: judge again on the current tail before refusing.
            let refused = write.judged.iter().any(|j| matches!(j, Judged::Refused(_)));
            if refused && !caught_up {
                caught_up = true;
                if let Err(e) = self.catch_up_held() {
                    return fail(&group, &e);
                }
                continue;
            }
            if write.chunks.is_empty() {
                return answer(&group, write.judged);
            }
            let states: Vec<(u64, Vec<u8>)> = write
                .producers
                .iter()
                .map(|(id, st)| (*id, st.encode()))
                .collect();
            let states: Vec<(u64, &[u8])> =
                states.iter().map(|(id, b)| (*id, b.as_slice())).collect();
            match self
                .store
                .append(&self.tp, write.base, &write.chunks, &states)
            {
                Ok(()) => {
                    self.log_writes.inc();
                    let mut s = self.state();
                    s.index_appended(write.base, &write.chunks);
                    s.producers.extend(write.producers);
                    drop(s);
                    return answer(&group, write.judged);
                }
                Err(LogError::Fenced { .. }) if attempt < FENCE_RETRIES => {
                    // Another node appended first: learn what it wrote (maybe one of these
                    // very batches, sent through it by a retrying producer), then judge again.
                    attempt += 1;
                    if attempt > 2 {
                        std::thread::sleep(std::time::Duration::from_millis(
                            u64::from(attempt) * 5,
                        ));
                    }
                    if let Err(e) = self.catch_up_held() {
                        return fail(&group, &e);
                    }
                    caught_up = true;
                }
                Err(e) => return fail(&group, &append_error(e)),
            }
        }
    }

    /// Judges the group's shares in order against the partition's state, as far as one write
    /// takes: the store's limit and [`GROUP_MAX_BYTES`], the plugin changelog's bound too (the
    /// first share always fits: its publish was checked alone).
    fn judge(&self, group: &[Arc<Queued>]) -> Write {
        let s = self.state();
        let mut write = Write {
            judged: Vec::with_capacity(group.len()),
            chunks: Vec::new(),
            producers: HashMap::new(),
            base: s.next,
            end: s.next,
            bytes: 0,
        };
        for q in group {
            let current = q.producer.and_then(|p| {
                write
                    .producers
                    .get(&p.producer_id)
                    .or_else(|| s.producers.get(&p.producer_id))
            });
            let after = match self.sequence(current, q.producer, q.count, write.end, q.now_ms) {
                Ok(Sequenced::Append(after)) => after,
                Ok(Sequenced::Duplicate(appended)) => {
                    write.judged.push(Judged::Duplicate(appended));
                    continue;
                }
                Err(refused) => {
                    write.judged.push(Judged::Refused(refused));
                    continue;
                }
            };
            let before = write.chunks.len();
            let bytes: usize = q.chunks.iter().map(|c| c.bytes.len()).sum();
            if before > 0 && write.bytes + bytes > GROUP_MAX_BYTES {
                break;
            }
            write.bytes += bytes;
            write.chunks.extend(q.chunks.iter().cloned());
            let producers = write.producers.len()
                + usize::from(
                    q.producer
                        .is_some_and(|p| !write.producers.contains_key(&p.producer_id)),
                );
            if before > 0 && self.store.check_append(&write.chunks, producers).is_err() {
                write.chunks.truncate(before);
                break;
            }
            write.judged.push(Judged::Append(write.end));
            write.end += q
                .chunks
                .iter()
                .map(|c| u64::from(c.header.count))
                .sum::<u64>();
            if let Some((id, state)) = after {
                write.producers.insert(id, state);
            }
        }
        write
    }
}

/// Answers each share of a write that landed (or had nothing to append).
fn answer(group: &[Arc<Queued>], judged: Vec<Judged>) {
    for (q, j) in group.iter().zip(judged) {
        let outcome = match j {
            Judged::Append(base_offset) => Ok(Appended {
                base_offset,
                count: q.count,
                duplicate: false,
            }),
            Judged::Duplicate(appended) => Ok(appended),
            Judged::Refused(e) => Err(e),
        };
        *q.outcome.lock() = Some(outcome);
    }
}

/// Answers every share of a write that failed with `e` (whether it landed may be unknown: a
/// producer's retry is answered from what did).
fn fail(group: &[Arc<Queued>], e: &BrokerError) {
    for q in group {
        *q.outcome.lock() = Some(Err(copy(e)));
    }
}

/// The same failure, told to another publish.
fn copy(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::WriteFailed { source } => BrokerError::WriteFailed {
            source: match source {
                LogError::Fenced {
                    tp,
                    expected,
                    actual,
                } => LogError::Fenced {
                    tp: tp.clone(),
                    expected: *expected,
                    actual: *actual,
                },
                LogError::Engine { op, reason } => LogError::Engine {
                    op: op.clone(),
                    reason: reason.clone(),
                },
                other => LogError::Engine {
                    op: "append".into(),
                    reason: other.to_string(),
                },
            },
        },
        BrokerError::UnknownTopic(topic) => BrokerError::UnknownTopic(topic.clone()),
        BrokerError::InvalidArgument(why) => BrokerError::InvalidArgument(why.clone()),
        BrokerError::Unavailable(why) => BrokerError::Unavailable(why.clone()),
        // Damage found while reading the tail stays damage (data loss, logged as such).
        BrokerError::Storage(e) if e.is_damage() => BrokerError::Storage(LogError::Malformed {
            what: "partition data".into(),
            reason: e.to_string(),
        }),
        other => BrokerError::Unavailable(other.to_string()),
    }
}
