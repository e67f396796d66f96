//! Following a log shared with other weir nodes (a replicated engine): their topics, their
//! appends, their producers. With a single-writer log none of this does anything.

use std::collections::BTreeSet;
use std::sync::Arc;

use weir_core::{now_ms, TopicConfig};
use weir_log::LogError;

use crate::owners::ProducerRecord;
use crate::partition::Partition;
use crate::{Broker, BrokerError, ProducerFields, Topic};

/// What [`Broker::look_up_topic`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicLookup {
    /// Open on this node.
    Open,
    /// The shared log has its configuration, but this node could not open it yet (another
    /// node is creating it: the configuration is written before the stream): look again soon.
    Opening,
    /// No such topic.
    Absent,
}

impl Broker {
    /// Whether other weir nodes write the same log.
    pub fn is_shared(&self) -> bool {
        self.store.shared().is_some()
    }

    /// Fails with [`BrokerError::UnknownTopic`] unless the topic exists; in a shared log, one
    /// this node has not seen yet is looked up in the store first (call it before the
    /// synchronous lookups: describe, watch, partition counts).
    ///
    /// # Errors
    /// Unknown topic; a store failure.
    pub async fn ensure_topic(&self, name: &str) -> Result<(), BrokerError> {
        self.shared_topic(name).await.map(|_| ())
    }

    /// A topic; in a shared log, one this node has not seen yet is looked up in the store.
    pub(crate) async fn shared_topic(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        match self.topic(name) {
            Err(BrokerError::UnknownTopic(_)) if self.is_shared() => {
                self.refresh_topics().await?;
                self.topic(name)
            }
            found => found,
        }
    }

    /// Whether a topic is open here, being created (the shared log has its configuration but
    /// this node cannot open it yet: its stream is being made), or absent. One look at the
    /// store at most: callers retry only [`TopicLookup::Opening`], and a misspelt name is
    /// refused at once rather than after their retries.
    ///
    /// # Errors
    /// A store failure.
    pub async fn look_up_topic(&self, name: &str) -> Result<TopicLookup, BrokerError> {
        if self.topic(name).is_ok() {
            return Ok(TopicLookup::Open);
        }
        if !self.is_shared() {
            return Ok(TopicLookup::Absent);
        }
        let configured = self.refresh_topics_named().await?;
        Ok(if self.topic(name).is_ok() {
            TopicLookup::Open
        } else if configured.contains(name) {
            TopicLookup::Opening
        } else {
            TopicLookup::Absent
        })
    }

    /// Opens topics other nodes created and drops those they deleted (shared logs).
    ///
    /// # Errors
    /// A store failure.
    pub async fn refresh_topics(&self) -> Result<(), BrokerError> {
        self.refresh_topics_named().await.map(drop)
    }

    /// [`Self::refresh_topics`], returning the names the shared log has a configuration of
    /// (opened here or not).
    async fn refresh_topics_named(&self) -> Result<BTreeSet<String>, BrokerError> {
        if !self.is_shared() {
            return Ok(BTreeSet::new());
        }
        let _admin = self.admin.lock().await;
        let store = self.store.clone();
        let known: Vec<(TopicConfig, Option<String>)> = self
            .topics
            .read()
            .values()
            .map(|t| (t.config.clone(), t.incarnation.clone()))
            .collect();
        let (opened, names) = Self::blocking(move || {
            let configs = store.load_topics()?;
            let names: BTreeSet<String> = configs.iter().map(|c| c.name.clone()).collect();
            // New topics, and topics deleted and created again (with another configuration,
            // or with the same one: another creation).
            let opened = configs
                .into_iter()
                .filter(|c| {
                    let now = store.shared().and_then(|s| s.incarnation(&c.name));
                    !known.iter().any(|(k, i)| k == c && *i == now)
                })
                .filter_map(|c| match Self::open_topic(&store, c.clone()) {
                    Ok(topic) => Some(topic),
                    Err(e) => {
                        // Being deleted (its stream gone) or created right now: next time.
                        tracing::debug!(message = "Cannot open a topic of the shared log yet.", topic = %c.name, error = %e);
                        None
                    }
                })
                .collect::<Vec<_>>();
            Ok((opened, names))
        })
        .await?;
        let mut topics = self.topics.write();
        topics.retain(|name, _| names.contains(name));
        for topic in opened {
            tracing::info!(message = "Topic created (or created again) by another node.", topic = %topic.config.name);
            topics.insert(topic.config.name.clone(), topic);
        }
        Ok(names)
    }

    /// Reloads a producer's record when another node may have issued it or bumped its epoch
    /// (shared logs; only when this node does not know it or knows an older epoch).
    pub(crate) async fn refresh_producer(&self, p: &ProducerFields) -> Result<(), BrokerError> {
        if !self.is_shared() {
            return Ok(());
        }
        let stale = match self.producers.lock().records.get(&p.producer_id) {
            None => true,
            Some(r) => p.epoch > r.epoch,
        };
        if stale {
            self.reload_producer(p.producer_id).await?;
        }
        Ok(())
    }

    pub(crate) async fn reload_producer(&self, id: u64) -> Result<(), BrokerError> {
        let store = self.store.clone();
        let Some(bytes) = Self::blocking(move || match store.shared() {
            Some(shared) => Ok(shared.load_producer(id)?),
            None => Ok(None),
        })
        .await?
        else {
            // Expired and deleted by another node: forgotten here too (a publish or re-init
            // is then refused as expired).
            self.producers.lock().records.remove(&id);
            return Ok(());
        };
        let mut record = ProducerRecord::decode(&bytes).ok_or_else(|| LogError::Malformed {
            what: format!("record of producer {id}"),
            reason: format!("{} bytes", bytes.len()),
        })?;
        record.last_used_ms = now_ms();
        let mut table = self.producers.lock();
        table.next_id = table.next_id.max(id + 1);
        match table.records.get(&id) {
            Some(known) if known.epoch > record.epoch => {}
            _ => {
                table.records.insert(id, record);
            }
        }
        Ok(())
    }

    /// Reloads the stored next producer id and every record this node lacks, after another
    /// node issued the id this one proposed.
    pub(crate) async fn reload_producers(&self) -> Result<(), BrokerError> {
        let store = self.store.clone();
        let stored = Self::blocking(move || Ok(store.load_producers()?)).await?;
        let now = now_ms();
        let mut table = self.producers.lock();
        table.next_id = table.next_id.max(stored.next_id);
        for (id, bytes) in stored.producers {
            if let Some(mut record) = ProducerRecord::decode(&bytes) {
                record.last_used_ms = now;
                table.records.entry(id).or_insert(record);
            }
        }
        Ok(())
    }

    /// One pass of following a shared log: every partition learns what other nodes appended
    /// (and readers see it); with `reload_topics`, topics created or deleted elsewhere too.
    ///
    /// # Errors
    /// A store failure (the engine unreachable).
    pub async fn follow_shared(&self, reload_topics: bool) -> Result<(), BrokerError> {
        if !self.is_shared() {
            return Ok(());
        }
        if reload_topics {
            self.refresh_topics().await?;
        }
        let partitions: Vec<Arc<Partition>> = self
            .topics
            .read()
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect();
        Self::blocking(move || {
            // One unreachable partition (its stream electing a leader) does not hold back
            // the others.
            let mut first_error = None;
            for p in partitions {
                if let Err(e) = p.catch_up() {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
        .await
    }

    /// A partition's end; in a shared log, when `offset` is past what this node has seen, after
    /// catching up (another node may have appended it).
    pub(crate) async fn end_at_least(
        &self,
        partition: &Arc<Partition>,
        offset: u64,
    ) -> Result<u64, BrokerError> {
        let end = partition.next_offset();
        if offset <= end || !self.is_shared() {
            return Ok(end);
        }
        let p = partition.clone();
        Self::blocking(move || p.catch_up()).await?;
        Ok(partition.next_offset())
    }

    /// Moves every partition's start to where retention on any node left it (shared logs).
    pub(crate) async fn refresh_starts(&self) -> Result<(), BrokerError> {
        if !self.is_shared() {
            return Ok(());
        }
        let partitions: Vec<Arc<Partition>> = self
            .topics
            .read()
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect();
        Self::blocking(move || {
            for p in partitions {
                p.refresh_start()?;
            }
            Ok(())
        })
        .await
    }
}
