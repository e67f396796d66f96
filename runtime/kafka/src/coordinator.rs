//! Kafka's classic group membership protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup):
//! who is in a consumer group, which generation it is in, and the assignment its leader
//! computed. The assignment itself is the clients' (their assignor runs in the leader), as
//! in Kafka; the offsets the members commit are weir's group offsets (`groups.rs`).
//!
//! Membership is held in memory by the node a member is connected to, as a Kafka
//! coordinator holds it for its groups: a restart makes every member join again (their
//! heartbeats answer UNKNOWN_MEMBER_ID), which costs a rebalance and loses no offset.
//!
//! States as Kafka names them: a join moves a group to `PreparingRebalance`; once every
//! member has (re)joined, or the rebalance time-out passed and the missing ones are dropped,
//! the generation is bumped, the leader gets every member's subscription, and the group is
//! `CompletingRebalance` until the leader's SyncGroup hands out the assignment (`Stable`).
//! A member whose session times out without a heartbeat is dropped, and the others rebalance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::group::{Group, Member};
pub(crate) use crate::group::{Joined, State};

/// A member's join request.
#[derive(Clone)]
pub(crate) struct Join {
    pub(crate) group: String,
    /// Empty for a new member.
    pub(crate) member_id: String,
    pub(crate) client_id: String,
    pub(crate) host: String,
    pub(crate) session_timeout: Duration,
    pub(crate) rebalance_timeout: Duration,
    pub(crate) protocol_type: String,
    pub(crate) protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a new member is first given its id and asked to join again with it.
    pub(crate) id_required: bool,
}

/// A member as DescribeGroups shows it.
pub(crate) struct MemberView {
    pub(crate) member_id: String,
    pub(crate) client_id: String,
    pub(crate) host: String,
    pub(crate) metadata: Bytes,
    pub(crate) assignment: Bytes,
}

/// A group as DescribeGroups and ListGroups show it.
pub(crate) struct GroupView {
    pub(crate) state: State,
    pub(crate) protocol_type: String,
    pub(crate) protocol: String,
    pub(crate) members: Vec<MemberView>,
}

/// The groups of this node.
pub(crate) struct Coordinator {
    /// The groups, and whether the listener has stopped (then nothing waits any more).
    groups: Mutex<HashMap<String, Group>>,
    /// The broker's membership of each (group, topic) a group with members here committed or
    /// fetched offsets for: while held, the broker never expires that group's offsets, as for
    /// a gRPC subscription. Dropped once the group has no members.
    in_use: Mutex<HashMap<String, HashMap<String, weir_broker::GroupMember>>>,
    stopped: std::sync::atomic::AtomicBool,
    next_member: AtomicU64,
    /// Differs at every start, so member ids given before a restart are never given again.
    nonce: u64,
}

impl Default for Coordinator {
    fn default() -> Self {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Coordinator {
            groups: Mutex::default(),
            in_use: Mutex::default(),
            stopped: Default::default(),
            next_member: AtomicU64::new(0),
            nonce,
        }
    }
}

/// Session time-outs a member may ask for (Kafka's `group.min.session.timeout.ms` and
/// `group.max.session.timeout.ms` defaults); others are refused with INVALID_SESSION_TIMEOUT.
pub(crate) const SESSION_TIMEOUTS: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(6)..=Duration::from_secs(1800);

impl Coordinator {
    /// [`Coordinator::join_where`] on a node that coordinates every group.
    #[cfg(test)]
    pub(crate) fn join(
        &self,
        join: Join,
    ) -> Result<oneshot::Receiver<Result<Joined, ResponseError>>, (ResponseError, String)> {
        self.join_where(join, |_, _| true)
    }

    /// Joins (or rejoins) a member if `here(group, held)` says this node coordinates the group
    /// (`held`: whether it holds it now), else NOT_COORDINATOR; resolves when the join phase
    /// ends. Asked under the groups' lock, as [`Coordinator::unload`] decides, so a join
    /// cannot bring back a group just let go.
    pub(crate) fn join_where(
        &self,
        join: Join,
        here: impl FnOnce(&str, bool) -> bool,
    ) -> Result<oneshot::Receiver<Result<Joined, ResponseError>>, (ResponseError, String)> {
        let mut groups = self.groups.lock();
        if self.stopped.load(Ordering::SeqCst) {
            return Err((ResponseError::NotCoordinator, join.member_id.clone()));
        }
        if !here(&join.group, groups.contains_key(&join.group)) {
            return Err((ResponseError::NotCoordinator, join.member_id.clone()));
        }
        // Refused before the group is made: a refused join leaves nothing held here.
        if !SESSION_TIMEOUTS.contains(&join.session_timeout) {
            return Err((ResponseError::InvalidSessionTimeout, join.member_id.clone()));
        }
        let group = groups.entry(join.group.clone()).or_insert_with(Group::new);
        let member_id = if join.member_id.is_empty() {
            let n = self.next_member.fetch_add(1, Ordering::Relaxed);
            let id = format!(
                "{}-{:x}-{n}",
                if join.client_id.is_empty() {
                    "member"
                } else {
                    &join.client_id
                },
                self.nonce
            );
            if join.id_required {
                group
                    .pending
                    .insert(id.clone(), Instant::now() + join.session_timeout);
                return Err((ResponseError::MemberIdRequired, id));
            }
            id
        } else {
            join.member_id.clone()
        };
        let known =
            group.members.contains_key(&member_id) || group.pending.remove(&member_id).is_some();
        if !known && !join.member_id.is_empty() {
            // Not one of ours (or from before a restart): the client starts over without one.
            return Err((ResponseError::UnknownMemberId, member_id));
        }
        if !group.members.is_empty() {
            if group.protocol_type != join.protocol_type {
                return Err((ResponseError::InconsistentGroupProtocol, member_id));
            }
            let others_share_one = join.protocols.iter().any(|(name, _)| {
                group
                    .members
                    .iter()
                    .filter(|(id, _)| **id != member_id)
                    .all(|(_, m)| m.protocols.iter().any(|(n, _)| n == name))
            });
            if !others_share_one {
                return Err((ResponseError::InconsistentGroupProtocol, member_id));
            }
        } else {
            group.protocol_type = join.protocol_type.clone();
        }
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let member = group.members.entry(member_id).or_insert_with(|| Member {
            client_id: String::new(),
            host: String::new(),
            session_timeout: join.session_timeout,
            rebalance_timeout: join.rebalance_timeout,
            protocols: Vec::new(),
            assignment: Bytes::new(),
            expires: now,
            joining: None,
            syncing: None,
        });
        member.client_id = join.client_id;
        member.host = join.host;
        member.session_timeout = join.session_timeout;
        member.rebalance_timeout = join.rebalance_timeout.min(*SESSION_TIMEOUTS.end());
        member.protocols = join.protocols;
        member.expires = now + join.session_timeout;
        if let Some(old) = member.joining.replace(tx) {
            let _ = old.send(Err(ResponseError::UnknownMemberId));
        }
        group.prepare_rebalance();
        group.try_complete_join(now);
        Ok(rx)
    }

    /// The member's assignment once its leader has synced (the leader's own sync hands
    /// everyone theirs).
    pub(crate) fn sync(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
    ) -> Result<oneshot::Receiver<Result<Bytes, ResponseError>>, ResponseError> {
        let mut groups = self.groups.lock();
        if self.stopped.load(Ordering::SeqCst) {
            return Err(ResponseError::NotCoordinator);
        }
        let group = groups
            .get_mut(group_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        group.check(member_id, generation)?;
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        match group.state {
            State::Empty | State::PreparingRebalance => {
                return Err(ResponseError::RebalanceInProgress)
            }
            State::Stable => {
                let m = group.members.get_mut(member_id).expect("checked");
                m.expires = now + m.session_timeout;
                let _ = tx.send(Ok(m.assignment.clone()));
            }
            State::CompletingRebalance => {
                let m = group.members.get_mut(member_id).expect("checked");
                m.expires = now + m.session_timeout;
                m.syncing = Some(tx);
                if group.leader.as_deref() == Some(member_id) {
                    let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
                    for (id, m) in group.members.iter_mut() {
                        m.assignment = given.remove(id).unwrap_or_default();
                        if let Some(s) = m.syncing.take() {
                            let _ = s.send(Ok(m.assignment.clone()));
                        }
                    }
                    group.state = State::Stable;
                }
            }
        }
        Ok(rx)
    }

    /// A heartbeat: keeps the member's session, and tells it when to rejoin.
    pub(crate) fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
    ) -> Result<(), ResponseError> {
        let mut groups = self.groups.lock();
        let group = groups
            .get_mut(group_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        group.check(member_id, generation)?;
        let m = group.members.get_mut(member_id).expect("checked");
        m.expires = Instant::now() + m.session_timeout;
        match group.state {
            State::PreparingRebalance => Err(ResponseError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// Members leave; the rest rebalance.
    pub(crate) fn leave(&self, group_id: &str, member_id: &str) -> Result<(), ResponseError> {
        let mut groups = self.groups.lock();
        let group = groups
            .get_mut(group_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        if group.remove(member_id) {
            Ok(())
        } else {
            Err(ResponseError::UnknownMemberId)
        }
    }

    /// Whether an offset commit of this member in this generation is taken now. A commit
    /// outside any membership (generation -1, no member id) is taken while the group has no
    /// members, as Kafka takes a standalone consumer's.
    pub(crate) fn may_commit(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
    ) -> Result<(), ResponseError> {
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return if generation < 0 && member_id.is_empty() {
                Ok(())
            } else {
                Err(ResponseError::UnknownMemberId)
            };
        };
        if generation < 0 && member_id.is_empty() {
            return if group.members.is_empty() {
                Ok(())
            } else {
                Err(ResponseError::UnknownMemberId)
            };
        }
        group.check(member_id, generation)?;
        if group.state == State::CompletingRebalance {
            return Err(ResponseError::RebalanceInProgress);
        }
        let m = group.members.get_mut(member_id).expect("checked");
        m.expires = Instant::now() + m.session_timeout;
        Ok(())
    }

    /// Drops members whose session expired and ends join phases whose time ran out. Called
    /// every [`TICK`].
    pub(crate) fn tick(&self) {
        let now = Instant::now();
        let mut groups = self.groups.lock();
        for group in groups.values_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| m.joining.is_none() && m.expires <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                tracing::info!(message = "Kafka group member's session expired.", member = %id);
                group.remove(&id);
            }
            group.try_complete_join(now);
            group.pending.retain(|_, until| *until > now);
        }
        groups.retain(|_, g| !g.members.is_empty() || !g.pending.is_empty());
        let live = |name: &String| groups.get(name).is_some_and(|g| !g.members.is_empty());
        // Groups left empty give their offsets back to the broker's expiry.
        self.in_use.lock().retain(|name, _| live(name));
    }

    /// Marks `topic`'s offsets of `group` in use while the group has members here (`join`
    /// makes the broker's guard when there is none yet).
    pub(crate) fn in_use(
        &self,
        group: &str,
        topic: &str,
        join: impl FnOnce() -> weir_broker::GroupMember,
    ) {
        let live = self
            .groups
            .lock()
            .get(group)
            .is_some_and(|g| !g.members.is_empty());
        if !live {
            return;
        }
        let mut in_use = self.in_use.lock();
        let topics = in_use.entry(group.to_string()).or_default();
        if !topics.contains_key(topic) {
            topics.insert(topic.to_string(), join());
        }
    }

    /// The listener stops: every join and sync still waiting is answered NOT_COORDINATOR (the
    /// clients find a coordinator again), so no answer waits for a tick that will not come.
    pub(crate) fn stop(&self) {
        let mut groups = self.groups.lock();
        // Set under the lock: a join or sync after this sees it and does not wait.
        self.stopped.store(true, Ordering::SeqCst);
        self.in_use.lock().clear();
        for group in groups.values_mut() {
            not_coordinator(group);
        }
    }

    /// Drops the groups `here` says another node coordinates now (the cluster's members
    /// changed): their waiting joins and syncs are answered NOT_COORDINATOR, and their members'
    /// next calls too, so they find the new coordinator and rejoin there.
    pub(crate) fn unload(&self, here: impl Fn(&str) -> bool) {
        let mut groups = self.groups.lock();
        let moved: Vec<String> = groups.keys().filter(|g| !here(g)).cloned().collect();
        if moved.is_empty() {
            return;
        }
        for name in moved {
            if let Some(mut group) = groups.remove(&name) {
                tracing::info!(message = "Kafka group moved to another node's coordinator.", group = %name);
                not_coordinator(&mut group);
            }
        }
        self.in_use
            .lock()
            .retain(|name, _| groups.contains_key(name));
    }

    /// Whether this node holds `group` (members, or joins waiting).
    pub(crate) fn holds(&self, group: &str) -> bool {
        self.groups.lock().contains_key(group)
    }

    /// A group's view, `None` if this node holds no members of it.
    pub(crate) fn describe(&self, group_id: &str) -> Option<GroupView> {
        let groups = self.groups.lock();
        let g = groups.get(group_id)?;
        let protocol = g.protocol.clone().unwrap_or_default();
        Some(GroupView {
            state: g.state,
            protocol_type: g.protocol_type.clone(),
            protocol: protocol.clone(),
            members: g
                .members
                .iter()
                .map(|(id, m)| MemberView {
                    member_id: id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    metadata: m
                        .protocols
                        .iter()
                        .find(|(n, _)| *n == protocol)
                        .map(|(_, md)| md.clone())
                        .unwrap_or_default(),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        })
    }

    /// The groups with members on this node: name, protocol type, state.
    pub(crate) fn list(&self) -> Vec<(String, String, State)> {
        self.groups
            .lock()
            .iter()
            .map(|(name, g)| (name.clone(), g.protocol_type.clone(), g.state))
            .collect()
    }
}

/// Answers a group's waiting joins and syncs with NOT_COORDINATOR.
fn not_coordinator(group: &mut Group) {
    for m in group.members.values_mut() {
        if let Some(j) = m.joining.take() {
            let _ = j.send(Err(ResponseError::NotCoordinator));
        }
        if let Some(s) = m.syncing.take() {
            let _ = s.send(Err(ResponseError::NotCoordinator));
        }
    }
}

/// How often sessions and rebalance deadlines are checked.
pub(crate) const TICK: Duration = Duration::from_millis(200);

#[cfg(test)]
#[path = "tests_coordinator.rs"]
mod tests;
