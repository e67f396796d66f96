//! When writes become durable: the fsync policy and the group-commit syncer.
//!
//! Writers apply their change to the store (fast, in memory), take a *ticket* from
//! [`Durability::written`], and under `always` wait until the syncer has synced past it. The
//! syncer thread loops: read the newest ticket, `sync()` the store, publish that ticket as
//! synced. Everything applied before the sync started is covered by it, so one fsync serves
//! every publish and commit that arrived while the previous one ran (group commit).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::Durable;

/// How eagerly writes are made durable (`--fsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Acknowledge only after the write is synced to disk (group commit). The default: an
    /// acknowledged record survives `kill -9` and power loss.
    Always,
    /// Acknowledge after the write reaches sled; sync every interval. A crash of the machine
    /// loses at most the last interval of acknowledged writes.
    Interval(Duration),
    /// Never sync while running (only at shutdown); the OS writes back when it likes.
    /// Fastest; a power loss can lose anything not yet written back.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(ms))),
                _ => Err(format!("unknown fsync policy {s:?}; use always, interval:<ms> (e.g. interval:100) or never")),
            },
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// The store could not be synced: acknowledged-durable writes may not be on disk. weir stops
/// (fail-stop, like PostgreSQL after a failed fsync): a later sync could report success for
/// pages the kernel already dropped, so the only safe state is the one a restart re-reads.
#[derive(Clone, Debug, thiserror::Error)]
#[error("syncing the store failed: {0}; the server stops (fail-stop): everything acknowledged before is on disk, restart it to carry on from there")]
pub struct SyncFailed(pub String);

/// Group commit for one store. Cheap to share behind an `Arc`.
pub struct Durability {
    policy: FsyncPolicy,
    store: Arc<dyn Durable>,
    /// Ticket of the newest applied write.
    written: AtomicU64,
    /// Ticket of the newest synced write, or the error that stopped syncing.
    synced: watch::Sender<Result<u64, SyncFailed>>,
    /// Wakes the syncer (the flag is "there is work or we are stopping").
    wake: Mutex<bool>,
    wake_cv: Condvar,
    stopping: std::sync::atomic::AtomicBool,
    /// Set once the syncer has made its last sync and returned: a write after that is never
    /// synced, and waiting for it answers an error instead of waiting forever.
    ended: std::sync::atomic::AtomicBool,
    /// Latency of each sync, for `weir bench` and metrics: (count, total micros).
    sync_stats: (AtomicU64, AtomicU64),
}

impl Durability {
    /// Starts the syncer thread for `store` under `policy`.
    pub fn start(
        store: Arc<dyn Durable>,
        policy: FsyncPolicy,
    ) -> (Arc<Self>, std::thread::JoinHandle<()>) {
        let (synced, _) = watch::channel(Ok(0));
        let this = Arc::new(Durability {
            policy,
            store,
            written: AtomicU64::new(0),
            synced,
            wake: Mutex::new(false),
            wake_cv: Condvar::new(),
            stopping: Default::default(),
            ended: Default::default(),
            sync_stats: Default::default(),
        });
        let runner = this.clone();
        let handle = std::thread::Builder::new()
            .name("weir-syncer".into())
            .spawn(move || runner.run())
            .expect("spawn syncer thread");
        (this, handle)
    }

    /// The policy in force.
    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// Records that a write was applied; returns its ticket.
    pub fn written(&self) -> u64 {
        let ticket = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        if self.policy == FsyncPolicy::Always {
            let mut flag = self.wake.lock().expect("wake lock");
            *flag = true;
            self.wake_cv.notify_one();
        }
        ticket
    }

    /// Waits until `ticket` is durable as the policy promises: synced under `always`,
    /// immediately otherwise.
    ///
    /// # Errors
    /// [`SyncFailed`] when a sync failed; the write must not be acknowledged.
    pub async fn durable(&self, ticket: u64) -> Result<(), SyncFailed> {
        if self.policy != FsyncPolicy::Always {
            return self.synced.borrow().clone().map(|_| ());
        }
        let mut rx = self.synced.subscribe();
        let result = rx
            .wait_for(|s| {
                s.as_ref().map_or(true, |&synced| synced >= ticket)
                    || self.ended.load(Ordering::SeqCst)
            })
            .await;
        match result {
            Ok(state) => match &*state {
                Ok(synced) if *synced < ticket => Err(SyncFailed(
                    "the store was closed (the server stopped) before this write was synced".into(),
                )),
                other => other.clone().map(|_| ()),
            },
            Err(_) => Err(SyncFailed("the syncer stopped".into())),
        }
    }

    /// Whether `ticket` is durable now, as [`Durability::durable`] would answer without
    /// waiting.
    ///
    /// # Errors
    /// [`SyncFailed`] when a sync failed.
    pub fn is_durable(&self, ticket: u64) -> Result<bool, SyncFailed> {
        match &*self.synced.borrow() {
            Err(failed) => Err(failed.clone()),
            Ok(synced) => Ok(self.policy != FsyncPolicy::Always || *synced >= ticket),
        }
    }

    /// Whether syncing has failed (writes must be refused).
    pub fn failed(&self) -> Option<SyncFailed> {
        self.synced.borrow().clone().err()
    }

    /// Waits until a sync fails; the server then stops.
    pub async fn failure(&self) -> SyncFailed {
        let mut rx = self.synced.subscribe();
        let failed = match rx.wait_for(|s| s.is_err()).await {
            Ok(state) => state.clone().err(),
            Err(_) => None,
        };
        match failed {
            Some(f) => f,
            None => std::future::pending().await,
        }
    }

    /// Syncs the store now, on the calling (blocking) thread: for rare metadata writes that
    /// are made durable under every policy. A failure stops the server like the syncer's.
    ///
    /// # Errors
    /// [`SyncFailed`].
    pub fn sync_now(&self) -> Result<(), SyncFailed> {
        if let Some(failed) = self.failed() {
            return Err(failed);
        }
        self.store.sync().map_err(|e| self.fail(e.to_string()))
    }

    /// Records a sync failure: every waiter and later write is refused.
    fn fail(&self, reason: String) -> SyncFailed {
        tracing::error!(message = "Sync failed; the server stops (fail-stop).", error = %reason);
        let failed = SyncFailed(reason);
        let _previous = self.synced.send_replace(Err(failed.clone()));
        failed
    }

    /// Number of syncs and their mean latency in microseconds.
    pub fn sync_stats(&self) -> (u64, u64) {
        let n = self.sync_stats.0.load(Ordering::Relaxed);
        let total = self.sync_stats.1.load(Ordering::Relaxed);
        (n, total.checked_div(n).unwrap_or(0))
    }

    /// Syncs whatever is outstanding and stops the syncer thread.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        *self.wake.lock().expect("wake lock") = true;
        self.wake_cv.notify_one();
    }

    fn run(&self) {
        let _blocking = weir_core::blocking::allow();
        loop {
            let stopping = {
                let mut flag = self.wake.lock().expect("wake lock");
                let timeout = match self.policy {
                    FsyncPolicy::Interval(d) => d,
                    _ => Duration::from_secs(3600),
                };
                if !*flag {
                    flag = self
                        .wake_cv
                        .wait_timeout(flag, timeout)
                        .expect("wake lock")
                        .0;
                }
                *flag = false;
                self.stopping.load(Ordering::SeqCst)
            };
            let target = self.written.load(Ordering::SeqCst);
            let already = matches!(*self.synced.borrow(), Ok(s) if s >= target);
            let due = match self.policy {
                FsyncPolicy::Never => stopping,
                _ => true,
            };
            if !already && due && self.synced.borrow().is_ok() {
                let started = std::time::Instant::now();
                let result = self.store.sync();
                weir_metrics::global()
                    .fsync_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.sync_stats.0.fetch_add(1, Ordering::Relaxed);
                self.sync_stats
                    .1
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                match result {
                    Ok(()) => {
                        let _previous = self.synced.send_replace(Ok(target));
                    }
                    Err(e) => {
                        self.fail(e.to_string());
                    }
                }
            }
            if stopping {
                // Waiters for writes the last sync did not cover are told, not left waiting.
                self.ended.store(true, Ordering::SeqCst);
                self.synced.send_modify(|_| {});
                return;
            }
        }
    }
}

/// A store whose every sync takes `delay` longer (it sleeps first): `weir serve
/// --debug-sync-delay-ms`, for tests that must catch plugin commits and publishes waiting for
/// durability with a `kill -9` (a slow disk: nothing becomes durable sooner or is acknowledged
/// earlier than with the store alone).
pub struct SlowSyncs {
    store: Arc<dyn Durable>,
    delay: Duration,
}

impl SlowSyncs {
    /// Wraps `store`.
    pub fn new(store: Arc<dyn Durable>, delay: Duration) -> SlowSyncs {
        SlowSyncs { store, delay }
    }
}

impl Durable for SlowSyncs {
    fn sync(&self) -> Result<(), crate::LogError> {
        std::thread::sleep(self.delay);
        self.store.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[test]
    fn parse_policies() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!(
            "interval:250".parse(),
            Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
        );
        for bad in ["", "sometimes", "interval:", "interval:0", "interval:x"] {
            let err = bad.parse::<FsyncPolicy>().unwrap_err();
            assert!(err.contains("interval:<ms>"), "{err}");
        }
        assert_eq!(
            FsyncPolicy::Interval(Duration::from_millis(7)).to_string(),
            "interval:7"
        );
    }

    #[tokio::test]
    async fn always_waits_for_a_sync_that_covers_the_ticket() {
        let (d, handle) = Durability::start(Arc::new(MemoryStore::new()), FsyncPolicy::Always);
        let tickets: Vec<u64> = (0..100).map(|_| d.written()).collect();
        for t in tickets {
            d.durable(t).await.unwrap();
        }
        let (syncs, _) = d.sync_stats();
        assert!(syncs >= 1 && syncs <= 100, "{syncs} syncs for 100 writes");
        d.stop();
        handle.join().unwrap();
    }

    /// A write made after the syncer stopped is never synced: waiting for it answers an
    /// error at once (an embedder's `stop` with plugin tasks still running used to leave them
    /// waiting forever), while writes the last sync covered stay durable.
    #[tokio::test]
    async fn a_write_after_the_syncer_stopped_is_refused_not_waited_for() {
        let (d, handle) = Durability::start(Arc::new(MemoryStore::new()), FsyncPolicy::Always);
        let before = d.written();
        d.stop();
        handle.join().unwrap();
        d.durable(before).await.unwrap();
        let after = d.written();
        let waited = tokio::time::timeout(Duration::from_secs(5), d.durable(after))
            .await
            .expect("waited for a write the stopped syncer will never sync");
        let err = waited.unwrap_err();
        assert!(err.0.contains("closed"), "{err:?}");
    }
}
