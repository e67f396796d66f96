//! The harness: a plugin's partition tasks and forwarders running over the fakes, with the
//! waits and reads the tests need.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weir_log::{Durability, FsyncPolicy, MemoryStore};

use super::fakes::{parse, FakeInput, FakeOutput, NoProbes};
use weir_wasm::Limits;

use crate::forwarder::Forwarder;
use crate::io::Input as _;
use crate::partition::PartitionTask;
use crate::processor::Plugin;
use crate::runtime::{PluginRuntime, Seams};
use crate::spec::{DedupWindow, OnError, PluginSpec};
use crate::store::{KvPluginStore, PluginStore};

/// A plugin's tasks running over fakes.
pub struct Harness {
    pub input: Arc<FakeInput>,
    pub output: Arc<FakeOutput>,
    pub store: Arc<dyn PluginStore>,
    pub durability: Arc<Durability>,
    syncer: Option<std::thread::JoinHandle<()>>,
    pub runtime: Option<Arc<PluginRuntime>>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A spec reading `in` (with `partitions`) and emitting to `out`.
pub fn spec(partitions: u32, on_error: OnError) -> PluginSpec {
    PluginSpec {
        name: "p".into(),
        version: 1,
        wasm_sha256: String::new(),
        input: "in".into(),
        outputs: vec!["out".into(), "p.dlq".into()],
        config: Vec::new(),
        limits: Limits::default(),
        on_error,
        max_attempts: 2,
        max_batch: 100,
        dedup: DedupWindow::default(),
        producer_ids: (1..=partitions as u64).collect(),
        paused: false,
        owner: None,
        alerts: Default::default(),
        max_rate: 0,
        commit: Default::default(),
        restarts: 0,
    }
}

impl Harness {
    /// Seams over a fresh memory store (or `store`, to wrap it), topics `in` and `out`.
    pub fn new(partitions: u32, store: Option<Arc<dyn weir_log::Store>>) -> Harness {
        let memory = Arc::new(MemoryStore::new());
        let kv: Arc<dyn weir_log::Store> = store.unwrap_or_else(|| memory.clone());
        Harness::synced_by(partitions, kv.clone(), kv, FsyncPolicy::Never)
    }

    /// Seams over `kv`, whose writes `syncs` makes durable under `policy`.
    pub fn synced_by(
        partitions: u32,
        kv: Arc<dyn weir_log::Store>,
        syncs: Arc<dyn weir_log::Durable>,
        policy: FsyncPolicy,
    ) -> Harness {
        let (durability, syncer) = Durability::start(syncs, policy);
        let input = Arc::new(FakeInput::default());
        input.topic("in", partitions);
        let output = Arc::new(FakeOutput::default());
        output.topic("out", 2);
        output.topic("p.dlq", partitions);
        Harness {
            input,
            output,
            store: Arc::new(KvPluginStore::new(kv)),
            durability,
            syncer: Some(syncer),
            runtime: None,
            cancel: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// A "node" of a cluster: its own memory cache, the plugins' changelogs in `changelog`,
    /// the broker (`input`, `output`) shared with the other nodes.
    pub fn node(
        changelog: Arc<weir_log::MemoryChangelog>,
        input: Arc<FakeInput>,
        output: Arc<FakeOutput>,
        snapshot_every: u64,
    ) -> Harness {
        let local = Arc::new(MemoryStore::new());
        let (durability, syncer) = Durability::start(local.clone(), FsyncPolicy::Never);
        let kv = weir_log::ReplicatedKv::new(local, changelog, KvPluginStore::OWNED_PREFIX)
            .with_snapshot_every(snapshot_every);
        Harness {
            input,
            output,
            store: Arc::new(KvPluginStore::replicated(Arc::new(kv))),
            durability,
            syncer: Some(syncer),
            runtime: None,
            cancel: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// Starts `plugin` under `spec` (its cursors start at 0 unless stored).
    pub fn start(&mut self, spec: PluginSpec, plugin: Arc<dyn Plugin>) {
        let seams = Seams {
            input: self.input.clone(),
            output: self.output.clone(),
            store: self.store.clone(),
            durability: self.durability.clone(),
            probes: Arc::new(NoProbes),
            cluster: None,
        };
        let runtime = {
            let _blocking = weir_core::blocking::allow();
            PluginRuntime::open(spec, plugin, seams, 1 << 20, true).unwrap()
        };
        self.cancel = CancellationToken::new();
        for p in 0..runtime.spec.partitions() {
            self.tasks.push(tokio::spawn(
                PartitionTask::new(runtime.clone(), p, self.cancel.clone()).run(),
            ));
            self.tasks.push(tokio::spawn(
                Forwarder::new(runtime.clone(), p).run(self.cancel.clone()),
            ));
        }
        // As the manager: the compactor folds deltas (and in the cluster takes snapshots).
        self.tasks.push(tokio::spawn(
            runtime.clone().run_compactor(self.cancel.clone()),
        ));
        self.runtime = Some(runtime);
    }

    /// Stops the tasks (as at shutdown: nothing half-done is committed).
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            t.await.unwrap();
        }
        self.runtime = None;
    }

    pub fn rt(&self) -> &Arc<PluginRuntime> {
        self.runtime.as_ref().expect("started")
    }

    /// Waits until every input partition is committed to its end and the outbox is empty.
    pub async fn idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rt = self.rt();
            let ends: Vec<u64> = (0..rt.spec.partitions())
                .map(|p| *self.input.watch("in", p).unwrap().borrow())
                .collect();
            let committed: Vec<u64> = rt.status.lock().iter().map(|s| s.committed).collect();
            let pending = {
                let _blocking = weir_core::blocking::allow();
                self.store.pending_outputs("p").unwrap()
            };
            let gaps = self.output.gaps.lock().clone();
            assert!(
                gaps.is_empty(),
                "publishes the broker refuses for good: {gaps:?}"
            );
            if committed == ends && pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not idle: committed {committed:?} of {ends:?}, {pending} pending; {:?}",
                rt.status.lock()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn state(&self, key: &str) -> Option<u64> {
        let _blocking = weir_core::blocking::allow();
        let rt = self.rt();
        rt.committer
            .state(&*rt.seams.store, &rt.spec.name, key.as_bytes())
            .unwrap()
            .map(|(v, _)| parse(&v))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.durability.stop();
        if let Some(s) = self.syncer.take() {
            let _ = s.join();
        }
    }
}
