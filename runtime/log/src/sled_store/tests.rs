//! The embedded store on disk: key-value values of any size and their durability, the move
//! of weir-log/3's namespaces into redb, foreign and newer directories.

use super::format::FORMAT_KEY;
use super::*;
use crate::{KvStore, Log, FRAGMENT_MAX_BYTES};

/// The files a crash would leave of a store still open in this process (its locks keep it
/// from being opened again here): a copy of the directory's files.
fn crash_image(dir: &std::path::Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    copy
}

fn value(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const SIZES: [usize; 6] = [
    0,
    1,
    FRAGMENT_MAX_BYTES - 1,
    FRAGMENT_MAX_BYTES,
    100_000,
    3_000_000,
];

#[test]
fn kv_values_of_any_size_round_trip_and_only_synced_commits_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
        let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = SIZES
            .iter()
            .map(|&n| (format!("o/{n:08}").into_bytes(), Some(value(n, 1))))
            .collect();
        store.kv_apply("plugin/p", &writes).unwrap();
        store
            .kv_apply(
                "plugin/p",
                &[
                    (b"o/00100000".to_vec(), Some(b"small".to_vec())),
                    (b"o/03000000".to_vec(), None),
                ],
            )
            .unwrap();
        store.kv_apply("plugin/gone", &writes[..1]).unwrap();
        store.kv_drop("plugin/gone").unwrap();
        store.sync().unwrap();
        // Written after the last sync: a crash (the store forgotten without a close) loses it.
        store
            .kv_apply("plugin/p", &[(b"o/late".to_vec(), Some(b"x".to_vec()))])
            .unwrap();
        assert!(store.kv_get("plugin/p", b"o/late").unwrap().is_some());
        std::mem::forget(store);
    }
    let copy = crash_image(dir.path());
    let store = SledStore::open(copy.path(), &SledOptions::default()).unwrap();
    let scanned = store.kv_scan("plugin/p", b"o/").unwrap();
    assert_eq!(scanned.len(), SIZES.len() - 1, "o/late is gone");
    for (key, got) in &scanned {
        let n: usize = std::str::from_utf8(&key[2..]).unwrap().parse().unwrap();
        let want = if n == 100_000 {
            b"small".to_vec()
        } else {
            value(n, 1)
        };
        assert_eq!(got.as_ref(), &want[..], "value of {n} bytes");
        assert_eq!(store.kv_get("plugin/p", key).unwrap().unwrap(), *got);
    }
    assert_eq!(store.kv_scan_first("plugin/p", b"o/", 2).unwrap().len(), 2);
    assert!(store.kv_scan("plugin/gone", b"").unwrap().is_empty());
    assert!(store.kv_get("never/written", b"k").unwrap().is_none());
}

/// A weir-log/3 store's namespaces (sled trees, large values in fragments) move into redb at
/// open, whole; a crash after the move's commit and before the trees were dropped only drops
/// them the next time — nothing is copied twice, nothing older comes back.
#[test]
fn a_weir_log_3_stores_namespaces_move_to_redb() {
    const APPLIED: &[u8] = b"\xff\xffapplied";
    let dir = tempfile::tempdir().unwrap();
    drop(SledStore::open(dir.path(), &SledOptions::default()).unwrap());
    // What an open killed inside redb's creation of the file can leave: zeroes, which redb
    // refuses. Before the marker says weir-log/4 the file holds nothing yet and is replaced.
    std::fs::write(dir.path().join(super::redb_kv::FILE), vec![0u8; 4096]).unwrap();
    let old: Vec<(Vec<u8>, Vec<u8>)> = SIZES
        .iter()
        .map(|&n| (format!("o/{n:08}").into_bytes(), value(n, 2)))
        .collect();
    let write_old = |path: &std::path::Path| {
        let db = sled::Config::new()
            .path(path)
            .segment_size(SEGMENT_BYTES)
            .open()
            .unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(FORMAT_KEY, "weir-log/3")
            .unwrap();
        super::kv::write_sled_namespace(&db, "plugin/p", &old).unwrap();
        // A cluster node's cache keeps its changelog position under a key starting with 0xFF,
        // like the fragments' keys: it moves, the fragments do not.
        let position = 7u64.to_be_bytes().to_vec();
        super::kv::write_sled_namespace(&db, "cluster", &[(APPLIED.to_vec(), position)]).unwrap();
        super::kv::write_sled_namespace(&db, "plugins", &[(b"p".to_vec(), b"{}".to_vec())])
            .unwrap();
        db.flush().unwrap();
    };
    write_old(dir.path());
    let check = |store: &SledStore| {
        let scanned = store.kv_scan("plugin/p", b"").unwrap();
        assert_eq!(scanned.len(), old.len());
        for ((k, v), (ok, ov)) in scanned.iter().zip(&old) {
            assert_eq!((k.as_ref(), v.as_ref()), (ok.as_slice(), ov.as_slice()));
        }
        assert_eq!(
            store.kv_get("plugins", b"p").unwrap().unwrap().as_ref(),
            b"{}"
        );
        let cluster = store.kv_scan("cluster", b"").unwrap();
        assert_eq!(cluster.len(), 1);
        assert_eq!(
            (cluster[0].0.as_ref(), cluster[0].1.as_ref()),
            (APPLIED, &7u64.to_be_bytes()[..])
        );
    };
    {
        let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
        check(&store);
        let names = store.db.tree_names();
        assert!(
            !names.iter().any(|n| n.starts_with(b"kv/")),
            "sled's namespace trees are dropped"
        );
        assert_eq!(
            store.meta.get(FORMAT_KEY).unwrap().unwrap().as_ref(),
            format!("weir-log/{FORMAT_VERSION}").as_bytes()
        );
    }
    // As if a crash had come between the move and the drop: the trees are back (with other
    // values), the move is marked done.
    {
        let db = sled::Config::new()
            .path(dir.path())
            .segment_size(SEGMENT_BYTES)
            .open()
            .unwrap();
        super::kv::write_sled_namespace(&db, "plugin/p", &[(b"o/stale".to_vec(), b"x".to_vec())])
            .unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    check(&store);
    assert!(!store.db.tree_names().iter().any(|n| n.starts_with(b"kv/")));
    drop(store);
    // A weir-log/4 directory without its key-value file is refused, not opened without every
    // plugin's state.
    std::fs::remove_file(dir.path().join(super::redb_kv::FILE)).unwrap();
    let err = SledStore::open(dir.path(), &SledOptions::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("kv.redb (the plugins' state) is missing"),
        "{err}"
    );
}

/// Under `--fsync never` a thread writes the namespaces out every interval: once the interval
/// passed, a commit is in what a crash leaves, without any sync.
#[test]
fn under_never_the_namespaces_are_written_out_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let options = SledOptions {
        background_flush_ms: Some(50),
        index_after_sync: false,
        ..SledOptions::default()
    };
    let store = SledStore::open(dir.path(), &options).unwrap();
    store
        .kv_apply("plugin/p", &[(b"c/".to_vec(), Some(b"cursor".to_vec()))])
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let copy = crash_image(dir.path());
    drop(store);
    let store = SledStore::open(copy.path(), &SledOptions::default()).unwrap();
    assert_eq!(
        store.kv_get("plugin/p", b"c/").unwrap().unwrap().as_ref(),
        b"cursor"
    );
}

/// A directory another store holds open is refused, after the short wait for a lock a
/// closing store may still hold, with a message that names the likely cause.
#[test]
fn a_directory_in_use_is_refused_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let held = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    let started = std::time::Instant::now();
    let err = SledStore::open(dir.path(), &SledOptions::default())
        .err()
        .expect("a second store on a directory in use");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "refused before the wait"
    );
    let text = err.to_string();
    assert!(
        text.contains("is another `weir serve` using this directory?"),
        "{text}"
    );
    drop(held);
}

#[test]
fn foreign_corrupt_and_newer_directories_are_clear_errors_and_version_1_migrates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let err = SledStore::open(dir.path(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("not a weir store") && err.contains("notes.txt"),
        "{err}"
    );

    let other = tempfile::tempdir().unwrap();
    {
        let db = sled::open(other.path()).unwrap();
        db.insert("someone", "else").unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(other.path(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("is not a weir store: a sled database with another segment size"),
        "{err}"
    );
    let marked = tempfile::tempdir().unwrap();
    {
        let db = sled::Config::new()
            .path(marked.path())
            .segment_size(SEGMENT_BYTES)
            .open()
            .unwrap();
        db.insert("someone", "else").unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(marked.path(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("without weir's format marker"), "{err}");

    let corrupt = tempfile::tempdir().unwrap();
    drop(SledStore::open(corrupt.path(), &Default::default()).unwrap());
    std::fs::write(corrupt.path().join("conf"), b"\xff\xfe garbage").unwrap();
    let err = SledStore::open(corrupt.path(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cannot open the store"), "{err}");

    // A store written by weir before the format version 2 opens and is marked version 2;
    // one written by a newer weir is refused, saying so.
    let v1 = tempfile::tempdir().unwrap();
    drop(SledStore::open(v1.path(), &Default::default()).unwrap());
    {
        let db = sled::Config::new()
            .path(v1.path())
            .segment_size(SEGMENT_BYTES)
            .open()
            .unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(FORMAT_KEY, "weir-log/1")
            .unwrap();
        db.flush().unwrap();
    }
    drop(SledStore::open(v1.path(), &Default::default()).unwrap());
    {
        let db = sled::Config::new()
            .path(v1.path())
            .segment_size(SEGMENT_BYTES)
            .open()
            .unwrap();
        let meta = db.open_tree("meta").unwrap();
        assert_eq!(
            meta.get(FORMAT_KEY).unwrap().unwrap().as_ref(),
            format!("weir-log/{FORMAT_VERSION}").as_bytes()
        );
        meta.insert(FORMAT_KEY, "weir-log/9").unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(v1.path(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("written by a newer weir (format weir-log/9"),
        "{err}"
    );
}

/// What a deleted topic leaves — a partition tree a publish in flight during the delete
/// re-opened and wrote to, group offsets — never comes back into a new topic of its name.
#[test]
fn a_recreated_topic_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), &SledOptions::default()).unwrap();
    let config = weir_core::TopicConfig::new("t", 1);
    let tp = TopicPartition::new("t", 0);
    let records = vec![weir_core::Record::from_value("old")];
    store.put_topic(&config).unwrap();
    store.put_group_offsets("g", "t", &[(0, 1)], 0).unwrap();
    store.delete_topic(&config).unwrap();
    // The publish in flight: it recovers (re-opens) the partition and appends.
    store.recover_partition(&tp).unwrap();
    store
        .append(
            &tp,
            0,
            &crate::codec::encode_chunks(&records, 0, 1 << 15),
            &[],
        )
        .unwrap();
    store.put_topic(&config).unwrap();
    let recovered = store.recover_partition(&tp).unwrap();
    assert!(recovered.chunks.is_empty(), "{:?}", recovered.chunks);
    assert!(store.group_offsets("g", "t").unwrap().is_empty());
}

/// A log sync that fails under a sync holding key-value commits back leaves them out of what
/// a later open finds, even after the store is dropped: redb's close would otherwise make
/// them durable (cursors past records the failed sync may have lost).
#[test]
fn commits_held_back_by_a_failed_log_sync_never_become_durable() {
    let dir = tempfile::tempdir().unwrap();
    let kv = super::redb_kv::RedbKv::open(dir.path(), 1 << 20).unwrap();
    kv.apply("plugin/p", &[(b"c/".to_vec(), Some(b"early".to_vec()))])
        .unwrap();
    kv.sync().unwrap();
    kv.apply("plugin/p", &[(b"c/".to_vec(), Some(b"late".to_vec()))])
        .unwrap();
    let failed = kv.sync_around(|| {
        Err(LogError::Io {
            path: dir.path().join("segments"),
            source: std::io::Error::other("fdatasync failed"),
        })
    });
    assert!(failed.is_err());
    drop(kv);
    let image = crash_image(dir.path());
    let kv = super::redb_kv::RedbKv::open(image.path(), 1 << 20).unwrap();
    assert_eq!(
        kv.get("plugin/p", b"c/").unwrap().unwrap().as_ref(),
        b"early"
    );
}

/// A commit made while a sync holds the log's sync (`interval`, `never`) waits for it and is
/// not made durable with it: what a crash right after that sync leaves holds the commits from
/// before it only, so no cursor is durable ahead of records the log's sync did not cover.
#[test]
fn a_commit_made_during_the_logs_sync_waits_and_is_not_made_durable_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let kv = std::sync::Arc::new(super::redb_kv::RedbKv::open(dir.path(), 1 << 20).unwrap());
    kv.apply("plugin/p", &[(b"c/".to_vec(), Some(b"early".to_vec()))])
        .unwrap();
    let mut late = None;
    kv.sync_around(|| {
        let writer = kv.clone();
        let started = std::time::Instant::now();
        late = Some(std::thread::spawn(move || {
            writer
                .apply("plugin/p", &[(b"c/".to_vec(), Some(b"late".to_vec()))])
                .unwrap();
            started.elapsed()
        }));
        std::thread::sleep(std::time::Duration::from_millis(200));
        Ok(())
    })
    .unwrap();
    let waited = late.unwrap().join().unwrap();
    assert!(
        waited >= std::time::Duration::from_millis(200),
        "the commit went ahead during the log's sync ({waited:?})"
    );
    let image = crash_image(dir.path());
    let reopened = super::redb_kv::RedbKv::open(image.path(), 1 << 20).unwrap();
    assert_eq!(
        reopened.get("plugin/p", b"c/").unwrap().unwrap().as_ref(),
        b"early"
    );
    assert_eq!(
        kv.get("plugin/p", b"c/").unwrap().unwrap().as_ref(),
        b"late"
    );
}
