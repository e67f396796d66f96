//! The stored forms of a plugin's values. Little-endian like the batch encoding, except where
//! a value was first written big-endian (cursors, state values, message ids): those keep
//! their form, so data written before stays readable.

use bytes::Bytes;
use weir_core::Record;

use super::{Group, GroupRef, StateWrites};

/// A partition's position, stored in every commit: the next input offset, the next commit
/// sequence and the counters `weir plugin list` shows (so they survive restarts like the
/// offset does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Next input offset to process.
    pub next: u64,
    /// Next commit sequence (names the batch's message ids and outbox entry).
    pub seq: u64,
    /// Records whose effects were committed.
    pub processed: u64,
    /// Records skipped as already processed.
    pub skipped: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
}

impl Cursor {
    /// A fresh partition starting at `next`.
    pub fn at(next: u64) -> Self {
        Cursor {
            next,
            ..Cursor::default()
        }
    }

    /// Five u64 BE.
    pub fn encode(&self) -> Vec<u8> {
        [
            self.next,
            self.seq,
            self.processed,
            self.skipped,
            self.dead_lettered,
        ]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
    }

    /// Reads the stored form; one written before the counters were kept (16 bytes) reads
    /// with counters at 0.
    pub fn decode(b: &[u8]) -> Option<Cursor> {
        if b.len() != 16 && b.len() != 40 {
            return None;
        }
        let u = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let counter = |i: usize| if b.len() == 40 { u(i) } else { 0 };
        Some(Cursor {
            next: u(0),
            seq: u(1),
            processed: counter(2),
            skipped: counter(3),
            dead_lettered: counter(4),
        })
    }
}

/// A state value: version u64 BE, then the value.
pub(super) fn encode_state(value: &[u8], version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(value);
    v
}

pub(super) fn decode_state(stored: &[u8]) -> Option<(Vec<u8>, u64)> {
    let version = u64::from_be_bytes(stored.get(..8)?.try_into().ok()?);
    Some((stored[8..].to_vec(), version))
}

/// A batch's state writes: count u32, then per key: key_len u32, key, present u8,
/// [version u64, value_len u32, value].
pub(super) fn encode_delta(writes: &StateWrites) -> Vec<u8> {
    let mut out = (writes.len() as u32).to_le_bytes().to_vec();
    for (key, value) in writes {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        match value {
            None => out.push(0),
            Some((v, version)) => {
                out.push(1);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

type StateWrite = (Vec<u8>, Option<(Vec<u8>, u64)>);

pub(super) fn decode_delta(b: &[u8]) -> Option<Vec<StateWrite>> {
    let mut r = weir_codec::Reader::new(b);
    let n = r.u32().ok()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let key = r.bytes32().ok()?.to_vec();
        let value = match r.u8().ok()? {
            0 => None,
            _ => {
                let version = r.u64().ok()?;
                Some((r.bytes32().ok()?.to_vec(), version))
            }
        };
        out.push((key, value));
    }
    r.done().ok()?;
    Some(out)
}

/// A commit's message ids: newest record time i64 BE, then 8-byte id hashes BE.
pub(super) fn encode_ids(newest_ms: i64, ids: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 8 * ids.len());
    v.extend_from_slice(&newest_ms.to_be_bytes());
    for id in ids {
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

pub(super) fn decode_ids(bytes: &[u8]) -> Option<(i64, Vec<u64>)> {
    if bytes.len() < 8 || (bytes.len() - 8) % 8 != 0 {
        return None;
    }
    let newest = i64::from_be_bytes(bytes[..8].try_into().ok()?);
    let ids = bytes[8..]
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Some((newest, ids))
}

/// Outbox entry: group count u32, then per group: topic (u16 length), partition u32, base
/// sequence u64, records (u32 length, weir output encoding).
pub(super) fn encode_groups<'a>(groups: impl ExactSizeIterator<Item = GroupRef<'a>>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
    for g in groups {
        out.extend_from_slice(&(g.topic.len() as u16).to_le_bytes());
        out.extend_from_slice(g.topic.as_bytes());
        out.extend_from_slice(&g.partition.to_le_bytes());
        out.extend_from_slice(&g.base_seq.to_le_bytes());
        let mut w = weir_codec::Writer::new();
        for r in g.records {
            w.push_out(r);
        }
        let blob = w.finish();
        out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        out.extend_from_slice(&blob);
    }
    out
}

/// Reads an outbox entry; records are slices of `entry` (no copy).
pub(super) fn decode_groups(entry: &Bytes) -> Option<Vec<Group>> {
    let mut r = weir_codec::Reader::new(entry);
    let n = r.u32().ok()?;
    let mut groups = Vec::new();
    for _ in 0..n {
        let topic = r.str16().ok()?.to_string();
        let partition = r.u32().ok()?;
        let base_seq = r.u64().ok()?;
        let blob = r.bytes32().ok()?;
        let records = weir_codec::decode_outputs(blob)
            .ok()?
            .iter()
            .map(|o| Record {
                key: o.key.map(|k| entry.slice_ref(k)),
                value: entry.slice_ref(o.value),
                headers: o
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), entry.slice_ref(v)))
                    .collect(),
                // Stamped with broker time at append.
                timestamp_ms: 0,
                id: None,
            })
            .collect();
        groups.push(Group {
            topic,
            partition,
            base_seq,
            records,
        });
    }
    r.done().ok()?;
    Some(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_old_ones_read_with_zero_counters() {
        let c = Cursor {
            next: 9,
            seq: 4,
            processed: 7,
            skipped: 1,
            dead_lettered: 1,
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        let old = &c.encode()[..16];
        assert_eq!(
            Cursor::decode(old),
            Some(Cursor {
                next: 9,
                seq: 4,
                ..Cursor::default()
            })
        );
        assert_eq!(Cursor::decode(&[0; 12]), None);
    }

    #[test]
    fn values_round_trip_and_garbage_is_refused() {
        let mut writes = StateWrites::default();
        writes.insert(b"a".to_vec(), Some((b"1".to_vec(), 3)));
        writes.insert(b"b".to_vec(), None);
        let delta = encode_delta(&writes);
        let back: StateWrites = decode_delta(&delta).unwrap().into_iter().collect();
        assert_eq!(back, writes);
        assert_eq!(decode_delta(&delta[..delta.len() - 1]), None);
        assert_eq!(
            decode_state(&encode_state(b"v", 9)),
            Some((b"v".to_vec(), 9))
        );
        assert_eq!(decode_ids(&encode_ids(7, &[1, 2])), Some((7, vec![1, 2])));
        assert_eq!(decode_ids(&encode_ids(7, &[1])[..9]), None);
        let out = [weir_codec::OutRecord {
            topic: "t",
            key: Some(b"k"),
            value: b"v",
            headers: vec![("h", b"x")],
        }];
        let entry = Bytes::from(encode_groups(
            [GroupRef {
                topic: "t",
                partition: 2,
                base_seq: 5,
                records: &out,
            }]
            .into_iter(),
        ));
        let groups = decode_groups(&entry).unwrap();
        assert_eq!((groups[0].partition, groups[0].base_seq), (2, 5));
        assert_eq!(groups[0].records[0].value.as_ref(), b"v");
        assert_eq!(groups[0].records[0].headers[0].1.as_ref(), b"x");
        assert_eq!(decode_groups(&entry.slice(..entry.len() - 1)), None);
    }
}
