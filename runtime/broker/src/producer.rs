//! Idempotent-producer sequence checks (Kafka KIP-98 style), per producer × partition.
//!
//! A producer numbers the records it sends to a partition 0, 1, 2, …; a batch carries the
//! sequence of its first record. The broker keeps the last [`KEEP_BATCHES`] batches' sequence
//! ranges and offsets, stored atomically with each append, so that a retry of any of them is
//! answered with the offsets of the first write instead of being appended again.

use std::collections::VecDeque;

/// How many recent batches per producer × partition are remembered for retries (Kafka: 5,
/// its max in-flight requests per connection with idempotence).
pub const KEEP_BATCHES: usize = 5;

/// One remembered batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSeq {
    /// Sequence of the batch's first record.
    pub first_seq: u64,
    /// Sequence of its last record.
    pub last_seq: u64,
    /// Offset of its first record.
    pub base_offset: u64,
}

/// A producer's state in one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerState {
    /// The epoch of the batches below.
    pub epoch: u32,
    /// Newest last.
    pub batches: VecDeque<BatchSeq>,
    /// When the producer last appended here, ms since the epoch (for expiry of idle
    /// producers); 0 when stored by a weir that did not record it.
    pub last_ms: i64,
}

/// What to do with an incoming batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// New: append it.
    Append,
    /// A retry of a stored batch: answer with its offsets, append nothing.
    Duplicate {
        /// Offset of the first write's first record.
        base_offset: u64,
    },
}

/// Why a batch's sequence was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceError {
    /// The batch's epoch is older than the producer's current epoch here.
    StaleEpoch {
        /// The batch's epoch.
        epoch: u32,
        /// The newest epoch seen.
        current: u32,
    },
    /// Records are missing between the last stored batch and this one.
    Gap {
        /// The sequence the broker expected.
        expected: u64,
        /// The sequence that came.
        got: u64,
    },
    /// A retry of a remembered batch (same first sequence) with another number of records.
    CountMismatch {
        /// The batch's first sequence.
        first_seq: u64,
        /// Records the stored batch had.
        stored: u64,
        /// Records the retry has.
        got: u64,
    },
    /// The sequence is below the next expected one but matches no remembered batch.
    OutOfOrder {
        /// The sequence the broker expected.
        expected: u64,
        /// The sequence that came.
        got: u64,
    },
}

impl ProducerState {
    /// Decides what to do with a batch of `count` records from `epoch` starting at `base_seq`.
    ///
    /// # Errors
    /// [`SequenceError`] when the batch must be refused.
    pub fn check(
        state: Option<&ProducerState>,
        epoch: u32,
        base_seq: u64,
        count: u64,
    ) -> Result<SequenceCheck, SequenceError> {
        let Some(state) = state.filter(|s| s.epoch == epoch) else {
            if let Some(s) = state {
                if epoch < s.epoch {
                    return Err(SequenceError::StaleEpoch {
                        epoch,
                        current: s.epoch,
                    });
                }
            }
            // First batch of this producer (or of a new epoch) here: sequences restart at 0.
            return if base_seq == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(SequenceError::Gap {
                    expected: 0,
                    got: base_seq,
                })
            };
        };
        let last_seq = base_seq.saturating_add(count.saturating_sub(1));
        if let Some(b) = state.batches.iter().find(|b| b.first_seq == base_seq) {
            if b.last_seq == last_seq {
                return Ok(SequenceCheck::Duplicate {
                    base_offset: b.base_offset,
                });
            }
            return Err(SequenceError::CountMismatch {
                first_seq: base_seq,
                stored: b.last_seq - b.first_seq + 1,
                got: count,
            });
        }
        let expected = state.batches.back().map_or(0, |b| b.last_seq + 1);
        match base_seq.cmp(&expected) {
            std::cmp::Ordering::Equal => Ok(SequenceCheck::Append),
            std::cmp::Ordering::Greater => Err(SequenceError::Gap {
                expected,
                got: base_seq,
            }),
            std::cmp::Ordering::Less => Err(SequenceError::OutOfOrder {
                expected,
                got: base_seq,
            }),
        }
    }

    /// Where this state stands in the producer's history: its epoch, then the sequence after
    /// its newest batch. A state written later never has a lower position.
    pub fn position(&self) -> (u32, u64) {
        (
            self.epoch,
            self.batches
                .back()
                .map_or(0, |b| b.last_seq.saturating_add(1)),
        )
    }

    /// The state after appending, at `now_ms`, a batch accepted by [`ProducerState::check`].
    pub fn after_append(
        state: Option<&ProducerState>,
        epoch: u32,
        base_seq: u64,
        count: u64,
        base_offset: u64,
        now_ms: i64,
    ) -> ProducerState {
        let mut next = match state {
            Some(s) if s.epoch == epoch => s.clone(),
            _ => ProducerState {
                epoch,
                batches: VecDeque::new(),
                last_ms: now_ms,
            },
        };
        next.last_ms = now_ms;
        next.batches.push_back(BatchSeq {
            first_seq: base_seq,
            last_seq: base_seq + count - 1,
            base_offset,
        });
        while next.batches.len() > KEEP_BATCHES {
            next.batches.pop_front();
        }
        next
    }

    /// Stored form: epoch u32 BE, count u8, per batch three u64 BE, then the last append
    /// time i64 BE (absent in states stored before expiry existed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + 24 * self.batches.len());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.push(self.batches.len() as u8);
        for b in &self.batches {
            for v in [b.first_seq, b.last_seq, b.base_offset] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        out.extend_from_slice(&self.last_ms.to_be_bytes());
        out
    }

    /// Reads the stored form; `None` if it is malformed.
    pub fn decode(bytes: &[u8]) -> Option<ProducerState> {
        let epoch = u32::from_be_bytes(bytes.get(0..4)?.try_into().ok()?);
        let n = usize::from(*bytes.get(4)?);
        let batches_end = 5 + 24 * n;
        let last_ms = match bytes.len() {
            len if len == batches_end => 0,
            len if len == batches_end + 8 => {
                i64::from_be_bytes(bytes[batches_end..].try_into().ok()?)
            }
            _ => return None,
        };
        let u = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let batches = (0..n)
            .map(|k| 5 + 24 * k)
            .map(|i| BatchSeq {
                first_seq: u(i),
                last_seq: u(i + 8),
                base_offset: u(i + 16),
            })
            .collect();
        Some(ProducerState {
            epoch,
            batches,
            last_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SequenceCheck::*;

    fn run(
        steps: &[(u32, u64, u64)],
    ) -> (
        Option<ProducerState>,
        Vec<Result<SequenceCheck, SequenceError>>,
    ) {
        let mut state: Option<ProducerState> = None;
        let mut next_offset = 100;
        let mut results = Vec::new();
        for &(epoch, seq, count) in steps {
            let r = ProducerState::check(state.as_ref(), epoch, seq, count);
            if r == Ok(Append) {
                state = Some(ProducerState::after_append(
                    state.as_ref(),
                    epoch,
                    seq,
                    count,
                    next_offset,
                    7,
                ));
                next_offset += count;
            }
            results.push(r);
        }
        (state, results)
    }

    #[test]
    fn sequences() {
        let (_, r) = run(&[(0, 0, 10), (0, 10, 5), (0, 0, 10), (0, 10, 5), (0, 15, 1)]);
        assert_eq!(
            r,
            vec![
                Ok(Append),
                Ok(Append),
                Ok(Duplicate { base_offset: 100 }),
                Ok(Duplicate { base_offset: 110 }),
                Ok(Append)
            ]
        );
        let (_, r) = run(&[(0, 0, 10), (0, 11, 1)]);
        assert_eq!(
            r[1],
            Err(SequenceError::Gap {
                expected: 10,
                got: 11
            })
        );
        let (_, r) = run(&[(0, 3, 1)]);
        assert_eq!(
            r[0],
            Err(SequenceError::Gap {
                expected: 0,
                got: 3
            })
        );
        // A retry of a kept batch with another record count says so.
        let (_, r) = run(&[(0, 0, 10), (0, 0, 3)]);
        assert_eq!(
            r[1],
            Err(SequenceError::CountMismatch {
                first_seq: 0,
                stored: 10,
                got: 3
            })
        );
        // A batch that overlaps a stored one without matching it is out of order, not a duplicate.
        let (_, r) = run(&[(0, 0, 10), (0, 5, 5)]);
        assert_eq!(
            r[1],
            Err(SequenceError::OutOfOrder {
                expected: 10,
                got: 5
            })
        );
    }

    #[test]
    fn epochs_fence_and_restart_sequences() {
        let (state, r) = run(&[(0, 0, 10), (1, 0, 3), (0, 10, 1), (1, 3, 1), (2, 5, 1)]);
        assert_eq!(r[1], Ok(Append));
        assert_eq!(
            r[2],
            Err(SequenceError::StaleEpoch {
                epoch: 0,
                current: 1
            })
        );
        assert_eq!(r[3], Ok(Append));
        assert_eq!(
            r[4],
            Err(SequenceError::Gap {
                expected: 0,
                got: 5
            })
        );
        assert_eq!(state.unwrap().epoch, 1);
    }

    #[test]
    fn only_recent_batches_are_remembered_and_encoding_round_trips() {
        let steps: Vec<(u32, u64, u64)> = (0..8).map(|i| (0, i * 2, 2)).collect();
        let (state, _) = run(&steps);
        let state = state.unwrap();
        assert_eq!(state.batches.len(), KEEP_BATCHES);
        assert_eq!(
            ProducerState::check(Some(&state), 0, 0, 2),
            Err(SequenceError::OutOfOrder {
                expected: 16,
                got: 0
            })
        );
        assert_eq!(
            ProducerState::check(Some(&state), 0, 14, 2),
            Ok(Duplicate { base_offset: 114 })
        );
        assert_eq!(ProducerState::decode(&state.encode()), Some(state.clone()));
        assert_eq!(ProducerState::decode(&state.encode()[..7]), None);
        // A state stored before the append time was recorded reads with time 0.
        let legacy = &state.encode()[..5 + 24 * KEEP_BATCHES];
        let read = ProducerState::decode(legacy).unwrap();
        assert_eq!((read.batches, read.last_ms), (state.batches.clone(), 0));
    }
}
