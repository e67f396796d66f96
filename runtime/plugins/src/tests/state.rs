//! Partitions sharing state: the commit's optimistic check against what a batch read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use super::fakes::{rec, FakePlugin};
use super::harness::{spec, Harness};
use crate::spec::OnError;

/// A batch on partition 0 reads `k` at version 1 and waits; partition 1 deletes `k` and puts
/// it again in one commit, which brings it back to version 1 with another value. The waiting
/// batch's commit must conflict and run again on the new value: checked by version alone, it
/// would overwrite a value it never read (a lost update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_and_put_again_at_the_version_a_batch_read_makes_it_conflict() {
    let (read_tx, read_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (read_tx, go_rx) = (Mutex::new(read_tx), Mutex::new(go_rx));
    let waited = AtomicBool::new(false);
    let plugin = FakePlugin::new(move |r, ctx| {
        match r.value {
            b"init" => ctx.put("k", 1),
            b"del" => ctx.delete("k"),
            b"set7" => ctx.put("k", 7),
            b"add100" => {
                let read = ctx.get("k").unwrap_or(0);
                // The first run waits for partition 1's commit; a re-run goes straight on.
                if !waited.swap(true, Ordering::SeqCst) {
                    read_tx.lock().unwrap().send(()).unwrap();
                    go_rx.lock().unwrap().recv().unwrap();
                }
                ctx.put("k", read + 100);
            }
            other => return Err(format!("unknown {other:?}")),
        }
        Ok(())
    });
    let mut h = Harness::new(2, None);
    h.start(spec(2, OnError::Halt), plugin);
    h.input.append("in", 1, vec![rec("a", "init", Some("i1"))]);
    h.idle().await;
    assert_eq!(h.state("k"), Some(1));
    h.input
        .append("in", 0, vec![rec("a", "add100", Some("i2"))]);
    tokio::task::spawn_blocking(move || read_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("partition 0 read k");
    h.input.append(
        "in",
        1,
        vec![rec("a", "del", Some("i3")), rec("a", "set7", Some("i4"))],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.rt().status.lock()[1].committed < 3 {
        assert!(Instant::now() < deadline, "partition 1 did not commit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.state("k"), Some(7), "deleted and put again, at version 1");
    go_tx.send(()).unwrap();
    h.idle().await;
    assert_eq!(
        h.state("k"),
        Some(107),
        "the batch ran again on the value it had not read"
    );
    h.stop().await;
}
