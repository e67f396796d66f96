//! Retention of records, and expiry of idle producers and consumer groups.

use std::sync::Arc;

use weir_core::now_ms;
use weir_log::GroupEntry;

use crate::partition::Partition;
use crate::{Broker, BrokerError, Topic};

impl Broker {
    /// Runs retention over every topic once; returns the records removed.
    ///
    /// # Errors
    /// A store failure.
    pub async fn apply_retention(&self) -> Result<u64, BrokerError> {
        self.refresh_starts().await?;
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
    /// without a subscriber and unused (no commit, no fetch) for longer than the group expiry.
    /// Returns how many of each.
    ///
    /// # Errors
    /// A store failure (what was removed before it stays removed).
    pub async fn expire_idle(&self, now_ms: i64) -> Result<(usize, usize), BrokerError> {
        let producers = self.expire_producers(now_ms).await?;
        let groups = self.expire_groups(now_ms).await?;
        Ok((producers, groups))
    }

    async fn expire_producers(&self, now_ms: i64) -> Result<usize, BrokerError> {
        let _writing = self.producer_writes.lock().await;
        // Chosen and forgotten in one step under the table's lock: a publish checked after
        // this is refused as expired; one checked before touched the producer, so it is not
        // chosen.
        if self.is_shared() {
            // Appends through other nodes count as use: the partitions saw them in the tail.
            let activity: Vec<(u64, i64)> = self
                .topics
                .read()
                .values()
                .flat_map(|t| t.partitions.iter().flat_map(|p| p.producer_activity()))
                .collect();
            let mut producers = self.producers.lock();
            for (id, at) in activity {
                if let Some(r) = producers.records.get_mut(&id) {
                    r.last_used_ms = r.last_used_ms.max(at);
                }
            }
        }
        let expired = {
            let mut producers = self.producers.lock();
            let ids = producers.expired(now_ms, self.config.producer_expiry.as_millis() as u64);
            for id in &ids {
                producers.records.remove(id);
            }
            ids
        };
        if expired.is_empty() {
            return Ok(0);
        }
        self.delete_producers(expired.clone()).await?;
        tracing::info!(message = "Idle producers expired.", count = expired.len());
        Ok(expired.len())
    }

    /// Releases producers of the server's that are no longer used (a removed plugin's): they
    /// are forgotten like expired ones.
    ///
    /// # Errors
    /// A store failure.
    pub async fn release_server_producers(&self, ids: &[u64]) -> Result<(), BrokerError> {
        let _writing = self.producer_writes.lock().await;
        let ids: Vec<u64> = {
            let mut producers = self.producers.lock();
            let ids: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| {
                    producers
                        .records
                        .get(id)
                        .is_some_and(|r| r.owner == crate::owners::Owner::Server)
                })
                .collect();
            for id in &ids {
                producers.records.remove(id);
            }
            ids
        };
        if !ids.is_empty() {
            self.delete_producers(ids).await?;
        }
        Ok(())
    }

    /// Deletes forgotten producers' partition states and records.
    async fn delete_producers(&self, ids: Vec<u64>) -> Result<(), BrokerError> {
        let partitions: Vec<Arc<Partition>> = self
            .topics
            .read()
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect();
        let store = self.store.clone();
        Self::blocking(move || {
            // Partition states first: a crash half-way leaves a producer record whose
            // sequences are gone, which the next pass removes.
            for p in &partitions {
                p.remove_producers(&ids)?;
            }
            Ok(store.delete_producers(&ids)?)
        })
        .await
    }

    async fn expire_groups(&self, now_ms: i64) -> Result<usize, BrokerError> {
        let store = self.store.clone();
        let groups: Vec<GroupEntry> = Self::blocking(move || Ok(store.list_groups()?)).await?;
        let mut removed = 0;
        for g in groups {
            if !self.group_idle(&g, now_ms) {
                continue;
            }
            // Checked again with commits held off, then deleted.
            let _writing = self.group_writes.write().await;
            if !self.group_idle(&g, now_ms) {
                continue;
            }
            let store = self.store.clone();
            let (group, topic) = (g.group.clone(), g.topic.clone());
            Self::blocking(move || Ok(store.delete_group(&group, &topic)?)).await?;
            let key = (g.group, g.topic);
            self.group_commits.lock().remove(&key);
            self.group_used.lock().remove(&key);
            removed += 1;
        }
        Ok(removed)
    }

    /// No subscriber and no use for longer than the group expiry (Kafka's
    /// `offsets.retention.minutes`, counted from when the group became empty).
    fn group_idle(&self, g: &GroupEntry, now_ms: i64) -> bool {
        let key = (g.group.clone(), g.topic.clone());
        if self.group_members.lock().get(&key).is_some_and(|n| *n > 0) {
            return false;
        }
        // A commit stored before commit times were recorded counts from this start.
        let committed = self.group_commits.lock().get(&key).copied();
        let used = self.group_used.lock().get(&key).copied();
        let last = committed
            .into_iter()
            .chain(used)
            .fold(g.last_commit_ms, i64::max);
        let last = if last == 0 { self.started_ms } else { last };
        weir_core::elapsed_ms(last, now_ms) > self.config.group_expiry.as_millis() as u64
    }
}
