//! The log's segment files: what a crash leaves at a segment's end, what retention gives
//! back, reads racing retention, and the index written only after its bytes are durable.

use std::path::Path;

use bytes::Bytes;

use super::*;
use crate::codec::{decode_chunk, encode_chunks};
use crate::{Durable, Log};
use weir_core::{Record, TopicConfig};

fn options(segment_bytes: u64) -> SledOptions {
    SledOptions {
        segment_bytes,
        ..SledOptions::default()
    }
}

/// `n` chunks of `per_chunk` records of about 100 bytes each, values numbered from `first`.
fn chunks(first: u64, n: usize, per_chunk: usize) -> Vec<crate::EncodedChunk> {
    (0..n)
        .flat_map(|c| {
            let records: Vec<Record> = (0..per_chunk)
                .map(|i| {
                    let v = first + (c * per_chunk + i) as u64;
                    Record::from_value(format!("{v:0100}"))
                })
                .collect();
            encode_chunks(&records, 1, usize::MAX)
        })
        .collect()
}

/// The values stored in a partition from `from`, read chunk by chunk through the store.
fn values(store: &SledStore, tp: &TopicPartition) -> Vec<u64> {
    let recovered = store.recover_partition(tp).unwrap();
    let mut out = Vec::new();
    for (base, _) in recovered.chunks {
        let bytes = store.read_chunk(tp, base).unwrap().expect("chunk present");
        for r in decode_chunk(&bytes, base, tp.partition).unwrap() {
            out.push(
                std::str::from_utf8(&r.record.value)
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
        }
    }
    out
}

fn segment_files(dir: &Path, tp: &TopicPartition) -> Vec<(String, u64)> {
    let part = dir
        .join("segments")
        .join(&tp.topic)
        .join(tp.partition.to_string());
    let mut files: Vec<(String, u64)> = std::fs::read_dir(part)
        .map(|entries| {
            entries
                .map(|e| e.unwrap())
                .map(|e| {
                    let len = e.metadata().unwrap().len();
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn records_round_trip_through_rolled_segments_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    {
        let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
        store.put_topic(&TopicConfig::new("t", 1)).unwrap();
        let mut next = 0;
        for _ in 0..20 {
            let batch = chunks(next, 4, 50);
            store.append(&tp, next, &batch, &[(7, b"state")]).unwrap();
            next += 200;
            // Readable before the sync, from the pending index.
            assert!(store.read_chunk(&tp, next - 50).unwrap().is_some());
        }
        store.sync().unwrap();
        assert_eq!(values(&store, &tp), (0..4000).collect::<Vec<_>>());
    }
    let files = segment_files(dir.path(), &tp);
    assert!(files.len() > 5, "{files:?}");
    assert!(files.iter().all(|(_, len)| *len <= 64 * 1024), "{files:?}");
    let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
    assert_eq!(values(&store, &tp), (0..4000).collect::<Vec<_>>());
    let recovered = store.recover_partition(&tp).unwrap();
    assert_eq!(recovered.producers, vec![(7, Bytes::from_static(b"state"))]);
}

/// The crash between a segment write and its index: the bytes of an append no sync covered
/// are on disk without an index entry (and after a power cut, possibly torn). Recovery cuts
/// them off; the producer state written with them was never stored either.
#[test]
fn an_unindexed_segment_tail_is_cut_off_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let durable_len;
    {
        let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
        store.put_topic(&TopicConfig::new("t", 1)).unwrap();
        store
            .append(&tp, 0, &chunks(0, 2, 10), &[(1, b"seq-19")])
            .unwrap();
        store.sync().unwrap();
        durable_len = segment_files(dir.path(), &tp)[0].1;
        // Written, never synced: the process dies before the group commit.
        store
            .append(&tp, 20, &chunks(20, 3, 10), &[(1, b"seq-49")])
            .unwrap();
        assert!(segment_files(dir.path(), &tp)[0].1 > durable_len);
    }
    // What a power cut can add: half a chunk of garbage at the end.
    let (name, _) = segment_files(dir.path(), &tp)[0].clone();
    let path = dir.path().join("segments/t/0").join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0xAB; 777]);
    std::fs::write(&path, bytes).unwrap();

    let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    let recovered = store.recover_partition(&tp).unwrap();
    assert_eq!(
        recovered.producers,
        vec![(1, Bytes::from_static(b"seq-19"))]
    );
    assert_eq!(values(&store, &tp), (0..20).collect::<Vec<_>>());
    assert_eq!(segment_files(dir.path(), &tp)[0].1, durable_len);
    // The partition carries on where the durable part ended.
    store.append(&tp, 20, &chunks(100, 1, 5), &[]).unwrap();
    store.sync().unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    let mut want: Vec<u64> = (0..20).collect();
    want.extend(100..105);
    assert_eq!(values(&store, &tp), want);
}

/// Under `--fsync never` the index goes to sled at once, so a power cut can keep an index
/// entry whose bytes never reached the disk: the partition then ends before it, and the
/// store still opens.
#[test]
fn an_index_entry_past_its_segment_end_ends_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let never = SledOptions {
        index_after_sync: false,
        ..SledOptions::default()
    };
    let first_len;
    {
        let store = SledStore::open(dir.path(), &never).unwrap();
        store.put_topic(&TopicConfig::new("t", 1)).unwrap();
        store.append(&tp, 0, &chunks(0, 1, 10), &[]).unwrap();
        store.sync().unwrap();
        first_len = segment_files(dir.path(), &tp)[0].1;
        store.append(&tp, 10, &chunks(10, 2, 10), &[]).unwrap();
        store.sync().unwrap();
    }
    let (name, _) = segment_files(dir.path(), &tp)[0].clone();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("segments/t/0").join(name))
        .unwrap();
    file.set_len(first_len + 10).unwrap();
    let store = SledStore::open(dir.path(), &never).unwrap();
    assert_eq!(values(&store, &tp), (0..10).collect::<Vec<_>>());
    assert_eq!(segment_files(dir.path(), &tp)[0].1, first_len);
}

/// Retention deletes whole segments: four retention windows written in a row leave about one
/// window on disk, and what the partition still holds reads back.
#[test]
fn retention_gives_whole_segments_back() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let window: u64 = 1024 * 1024;
    let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    store
        .put_topic(&TopicConfig::new("t", 1).with_retention_bytes(window))
        .unwrap();
    let mut next = 0;
    let mut kept: std::collections::BTreeMap<u64, u64> = Default::default();
    while next < 4 * window / 100 {
        let batch = chunks(next, 10, 100);
        store.append(&tp, next, &batch, &[]).unwrap();
        for c in &batch {
            kept.insert(next, c.bytes.len() as u64);
            next += u64::from(c.header.count);
        }
        store.sync().unwrap();
        // The broker's plan: drop the oldest chunks while the partition is over the window.
        let mut size: u64 = kept.values().sum();
        let mut remove = Vec::new();
        while size > window {
            let (&base, &len) = kept.iter().next().unwrap();
            kept.remove(&base);
            size -= len;
            remove.push(base);
        }
        if !remove.is_empty() {
            let start = *kept.keys().next().unwrap();
            store.trim(&tp, &remove, start).unwrap();
        }
    }
    let on_disk: u64 = segment_files(dir.path(), &tp).iter().map(|f| f.1).sum();
    assert!(
        on_disk <= window + window / 4 + 64 * 1024,
        "{on_disk} bytes in segments for a {window}-byte window: {:?}",
        segment_files(dir.path(), &tp)
    );
    let start = *kept.keys().next().unwrap();
    assert_eq!(values(&store, &tp), (start..next).collect::<Vec<_>>());
}

/// Retention deletes a segment while readers are in it: every read returns the chunk's bytes
/// whole or nothing (trimmed), never an error or a torn chunk.
#[test]
fn a_segment_deleted_under_readers_reads_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let store = std::sync::Arc::new(SledStore::open(dir.path(), &options(64 * 1024)).unwrap());
    store.put_topic(&TopicConfig::new("t", 1)).unwrap();
    let mut bases = Vec::new();
    let mut next = 0;
    for _ in 0..40 {
        let batch = chunks(next, 2, 50);
        store.append(&tp, next, &batch, &[]).unwrap();
        for c in &batch {
            bases.push(next);
            next += u64::from(c.header.count);
        }
    }
    store.sync().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, tp, bases, stop) = (store.clone(), tp.clone(), bases.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut whole = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for &base in &bases {
                        if let Some(bytes) = store.read_chunk(&tp, base).unwrap() {
                            let records = decode_chunk(&bytes, base, 0).expect("a whole chunk");
                            assert_eq!(records.len(), 50);
                            whole += 1;
                        }
                    }
                }
                whole
            })
        })
        .collect();
    for (i, chunk) in bases.chunks(8).enumerate() {
        let start = bases.get((i + 1) * 8).copied().unwrap_or(next);
        store.trim(&tp, chunk, start).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert!(segment_files(dir.path(), &tp).len() <= 1);
}

/// A crash after retention's trim was durable but before its segment file was deleted, a
/// segment created and written but never indexed, an empty one a failed roll left between
/// indexed ones: recovery deletes those files.
#[test]
fn segments_no_index_entry_points_into_are_deleted_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let part = dir.path().join("segments/t/0");
    let (first, first_bytes, start);
    {
        let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
        store.put_topic(&TopicConfig::new("t", 1)).unwrap();
        store.append(&tp, 0, &chunks(0, 30, 50), &[]).unwrap();
        store.sync().unwrap();
        let files = segment_files(dir.path(), &tp);
        assert!(files.len() >= 3, "{files:?}");
        first = files[0].0.clone();
        first_bytes = std::fs::read(part.join(&first)).unwrap();
        start = files[1].0[..20].parse::<u64>().unwrap();
        let bases: Vec<u64> = (0..start).step_by(50).collect();
        store.trim(&tp, &bases, start).unwrap();
        assert!(!part.join(&first).exists());
    }
    let kept = segment_files(dir.path(), &tp);
    // The trimmed segment is back (its deletion never reached the disk), and a segment after
    // the last was created but never indexed.
    std::fs::write(part.join(&first), &first_bytes).unwrap();
    std::fs::write(part.join(format!("{:020}.seg", 10_000u64)), b"junk").unwrap();
    // And an empty one between indexed segments (a roll that failed and was retried).
    std::fs::write(part.join(format!("{:020}.seg", start + 1)), b"").unwrap();
    let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
    assert_eq!(values(&store, &tp), (start..1500).collect::<Vec<_>>());
    assert_eq!(segment_files(dir.path(), &tp), kept);
}

/// The ordering recovery relies on: an append's index entry and the producer state written
/// with it reach sled only in the sync that made its bytes durable, never before.
#[test]
fn the_index_reaches_sled_only_in_the_sync_that_made_its_bytes_durable() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    store.put_topic(&TopicConfig::new("t", 1)).unwrap();
    store
        .append(&tp, 0, &chunks(0, 2, 10), &[(3, b"seq-19")])
        .unwrap();
    let tree = store.part(&tp).unwrap();
    assert_eq!(tree.scan_prefix(b"i").count(), 0, "indexed before its sync");
    assert!(tree.get(producer_key(3)).unwrap().is_none());
    assert!(
        store.read_chunk(&tp, 10).unwrap().is_some(),
        "served while pending"
    );
    store.sync().unwrap();
    assert_eq!(tree.scan_prefix(b"i").count(), 2);
    assert_eq!(
        tree.get(producer_key(3)).unwrap().unwrap().as_ref(),
        b"seq-19"
    );
    // Under `--fsync never` nothing syncs while running: the index is written at once.
    let never_dir = tempfile::tempdir().unwrap();
    let never = SledStore::open(
        never_dir.path(),
        &SledOptions {
            index_after_sync: false,
            ..SledOptions::default()
        },
    )
    .unwrap();
    never.put_topic(&TopicConfig::new("t", 1)).unwrap();
    never.append(&tp, 0, &chunks(0, 2, 10), &[]).unwrap();
    assert_eq!(never.part(&tp).unwrap().scan_prefix(b"i").count(), 2);
}

/// Descriptors of this process open on files under `dir`.
fn open_fds_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// Only the segments being written keep a descriptor: a partition with many segments does
/// not hold one per segment (a long-lived server would run out of them).
#[test]
fn descriptors_stay_bounded_by_the_partitions_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let tp = TopicPartition::new("t", 0);
    let store = SledStore::open(&root, &options(64 * 1024)).unwrap();
    store.put_topic(&TopicConfig::new("t", 1)).unwrap();
    let mut next = 0;
    for _ in 0..30 {
        store.append(&tp, next, &chunks(next, 4, 50), &[]).unwrap();
        next += 200;
        store.sync().unwrap();
    }
    assert!(segment_files(&root, &tp).len() > 10);
    let open = open_fds_under(&root.join("segments"));
    assert!(open <= 2, "{open} descriptors open on segment files");
    // Old segments still read (each read opens its own descriptor).
    assert_eq!(values(&store, &tp), (0..next).collect::<Vec<_>>());
    assert!(open_fds_under(&root.join("segments")) <= 2);
}

/// An append that fails to create its next segment stores nothing, and the partition takes
/// the same append again once the cause is gone.
#[test]
fn an_append_that_fails_to_roll_leaves_the_partition_writable() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
    store.put_topic(&TopicConfig::new("t", 1)).unwrap();
    store.append(&tp, 0, &chunks(0, 10, 50), &[]).unwrap();
    store.sync().unwrap();
    // Whatever base the next roll takes, a directory in its place makes the create fail.
    let part = dir.path().join("segments/t/0");
    let blockers: Vec<_> = (500..1500)
        .step_by(50)
        .map(|b| part.join(format!("{b:020}.seg")))
        .filter(|p| !p.exists())
        .collect();
    for b in &blockers {
        std::fs::create_dir(b).unwrap();
    }
    let err = store
        .append(&tp, 500, &chunks(500, 10, 50), &[(1, b"s")])
        .unwrap_err();
    assert!(matches!(err, LogError::Io { .. }), "{err}");
    for b in &blockers {
        std::fs::remove_dir(b).unwrap();
    }
    store
        .append(&tp, 500, &chunks(500, 10, 50), &[(1, b"s")])
        .unwrap();
    store.sync().unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
    assert_eq!(values(&store, &tp), (0..1000).collect::<Vec<_>>());
}

/// Entries whose segment is gone at the start of a partition (a crash in the middle of a
/// topic's deletion): the start moves past them, and stays moved across restarts.
#[test]
fn a_start_moved_past_missing_segments_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    {
        let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
        store.put_topic(&TopicConfig::new("t", 1)).unwrap();
        store.append(&tp, 0, &chunks(0, 30, 50), &[]).unwrap();
        store.sync().unwrap();
    }
    let files = segment_files(dir.path(), &tp);
    let second: u64 = files[1].0[..20].parse().unwrap();
    std::fs::remove_file(dir.path().join("segments/t/0").join(&files[0].0)).unwrap();
    for _ in 0..2 {
        let store = SledStore::open(dir.path(), &options(64 * 1024)).unwrap();
        let recovered = store.recover_partition(&tp).unwrap();
        assert_eq!(recovered.start_offset, second);
        assert_eq!(values(&store, &tp), (second..1500).collect::<Vec<_>>());
    }
}

/// A read that looked a chunk up before its topic was deleted and created again must not
/// read the new topic's segment of the same name (base 0 is every new topic's first).
#[test]
fn a_read_begun_before_a_topic_was_recreated_reads_nothing_of_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let tp = TopicPartition::new("t", 0);
    let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    let config = TopicConfig::new("t", 1);
    store.put_topic(&config).unwrap();
    store.append(&tp, 0, &chunks(0, 1, 10), &[]).unwrap();
    store.sync().unwrap();
    let generation = store.segments.generation("t");
    let old = store.part(&tp).unwrap().get(index_key(0)).unwrap().unwrap();
    let old = segment::Loc::decode(&old).unwrap();
    store.delete_topic(&config).unwrap();
    store.put_topic(&config).unwrap();
    store.append(&tp, 0, &chunks(500, 1, 10), &[]).unwrap();
    store.sync().unwrap();
    assert!(store
        .segments
        .read(&tp, &old, generation)
        .unwrap()
        .is_none());
    assert_eq!(values(&store, &tp), (500..510).collect::<Vec<_>>());
}
