//! Property-based fuzzing of everything that decodes bytes from outside: the publish request
//! (protobuf → records → log), the stored chunk read back from disk, the batch and outputs
//! blobs that cross into and out of plugins, and deploy with arbitrary bytes as wasm.
//!
//! Bounded for CI: `WEIR_FUZZ_CASES` (default 256) cases per target, a tenth of that for the
//! wasm targets (each one compiles). proptest saves a failing input under
//! `tests/proptest-regressions/` and replays it first on every later run; crashes found while
//! writing these are pinned as named regression tests at the end of the file.

use crate::common;

use std::sync::OnceLock;

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use weir_api::pb;
use weir_core::Record;
use weir_log::codec::{decode_chunk, encode_chunks};
use weir_server::local::LocalRuntime;

fn cases(divisor: u32) -> ProptestConfig {
    let n: u32 = std::env::var("WEIR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases: (n / divisor).max(4),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/proptest-regressions/fuzz.txt"
            )),
        )),
        ..ProptestConfig::default()
    }
}

fn record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(
            (
                "[a-z-]{0,12}",
                proptest::collection::vec(any::<u8>(), 0..20),
            ),
            0..4,
        ),
        1i64..i64::MAX,
        proptest::option::of("[ -~]{0,30}"),
    )
        .prop_map(|(key, value, headers, timestamp_ms, id)| Record {
            key: key.map(Bytes::from),
            value: Bytes::from(value),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
            timestamp_ms,
            id,
        })
}

/// Byte edits: (position seed, new byte), applied modulo the length.
fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)
}

fn apply(bytes: &mut [u8], edits: &[(usize, u8)]) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    for &(at, b) in edits {
        bytes[at % n] = b;
    }
}

proptest! {
    #![proptest_config(cases(1))]

    /// Storage: records survive encode → decode exactly; arbitrary bytes are an error.
    #[test]
    fn stored_chunks_round_trip(records in proptest::collection::vec(record(), 1..20), base in 0u64..1 << 40) {
        for chunk in encode_chunks(&records, 1, 4096) {
            let decoded = decode_chunk(&chunk.bytes, base, 3).unwrap();
            prop_assert_eq!(decoded.len() as u32, chunk.header.count);
        }
        let all: Vec<Record> = encode_chunks(&records, 1, 1 << 20)
            .iter()
            .flat_map(|c| decode_chunk(&c.bytes, base, 3).unwrap())
            .enumerate()
            .map(|(i, s)| { assert_eq!(s.offset, base + i as u64); s.record })
            .collect();
        prop_assert_eq!(all, records);
    }

    /// Storage: a chunk corrupted on disk is an error, never a panic or different records;
    /// with its checksum recomputed (corruption the CRC cannot see) the parser still never
    /// panics and never reads outside the chunk.
    #[test]
    fn corrupt_stored_chunks_are_errors(records in proptest::collection::vec(record(), 1..8), edits in edits(), cut in any::<usize>()) {
        let chunk = encode_chunks(&records, 1, 1 << 20).remove(0);
        let mut bytes = chunk.bytes.to_vec();
        apply(&mut bytes, &edits);
        if let Ok(decoded) = decode_chunk(&Bytes::from(bytes.clone()), 0, 0) {
            prop_assert_eq!(&bytes, &chunk.bytes.to_vec(), "a changed chunk decoded: {:?}", decoded);
        }
        // Recompute the checksum so the record parser itself sees the damage.
        if bytes.len() >= 8 {
            let crc = crc32fast::hash(&bytes[8..]);
            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        let _ = decode_chunk(&Bytes::from(bytes.clone()), 0, 0);
        let truncated = Bytes::from(bytes[..cut % (bytes.len() + 1)].to_vec());
        let _ = decode_chunk(&truncated, 0, 0);
    }

    /// Storage: arbitrary bytes (with a valid-looking header and checksum) never panic.
    #[test]
    fn arbitrary_stored_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..600), count in any::<u32>()) {
        let _ = decode_chunk(&Bytes::from(bytes.clone()), 0, 0);
        if bytes.len() >= 20 {
            bytes[..4].copy_from_slice(&[b'w', b'c', 1, 0]);
            bytes[8..12].copy_from_slice(&(count % 64).to_le_bytes());
            let crc = crc32fast::hash(&bytes[8..]);
            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
            let _ = decode_chunk(&Bytes::from(bytes), 0, 0);
        }
    }

    /// Plugin blobs: what the host writes the SDK reads back exactly, and arbitrary or
    /// damaged blobs are errors.
    #[test]
    fn plugin_blobs_round_trip_and_reject_garbage(records in proptest::collection::vec(record(), 0..12), edits in edits(), junk in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut writer = weir_codec::Writer::new();
        let ins: Vec<weir_codec::InRecord<'_>> = records.iter().enumerate().map(|(i, r)| weir_codec::InRecord {
            offset: i as u64,
            timestamp_ms: r.timestamp_ms,
            partition: 7,
            key: r.key.as_deref(),
            value: &r.value,
            id: r.id.as_deref(),
            headers: r.headers.iter().map(|(k, v)| (k.as_str(), &v[..])).collect(),
        }).collect();
        for r in &ins {
            writer.push_in(r);
        }
        let blob = writer.finish();
        prop_assert_eq!(&weir_codec::decode_batch(&blob).unwrap(), &ins);

        let mut writer = weir_codec::Writer::new();
        let outs: Vec<weir_codec::OutRecord<'_>> = ins.iter().map(|r| weir_codec::OutRecord {
            topic: r.id.unwrap_or("out"),
            key: r.key,
            value: r.value,
            headers: r.headers.clone(),
        }).collect();
        for r in &outs {
            writer.push_out(r);
        }
        let out_blob = writer.finish();
        prop_assert_eq!(&weir_codec::decode_outputs(&out_blob).unwrap(), &outs);

        let _ = weir_codec::decode_batch(&junk);
        let _ = weir_codec::decode_outputs(&junk);
        let mut damaged = blob.clone();
        apply(&mut damaged, &edits);
        let _ = weir_codec::decode_batch(&damaged);
        let cut = &blob[..blob.len().saturating_sub(1 + edits.len())];
        if !ins.is_empty() {
            prop_assert!(weir_codec::decode_batch(cut).is_err());
        }
        let mut longer = out_blob.clone();
        longer.push(0);
        prop_assert!(weir_codec::decode_outputs(&longer).is_err());
    }
}

/// One server for the request fuzzing, on its own runtime.
fn server() -> &'static (
    tokio::runtime::Runtime,
    weir_server::server::RunningServer,
    tempfile::TempDir,
) {
    static SERVER: OnceLock<(
        tokio::runtime::Runtime,
        weir_server::server::RunningServer,
        tempfile::TempDir,
    )> = OnceLock::new();
    SERVER.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = rt.block_on(async {
            let server = common::start_with(dir.path(), |c| c.broker.max_record_bytes = 4096).await;
            let client = weir_api::Client::connect(&server.url()).await.unwrap();
            client
                .create_topic(&weir_core::TopicConfig {
                    name: "fuzz".into(),
                    partitions: 3,
                    retention_ms: 0,
                    retention_bytes: 0,
                    admission: None,
                })
                .await
                .unwrap();
            server
        });
        (rt, server, dir)
    })
}

proptest! {
    #![proptest_config(cases(4))]

    /// Publish: a request decoded from arbitrary or damaged protobuf bytes is either refused
    /// with a status or stored, and what was acked reads back exactly.
    #[test]
    fn publish_requests_from_arbitrary_bytes(records in proptest::collection::vec(record(), 1..6), edits in edits(), junk in proptest::collection::vec(any::<u8>(), 0..300), partition in proptest::option::of(0u32..5)) {
        let (rt, server, _) = server();
        let valid = pb::PublishRequest {
            topic: "fuzz".into(),
            partition,
            records: records.iter().cloned().map(Into::into).collect(),
            producer: None,
            request_id: 1,
        };
        let mut damaged = valid.encode_to_vec();
        apply(&mut damaged, &edits);
        rt.block_on(async {
            let mut raw = weir_api::Client::connect(&server.url()).await.unwrap().raw();
            for bytes in [valid.encode_to_vec(), damaged, junk] {
                let Ok(mut request) = pb::PublishRequest::decode(&bytes[..]) else { continue };
                request.topic = "fuzz".into(); // reach the log, not just the topic lookup
                let sent: Vec<Record> = request.records.iter().cloned().map(Record::from).collect();
                match raw.publish(request).await {
                    Ok(response) => {
                        // Partitions interleave the records; compare as multisets.
                        let mut stored = Vec::new();
                        for ack in response.into_inner().acks {
                            let read = server.broker.read("fuzz", ack.partition, ack.base_offset, ack.record_count as usize).await.unwrap();
                            assert_eq!(read.len(), ack.record_count as usize);
                            stored.extend(read.into_iter().map(|s| s.record));
                        }
                        let mut sent = sent;
                        for (r, s) in sent.iter_mut().zip(&stored) {
                            if r.timestamp_ms == 0 {
                                r.timestamp_ms = s.timestamp_ms; // stamped by the broker
                            }
                        }
                        let key = |r: &Record| format!("{:?}", (&r.key, &r.value, &r.headers, &r.id));
                        let (mut a, mut b): (Vec<String>, Vec<String>) = (sent.iter().map(key).collect(), stored.iter().map(key).collect());
                        a.sort();
                        b.sort();
                        assert_eq!(a, b);
                    }
                    Err(status) => assert!(!status.message().is_empty(), "{status:?}"),
                }
            }
        });
    }
}

/// A local runtime for the deploy fuzzing, and the bytes of a real plugin to mutate.
fn plugin_host() -> &'static (tokio::runtime::Runtime, LocalRuntime, Bytes) {
    static HOST: OnceLock<(tokio::runtime::Runtime, LocalRuntime, Bytes)> = OnceLock::new();
    HOST.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let local = rt.block_on(async {
            let local = LocalRuntime::start().await.unwrap();
            local.create_topic("in", 1).await.unwrap();
            local
        });
        (rt, local, common::plugin_wasm("noop"))
    })
}

proptest! {
    #![proptest_config(cases(10))]

    /// Deploy: arbitrary bytes, and a real component with bytes changed, are refused with an
    /// error or deployed and run; the host never panics and stays usable.
    #[test]
    fn deploy_arbitrary_and_mutated_wasm(junk in proptest::collection::vec(any::<u8>(), 0..2000), edits in edits(), header in any::<bool>()) {
        let (rt, local, noop) = plugin_host();
        rt.block_on(async {
            let mut junk = junk;
            if header && junk.len() >= 8 {
                // the component preamble, so validation goes past the magic number
                junk[..8].copy_from_slice(&[0, b'a', b's', b'm', 0x0d, 0, 1, 0]);
            }
            assert!(local.deploy("junk", junk, "in", &[], &[]).await.is_err());
            let mut mutated = noop.to_vec();
            apply(&mut mutated, &edits);
            if local.deploy("mutant", mutated, "in", &[], &[]).await.is_ok() {
                local.publish("in", vec![Record::from_value("x")]).await.unwrap();
                let _ = local.run_until_idle().await;
                local.remove("mutant").await.unwrap();
            }
            // the host is still whole: a real plugin deploys and runs
            local.deploy("sound", noop.clone(), "in", &[], &[]).await.unwrap();
            local.publish("in", vec![Record::from_value("y")]).await.unwrap();
            local.run_until_idle().await.unwrap();
            local.remove("sound").await.unwrap();
        });
    }
}
