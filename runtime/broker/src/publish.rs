//! Publishing: validation, the admission limit, the append under the partition's lock (with
//! the idempotence check), and the wait for durability before readers see the records.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use weir_core::{now_ms, partition_for_key, Record};
use weir_log::codec;

use crate::partition::Partition;
use crate::{Appended, Broker, BrokerError, Caller, ProducerFields, Topic};

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

impl Broker {
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
        // A plugin's committed outputs are forwarded whole (a batch that fans out may exceed
        // the client limit); a refusal would block its outbox for good.
        if publish.records.len() > self.config.max_batch_records && publish.caller != Caller::Server
        {
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
        let topic = self.shared_topic(&publish.topic).await?;
        if let Some(p) = &publish.producer {
            self.refresh_producer(p).await?;
        }
        self.validate(&publish, &topic)?;
        self.admit(&publish, &topic)?;
        let this = self.clone();
        let (appended, ticket) =
            Self::blocking(move || this.append_blocking(&topic, publish)).await?;
        let this = self.clone();
        // The durability wait runs in its own task so that readers are shown the records even
        // if the publisher goes away before its acknowledgement.
        let task = tokio::spawn(async move {
            // A shared log acknowledged the append once replicated: nothing local to wait for.
            if this.store.shared().is_none() {
                this.durability
                    .durable(ticket)
                    .await
                    .map_err(|e| BrokerError::NotDurable {
                        reason: e.to_string(),
                    })?;
            }
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
        // Encoded, and checked against the log's limits, before any partition is written: a
        // refusal stores nothing.
        let mut encoded = Vec::with_capacity(groups.len());
        for (p, records) in groups {
            let chunks = codec::encode_chunks(&records, now, self.store.chunk_target_bytes());
            self.store
                .check_append(&chunks, usize::from(publish.producer.is_some()))
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
            encoded.push((p, records, chunks));
        }
        let mut acks = Vec::with_capacity(encoded.len());
        for (p, records, chunks) in encoded {
            let partition = topic.partitions[p as usize].clone();
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
        // A shared log's ack is its durability: no local sync to ask for (the ticket is unused).
        let ticket = if self.store.shared().is_some() {
            0
        } else {
            self.durability.written()
        };
        Ok((acks, ticket))
    }
}
