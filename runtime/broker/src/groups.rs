//! Consumer-group offsets: commits (never past a partition's end), fetches, the list the
//! monitor reads; membership (open subscriptions), which keeps a group from expiring.

use std::sync::Arc;

use weir_core::now_ms;

use crate::{Broker, BrokerError};

/// An open subscription of a consumer group: while one lives the group is in use and never
/// expires; its idle time counts from when the last one ends.
pub struct GroupMember {
    broker: Arc<Broker>,
    key: (String, String),
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        let mut members = self.broker.group_members.lock();
        if let Some(n) = members.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                members.remove(&self.key);
            }
        }
        drop(members);
        self.broker.touch_group(&self.key.0, &self.key.1);
    }
}

impl Broker {
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
        self.shared_topic(topic).await?;
        for &(p, offset) in &offsets {
            let partition = self.partition(topic, p)?;
            let end = self.end_at_least(&partition, offset).await?;
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
        {
            // Touched before the write and held shared across it: expiry, which holds it
            // exclusively, sees this commit or runs before it.
            let _writing = self.group_writes.read().await;
            self.group_commits
                .lock()
                .insert((group.to_string(), topic.to_string()), now);
            Self::blocking(move || {
                Ok(store.put_group_offsets(&group_owned, &topic_owned, &offsets, now)?)
            })
            .await?;
        }
        if self.store.shared().is_some() {
            // Stored in the replicated log: durable once it acknowledged.
            return Ok(());
        }
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

    /// Records a client's use of a group now (a fetch of its offsets): its idle time starts
    /// again. Not called for the server's own reads (the monitor).
    pub fn touch_group(&self, group: &str, topic: &str) {
        self.group_used
            .lock()
            .insert((group.to_string(), topic.to_string()), now_ms());
    }

    /// Joins `group` on `topic` for the life of the returned guard (a subscription that
    /// starts from the group's offsets): the group does not expire while it lives.
    pub fn join_group(self: &Arc<Self>, group: &str, topic: &str) -> GroupMember {
        let key = (group.to_string(), topic.to_string());
        *self.group_members.lock().entry(key.clone()).or_insert(0) += 1;
        GroupMember {
            broker: self.clone(),
            key,
        }
    }
}
