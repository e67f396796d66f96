//! Fakes of the plugin core's seams: an in-memory input, an output that behaves like the
//! broker's idempotent producer (and fails on command), plugins written as Rust closures, and
//! a harness that runs a plugin's partition tasks and forwarders over them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weir_core::{ProbeMarker, ReadLimits, Record, StartAt, StoredRecord};
use weir_log::{Durability, FsyncPolicy, MemoryStore};
use weir_wasm::{BatchEffects, Interrupt, Limits, PluginError, StateReader};

use crate::forwarder::Forwarder;
use crate::io::{Input, IoError, IoKind, Output, OutputBatch, ProbeSink};
use crate::partition::PartitionTask;
use crate::processor::{Plugin, Processor};
use crate::runtime::{PluginRuntime, Seams};
use crate::spec::{DedupWindow, OnError, PluginSpec};
use crate::store::{KvPluginStore, PluginStore};

/// Topics of records in memory, with the visible-end watches a real input has.
#[derive(Default)]
pub struct FakeInput {
    topics: Mutex<HashMap<String, Vec<(Vec<StoredRecord>, watch::Sender<u64>)>>>,
}

impl FakeInput {
    pub fn topic(&self, name: &str, partitions: u32) {
        self.topics.lock().insert(
            name.into(),
            (0..partitions)
                .map(|_| (Vec::new(), watch::channel(0).0))
                .collect(),
        );
    }

    /// Appends records to a partition; returns their first offset.
    pub fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> u64 {
        let mut topics = self.topics.lock();
        let (log, visible) = &mut topics.get_mut(topic).unwrap()[partition as usize];
        let base = log.len() as u64;
        for (i, record) in records.into_iter().enumerate() {
            log.push(StoredRecord {
                partition,
                offset: base + i as u64,
                record: Record {
                    timestamp_ms: 1_000,
                    ..record
                },
            });
        }
        visible.send_replace(log.len() as u64);
        base
    }
}

#[async_trait]
impl Input for FakeInput {
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        limits: ReadLimits,
    ) -> Result<Vec<StoredRecord>, IoError> {
        let topics = self.topics.lock();
        let log = &topics
            .get(topic)
            .ok_or_else(|| IoError::new(IoKind::NotFound, "no topic"))?[partition as usize]
            .0;
        Ok(log
            .iter()
            .skip(from as usize)
            .take(limits.max_records)
            .cloned()
            .collect())
    }

    fn watch(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, IoError> {
        let topics = self.topics.lock();
        let parts = topics
            .get(topic)
            .ok_or_else(|| IoError::new(IoKind::NotFound, "no topic"))?;
        Ok(parts[partition as usize].1.subscribe())
    }

    fn partition_count(&self, topic: &str) -> Result<u32, IoError> {
        self.topics
            .lock()
            .get(topic)
            .map(|p| p.len() as u32)
            .ok_or_else(|| IoError::new(IoKind::NotFound, format!("no topic {topic}")))
    }

    async fn resolve_start(&self, _: &str, _: u32, _: StartAt) -> Result<u64, IoError> {
        Ok(0)
    }
}

/// Output topics that keep what the plugin's producers published, dropping a retry of a stored
/// batch as the broker does; `fail` queues failures for the next publishes.
#[derive(Default)]
pub struct FakeOutput {
    partitions: Mutex<HashMap<String, u32>>,
    /// (topic, partition) → records.
    pub stored: Mutex<BTreeMap<(String, u32), Vec<Record>>>,
    /// (producer, topic, partition) → next sequence.
    sequences: Mutex<HashMap<(u64, String, u32), u64>>,
    pub fail: Mutex<VecDeque<IoError>>,
    /// Publishes refused with this while set.
    pub block: Mutex<Option<IoError>>,
    next_producer: Mutex<u64>,
}

impl FakeOutput {
    pub fn topic(&self, name: &str, partitions: u32) {
        self.partitions.lock().insert(name.into(), partitions);
    }

    /// Every value stored in a topic, in (partition, offset) order.
    pub fn values(&self, topic: &str) -> Vec<String> {
        self.stored
            .lock()
            .iter()
            .filter(|((t, _), _)| t == topic)
            .flat_map(|(_, records)| records.iter())
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect()
    }

    pub fn records(&self, topic: &str) -> Vec<Record> {
        self.stored
            .lock()
            .iter()
            .filter(|((t, _), _)| t == topic)
            .flat_map(|(_, records)| records.iter().cloned())
            .collect()
    }
}

#[async_trait]
impl Output for FakeOutput {
    async fn publish(&self, batch: OutputBatch) -> Result<(), IoError> {
        if let Some(e) = self.fail.lock().pop_front() {
            return Err(e);
        }
        if let Some(e) = self.block.lock().clone() {
            return Err(e);
        }
        let key = (batch.producer_id, batch.topic.clone(), batch.partition);
        let mut sequences = self.sequences.lock();
        let next = sequences.entry(key).or_insert(0);
        if batch.base_sequence < *next {
            return Ok(()); // a retry of a stored batch
        }
        assert_eq!(batch.base_sequence, *next, "a sequence gap");
        *next += batch.records.len() as u64;
        self.stored
            .lock()
            .entry((batch.topic, batch.partition))
            .or_default()
            .extend(batch.records);
        Ok(())
    }

    fn partition_count(&self, topic: &str) -> Result<u32, IoError> {
        self.partitions
            .lock()
            .get(topic)
            .copied()
            .ok_or_else(|| IoError::new(IoKind::NotFound, format!("unknown topic {topic}")))
    }

    fn max_record_bytes(&self) -> usize {
        1 << 20
    }

    async fn new_producer(&self) -> Result<u64, IoError> {
        let mut next = self.next_producer.lock();
        *next += 1;
        Ok(*next)
    }

    async fn claim_producers(&self, _: &[u64]) -> Result<(), IoError> {
        Ok(())
    }

    async fn ensure_topic(&self, name: &str, partitions: u32) -> Result<(), IoError> {
        self.partitions
            .lock()
            .entry(name.into())
            .or_insert(partitions);
        Ok(())
    }
}

/// Probes are not what these tests are about.
pub struct NoProbes;

impl ProbeSink for NoProbes {
    fn record(&self, _: &str, _: u32, _: ProbeMarker, _: u64) {}
    fn forget(&self, _: &str) {}
}

/// What a fake plugin's function gets besides the record: state with read-your-writes and
/// versions, and outputs.
pub struct Ctx<'a> {
    reader: &'a StateReader,
    effects: &'a mut BatchEffects,
    outputs: &'a mut weir_codec::Writer,
}

impl Ctx<'_> {
    pub fn get(&mut self, key: &str) -> Option<u64> {
        let key = key.as_bytes().to_vec();
        if let Some(w) = self.effects.writes.get(&key) {
            return w.as_ref().map(|(v, _)| parse(v));
        }
        let found = (self.reader)(&key).expect("state readable");
        self.effects
            .reads
            .entry(key)
            .or_insert(found.as_ref().map_or(0, |(_, v)| *v));
        found.map(|(v, _)| parse(&v))
    }

    pub fn put(&mut self, key: &str, value: u64) {
        let k = key.as_bytes().to_vec();
        let version = match self.effects.writes.get(&k) {
            Some(w) => w.as_ref().map_or(0, |(_, v)| *v),
            None => {
                let found = (self.reader)(&k).expect("state readable");
                let version = found.as_ref().map_or(0, |(_, v)| *v);
                self.effects.reads.entry(k.clone()).or_insert(version);
                version
            }
        } + 1;
        self.effects
            .writes
            .insert(k, Some((value.to_string().into_bytes(), version)));
    }

    pub fn emit(&mut self, topic: &str, key: Option<&str>, value: &str) {
        self.outputs.push_out(&weir_codec::OutRecord {
            topic,
            key: key.map(str::as_bytes),
            value: value.as_bytes(),
            headers: Vec::new(),
        });
    }
}

fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

type Handler = dyn Fn(&weir_codec::InRecord<'_>, &mut Ctx<'_>) -> Result<(), String> + Send + Sync;

/// A plugin written in Rust: `handle` runs once per record of each batch.
pub struct FakePlugin {
    handle: Arc<Handler>,
    /// Instances made so far.
    pub instances: Arc<Mutex<u32>>,
}

impl FakePlugin {
    pub fn new(
        handle: impl Fn(&weir_codec::InRecord<'_>, &mut Ctx<'_>) -> Result<(), String>
            + Send
            + Sync
            + 'static,
    ) -> Arc<FakePlugin> {
        Arc::new(FakePlugin {
            handle: Arc::new(handle),
            instances: Arc::default(),
        })
    }
}

struct FakeProcessor {
    handle: Arc<Handler>,
    reader: StateReader,
    interrupt: Interrupt,
}

impl Plugin for FakePlugin {
    fn instantiate(
        &self,
        _: Limits,
        _: &[(String, String)],
        reader: StateReader,
        interrupt: Interrupt,
    ) -> Result<Box<dyn Processor>, PluginError> {
        *self.instances.lock() += 1;
        Ok(Box::new(FakeProcessor {
            handle: self.handle.clone(),
            reader,
            interrupt,
        }))
    }
}

impl Processor for FakeProcessor {
    fn process(&mut self, batch: &[u8]) -> Result<BatchEffects, PluginError> {
        if (self.interrupt)() {
            return Err(PluginError::Interrupted);
        }
        let records =
            weir_codec::decode_batch(batch).map_err(|e| PluginError::Failed(e.to_string()))?;
        let mut effects = BatchEffects::default();
        let mut outputs = weir_codec::Writer::new();
        for r in &records {
            let mut ctx = Ctx {
                reader: &self.reader,
                effects: &mut effects,
                outputs: &mut outputs,
            };
            (self.handle)(r, &mut ctx)
                .map_err(|e| PluginError::Failed(format!("offset={}: {e}", r.offset)))?;
        }
        effects.outputs = if outputs.is_empty() {
            Vec::new()
        } else {
            outputs.finish()
        };
        Ok(effects)
    }

    fn worn_out(&self) -> bool {
        false
    }

    fn drain_log(&mut self) -> Vec<String> {
        Vec::new()
    }
}

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
    }
}

impl Harness {
    /// Seams over a fresh memory store (or `store`, to wrap it), topics `in` and `out`.
    pub fn new(partitions: u32, store: Option<Arc<dyn weir_log::Store>>) -> Harness {
        let memory = Arc::new(MemoryStore::new());
        let kv: Arc<dyn weir_log::Store> = store.unwrap_or_else(|| memory.clone());
        let (durability, syncer) = Durability::start(kv.clone(), FsyncPolicy::Never);
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

    /// Starts `plugin` under `spec` (its cursors start at 0 unless stored).
    pub fn start(&mut self, spec: PluginSpec, plugin: Arc<dyn Plugin>) {
        let seams = Seams {
            input: self.input.clone(),
            output: self.output.clone(),
            store: self.store.clone(),
            durability: self.durability.clone(),
            probes: Arc::new(NoProbes),
        };
        let runtime = {
            let _blocking = weir_core::blocking::allow();
            PluginRuntime::open(spec, plugin, seams, 1 << 20).unwrap()
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

/// A record with a key, a value and an id.
pub fn rec(key: &str, value: &str, id: Option<&str>) -> Record {
    Record {
        key: Some(Bytes::from(key.to_string())),
        id: id.map(str::to_string),
        ..Record::from_value(value.to_string())
    }
}
