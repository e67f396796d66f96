//! Reading a partition: visible records by offset and by timestamp.

use super::Partition;
use crate::BrokerError;
use weir_core::{ReadLimits, StoredRecord};
use weir_log::{codec, LogError};

impl Partition {
    /// Reads visible records from `from` (clamped to the log start): at most
    /// `limits.max_records`, and no more than `limits.max_bytes` of encoded records unless the
    /// first one alone is larger (it is then returned alone). Blocking (store reads).
    pub(crate) fn read(
        &self,
        from: u64,
        limits: ReadLimits,
    ) -> Result<Vec<StoredRecord>, BrokerError> {
        let out = self.read_once(from, limits)?;
        if out.is_empty() && self.store.shared().is_some() && from < self.visible_end() {
            // Another node's retention may have removed what the index still lists.
            self.refresh_start()?;
            return self.read_once(from, limits);
        }
        Ok(out)
    }

    fn read_once(&self, from: u64, limits: ReadLimits) -> Result<Vec<StoredRecord>, BrokerError> {
        let visible = self.visible_end();
        if from >= visible || limits.max_records == 0 {
            return Ok(Vec::new());
        }
        let (from, bases) = {
            let s = self.state();
            let from = from.max(s.start);
            let first = s
                .chunks
                .range(..=from)
                .next_back()
                .map(|(b, _)| *b)
                .unwrap_or(from);
            let mut bases = Vec::new();
            let (mut records, mut bytes) = (0usize, 0usize);
            for (&base, meta) in s.chunks.range(first..) {
                if base >= visible || records >= limits.max_records || bytes >= limits.max_bytes {
                    break;
                }
                records += (base + u64::from(meta.count)).saturating_sub(from.max(base)) as usize;
                bytes += meta.bytes as usize;
                bases.push(base);
            }
            (from, bases)
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        'chunks: for base in bases {
            let Some(chunk) = self.store.read_chunk(&self.tp, base)? else {
                break; // trimmed by retention since the lookup: the caller re-reads from the new start
            };
            for r in self.decode(&chunk, base)? {
                if r.offset < from {
                    continue;
                }
                let size = r.record.encoded_len();
                if r.offset >= visible
                    || out.len() >= limits.max_records
                    || (!out.is_empty() && bytes + size > limits.max_bytes)
                {
                    break 'chunks;
                }
                bytes += size;
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The first offset whose record has a timestamp at or after `ts` (the end offset if none).
    pub(crate) fn offset_for_timestamp(&self, ts: i64) -> Result<u64, BrokerError> {
        let candidates: Vec<u64> = {
            let s = self.state();
            s.chunks
                .iter()
                .filter(|(_, m)| m.max_timestamp_ms >= ts)
                .map(|(b, _)| *b)
                .take(8)
                .collect()
        };
        let visible = self.visible_end();
        for base in candidates {
            if let Some(r) = self
                .read_chunk_records(base)?
                .into_iter()
                .find(|r| r.record.timestamp_ms >= ts && r.offset < visible)
            {
                return Ok(r.offset);
            }
        }
        Ok(visible)
    }

    fn read_chunk_records(&self, base: u64) -> Result<Vec<StoredRecord>, BrokerError> {
        let Some(bytes) = self.store.read_chunk(&self.tp, base)? else {
            return Ok(Vec::new());
        };
        self.decode(&bytes, base)
    }

    fn decode(&self, bytes: &bytes::Bytes, base: u64) -> Result<Vec<StoredRecord>, BrokerError> {
        codec::decode_chunk(bytes, base, self.tp.partition).map_err(|source| {
            BrokerError::Storage(LogError::Corrupt {
                tp: self.tp.clone(),
                base_offset: base,
                source,
            })
        })
    }
}
