//! Produce's record batches, decoded with bounds a client cannot push past.
//!
//! The codec takes counts from the wire and reserves for them before reading (records per
//! batch, headers per record), and decompresses a batch whole, however large it turns out.
//! A few bytes could then ask for gigabytes. So before the codec sees a batch: its record
//! count must fit the bytes it has (a record takes at least [`MIN_RECORD_BYTES`]), it is
//! decompressed here into at most [`MAX_DECOMPRESSED_BYTES`], and each record's header count
//! must fit that record's bytes. The codec then decodes what passed.

use std::io::Read;

use bytes::{Buf, Bytes};
use kafka_protocol::error::ResponseError;
use kafka_protocol::records::{Compression, RecordBatchDecoder, RecordSet};

/// A batch decompresses into at most this (Kafka's own limit is the batch's compressed size;
/// 64 MiB is far above any batch a producer sends at its default 1 MiB `batch.size`).
pub(crate) const MAX_DECOMPRESSED_BYTES: usize = 64 * 1024 * 1024;

/// The smallest encoded record: length, attributes, timestamp and offset deltas, key and value
/// lengths, header count (one byte each).
const MIN_RECORD_BYTES: usize = 7;

/// Bytes of a v2 batch header before its records.
const HEADER_BYTES: usize = 61;

/// A decoded batch, and the bytes it was decompressed into (0 for an uncompressed batch,
/// whose records are slices of the request). Its records hold that buffer alive, whatever
/// their own lengths: it is what a caller keeping batches must count.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) set: RecordSet,
    pub(crate) decompressed: usize,
}

/// Decodes the next batch of `bytes`, of at most `max_records` records (the broker's
/// `--max-batch-records`, checked here before anything is reserved for them).
///
/// # Errors
/// The Kafka error and what is wrong with the batch, for the client.
pub(crate) fn decode(
    bytes: &mut Bytes,
    max_records: usize,
) -> Result<Decoded, (ResponseError, String)> {
    let corrupt = |why: String| (ResponseError::CorruptMessage, why);
    if bytes.len() >= HEADER_BYTES {
        let count = i32::from_be_bytes(bytes[57..61].try_into().expect("4 bytes"));
        if usize::try_from(count).is_ok_and(|c| c > max_records) {
            return Err((
                ResponseError::RecordListTooLarge,
                format!("a record batch of {count} records; the server takes at most {max_records} per batch (weir serve --max-batch-records)"),
            ));
        }
    }
    decode_bounded(bytes).map_err(corrupt)
}

fn decode_bounded(bytes: &mut Bytes) -> Result<Decoded, String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!(
            "a record batch of {} bytes is shorter than its header",
            bytes.len()
        ));
    }
    let batch_len = i32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let count = i32::from_be_bytes(bytes[57..61].try_into().expect("4 bytes"));
    let (Ok(batch_len), Ok(count)) = (usize::try_from(batch_len), usize::try_from(count)) else {
        return Err("a record batch with a negative length or record count".into());
    };
    // The batch length counts from the partition leader epoch (byte 12).
    let records_len = (batch_len + 12)
        .checked_sub(HEADER_BYTES)
        .ok_or("a record batch shorter than its header")?;
    if records_len > bytes.len() - HEADER_BYTES {
        return Err(format!(
            "a record batch says it has {batch_len} bytes; the request has {}",
            bytes.len() - 12
        ));
    }
    let decompressed = std::cell::Cell::new(0usize);
    let set = RecordBatchDecoder::decode_with_custom_compression(
        bytes,
        Some(|compressed: &mut Bytes, compression: Compression| {
            let plain = decompress(compressed, compression).map_err(anyhow::Error::msg)?;
            if compression != Compression::None {
                decompressed.set(decompressed.get() + plain.len());
            }
            check_records(&plain, count).map_err(anyhow::Error::msg)?;
            Ok(plain)
        }),
    )
    .map_err(|e| format!("a record batch did not decode: {e}"))?;
    Ok(Decoded {
        set,
        decompressed: decompressed.get(),
    })
}

/// Decompresses into at most [`MAX_DECOMPRESSED_BYTES`].
fn decompress(compressed: &mut Bytes, compression: Compression) -> Result<Bytes, String> {
    let input = compressed.copy_to_bytes(compressed.remaining());
    let bounded = |reader: &mut dyn Read| -> Result<Bytes, String> {
        let mut out = Vec::new();
        reader
            .take(MAX_DECOMPRESSED_BYTES as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("{compression:?} data did not decompress: {e}"))?;
        if out.len() > MAX_DECOMPRESSED_BYTES {
            return Err(format!(
                "a record batch decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes"
            ));
        }
        // The records keep the buffer alive: no spare capacity with them.
        out.shrink_to_fit();
        Ok(out.into())
    };
    match compression {
        Compression::None => Ok(input),
        Compression::Gzip => bounded(&mut flate2::read::GzDecoder::new(input.reader())),
        Compression::Zstd => bounded(
            &mut zstd::stream::read::Decoder::new(input.reader())
                .map_err(|e| format!("zstd data did not decompress: {e}"))?,
        ),
        Compression::Lz4 => bounded(
            &mut lz4::Decoder::new(input.reader())
                .map_err(|e| format!("lz4 data did not decompress: {e}"))?,
        ),
        Compression::Snappy => snappy(&input),
    }
}

/// Kafka's snappy: xerial's framing (a magic header, then length-prefixed raw blocks), or a
/// raw block alone, as the Java client accepts both.
fn snappy(input: &[u8]) -> Result<Bytes, String> {
    const MAGIC: &[u8] = b"\x82SNAPPY\x00";
    let mut raw_blocks: Vec<&[u8]> = Vec::new();
    if input.starts_with(MAGIC) && input.len() >= 16 {
        let mut rest = &input[16..];
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err("a snappy block length cut short".into());
            }
            let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            rest = &rest[4..];
            if n > rest.len() {
                return Err("a snappy block longer than the batch".into());
            }
            raw_blocks.push(&rest[..n]);
            rest = &rest[n..];
        }
    } else {
        raw_blocks.push(input);
    }
    let mut out = Vec::new();
    for block in raw_blocks {
        let n = snap::raw::decompress_len(block).map_err(|e| format!("snappy data: {e}"))?;
        if out.len() + n > MAX_DECOMPRESSED_BYTES {
            return Err(format!(
                "a record batch decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes"
            ));
        }
        let start = out.len();
        out.resize(start + n, 0);
        snap::raw::Decoder::new()
            .decompress(block, &mut out[start..])
            .map_err(|e| format!("snappy data did not decompress: {e}"))?;
    }
    Ok(out.into())
}

/// Each of `count` records fits the bytes, and so does each record's header count.
fn check_records(mut records: &[u8], count: usize) -> Result<(), String> {
    if count.saturating_mul(MIN_RECORD_BYTES) > records.len() {
        return Err(format!(
            "a record batch says it holds {count} records in {} bytes",
            records.len()
        ));
    }
    for _ in 0..count {
        let len = varint(&mut records).and_then(|l| usize::try_from(l).ok());
        let Some(len) = len.filter(|&l| l <= records.len()) else {
            return Err("a record's length is past the end of its batch".into());
        };
        let (mut record, rest) = records.split_at(len);
        records = rest;
        let headers = (|| {
            record = record.get(1..)?; // attributes
            varint(&mut record)?; // timestamp delta
            varint(&mut record)?; // offset delta
            for _ in 0..2 {
                // key, then value: -1 is null
                let n = varint(&mut record)?;
                let n = usize::try_from(n.max(0)).ok()?;
                record = record.get(n..)?;
            }
            varint(&mut record)
        })();
        match headers.and_then(|h| usize::try_from(h).ok()) {
            // A header takes at least two bytes (key and value lengths).
            Some(h) if h.saturating_mul(2) <= record.len() => {}
            _ => return Err("a record's header count is past the end of the record".into()),
        }
    }
    Ok(())
}

/// A zigzag varint (up to 64 bits), advancing `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<i64> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}
