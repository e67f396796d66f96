//! Consumer-group offsets: commits (never past a partition's end), fetches, the list the
//! monitor reads; membership (open subscriptions), which keeps a group from expiring.

use std::sync::Arc;

use weir_core::now_ms;

use crate::{Broker, BrokerError};

/// A group commit's time: the clock's `now`, or the latest time given before if the clock
/// went back (an NTP step). On a shared log a commit keeps a later one it raced with
/// (`at_ms` in the JetStream log): a commit through this node after a step back must still
/// count as later than this node's earlier ones, or it would be answered but not kept. Never
/// ahead of the clock by more than the step (no counter that runs ahead under load).
pub(crate) fn commit_time(clock: &std::sync::atomic::AtomicI64, now: i64) -> i64 {
    let before = clock.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
    before.max(now)
}

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
        let now = commit_time(&self.commit_clock, now_ms());
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

#[cfg(test)]
mod tests {
    use super::commit_time;

    /// A clock stepped back does not make a later commit look earlier than this node's
    /// earlier ones; once the clock passes the latest time again, commits follow it.
    #[test]
    fn commit_times_never_go_back_when_the_clock_does() {
        let clock = Default::default();
        assert_eq!(commit_time(&clock, 10_000), 10_000);
        assert_eq!(commit_time(&clock, 4_000), 10_000, "stepped back 6 s");
        assert_eq!(commit_time(&clock, 9_999), 10_000);
        assert_eq!(commit_time(&clock, 10_001), 10_001);
        assert_eq!(
            commit_time(&clock, 10_001),
            10_001,
            "never runs ahead of the clock"
        );
    }
}
