//! Bytes from outside that are not what they claim: random frames, valid frames with bytes
//! flipped, batches whose counts or compressed sizes ask for more memory than they carry, and
//! garbage on a real socket. None may panic, abort or stop the listener; a frame that does
//! not decode closes its own connection.

use std::io::Write;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::records::Compression;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::batches::{self, MAX_DECOMPRESSED_BYTES};
use crate::tests::{ask, batch, frame, produce_to_t0, s, setup};
use crate::{apis, conn};

/// Produce v8 (not flexible): the batch is the frame's last bytes.
fn produce_frame(records: Bytes) -> Bytes {
    frame(ApiKey::Produce, 8, &produce_to_t0(records))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any API and version weir speaks, followed by anything.
    #[test]
    fn random_frames_are_answered_or_refused_never_a_panic(
        api in 0..apis::SUPPORTED.len(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let rt = runtime();
        rt.block_on(async {
            let setup = setup().await;
            let (key, min, max) = apis::SUPPORTED[api];
            for version in [min, max] {
                let mut f = BytesMut::new();
                f.extend_from_slice(&(key as i16).to_be_bytes());
                f.extend_from_slice(&version.to_be_bytes());
                f.extend_from_slice(&body);
                if let Ok(answer) = conn::handle(f.freeze(), &setup.ctx).await {
                    let _ = answer.await;
                }
            }
        });
    }

    /// A produce of a valid batch in each compression with bytes flipped anywhere, and half
    /// the time the batch's CRC made right again, so the flips reach decompression and the
    /// record decoding instead of stopping at the checksum.
    #[test]
    fn flipped_bytes_in_a_produce_never_panic(
        codec in 0..5usize,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        fix_crc in any::<bool>(),
    ) {
        let compression = [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd][codec];
        let records = batch(compression);
        let mut f = produce_frame(records.clone()).to_vec();
        prop_assert!(f.ends_with(&records), "the batch is the frame's tail");
        let start = f.len() - records.len();
        for (at, byte) in flips {
            let i = if fix_crc { start + 21 + at.index(records.len() - 21) } else { at.index(f.len()) };
            f[i] ^= byte | 1;
        }
        if fix_crc {
            let crc = crc32c(&f[start + 21..]);
            f[start + 17..start + 21].copy_from_slice(&crc.to_be_bytes());
        }
        let rt = runtime();
        rt.block_on(async {
            let setup = setup().await;
            if let Ok(answer) = conn::handle(Bytes::from(f), &setup.ctx).await {
                let _ = answer.await;
            }
        });
    }
}

/// A v2 batch header for `count` records over `records` (CRC not checked by this path).
fn raw_batch(count: i32, attributes: i16, records: &[u8]) -> Bytes {
    let mut b = Vec::new();
    b.extend_from_slice(&0i64.to_be_bytes()); // base offset
    b.extend_from_slice(&((49 + records.len()) as i32).to_be_bytes()); // batch length
    b.extend_from_slice(&0i32.to_be_bytes()); // leader epoch
    b.push(2); // magic
    b.extend_from_slice(&0u32.to_be_bytes()); // crc
    b.extend_from_slice(&attributes.to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&count.to_be_bytes());
    b.extend_from_slice(records);
    // CRC-32C of everything after the CRC field, as the codec checks it first.
    let crc = crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(b)
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn counts_and_sizes_a_batch_cannot_back_are_refused_before_anything_is_reserved() {
    // Two billion records in 7 bytes.
    let err = batches::decode(&mut raw_batch(i32::MAX, 0, &[0; 7]), usize::MAX)
        .unwrap_err()
        .1;
    assert!(err.contains("holds 2147483647 records"), "{err}");
    // More records than the broker takes in one batch: refused from the header alone.
    let (code, why) = batches::decode(&mut raw_batch(1_000_000, 0, &[0; 7]), 100_000).unwrap_err();
    assert_eq!(
        code,
        kafka_protocol::error::ResponseError::RecordListTooLarge
    );
    assert!(why.contains("--max-batch-records"), "{why}");
    // One record claiming a billion headers (zigzag varint of 1e9).
    let mut record = vec![
        1u8, /* attributes */
        0, 0, 1, /* key null */
        1, /* value null */
    ];
    let mut h = (1_000_000_000u64) << 1;
    while h >= 0x80 {
        record.push((h as u8) | 0x80);
        h >>= 7;
    }
    record.push(h as u8);
    let mut framed = vec![(record.len() as u8) << 1];
    framed.extend_from_slice(&record);
    framed.resize(16, 0);
    let err = batches::decode(&mut raw_batch(1, 0, &framed), usize::MAX)
        .unwrap_err()
        .1;
    assert!(err.contains("header count"), "{err}");
    // A zstd bomb: 64 MiB + 1 of zeros in a few kilobytes.
    let bomb = zstd::encode_all(&vec![0u8; MAX_DECOMPRESSED_BYTES + 1][..], 3).unwrap();
    assert!(bomb.len() < 64 * 1024);
    let err = batches::decode(&mut raw_batch(1, 4, &bomb), usize::MAX)
        .unwrap_err()
        .1;
    assert!(err.contains("decompresses to more than"), "{err}");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&vec![0u8; MAX_DECOMPRESSED_BYTES + 1])
        .unwrap();
    let err = batches::decode(&mut raw_batch(1, 1, &gz.finish().unwrap()), usize::MAX)
        .unwrap_err()
        .1;
    assert!(err.contains("decompresses to more than"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_socket_closes_that_connection_and_the_listener_serves_on() {
    let setup = setup().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = setup.ctx.shutdown.clone();
    let server = tokio::spawn(crate::serve(
        listener,
        setup.ctx.broker.clone(),
        (*setup.ctx.options).clone(),
        shutdown.clone(),
    ));
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x7f, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 8, 0, 3, 0, 1, 0, 0, 0, 1][..],
        &[0, 0, 0, 2, 0, 3][..],
    ] {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(garbage).await.unwrap();
        let mut buf = [0u8; 64];
        // Closed (0 bytes), or a reset: either way, not left hanging.
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{garbage:?}: {read:?}"
        );
    }
    // A well-formed client is still served.
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = frame(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default());
    c.write_all(&(request.len() as i32).to_be_bytes())
        .await
        .unwrap();
    c.write_all(&request).await.unwrap();
    let mut len = [0u8; 4];
    c.read_exact(&mut len).await.unwrap();
    assert!(i32::from_be_bytes(len) > 8);
    shutdown.cancel();
    server.await.unwrap();
    let _: ApiVersionsResponse = ask(
        &setup.ctx,
        ApiKey::ApiVersions,
        3,
        &ApiVersionsRequest::default()
            .with_client_software_name(s("t"))
            .with_client_software_version(s("1")),
    )
    .await;
    let _ = Arc::clone(&setup.ctx.broker);
}

/// A produce whose topic array claims two billion entries in a 20-byte frame: the codec
/// reserves for the count before reading, and the answer is a closed connection, not an
/// aborted server (on the server's allocator, mimalloc).
#[tokio::test]
async fn an_array_count_the_frame_cannot_hold_is_refused() {
    let setup = setup().await;
    let mut f = Vec::new();
    f.extend_from_slice(&0i16.to_be_bytes()); // Produce
    f.extend_from_slice(&8i16.to_be_bytes()); // v8, header v1
    f.extend_from_slice(&1i32.to_be_bytes()); // correlation id
    f.extend_from_slice(&(-1i16).to_be_bytes()); // no client id
    f.extend_from_slice(&(-1i16).to_be_bytes()); // no transactional id
    f.extend_from_slice(&(-1i16).to_be_bytes()); // acks
    f.extend_from_slice(&5000i32.to_be_bytes()); // timeout
    f.extend_from_slice(&i32::MAX.to_be_bytes()); // topics: 2^31 - 1 of them
    let refused = conn::handle(Bytes::from(f), &setup.ctx).await;
    assert!(
        matches!(refused, Err(e) if e.contains("Produce v8 request")),
        "refused"
    );
}

/// A record's decoded slices keep its whole decompressed buffer alive, padding after the
/// records included: that buffer, not the records' lengths, counts against a partition's
/// bound, so batches of one small record and 40 MiB of compressed padding are refused in
/// pairs.
#[tokio::test]
async fn padding_after_the_records_counts_against_a_partitions_bound() {
    // One record: attributes, timestamp and offset deltas, null key, value "v", no headers.
    let mut plain = vec![14u8, 0, 0, 0, 1, 2, b'v', 0];
    plain.resize(40 << 20, 0);
    let padded = raw_batch(1, 4, &zstd::encode_all(&plain[..], 3).unwrap());
    assert!(padded.len() < 64 * 1024);
    let decoded = batches::decode(&mut padded.clone(), usize::MAX).unwrap();
    assert_eq!(decoded.set.records.len(), 1);
    assert_eq!(decoded.decompressed, 40 << 20);
    // An uncompressed batch holds slices of the request itself: nothing extra is counted.
    let plain_batch = batches::decode(&mut raw_batch(1, 0, &plain[..8]), usize::MAX).unwrap();
    assert_eq!(plain_batch.decompressed, 0);
    let setup = crate::tests::setup().await;
    crate::tests_produce::refuses_two_as_too_large(&setup.ctx, &padded).await;
}
