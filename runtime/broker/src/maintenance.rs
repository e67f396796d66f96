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
