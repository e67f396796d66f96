//! The stored form of records: a *chunk* is a run of consecutive records of one partition,
//! encoded once at publish time and handed out as `Bytes` slices on read (no re-copy).
//!
//! ```text
//! chunk   := header record*
//! header  := magic "wc" (2) | version u8 = 1 | reserved u8 | crc32 u32 | count u32
//!            | max_timestamp_ms i64                                   (20 bytes, little endian)
//! record  := len u32 | timestamp_ms i64 | flags u8 (1 = key, 2 = id)
//!            | [key_len u32 key] | value_len u32 value | [id_len u16 id]
//!            | header_count u16 (name_len u16 name value_len u32 value)*
//! ```
//! `crc32` covers everything after itself (count, max timestamp, records), so a torn or corrupted chunk is detected on
//! read instead of yielding wrong records. The base offset is not stored in the chunk: it is
//! the chunk's key in the log, so a chunk can be encoded before its offset is known.

use bytes::{BufMut, Bytes, BytesMut};

use weir_core::Record;

const MAGIC: [u8; 2] = *b"wc";
const VERSION: u8 = 1;
/// Size of the chunk header.
pub const HEADER_LEN: usize = 20;
const FLAG_KEY: u8 = 1;
const FLAG_ID: u8 = 2;

/// Why a stored chunk could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The chunk is shorter than its header or a field runs past its end.
    #[error("chunk truncated: {0}")]
    Truncated(&'static str),
    /// The magic bytes or version are not ours.
    #[error("not a weir chunk (magic {magic:?}, version {version})")]
    BadMagic {
        /// First two bytes found.
        magic: [u8; 2],
        /// Version byte found.
        version: u8,
    },
    /// The checksum does not match the content.
    #[error("chunk checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A field holds a value that cannot be right (bad UTF-8, count mismatch, trailing bytes).
    #[error("chunk malformed: {0}")]
    Malformed(&'static str),
}

/// Header fields of a chunk, readable without decoding its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Number of records in the chunk.
    pub count: u32,
    /// Largest record timestamp in the chunk (drives retention by age and seek by time).
    pub max_timestamp_ms: i64,
}

/// One encoded chunk, ready to be stored.
#[derive(Clone, Debug)]
pub struct EncodedChunk {
    /// Header values (also inside `bytes`).
    pub header: ChunkHeader,
    /// The full encoded chunk.
    pub bytes: Bytes,
}

/// Encodes `records` into chunks of at most `target_bytes` each (a single record larger than
/// that gets a chunk of its own). Records with `timestamp_ms == 0` get `now_ms`.
///
/// Records longer than the limits of the format (ids over 64 KiB, over 65,535 headers) must be
/// refused before this is called; `Record::check_shape` does that.
pub fn encode_chunks(records: &[Record], now_ms: i64, target_bytes: usize) -> Vec<EncodedChunk> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < records.len() {
        let mut end = start;
        let mut size = HEADER_LEN;
        while end < records.len() {
            let len = records[end].encoded_len();
            if end > start && size + len > target_bytes {
                break;
            }
            size += len;
            end += 1;
        }
        chunks.push(encode_chunk(&records[start..end], now_ms, size));
        start = end;
    }
    chunks
}

fn encode_chunk(records: &[Record], now_ms: i64, size: usize) -> EncodedChunk {
    let mut buf = BytesMut::with_capacity(size);
    buf.put_slice(&MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(0);
    buf.put_u32_le(0); // crc, patched below
    buf.put_u32_le(records.len() as u32);
    buf.put_i64_le(0); // max timestamp, patched below
    let mut max_ts = i64::MIN;
    for record in records {
        let ts = if record.timestamp_ms == 0 {
            now_ms
        } else {
            record.timestamp_ms
        };
        max_ts = max_ts.max(ts);
        buf.put_u32_le((record.encoded_len() - 4) as u32);
        buf.put_i64_le(ts);
        let flags = if record.key.is_some() { FLAG_KEY } else { 0 }
            | if record.id.is_some() { FLAG_ID } else { 0 };
        buf.put_u8(flags);
        if let Some(key) = &record.key {
            buf.put_u32_le(key.len() as u32);
            buf.put_slice(key);
        }
        buf.put_u32_le(record.value.len() as u32);
        buf.put_slice(&record.value);
        if let Some(id) = &record.id {
            buf.put_u16_le(id.len() as u16);
            buf.put_slice(id.as_bytes());
        }
        buf.put_u16_le(record.headers.len() as u16);
        for (name, value) in &record.headers {
            buf.put_u16_le(name.len() as u16);
            buf.put_slice(name.as_bytes());
            buf.put_u32_le(value.len() as u32);
            buf.put_slice(value);
        }
    }
    debug_assert_eq!(buf.len(), size);
    buf[12..20].copy_from_slice(&max_ts.to_le_bytes());
    let crc = crc32fast::hash(&buf[8..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    EncodedChunk {
        header: ChunkHeader {
            count: records.len() as u32,
            max_timestamp_ms: max_ts,
        },
        bytes: buf.freeze(),
    }
}

/// Reads and validates a chunk's header, without checking the checksum.
///
/// # Errors
/// [`CodecError`] when the header is short or not ours.
pub fn read_header(bytes: &[u8]) -> Result<ChunkHeader, CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Truncated("header"));
    }
    let magic = [bytes[0], bytes[1]];
    if magic != MAGIC || bytes[2] != VERSION {
        return Err(CodecError::BadMagic {
            magic,
            version: bytes[2],
        });
    }
    if bytes[3] != 0 {
        return Err(CodecError::Malformed("reserved header byte is not zero"));
    }
    Ok(ChunkHeader {
        count: u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
        max_timestamp_ms: i64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
    })
}

/// Decodes every record of a chunk whose first record has offset `base_offset`, verifying the
/// checksum first. Keys, values and header values are slices of `chunk`: nothing is copied.
///
/// # Errors
/// [`CodecError`] for a chunk that is truncated, foreign, corrupted or inconsistent.
pub fn decode_chunk(
    chunk: &Bytes,
    base_offset: u64,
    partition: u32,
) -> Result<Vec<weir_core::StoredRecord>, CodecError> {
    let header = read_header(chunk)?;
    let stored = u32::from_le_bytes(chunk[4..8].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&chunk[8..]);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    // A record takes at least 19 bytes, so a count that cannot fit is rejected before allocating.
    if header.count as usize > (chunk.len() - HEADER_LEN) / 19 {
        return Err(CodecError::Malformed(
            "record count larger than the chunk can hold",
        ));
    }
    let mut out = Vec::with_capacity(header.count as usize);
    let mut cursor = Cursor {
        bytes: chunk,
        pos: HEADER_LEN,
    };
    for i in 0..header.count {
        let len = cursor.u32()? as usize;
        let end = cursor
            .pos
            .checked_add(len)
            .filter(|&e| e <= chunk.len())
            .ok_or(CodecError::Truncated("record"))?;
        let timestamp_ms = cursor.i64()?;
        let flags = cursor.u8()?;
        let key = if flags & FLAG_KEY != 0 {
            let n = cursor.u32()? as usize;
            Some(cursor.slice(n)?)
        } else {
            None
        };
        let n = cursor.u32()? as usize;
        let value = cursor.slice(n)?;
        let id = if flags & FLAG_ID != 0 {
            let n = cursor.u16()? as usize;
            Some(cursor.string(n)?)
        } else {
            None
        };
        let header_count = cursor.u16()?;
        let mut headers = Vec::with_capacity(usize::from(header_count).min(64));
        for _ in 0..header_count {
            let n = cursor.u16()? as usize;
            let name = cursor.string(n)?;
            let n = cursor.u32()? as usize;
            headers.push((name, cursor.slice(n)?));
        }
        if cursor.pos != end {
            return Err(CodecError::Malformed(
                "record length does not match its fields",
            ));
        }
        out.push(weir_core::StoredRecord {
            partition,
            offset: base_offset + u64::from(i),
            record: Record {
                key,
                value,
                headers,
                timestamp_ms,
                id,
            },
        });
    }
    if cursor.pos != chunk.len() {
        return Err(CodecError::Malformed(
            "trailing bytes after the last record",
        ));
    }
    Ok(out)
}

struct Cursor<'a> {
    bytes: &'a Bytes,
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, CodecError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(CodecError::Truncated("field"))?;
        let range = self.pos..end;
        self.pos = end;
        Ok(range)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.bytes[self.take(1)?][0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(
            self.bytes[self.take(2)?].try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(
            self.bytes[self.take(4)?].try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(
            self.bytes[self.take(8)?].try_into().expect("8 bytes"),
        ))
    }
    fn slice(&mut self, n: usize) -> Result<Bytes, CodecError> {
        let range = self.take(n)?;
        Ok(self.bytes.slice(range))
    }
    fn string(&mut self, n: usize) -> Result<String, CodecError> {
        let range = self.take(n)?;
        String::from_utf8(self.bytes[range].to_vec())
            .map_err(|_| CodecError::Malformed("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: usize) -> Record {
        Record {
            key: (i % 2 == 0).then(|| Bytes::from(format!("user-{i}"))),
            value: Bytes::from(vec![i as u8; i % 50]),
            headers: if i % 3 == 0 {
                vec![("trace".into(), Bytes::from_static(b"abc"))]
            } else {
                vec![]
            },
            timestamp_ms: if i % 4 == 0 { 0 } else { 1_000 + i as i64 },
            id: (i % 5 == 0).then(|| format!("msg-{i}")),
        }
    }

    #[test]
    fn round_trip_and_chunking() {
        let records: Vec<Record> = (0..500).map(sample).collect();
        let chunks = encode_chunks(&records, 42, 2048);
        assert!(chunks.len() > 5, "split into several chunks");
        let mut decoded = Vec::new();
        let mut base = 100;
        for chunk in &chunks {
            assert!(chunk.bytes.len() <= 2048);
            let header = read_header(&chunk.bytes).unwrap();
            assert_eq!(header, chunk.header);
            let recs = decode_chunk(&chunk.bytes, base, 3).unwrap();
            base += recs.len() as u64;
            decoded.extend(recs);
        }
        assert_eq!(decoded.len(), 500);
        for (i, stored) in decoded.iter().enumerate() {
            let mut want = sample(i);
            if want.timestamp_ms == 0 {
                want.timestamp_ms = 42;
            }
            assert_eq!(stored.record, want);
            assert_eq!(stored.offset, 100 + i as u64);
            assert_eq!(stored.partition, 3);
        }
    }

    #[test]
    fn oversized_record_gets_its_own_chunk() {
        let big = Record::from_value(vec![7u8; 10_000]);
        let chunks = encode_chunks(
            &[
                Record::from_value("a"),
                big.clone(),
                Record::from_value("b"),
            ],
            1,
            1024,
        );
        assert_eq!(
            chunks.iter().map(|c| c.header.count).collect::<Vec<_>>(),
            vec![1, 1, 1]
        );
        assert_eq!(
            decode_chunk(&chunks[1].bytes, 0, 0).unwrap()[0]
                .record
                .value,
            big.value
        );
    }

    #[test]
    fn corruption_is_an_error_never_a_panic_or_a_wrong_record() {
        let chunk = encode_chunks(&(0..20).map(sample).collect::<Vec<_>>(), 1, 1 << 20)
            .remove(0)
            .bytes;
        for cut in 0..chunk.len() {
            assert!(
                decode_chunk(&chunk.slice(..cut), 0, 0).is_err(),
                "truncated at {cut}"
            );
        }
        for pos in 0..chunk.len() {
            let mut bad = chunk.to_vec();
            bad[pos] ^= 0x5a;
            assert!(
                decode_chunk(&Bytes::from(bad), 0, 0).is_err(),
                "flipped byte {pos}"
            );
        }
        assert!(matches!(
            decode_chunk(&Bytes::from_static(b"hello world, not a chunk"), 0, 0),
            Err(CodecError::BadMagic { .. })
        ));
    }
}
