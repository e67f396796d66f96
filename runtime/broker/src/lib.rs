//! weir-broker: topics of partitions on a [`Log`], publish with the idempotent-producer check
//! and group commit, reads that follow the tail, consumer-group offsets, retention and
//! admission limits.
//!
//! Knows nothing of gRPC, plugins or how the log is stored: the server converts requests into
//! these calls. Blocking store work runs on tokio's blocking pool, never on the async workers.

#![deny(missing_docs)]

mod admission;
mod error;
mod groups;
mod maintenance;
pub mod owners;
mod partition;
pub mod producer;
mod producers;
mod publish;
mod shared;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

pub use error::BrokerError;
pub use groups::GroupMember;
pub use owners::Caller;
use owners::{ProducerRecord, ProducerTable};
use partition::Partition;
pub use partition::{retention_plan, Appended, ProducerFields};
pub use publish::{PartitionAck, PendingPublish, Publish};
pub use shared::TopicLookup;
pub use weir_core::{PartitionStats, ReadLimits, StartAt, TopicInfo};

use weir_core::{now_ms, StoredRecord, TopicConfig, TopicPartition};
use weir_log::Durability;
use weir_log::{Log, LogError};

/// Broker limits and intervals.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Largest encoded record accepted (Kafka's `max.message.bytes`).
    pub max_record_bytes: usize,
    /// Most records in one publish request of a client (plugins' forwards are exempt).
    pub max_batch_records: usize,
    /// How often retention (and expiry of idle producers and groups) runs.
    pub retention_interval: Duration,
    /// A client's producer idle for longer is forgotten (Kafka's
    /// `transactional.id.expiration.ms`); plugins' producers never expire.
    pub producer_expiry: Duration,
    /// Most producer ids one client principal may hold (issued and not yet expired); the
    /// server's (plugins') are not counted. Each costs a record in the store and memory on
    /// every node until it expires.
    pub max_producers_per_principal: usize,
    /// A consumer group that has not committed for longer is forgotten, with its offsets
    /// (Kafka's `offsets.retention.minutes`).
    pub group_expiry: Duration,
}

/// The default of [`BrokerConfig::max_producers_per_principal`]: far above what a client
/// that reuses its producers needs (one per process or partition writer), low enough that one
/// principal cannot fill the store and every node's table with ids kept for a week.
pub const DEFAULT_MAX_PRODUCERS_PER_PRINCIPAL: usize = 10_000;

/// A week: the default expiry of idle producers and consumer groups.
pub const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_record_bytes: 1024 * 1024,
            max_batch_records: 100_000,
            retention_interval: Duration::from_secs(30),
            producer_expiry: WEEK,
            max_producers_per_principal: DEFAULT_MAX_PRODUCERS_PER_PRINCIPAL,
            group_expiry: WEEK,
        }
    }
}

/// A topic and its live partitions.
pub(crate) struct Topic {
    config: TopicConfig,
    /// Which creation of the topic this is (shared logs; see `SharedLog::incarnation`).
    incarnation: Option<String>,
    partitions: Vec<Arc<Partition>>,
    /// Admission per key, if the topic has a limit.
    admission: Option<Mutex<admission::AdmissionLog>>,
    /// This topic's `publish_records` and `publish_bytes` counters, looked up once.
    published: (weir_metrics::Counter, weir_metrics::Counter),
    /// Partition that keyless records of the next request stick to (sticky partitioner).
    sticky: AtomicU32,
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
    /// Serialises the writes of producer records (issue, epoch bump, claim, expiry): each
    /// decides from the table and writes before the next decides, so no epoch is issued twice
    /// and the stored next id never goes back.
    producer_writes: tokio::sync::Mutex<()>,
    /// When each (group, topic) last committed, ms since the epoch (since this start).
    group_commits: Mutex<HashMap<(String, String), i64>>,
    /// The latest commit time this broker has given a group commit: commit times never go
    /// back on one node, even when its clock does (see [`groups::commit_time`]).
    commit_clock: std::sync::atomic::AtomicI64,
    /// When each (group, topic) was last otherwise used by a client (a fetch of its offsets,
    /// its last subscriber leaving), ms since the epoch (since this start).
    group_used: Mutex<HashMap<(String, String), i64>>,
    /// Open subscriptions of each (group, topic): a group with one is in use and never expires.
    group_members: Mutex<HashMap<(String, String), usize>>,
    /// Commits hold it shared, expiry exclusively: a group is never deleted between the check
    /// that it is idle and a commit that was acknowledged.
    group_writes: tokio::sync::RwLock<()>,
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
            match Self::open_topic(&store, topic_config.clone()) {
                Ok(topic) => {
                    topics.insert(topic.config.name.clone(), topic);
                }
                // On a shared log another node may be deleting it (its stream is gone): the
                // topic refresh tries again; one topic does not keep the node from starting.
                Err(e) if store.shared().is_some() => {
                    tracing::warn!(message = "Cannot open a topic of the shared log; will retry.", topic = %topic_config.name, error = %e);
                }
                Err(e) => return Err(e),
            }
        }
        let stored = store.load_producers()?;
        let now = now_ms();
        // Never below an id already issued, whatever the stored next id says (a store whose
        // next id was not carried over).
        let max_id = stored.producers.iter().map(|(id, _)| *id).max();
        let mut producers = ProducerTable {
            records: HashMap::new(),
            next_id: stored.next_id.max(max_id.map_or(0, |m| m + 1)),
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
            producer_writes: Default::default(),
            group_commits: Default::default(),
            commit_clock: Default::default(),
            group_used: Default::default(),
            group_members: Default::default(),
            group_writes: Default::default(),
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
            incarnation: store.shared().and_then(|s| s.incarnation(&config.name)),
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
        let name = config.name.clone();
        let topic = match Self::blocking(move || {
            store.put_topic(&config)?;
            Self::open_topic(&store, config)
        })
        .await
        {
            // Another node created it first (shared logs).
            Err(BrokerError::Storage(LogError::Conflict { .. })) => {
                return Err(BrokerError::TopicExists(name))
            }
            other => other?,
        };
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
        self.group_used.lock().retain(|(_, t), _| t != name);
        let (m, label) = (weir_metrics::global(), weir_metrics::topic(name));
        m.publish_records.remove(&label);
        m.publish_bytes.remove(&label);
        m.publish_log_writes.remove(&label);
        m.admission_refused.remove(&label);
        tracing::info!(message = "Topic deleted.", topic = %name);
        Ok(())
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
        self.shared_topic(topic).await?;
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
        self.shared_topic(topic).await?;
        let p = self.partition(topic, partition)?;
        let stats = p.stats();
        let visible = p.visible_end();
        match start {
            StartAt::Earliest => Ok(stats.start_offset),
            StartAt::Latest => Ok(visible),
            StartAt::Offset(o) if o > self.end_at_least(&p, o).await? => {
                Err(BrokerError::OffsetOutOfRange {
                    tp: p.tp.clone(),
                    offset: o,
                    start: stats.start_offset,
                    end: p.next_offset(),
                })
            }
            StartAt::Offset(o) => Ok(o.max(stats.start_offset)),
            StartAt::Timestamp(ts) => Self::blocking(move || p.offset_for_timestamp(ts)).await,
        }
    }
}

#[cfg(test)]
#[macro_use]
mod tests_suite;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_expiry;
#[cfg(test)]
mod tests_shared;
