//! Crash test: `kill -9` a real `weir serve --fsync always` while concurrent idempotent
//! producers publish, over many cycles. Producers keep an unacknowledged batch across the
//! crash and retry it with the same producer id, epoch and sequence after the restart.
//!
//! Checked at the end: every acknowledged record is stored exactly once at the offset its
//! acknowledgement named, every partition's offsets are contiguous from 0, no record is stored
//! twice (retries of batches that were stored before the crash were recognised), and nothing
//! is stored that no producer sent.
//!
//! `WEIR_CRASH_CYCLES` (default 12) and `WEIR_CRASH_SEED` make runs longer or reproducible.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::idem::IdemProducer;
use common::WeirProcess;
use rand::{Rng, SeedableRng};
use weir_api::Client;
use weir_core::StartAt;
use weir_core::TopicConfig;

const PARTITIONS: u32 = 3;
const PRODUCERS: usize = 4;

/// Publishes until `stop`; returns the state (with at most one pending batch).
async fn run_producer(addr: String, mut p: IdemProducer, stop: Arc<AtomicBool>) -> IdemProducer {
    let Ok(client) = Client::connect(&addr).await else {
        return p;
    };
    while !stop.load(Ordering::Relaxed) {
        if let Err(status) = p.send(&client).await {
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::Internal
                ),
                "publish refused (not a crash symptom): {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    p
}

fn spawn_on(dir: &std::path::Path, port: u16) -> WeirProcess {
    WeirProcess::spawn_on_port(dir, port, &["--fsync", "always"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_publishes_survive_kill_9_exactly_once() {
    let cycles: usize = std::env::var("WEIR_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("WEIR_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test: {cycles} cycles, WEIR_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();

    let server = WeirProcess::spawn(dir.path(), "127.0.0.1:0", &["--fsync", "always"]);
    let port = server.port();
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic(&TopicConfig {
            name: "crash".into(),
            partitions: PARTITIONS,
            retention_ms: 0,
            retention_bytes: 0,
            admission: None,
        })
        .await
        .unwrap();
    let mut producers = Vec::new();
    for i in 0..PRODUCERS {
        let (id, epoch) = client.init_producer(None).await.unwrap();
        producers.push(IdemProducer::new(
            id,
            epoch,
            "crash",
            PARTITIONS,
            200,
            seed ^ i as u64,
        ));
    }
    drop(client);
    let mut server = Some(server);

    for cycle in 0..cycles {
        let process = server.take().unwrap_or_else(|| spawn_on(dir.path(), port));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = producers
            .drain(..)
            .map(|p| tokio::spawn(run_producer(process.addr.clone(), p, stop.clone())))
            .collect();
        let run_for = Duration::from_millis(rng.random_range(100..1200));
        tokio::time::sleep(run_for).await;
        process.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            producers.push(t.await.unwrap());
        }
        let acked: usize = producers.iter().map(|p| p.acked.len()).sum();
        let pending = producers.iter().filter(|p| p.pending.is_some()).count();
        println!("cycle {cycle}: killed after {run_for:?}; {acked} records acked so far, {pending} batches in doubt");
    }

    // Restart once more and let every producer resolve its batch in doubt by retrying it.
    let process = spawn_on(dir.path(), port);
    let client = Client::connect(&process.addr).await.unwrap();
    for p in producers.iter_mut().filter(|p| p.pending.is_some()) {
        p.send(&client).await.unwrap();
    }
    let duplicates: usize = producers.iter().map(|p| p.duplicates).sum();
    println!(
        "{duplicates} retried batches were recognised as already stored and not appended again"
    );

    // Read everything back.
    let info = client.describe_topic("crash").await.unwrap();
    let total: u64 = info.partitions.iter().map(|p| p.end_offset).sum();
    let mut subscription = client
        .subscribe("crash", &[], StartAt::Earliest, None)
        .await
        .unwrap();
    let mut stored: BTreeMap<(u32, u64), String> = BTreeMap::new();
    while (stored.len() as u64) < total {
        let batch = tokio::time::timeout(Duration::from_secs(20), subscription.next())
            .await
            .expect("read back")
            .unwrap()
            .unwrap();
        for r in batch {
            assert!(stored
                .insert((r.partition, r.offset), r.record.id.clone().unwrap())
                .is_none());
        }
    }
    for p in &info.partitions {
        let offsets: Vec<u64> = stored
            .keys()
            .filter(|(part, _)| *part == p.partition)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            offsets,
            (0..p.end_offset).collect::<Vec<_>>(),
            "partition {} offsets are contiguous from 0",
            p.partition
        );
    }
    let mut seen = HashMap::new();
    for (position, id) in &stored {
        if let Some(other) = seen.insert(id.clone(), *position) {
            panic!("record {id} stored twice, at {other:?} and {position:?}");
        }
    }
    let acked: HashMap<&String, &(u32, u64)> =
        producers.iter().flat_map(|p| p.acked.iter()).collect();
    for (id, position) in &acked {
        assert_eq!(
            seen.get(*id),
            Some(*position),
            "acknowledged record {id} is where its ack said"
        );
    }
    assert_eq!(
        seen.len(),
        acked.len(),
        "every stored record was acknowledged to its producer (no strays)"
    );
    assert!(
        acked.len() > 1000,
        "the test published too little to mean anything: {}",
        acked.len()
    );
    println!(
        "verified {} records in {} partitions after {cycles} kill -9 cycles",
        acked.len(),
        PARTITIONS
    );
    let status = process.terminate(Duration::from_secs(20));
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
}
