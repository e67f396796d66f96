//! weir-broker: topics of partitions on a [`Log`], publish with the idempotent-producer check
//! and group commit, reads that follow the tail, consumer-group offsets, retention and
//! admission limits.
//!
//! Knows nothing of gRPC, plugins or how the log is stored: the server converts requests into
//! these calls. Blocking store work runs on tokio's blocking pool, never on the async workers.

#![deny(missing_docs)]

mod admission;
mod error;
pub mod owners;
mod partition;
pub mod producer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

pub use error::BrokerError;
pub use owners::Caller;
use owners::{Owner, ProducerRecord, ProducerTable};
use partition::Partition;
pub use partition::{retention_plan, Appended, ProducerFields};
pub use weir_core::{PartitionStats, ReadLimits, StartAt, TopicInfo};

use weir_core::{now_ms, partition_for_key, Record, StoredRecord, TopicConfig, TopicPartition};
use weir_log::Durability;
use weir_log::{codec, GroupEntry, Log, CHUNK_TARGET_BYTES};

/// Broker limits and intervals.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Largest encoded record accepted (Kafka's `max.message.bytes`).
    pub max_record_bytes: usize,
    /// Most records in one publish request.
    pub max_batch_records: usize,
    /// How often retention (and expiry of idle producers and groups) runs.
    pub retention_interval: Duration,
    /// A client's producer idle for longer is forgotten (Kafka's
    /// `transactional.id.expiration.ms`); plugins' producers never expire.
    pub producer_expiry: Duration,
    /// A consumer group that has not committed for longer is forgotten, with its offsets
    /// (Kafka's `offsets.retention.minutes`).
    pub group_expiry: Duration,
}

/// A week: the default expiry of idle producers and consumer groups.
pub const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_record_bytes: 1024 * 1024,
            max_batch_records: 100_000,
            retention_interval: Duration::from_secs(30),
            producer_expiry: WEEK,
            group_expiry: WEEK,
        }
    }
}

/// A topic and its live partitions.
pub(crate) struct Topic {
    config: TopicConfig,
    partitions: Vec<Arc<Partition>>,
    /// Admission per key, if the topic has a limit.
    admission: Option<Mutex<admission::AdmissionLog>>,
    /// This topic's `publish_records` and `publish_bytes` counters, looked up once.
    published: (weir_metrics::Counter, weir_metrics::Counter),
    /// Partition that keyless records of the next request stick to (sticky partitioner).
    sticky: AtomicU32,
}

/// A publish to one topic.
#[derive(Clone, Debug, Default)]
pub struct Publish {
    /// Topic name.
    pub topic: String,
    /// Explicit partition, or `None` to partition by key.
    pub partition: Option<u32>,
    /// The records.
    pub records: Vec<Record>,
    /// Producer fields for an idempotent publish (needs an explicit partition).
    pub producer: Option<ProducerFields>,
    /// Who publishes: must own the producer id of an idempotent publish.
    pub caller: Caller,
}

/// Where one partition's share of a publish went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionAck {
    /// Partition.
    pub partition: u32,
    /// Offsets, count and whether it was a retry.
    pub appended: Appended,
}

/// A publish that is stored but maybe not yet durable; [`PendingPublish::acked`] waits.
pub struct PendingPublish {
    task: tokio::task::JoinHandle<Result<Vec<PartitionAck>, BrokerError>>,
}

impl PendingPublish {
    /// Waits until the publish is as durable as the fsync policy promises.
    ///
    /// # Errors
    /// [`BrokerError::NotDurable`] if the store could not be synced.
    pub async fn acked(self) -> Result<Vec<PartitionAck>, BrokerError> {
        self.task.await.map_err(|e| BrokerError::NotDurable {
            reason: format!("the publish task failed: {e}"),
        })?
    }
}

/// The broker. Shared as `Arc<Broker>`.
pub struct Broker {
    store: Arc<dyn Log>,
    durability: Arc<Durability>,
    config: BrokerConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Producer id → epoch, owner, last use; and the next id.
    producers: Mutex<ProducerTable>,
    /// Serialises topic creation and deletion.
    admin: tokio::sync::Mutex<()>,
    /// When each (group, topic) last committed, ms since the epoch (since this start).
    group_commits: Mutex<HashMap<(String, String), i64>>,
    /// When this broker opened, ms since the epoch.
    started_ms: i64,
}

impl Broker {
    /// Opens the broker on `store`, rebuilding every partition's index. Blocking.
    ///
    /// # Errors
    /// [`BrokerError::Storage`] when the store cannot be read.
    pub fn open(
        store: Arc<dyn Log>,
        durability: Arc<Durability>,
        config: BrokerConfig,
    ) -> Result<Arc<Self>, BrokerError> {
        let mut topics = BTreeMap::new();
        for topic_config in store.load_topics()? {
            let topic = Self::open_topic(&store, topic_config)?;
            topics.insert(topic.config.name.clone(), topic);
        }
        let stored = store.load_producers()?;
        let now = now_ms();
        let mut producers = ProducerTable {
            records: HashMap::new(),
            next_id: stored.next_id,
        };
        for (id, bytes) in stored.producers {
            let record =
                ProducerRecord::decode(&bytes).ok_or_else(|| weir_log::LogError::Malformed {
                    what: format!("record of producer {id}"),
                    reason: format!("{} bytes", bytes.len()),
                })?;
            producers.records.insert(id, record);
        }
        // Idle time counts from the newest append in any partition; a producer stored before
        // append times were recorded counts from now.
        let mut last_append: HashMap<u64, i64> = HashMap::new();
        for topic in topics.values() {
            for p in &topic.partitions {
                for (id, at) in p.producer_activity() {
                    let at = if at == 0 { now } else { at };
                    let e = last_append.entry(id).or_insert(at);
                    *e = (*e).max(at);
                }
            }
        }
        for (id, record) in producers.records.iter_mut() {
            record.last_used_ms = last_append.get(id).copied().unwrap_or(now);
        }
        Ok(Arc::new(Broker {
            store,
            durability,
            config,
            topics: RwLock::new(topics),
            producers: Mutex::new(producers),
            admin: Default::default(),
            group_commits: Default::default(),
            started_ms: now,
        }))
    }

    fn open_topic(store: &Arc<dyn Log>, config: TopicConfig) -> Result<Arc<Topic>, BrokerError> {
        let partitions = (0..config.partitions)
            .map(|p| Partition::recover(store.clone(), TopicPartition::new(config.name.clone(), p)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Topic {
            admission: config
                .admission
                .map(|a| Mutex::new(admission::AdmissionLog::new(a))),
            published: {
                let (m, label) = (weir_metrics::global(), weir_metrics::topic(&config.name));
                (
                    m.publish_records.get_or_create(&label).clone(),
                    m.publish_bytes.get_or_create(&label).clone(),
                )
            },
            config,
            partitions,
            sticky: AtomicU32::new(0),
        }))
    }

    /// The limits in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The durability (group commit) this broker writes through.
    pub fn durability(&self) -> &Arc<Durability> {
        &self.durability
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "the request names no topic: set its `topic` field".into(),
            ));
        }
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, BrokerError> {
        let t = self.topic(topic)?;
        t.partitions
            .get(partition as usize)
            .cloned()
            .ok_or(BrokerError::PartitionOutOfRange {
                topic: topic.into(),
                partition,
                partitions: t.config.partitions,
            })
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
    ) -> Result<T, BrokerError> {
        weir_core::blocking::run(f)
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?
    }

    /// Makes a metadata write durable before answering (all policies: metadata is rare).
    async fn sync_now(&self) -> Result<(), BrokerError> {
        let durability = self.durability.clone();
        Self::blocking(move || {
            durability.sync_now().map_err(|e| BrokerError::NotDurable {
                reason: e.to_string(),
            })
        })
        .await
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// Invalid name or partition count, or a topic of that name exists.
    pub async fn create_topic(
        self: &Arc<Self>,
        config: TopicConfig,
    ) -> Result<TopicInfo, BrokerError> {
        weir_core::validate_topic_name(&config.name).map_err(BrokerError::InvalidTopicName)?;
        config.validate().map_err(BrokerError::InvalidArgument)?;
        let _admin = self.admin.lock().await;
        if self.topics.read().contains_key(&config.name) {
            return Err(BrokerError::TopicExists(config.name));
        }
        let store = self.store.clone();
        let topic = Self::blocking(move || {
            store.put_topic(&config)?;
            Self::open_topic(&store, config)
        })
        .await?;
        self.sync_now().await?;
        self.topics
            .write()
            .insert(topic.config.name.clone(), topic.clone());
        tracing::info!(message = "Topic created.", topic = %topic.config.name, partitions = topic.config.partitions);
        Ok(Self::info(&topic))
    }

    fn info(topic: &Topic) -> TopicInfo {
        TopicInfo {
            config: topic.config.clone(),
            partitions: topic.partitions.iter().map(|p| p.stats()).collect(),
        }
    }

    /// All topics with their offsets.
    pub fn list_topics(&self) -> Vec<TopicInfo> {
        self.topics.read().values().map(|t| Self::info(t)).collect()
    }

    /// One topic with its offsets.
    ///
    /// # Errors
    /// [`BrokerError::UnknownTopic`].
    pub fn describe_topic(&self, name: &str) -> Result<TopicInfo, BrokerError> {
        let topic = self.topic(name)?;
        Ok(Self::info(&topic))
    }

    /// Deletes a topic and everything stored for it.
    ///
    /// # Errors
    /// [`BrokerError::UnknownTopic`].
    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let topic = self
            .topics
            .write()
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))?;
        let store = self.store.clone();
        let config = topic.config.clone();
        Self::blocking(move || Ok(store.delete_topic(&config)?)).await?;
        self.sync_now().await?;
        self.group_commits.lock().retain(|(_, t), _| t != name);
        let (m, label) = (weir_metrics::global(), weir_metrics::topic(name));
        m.publish_records.remove(&label);
        m.publish_bytes.remove(&label);
        m.admission_refused.remove(&label);
        tracing::info!(message = "Topic deleted.", topic = %name);
        Ok(())
    }

    /// Allocates a producer id (epoch 0) owned by `caller`, or bumps the epoch of `existing`,
    /// fencing its older instances.
    ///
    /// # Errors
    /// [`BrokerError::UnknownProducer`] for an id this broker never issued,
    /// [`BrokerError::ProducerExpired`] for one forgotten after its idle time,
    /// [`BrokerError::ProducerNotOwned`] for another principal's or a plugin's producer.
    pub async fn init_producer(
        &self,
        existing: Option<u64>,
        caller: &Caller,
    ) -> Result<(u64, u32), BrokerError> {
        let (id, record, next_id) = {
            let mut producers = self.producers.lock();
            let now = now_ms();
            match existing {
                Some(id) => {
                    let current = self.producer(&producers, id)?;
                    if !current.owner.admits(caller) {
                        return Err(BrokerError::ProducerNotOwned {
                            producer_id: id,
                            owner: current.owner.to_string(),
                            caller: caller.to_string(),
                        });
                    }
                    let epoch = current.epoch.checked_add(1).ok_or_else(|| {
                        BrokerError::InvalidArgument(format!(
                            "producer {id} has used every epoch; init a new producer"
                        ))
                    })?;
                    let record = ProducerRecord {
                        epoch,
                        owner: current.owner.clone(),
                        last_used_ms: now,
                    };
                    (id, record, producers.next_id)
                }
                None => {
                    let record = ProducerRecord {
                        epoch: 0,
                        owner: Owner::of(caller),
                        last_used_ms: now,
                    };
                    let id = producers.next_id;
                    // Reserved under the lock, so concurrent inits get distinct ids.
                    producers.next_id += 1;
                    (id, record, id + 1)
                }
            }
        };
        // Written (and synced) before it is used: a restart must never reissue an id or an
        // epoch. The lock is not held across the write.
        let store = self.store.clone();
        let encoded = record.encode();
        Self::blocking(move || Ok(store.put_producer(id, &encoded, next_id)?)).await?;
        let epoch = record.epoch;
        self.producers.lock().records.insert(id, record);
        self.sync_now().await?;
        Ok((id, epoch))
    }

    /// The record of a producer id, or why there is none.
    fn producer<'a>(
        &self,
        producers: &'a ProducerTable,
        id: u64,
    ) -> Result<&'a ProducerRecord, BrokerError> {
        producers
            .records
            .get(&id)
            .ok_or(if id > 0 && id < producers.next_id {
                BrokerError::ProducerExpired {
                    producer_id: id,
                    expiry_ms: self.config.producer_expiry.as_millis() as u64,
                }
            } else {
                BrokerError::UnknownProducer(id)
            })
    }

    fn check_producer(&self, p: &ProducerFields, caller: &Caller) -> Result<(), BrokerError> {
        let mut producers = self.producers.lock();
        let record = self.producer(&producers, p.producer_id)?;
        if !record.owner.admits(caller) {
            return Err(BrokerError::ProducerNotOwned {
                producer_id: p.producer_id,
                owner: record.owner.to_string(),
                caller: caller.to_string(),
            });
        }
        let current = record.epoch;
        if p.epoch < current {
            return Err(BrokerError::StaleEpoch {
                producer_id: p.producer_id,
                epoch: p.epoch,
                current,
            });
        }
        if p.epoch > current {
            return Err(BrokerError::InvalidArgument(format!(
                "producer {} has epoch {current}; epoch {} was never issued",
                p.producer_id, p.epoch
            )));
        }
        if let Some(r) = producers.records.get_mut(&p.producer_id) {
            r.last_used_ms = now_ms();
        }
        Ok(())
    }

    /// Marks producer ids as the server's (plugins' forwarders): no client may use them. For
    /// producers issued before ownership was recorded. Blocking-free; the write goes through
    /// the blocking pool.
    ///
    /// # Errors
    /// Unknown ids, storage failures.
    pub async fn claim_for_server(&self, ids: &[u64]) -> Result<(), BrokerError> {
        for &id in ids {
            let (record, next_id) = {
                let producers = self.producers.lock();
                let current = self.producer(&producers, id)?;
                if current.owner == Owner::Server {
                    continue;
                }
                let mut record = current.clone();
                record.owner = Owner::Server;
                (record, producers.next_id)
            };
            let (store, encoded) = (self.store.clone(), record.encode());
            Self::blocking(move || Ok(store.put_producer(id, &encoded, next_id)?)).await?;
            self.producers.lock().records.insert(id, record);
        }
        self.sync_now().await
    }

    /// Applies the topic's admission limit, if any. A retry of a stored idempotent batch is
    /// not charged again (it stores nothing).
    fn admit(&self, publish: &Publish, topic: &Topic) -> Result<(), BrokerError> {
        let Some(log) = &topic.admission else {
            return Ok(());
        };
        // Plugins' outputs are committed effects, forwarded whole: a limit meant to shed a
        // flood of client requests must not hold them back for ever.
        if publish.caller == Caller::Server {
            return Ok(());
        }
        if let (Some(p), Some(partition)) = (&publish.producer, publish.partition) {
            let count = publish.records.len() as u32;
            if topic.partitions[partition as usize].is_duplicate(p, count) {
                return Ok(());
            }
        }
        let keys = publish.records.iter().filter_map(|r| r.key.as_ref());
        let refused = match log.lock().admit(keys, now_ms()) {
            Ok(()) => return Ok(()),
            Err(r) => r,
        };
        weir_metrics::global()
            .admission_refused
            .get_or_create(&weir_metrics::topic(&topic.config.name))
            .inc_by(refused.records as u64);
        let limit = topic.config.admission.unwrap_or(weir_core::Admission {
            per_key: 0,
            window_ms: 0,
        });
        Err(BrokerError::Admission {
            topic: topic.config.name.clone(),
            key: String::from_utf8_lossy(&refused.key).into_owned(),
            per_key: limit.per_key,
            window_ms: limit.window_ms,
            refused: refused.records,
        })
    }

    fn validate(&self, publish: &Publish, topic: &Topic) -> Result<(), BrokerError> {
        if let Some(e) = self.durability.failed() {
            return Err(BrokerError::Unavailable(e.to_string()));
        }
        if publish.topic.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "the publish names no topic: set its `topic` field".into(),
            ));
        }
        if publish.records.is_empty() {
            return Err(BrokerError::EmptyBatch);
        }
        if publish.records.len() > self.config.max_batch_records {
            return Err(BrokerError::BatchTooLarge {
                count: publish.records.len(),
                max: self.config.max_batch_records,
            });
        }
        if let Some(p) = publish.partition {
            if p >= topic.config.partitions {
                return Err(BrokerError::PartitionOutOfRange {
                    topic: publish.topic.clone(),
                    partition: p,
                    partitions: topic.config.partitions,
                });
            }
        }
        if let Some(p) = &publish.producer {
            if publish.partition.is_none() {
                return Err(BrokerError::IdempotenceNeedsPartition);
            }
            self.check_producer(p, &publish.caller)?;
        }
        for (index, record) in publish.records.iter().enumerate() {
            let size = record.encoded_len();
            if size > self.config.max_record_bytes {
                return Err(BrokerError::RecordTooLarge {
                    index,
                    size,
                    max: self.config.max_record_bytes,
                });
            }
            record
                .check_shape()
                .map_err(|why| BrokerError::InvalidArgument(format!("record {index}: {why}")))?;
        }
        Ok(())
    }

    /// Validates and stores a publish, returning once it is applied (so a stream's batches to a
    /// partition keep their order); the returned [`PendingPublish`] resolves when it is durable.
    ///
    /// # Errors
    /// Validation and sequence errors; nothing is stored for a refused publish.
    pub async fn append(self: &Arc<Self>, publish: Publish) -> Result<PendingPublish, BrokerError> {
        let topic = self.topic(&publish.topic)?;
        self.validate(&publish, &topic)?;
        self.admit(&publish, &topic)?;
        let this = self.clone();
        let (appended, ticket) =
            Self::blocking(move || this.append_blocking(&topic, publish)).await?;
        let this = self.clone();
        // The durability wait runs in its own task so that readers are shown the records even
        // if the publisher goes away before its acknowledgement.
        let task = tokio::spawn(async move {
            this.durability
                .durable(ticket)
                .await
                .map_err(|e| BrokerError::NotDurable {
                    reason: e.to_string(),
                })?;
            for (partition, ack) in &appended {
                partition.publish_visible(ack.appended.base_offset + u64::from(ack.appended.count));
            }
            Ok(appended.into_iter().map(|(_, ack)| ack).collect())
        });
        Ok(PendingPublish { task })
    }

    /// Stores a publish and waits until it is durable.
    ///
    /// # Errors
    /// See [`Broker::append`] and [`PendingPublish::acked`].
    pub async fn publish(
        self: &Arc<Self>,
        publish: Publish,
    ) -> Result<Vec<PartitionAck>, BrokerError> {
        self.append(publish).await?.acked().await
    }

    fn append_blocking(
        &self,
        topic: &Topic,
        publish: Publish,
    ) -> Result<(Vec<(Arc<Partition>, PartitionAck)>, u64), BrokerError> {
        let groups: Vec<(u32, Vec<Record>)> = match publish.partition {
            Some(p) => vec![(p, publish.records)],
            None => {
                let n = topic.config.partitions;
                let sticky = topic.sticky.fetch_add(1, Ordering::Relaxed) % n;
                let mut by_partition: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
                for record in publish.records {
                    let p = record
                        .key
                        .as_deref()
                        .map_or(sticky, |k| partition_for_key(k, n));
                    by_partition.entry(p).or_default().push(record);
                }
                by_partition.into_iter().collect()
            }
        };
        let now = now_ms();
        let mut acks = Vec::with_capacity(groups.len());
        for (p, records) in groups {
            let partition = topic.partitions[p as usize].clone();
            let chunks = codec::encode_chunks(&records, now, CHUNK_TARGET_BYTES);
            let appended =
                partition.append(&chunks, records.len() as u32, publish.producer, now)?;
            if !appended.duplicate {
                let bytes: usize = chunks.iter().map(|c| c.bytes.len()).sum();
                topic.published.0.inc_by(u64::from(appended.count));
                topic.published.1.inc_by(bytes as u64);
            }
            acks.push((
                partition,
                PartitionAck {
                    partition: p,
                    appended,
                },
            ));
        }
        Ok((acks, self.durability.written()))
    }

    /// Reads at most `max_records` visible records of a partition from `from`.
    ///
    /// # Errors
    /// Unknown topic or partition; a corrupt stored chunk.
    pub async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, BrokerError> {
        self.read_limited(topic, partition, from, ReadLimits::records(max_records))
            .await
    }

    /// Reads visible records of a partition from `from`, bounded by records and bytes (one
    /// record larger than the byte bound is returned alone).
    ///
    /// # Errors
    /// Unknown topic or partition; a corrupt stored chunk.
    pub async fn read_limited(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        limits: ReadLimits,
    ) -> Result<Vec<StoredRecord>, BrokerError> {
        let p = self.partition(topic, partition)?;
        Self::blocking(move || p.read(from, limits)).await
    }

    /// The partition count of a topic (cheaper than [`Broker::describe_topic`]).
    ///
    /// # Errors
    /// [`BrokerError::UnknownTopic`].
    pub fn partition_count(&self, topic: &str) -> Result<u32, BrokerError> {
        Ok(self.topic(topic)?.config.partitions)
    }

    /// A receiver of the partition's visible end offset, to wait for new records.
    ///
    /// # Errors
    /// Unknown topic or partition.
    pub fn watch(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, BrokerError> {
        Ok(self.partition(topic, partition)?.watch())
    }

    /// Resolves a start position to an offset in a partition.
    ///
    /// # Errors
    /// Unknown topic or partition; an explicit offset past the end ([`BrokerError::OffsetOutOfRange`]).
    pub async fn resolve_start(
        &self,
        topic: &str,
        partition: u32,
        start: StartAt,
    ) -> Result<u64, BrokerError> {
        let p = self.partition(topic, partition)?;
        let stats = p.stats();
        let visible = p.visible_end();
        match start {
            StartAt::Earliest => Ok(stats.start_offset),
            StartAt::Latest => Ok(visible),
            StartAt::Offset(o) if o > stats.end_offset => Err(BrokerError::OffsetOutOfRange {
                tp: p.tp.clone(),
                offset: o,
                start: stats.start_offset,
                end: stats.end_offset,
            }),
            StartAt::Offset(o) => Ok(o.max(stats.start_offset)),
            StartAt::Timestamp(ts) => Self::blocking(move || p.offset_for_timestamp(ts)).await,
        }
    }

    /// Stores a consumer group's next offsets for partitions of a topic (durably under `always`).
    ///
    /// # Errors
    /// Unknown topic, partition out of range, empty group name.
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: Vec<(u32, u64)>,
    ) -> Result<(), BrokerError> {
        if group.is_empty() || group.contains('\0') {
            return Err(BrokerError::InvalidArgument(
                "group name must be non-empty and contain no NUL".into(),
            ));
        }
        for &(p, offset) in &offsets {
            let partition = self.partition(topic, p)?;
            let end = partition.stats().end_offset;
            if offset > end {
                return Err(BrokerError::CommitPastEnd {
                    tp: partition.tp.clone(),
                    offset,
                    end,
                });
            }
        }
        let store = self.store.clone();
        let (group_owned, topic_owned) = (group.to_string(), topic.to_string());
        let now = now_ms();
        Self::blocking(move || {
            Ok(store.put_group_offsets(&group_owned, &topic_owned, &offsets, now)?)
        })
        .await?;
        self.group_commits
            .lock()
            .insert((group.to_string(), topic.to_string()), now);
        let ticket = self.durability.written();
        self.durability
            .durable(ticket)
            .await
            .map_err(|e| BrokerError::NotDurable {
                reason: e.to_string(),
            })
    }

    /// Every (group, topic) with committed offsets.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn list_groups(&self) -> Result<Vec<(String, String)>, BrokerError> {
        let store = self.store.clone();
        let groups = Self::blocking(move || Ok(store.list_groups()?)).await?;
        Ok(groups.into_iter().map(|g| (g.group, g.topic)).collect())
    }

    /// When a group last committed offsets for a topic since this broker started.
    pub fn group_last_commit_ms(&self, group: &str, topic: &str) -> Option<i64> {
        self.group_commits
            .lock()
            .get(&(group.to_string(), topic.to_string()))
            .copied()
    }

    /// A consumer group's committed offsets for a topic.
    ///
    /// # Errors
    /// Unknown topic.
    pub async fn fetch_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        self.topic(topic)?;
        let store = self.store.clone();
        let (group, topic) = (group.to_string(), topic.to_string());
        Self::blocking(move || Ok(store.group_offsets(&group, &topic)?)).await
    }

    /// Runs retention over every topic once; returns the records removed.
    ///
    /// # Errors
    /// A store failure.
    pub async fn apply_retention(&self) -> Result<u64, BrokerError> {
        let topics: Vec<Arc<Topic>> = self.topics.read().values().cloned().collect();
        Self::blocking(move || {
            let now = now_ms();
            let mut removed = 0;
            for topic in topics
                .iter()
                .filter(|t| t.config.retention_ms > 0 || t.config.retention_bytes > 0)
            {
                for p in &topic.partitions {
                    let n = p.trim(now, topic.config.retention_ms, topic.config.retention_bytes)?;
                    if n > 0 {
                        tracing::debug!(message = "Retention trimmed.", partition = %p.tp, records = n);
                    }
                    removed += n;
                }
            }
            Ok(removed)
        })
        .await
    }

    /// Forgets client producers idle for longer than the producer expiry and consumer groups
    /// that have not committed for longer than the group expiry. Returns how many of each.
    ///
    /// # Errors
    /// A store failure (what was removed before it stays removed).
    pub async fn expire_idle(&self, now_ms: i64) -> Result<(usize, usize), BrokerError> {
        let expired = self
            .producers
            .lock()
            .expired(now_ms, self.config.producer_expiry.as_millis() as u64);
        if !expired.is_empty() {
            let partitions: Vec<Arc<Partition>> = self
                .topics
                .read()
                .values()
                .flat_map(|t| t.partitions.iter().cloned())
                .collect();
            let (store, ids) = (self.store.clone(), expired.clone());
            Self::blocking(move || {
                // Partition states first: a crash half-way leaves a producer record whose
                // sequences are gone, which the next pass removes.
                for p in &partitions {
                    p.remove_producers(&ids)?;
                }
                Ok(store.delete_producers(&ids)?)
            })
            .await?;
            let mut producers = self.producers.lock();
            for id in &expired {
                producers.records.remove(id);
            }
            tracing::info!(message = "Idle producers expired.", count = expired.len());
        }
        let store = self.store.clone();
        let groups: Vec<GroupEntry> = Self::blocking(move || Ok(store.list_groups()?)).await?;
        let expiry = self.config.group_expiry.as_millis() as u64;
        let mut removed = 0;
        for g in groups {
            // A commit stored before commit times were recorded counts from this start.
            let last = self
                .group_last_commit_ms(&g.group, &g.topic)
                .unwrap_or(g.last_commit_ms)
                .max(g.last_commit_ms);
            let last = if last == 0 { self.started_ms } else { last };
            if weir_core::elapsed_ms(last, now_ms) <= expiry {
                continue;
            }
            let store = self.store.clone();
            let (group, topic) = (g.group.clone(), g.topic.clone());
            Self::blocking(move || Ok(store.delete_group(&group, &topic)?)).await?;
            self.group_commits.lock().remove(&(g.group, g.topic));
            removed += 1;
        }
        Ok((expired.len(), removed))
    }
}

#[cfg(test)]
mod tests;
