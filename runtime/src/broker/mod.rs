//! The broker: topics of partitions on a [`LogStore`], publish with the idempotent-producer
//! check and group commit, reads that follow the tail, consumer-group offsets and retention.
//!
//! Knows nothing of gRPC: the API layer converts its requests into these calls. Blocking store
//! work runs on tokio's blocking pool, never on the async workers.

mod admission;
mod error;
mod partition;
pub mod producer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

pub use error::BrokerError;
use partition::Partition;
pub use partition::{Appended, PartitionStats, ProducerFields};

use crate::durability::Durability;
use crate::log::{codec, LogStore, CHUNK_TARGET_BYTES};
use crate::record::{
    now_ms, partition_for_key, validate_topic_name, Record, StoredRecord, TopicConfig,
    TopicPartition, MAX_PARTITIONS,
};

/// Broker limits and intervals.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Largest encoded record accepted (Kafka's `max.message.bytes`).
    pub max_record_bytes: usize,
    /// Most records in one publish request.
    pub max_batch_records: usize,
    /// How often retention runs.
    pub retention_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_record_bytes: 1024 * 1024,
            max_batch_records: 100_000,
            retention_interval: Duration::from_secs(30),
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
    published: (
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::counter::Counter,
    ),
    /// Partition that keyless records of the next request stick to (sticky partitioner).
    sticky: AtomicU32,
}

/// Description of a topic with its partitions' offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    /// Configuration.
    pub config: TopicConfig,
    /// Per partition.
    pub partitions: Vec<PartitionStats>,
}

/// Where to start reading a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest stored record.
    Earliest,
    /// Only records published after subscribing.
    Latest,
    /// This offset.
    Offset(u64),
    /// The first record with a timestamp at or after this many ms since the epoch.
    Timestamp(i64),
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
    /// [`BrokerError::Unavailable`] if the store could not be synced.
    pub async fn acked(self) -> Result<Vec<PartitionAck>, BrokerError> {
        self.task
            .await
            .map_err(|e| BrokerError::Unavailable(format!("publish task failed: {e}")))?
    }
}

/// The broker. Shared as `Arc<Broker>`.
pub struct Broker {
    store: Arc<dyn LogStore>,
    durability: Arc<Durability>,
    config: BrokerConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Producer id → current epoch; the next id is one past the largest.
    producers: Mutex<HashMap<u64, u32>>,
    /// Serialises topic creation and deletion.
    admin: tokio::sync::Mutex<()>,
    /// When each (group, topic) last committed, ms since the epoch (since this start).
    group_commits: Mutex<HashMap<(String, String), i64>>,
}

impl Broker {
    /// Opens the broker on `store`, rebuilding every partition's index. Blocking.
    ///
    /// # Errors
    /// [`BrokerError::Storage`] when the store cannot be read.
    pub fn open(
        store: Arc<dyn LogStore>,
        durability: Arc<Durability>,
        config: BrokerConfig,
    ) -> Result<Arc<Self>, BrokerError> {
        let mut topics = BTreeMap::new();
        for topic_config in store.load_topics()? {
            let topic = Self::open_topic(&store, topic_config)?;
            topics.insert(topic.config.name.clone(), topic);
        }
        let producers = store.load_producers()?.into_iter().collect();
        Ok(Arc::new(Broker {
            store,
            durability,
            config,
            topics: RwLock::new(topics),
            producers: Mutex::new(producers),
            admin: Default::default(),
            group_commits: Default::default(),
        }))
    }

    fn open_topic(
        store: &Arc<dyn LogStore>,
        config: TopicConfig,
    ) -> Result<Arc<Topic>, BrokerError> {
        let partitions = (0..config.partitions)
            .map(|p| Partition::recover(store.clone(), TopicPartition::new(config.name.clone(), p)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Topic {
            admission: config
                .admission
                .map(|a| Mutex::new(admission::AdmissionLog::new(a))),
            published: {
                let (m, label) = (
                    crate::metrics::global(),
                    crate::metrics::topic(&config.name),
                );
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
        self.topics
            .read()
            .expect("topics lock")
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
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("storage task failed: {e}")))?
    }

    /// Makes a metadata write durable before answering (all policies: metadata is rare).
    async fn sync_now(&self) -> Result<(), BrokerError> {
        let store = self.store.clone();
        Self::blocking(move || Ok(store.sync()?)).await
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// Invalid name or partition count, or a topic of that name exists.
    pub async fn create_topic(
        self: &Arc<Self>,
        config: TopicConfig,
    ) -> Result<TopicInfo, BrokerError> {
        validate_topic_name(&config.name).map_err(BrokerError::InvalidTopicName)?;
        if config.partitions == 0 || config.partitions > MAX_PARTITIONS {
            return Err(BrokerError::InvalidArgument(format!(
                "a topic needs 1 to {MAX_PARTITIONS} partitions, got {}",
                config.partitions
            )));
        }
        if let Some(a) = config.admission {
            if a.per_key == 0 || a.window_ms == 0 {
                return Err(BrokerError::InvalidArgument(
                    "an admission limit needs --admit-per-key and --admit-window-ms above 0".into(),
                ));
            }
        }
        let _admin = self.admin.lock().await;
        if self
            .topics
            .read()
            .expect("topics lock")
            .contains_key(&config.name)
        {
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
            .expect("topics lock")
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
        self.topics
            .read()
            .expect("topics lock")
            .values()
            .map(|t| Self::info(t))
            .collect()
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
            .expect("topics lock")
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))?;
        let store = self.store.clone();
        let config = topic.config.clone();
        Self::blocking(move || Ok(store.delete_topic(&config)?)).await?;
        self.sync_now().await?;
        tracing::info!(message = "Topic deleted.", topic = %name);
        Ok(())
    }

    /// Allocates a producer id (epoch 0), or bumps the epoch of `existing`, fencing its older
    /// instances.
    ///
    /// # Errors
    /// [`BrokerError::UnknownProducer`] for an id this broker never issued.
    pub async fn init_producer(&self, existing: Option<u64>) -> Result<(u64, u32), BrokerError> {
        let (id, epoch) = {
            let mut producers = self.producers.lock().expect("producers lock");
            let (id, epoch) = match existing {
                Some(id) => (
                    id,
                    producers
                        .get(&id)
                        .ok_or(BrokerError::UnknownProducer(id))?
                        .checked_add(1)
                        .ok_or_else(|| {
                            BrokerError::InvalidArgument(format!(
                                "producer {id} has used every epoch; init a new producer"
                            ))
                        })?,
                ),
                None => (producers.keys().max().map_or(1, |m| m + 1), 0),
            };
            self.store.put_producer(id, epoch)?;
            producers.insert(id, epoch);
            (id, epoch)
        };
        self.sync_now().await?;
        Ok((id, epoch))
    }

    fn check_producer(&self, p: &ProducerFields) -> Result<(), BrokerError> {
        let current = *self
            .producers
            .lock()
            .expect("producers lock")
            .get(&p.producer_id)
            .ok_or(BrokerError::UnknownProducer(p.producer_id))?;
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
        Ok(())
    }

    /// Applies the topic's admission limit, if any. A retry of a stored idempotent batch is
    /// not charged again (it stores nothing).
    fn admit(&self, publish: &Publish, topic: &Topic) -> Result<(), BrokerError> {
        let Some(log) = &topic.admission else {
            return Ok(());
        };
        if let (Some(p), Some(partition)) = (&publish.producer, publish.partition) {
            let count = publish.records.len() as u32;
            if topic.partitions[partition as usize].is_duplicate(p, count) {
                return Ok(());
            }
        }
        let keys = publish.records.iter().filter_map(|r| r.key.as_ref());
        let refused = match log.lock().expect("admission lock").admit(keys, now_ms()) {
            Ok(()) => return Ok(()),
            Err(r) => r,
        };
        crate::metrics::global()
            .admission_refused
            .get_or_create(&crate::metrics::topic(&topic.config.name))
            .inc_by(refused.records as u64);
        let limit = topic.config.admission.expect("a log has a limit");
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
            self.check_producer(p)?;
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
            codec::check_record_shape(record)
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
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
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
            let appended = partition.append(&chunks, records.len() as u32, publish.producer)?;
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

    /// Reads up to about `max_records` visible records of a partition from `from`.
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
        let p = self.partition(topic, partition)?;
        Self::blocking(move || p.read(from, max_records)).await
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
        for &(p, _) in &offsets {
            self.partition(topic, p)?;
        }
        let store = self.store.clone();
        let (group_owned, topic_owned) = (group.to_string(), topic.to_string());
        Self::blocking(move || {
            Ok(store.put_group_offsets(&group_owned, &topic_owned, &offsets)?)
        })
        .await?;
        self.group_commits
            .lock()
            .expect("group commits lock")
            .insert(
                (group.to_string(), topic.to_string()),
                crate::record::now_ms(),
            );
        let ticket = self.durability.written();
        self.durability
            .durable(ticket)
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    /// Every (group, topic) with committed offsets.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn list_groups(&self) -> Result<Vec<(String, String)>, BrokerError> {
        let store = self.store.clone();
        Self::blocking(move || Ok(store.list_groups()?)).await
    }

    /// When a group last committed offsets for a topic since this broker started.
    pub fn group_last_commit_ms(&self, group: &str, topic: &str) -> Option<i64> {
        self.group_commits
            .lock()
            .expect("group commits lock")
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
        let topics: Vec<Arc<Topic>> = self
            .topics
            .read()
            .expect("topics lock")
            .values()
            .cloned()
            .collect();
        Self::blocking(move || {
            let now = now_ms();
            let mut removed = 0;
            for topic in topics.iter().filter(|t| t.config.retention_ms > 0 || t.config.retention_bytes > 0) {
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
}

#[cfg(test)]
mod tests;
