//! The broker's contract as one suite over two stores: the embedded single-writer log
//! (`MemoryStore`, which models sled's contract) and the shared log on JetStream (a real
//! 3-node cluster on loopback, started once per test process). `on_both_stores!(a, b)`
//! turns `async fn a(backend: Backend)` into `memory::a` and `jetstream::a` tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use weir_jetstream::{JetStreamLog, JetStreamOptions};
use weir_log::{Durability, FsyncPolicy, Log, MemoryStore};

use crate::{Broker, BrokerConfig};

/// A broker whose syncer thread is stopped on drop, releasing the store (and sled's lock).
pub(crate) struct TestBroker {
    pub(crate) broker: Arc<Broker>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

impl TestBroker {
    pub(crate) fn new(broker: Arc<Broker>, syncer: std::thread::JoinHandle<()>) -> Self {
        TestBroker {
            broker,
            syncer: Some(syncer),
        }
    }
}

impl std::ops::Deref for TestBroker {
    type Target = Arc<Broker>;
    fn deref(&self) -> &Arc<Broker> {
        &self.broker
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.broker.durability().stop();
        if let Some(t) = self.syncer.take() {
            t.join().unwrap();
        }
    }
}

pub(crate) fn broker_on(store: Arc<dyn Log>) -> TestBroker {
    broker_with(store, FsyncPolicy::Always)
}

pub(crate) fn broker_with(store: Arc<dyn Log>, policy: FsyncPolicy) -> TestBroker {
    // Opening reads the store: a blocking call the tests make directly.
    let _blocking = weir_core::blocking::allow();
    let (durability, syncer) = Durability::start(store.clone(), policy);
    TestBroker {
        broker: Broker::open(store, durability, BrokerConfig::default()).unwrap(),
        syncer: Some(syncer),
    }
}

pub(crate) fn memory_broker() -> TestBroker {
    broker_on(Arc::new(MemoryStore::new()))
}

/// The store a suite test runs on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Backend {
    Memory,
    JetStream,
}

impl Backend {
    /// A broker on a fresh store of this kind.
    pub(crate) fn broker(self) -> TestBroker {
        match self {
            Backend::Memory => memory_broker(),
            Backend::JetStream => jetstream_broker(&fresh_prefix()),
        }
    }
}

/// A prefix no other broker of this process uses: its own topics, producers and groups.
pub(crate) fn fresh_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "b{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A broker on the shared test cluster under `prefix` (two brokers with one prefix are two
/// weir nodes of one cluster).
pub(crate) fn jetstream_broker(prefix: &str) -> TestBroker {
    let urls = weir_cluster::shared_test_cluster("broker").unwrap_or_else(|e| panic!("{e}"));
    let mut options = JetStreamOptions::new(urls);
    options.prefix = prefix.into();
    // Opening blocks on the engine: not on the test's async thread.
    std::thread::scope(|s| {
        s.spawn(|| {
            let store: Arc<dyn Log> = Arc::new(JetStreamLog::connect(options).expect("connect"));
            let (durability, syncer) = Durability::start(store.clone(), FsyncPolicy::Always);
            TestBroker::new(
                Broker::open(store, durability, BrokerConfig::default()).expect("open"),
                syncer,
            )
        })
        .join()
        .expect("opening the broker")
    })
}

/// Runs each named `async fn(Backend)` as a test on each store.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::tests_suite::Backend::Memory).await
                }
            )*
        }
        mod jetstream {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::tests_suite::Backend::JetStream).await
                }
            )*
        }
    };
}
