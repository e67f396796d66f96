//! Fakes of the plugin core's seams: an in-memory input, an output that behaves like the
//! broker's idempotent producer (and fails on command), plugins written as Rust closures, and
//! a harness that runs a plugin's partition tasks and forwarders over them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use weir_core::{ProbeMarker, ReadLimits, Record, StartAt, StoredRecord};
use weir_wasm::{BatchEffects, Interrupt, Limits, PluginError, StateReader};

use crate::io::{Acked, Input, IoError, IoKind, Output, OutputBatch, ProbeSink};
use crate::processor::{Plugin, Processor};

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
/// Batches remembered per producer × partition for retries, as the broker (weir_broker's
/// `KEEP_BATCHES`, Kafka's 5).
const KEEP_BATCHES: usize = 5;

/// The largest record the fake output takes, as the broker's default.
pub const RECORD_LIMIT: usize = 1 << 20;

#[derive(Default)]
pub struct FakeOutput {
    partitions: Mutex<HashMap<String, u32>>,
    /// (topic, partition) → records.
    pub stored: Mutex<BTreeMap<(String, u32), Vec<Record>>>,
    /// (producer, topic, partition) → next sequence and the batches remembered for retries
    /// (first and last sequence), newest last: the broker keeps the last [`KEEP_BATCHES`].
    sequences: Mutex<HashMap<(u64, String, u32), (u64, VecDeque<(u64, u64)>)>>,
    pub fail: Mutex<VecDeque<IoError>>,
    /// Publishes refused with this while set.
    pub block: Mutex<Option<IoError>>,
    next_producer: Mutex<u64>,
    /// Producer ids released.
    pub released: Mutex<Vec<u64>>,
    /// Publishes the broker would refuse for good (a sequence gap, a record over the limit):
    /// bugs of the commit or the forwarder, so the harness fails the test on one.
    pub gaps: Mutex<Vec<String>>,
    /// While set, an appended batch is applied (stored, its sequences taken) but not durable:
    /// what `append` returns resolves once this is cleared (the broker's sync, held).
    pub syncs_held: Arc<AtomicBool>,
    /// The next this-many durability waits of appended batches fail (their batches stay
    /// applied, as a broker's would until a restart).
    pub failed_syncs: std::sync::atomic::AtomicU32,
    /// Batches sent and accepted, retries of stored ones included.
    pub accepted: std::sync::atomic::AtomicU32,
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

impl FakeOutput {
    /// Applies a batch as the broker's append does (stored, its sequences taken), or refuses
    /// it; durability is [`FakeOutput::synced`].
    fn apply(&self, batch: OutputBatch) -> Result<(), IoError> {
        if let Some(e) = self.fail.lock().pop_front() {
            return Err(e);
        }
        if let Some(e) = self.block.lock().clone() {
            return Err(e);
        }
        // The broker's record limit: a committed output over it would block the outbox.
        if let Some(r) = batch
            .records
            .iter()
            .find(|r| r.encoded_len() > RECORD_LIMIT)
        {
            let e = format!("a record of {} bytes is over the limit", r.encoded_len());
            self.gaps.lock().push(e.clone());
            return Err(IoError::new(IoKind::Invalid, e));
        }
        let key = (batch.producer_id, batch.topic.clone(), batch.partition);
        let mut sequences = self.sequences.lock();
        let (next, remembered) = sequences.entry(key).or_default();
        let last_seq = batch.base_sequence + (batch.records.len() as u64).saturating_sub(1);
        if batch.base_sequence < *next {
            if remembered.contains(&(batch.base_sequence, last_seq)) {
                self.accepted.fetch_add(1, Ordering::SeqCst);
                return Ok(()); // a retry of a stored batch
            }
            // As the broker: older than what it remembers, so not recognised as a retry.
            return Err(IoError {
                kind: IoKind::Refused,
                name: "sequence-out-of-order",
                message: format!(
                    "sequence out of order: producer {} sent sequence {} to {}/{}, which is older than the last batches kept for retries (next expected {})",
                    batch.producer_id, batch.base_sequence, batch.topic, batch.partition, *next
                ),
            });
        }
        if batch.base_sequence != *next {
            // Not a panic: it would end the forwarder's task quietly, not the test.
            let gap = format!(
                "producer {} {}/{}: sequence {} after {}",
                batch.producer_id, batch.topic, batch.partition, batch.base_sequence, *next
            );
            self.gaps.lock().push(gap.clone());
            return Err(IoError::new(IoKind::Refused, gap));
        }
        *next += batch.records.len() as u64;
        self.accepted.fetch_add(1, Ordering::SeqCst);
        remembered.push_back((batch.base_sequence, last_seq));
        if remembered.len() > KEEP_BATCHES {
            remembered.pop_front();
        }
        self.stored
            .lock()
            .entry((batch.topic, batch.partition))
            .or_default()
            .extend(batch.records);
        Ok(())
    }

    /// Resolves once the broker's syncs are not held (see `syncs_held`), or fails (see
    /// `failed_syncs`).
    fn synced(&self) -> Acked {
        let held = self.syncs_held.clone();
        let failed = self
            .failed_syncs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            while held.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            if failed {
                return Err(IoError::new(IoKind::Unavailable, "the sync failed"));
            }
            Ok(())
        })
    }
}

#[async_trait]
impl Output for FakeOutput {
    async fn append(&self, batch: OutputBatch) -> Result<Acked, IoError> {
        self.apply(batch)?;
        Ok(self.synced())
    }

    fn partition_count(&self, topic: &str) -> Result<u32, IoError> {
        self.partitions
            .lock()
            .get(topic)
            .copied()
            .ok_or_else(|| IoError::new(IoKind::NotFound, format!("unknown topic {topic}")))
    }

    fn max_record_bytes(&self) -> usize {
        RECORD_LIMIT
    }

    async fn new_producer(&self) -> Result<u64, IoError> {
        let mut next = self.next_producer.lock();
        *next += 1;
        Ok(*next)
    }

    async fn claim_producers(&self, _: &[u64]) -> Result<(), IoError> {
        Ok(())
    }

    async fn release_producers(&self, ids: &[u64]) -> Result<(), IoError> {
        self.released.lock().extend_from_slice(ids);
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
    interrupt: &'a Interrupt,
}

impl Ctx<'_> {
    /// Whether the host asked the batch to stop (what wasmtime's epoch callback checks).
    pub fn interrupted(&self) -> bool {
        (self.interrupt)()
    }

    pub fn get(&mut self, key: &str) -> Option<u64> {
        let key = key.as_bytes().to_vec();
        if let Some(w) = self.effects.writes.get(&key) {
            return w.as_ref().map(|(v, _)| parse(v));
        }
        let found = (self.reader)(&key).expect("state readable");
        self.effects.record_read(&key, found.as_ref());
        found.map(|(v, _)| parse(&v))
    }

    pub fn put(&mut self, key: &str, value: u64) {
        self.write(key, Some(value.to_string().into_bytes()));
    }

    pub fn delete(&mut self, key: &str) {
        self.write(key, None);
    }

    /// As the host: a key's next version follows this batch's write or first read of it.
    fn write(&mut self, key: &str, value: Option<Vec<u8>>) {
        let k = key.as_bytes().to_vec();
        let version = match self.effects.known_version(&k) {
            Some(version) => version,
            None => {
                let found = (self.reader)(&k).expect("state readable");
                self.effects.record_read(&k, found.as_ref());
                found.map_or(0, |(_, v)| v)
            }
        } + 1;
        self.effects.writes.insert(k, value.map(|v| (v, version)));
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

pub fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

type Handler = dyn Fn(&weir_codec::InRecord<'_>, &mut Ctx<'_>) -> Result<(), String> + Send + Sync;

/// A plugin written in Rust: `handle` runs once per record of each batch.
pub struct FakePlugin {
    handle: Arc<Handler>,
    /// Instances made so far.
    pub instances: Arc<Mutex<u32>>,
    /// Calls after which an instance asks to be replaced (a real one's output buffer filling).
    wear_after: Option<u64>,
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
            wear_after: None,
        })
    }

    /// The same plugin, whose instances are worn out after `calls` calls.
    pub fn wearing_out_after(self: Arc<Self>, calls: u64) -> Arc<FakePlugin> {
        Arc::new(FakePlugin {
            handle: self.handle.clone(),
            instances: self.instances.clone(),
            wear_after: Some(calls),
        })
    }
}

struct FakeProcessor {
    handle: Arc<Handler>,
    reader: StateReader,
    interrupt: Interrupt,
    calls: u64,
    wear_after: Option<u64>,
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
            calls: 0,
            wear_after: self.wear_after,
        }))
    }
}

impl Processor for FakeProcessor {
    fn process(
        &mut self,
        batch: &[u8],
        carried: BatchEffects,
    ) -> Result<BatchEffects, PluginError> {
        if (self.interrupt)() {
            return Err(PluginError::Interrupted);
        }
        self.calls += 1;
        let records =
            weir_codec::decode_batch(batch).map_err(|e| PluginError::Failed(e.to_string()))?;
        let mut effects = BatchEffects {
            outputs: Vec::new(),
            ..carried
        };
        let mut outputs = weir_codec::Writer::new();
        for r in &records {
            let mut ctx = Ctx {
                reader: &self.reader,
                effects: &mut effects,
                outputs: &mut outputs,
                interrupt: &self.interrupt,
            };
            (self.handle)(r, &mut ctx)
                .map_err(|e| PluginError::Failed(format!("offset={}: {e}", r.offset)))?;
            if (self.interrupt)() {
                return Err(PluginError::Interrupted);
            }
        }
        effects.outputs = if outputs.is_empty() {
            Vec::new()
        } else {
            outputs.finish()
        };
        Ok(effects)
    }

    fn worn_out(&self) -> bool {
        self.wear_after.is_some_and(|n| self.calls >= n)
    }

    fn drain_log(&mut self) -> Vec<String> {
        Vec::new()
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
