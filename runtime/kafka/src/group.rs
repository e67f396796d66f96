//! One consumer group's membership state machine (see `coordinator.rs` for the protocol and
//! the states).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A group's state, with Kafka's names (DescribeGroups shows them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

/// What a JoinGroup is answered with.
#[derive(Debug)]
pub(crate) struct Joined {
    pub(crate) generation: i32,
    pub(crate) protocol_type: String,
    pub(crate) protocol: String,
    pub(crate) leader: String,
    pub(crate) member_id: String,
    /// Every member's id and subscription for the chosen protocol; the leader's answer only.
    pub(crate) members: Vec<(String, Bytes)>,
}

pub(crate) struct Member {
    pub(crate) client_id: String,
    pub(crate) host: String,
    pub(crate) session_timeout: Duration,
    pub(crate) rebalance_timeout: Duration,
    pub(crate) protocols: Vec<(String, Bytes)>,
    pub(crate) assignment: Bytes,
    /// Dropped from the group when this passes without a heartbeat (or join, sync, commit).
    pub(crate) expires: Instant,
    pub(crate) joining: Option<oneshot::Sender<Result<Joined, ResponseError>>>,
    pub(crate) syncing: Option<oneshot::Sender<Result<Bytes, ResponseError>>>,
}

pub(crate) struct Group {
    pub(crate) state: State,
    pub(crate) generation: i32,
    pub(crate) protocol_type: String,
    pub(crate) protocol: Option<String>,
    pub(crate) leader: Option<String>,
    pub(crate) members: BTreeMap<String, Member>,
    /// Ids given to new members (JoinGroup v4+) that have not joined with them yet, until
    /// when they may.
    pub(crate) pending: HashMap<String, Instant>,
    /// PreparingRebalance: members that have not rejoined by then are dropped.
    pub(crate) rebalance_deadline: Instant,
}

impl Group {
    pub(crate) fn new() -> Self {
        Group {
            state: State::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: Default::default(),
            rebalance_deadline: Instant::now(),
        }
    }

    /// Every member must join again: pending syncs are told to rejoin.
    pub(crate) fn prepare_rebalance(&mut self) {
        if self.state == State::PreparingRebalance {
            return;
        }
        self.state = State::PreparingRebalance;
        let longest = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        self.rebalance_deadline = Instant::now() + longest;
        for m in self.members.values_mut() {
            if let Some(s) = m.syncing.take() {
                let _ = s.send(Err(ResponseError::RebalanceInProgress));
            }
        }
    }

    /// Ends the join phase once every member joined or the deadline passed.
    pub(crate) fn try_complete_join(&mut self, now: Instant) {
        if self.state != State::PreparingRebalance {
            return;
        }
        let all_joined = self.members.values().all(|m| m.joining.is_some());
        if !all_joined && now < self.rebalance_deadline {
            return;
        }
        self.members.retain(|_, m| m.joining.is_some());
        self.generation = self.generation.wrapping_add(1).max(1);
        if self.members.is_empty() {
            self.state = State::Empty;
            self.leader = None;
            self.protocol = None;
            return;
        }
        if !self
            .leader
            .as_ref()
            .is_some_and(|l| self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        let leader = self.leader.clone().expect("a member leads");
        // The first of the leader's protocols that every member supports (checked at join).
        let protocol = self.members[&leader]
            .protocols
            .iter()
            .map(|(name, _)| name.clone())
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == name))
            })
            .unwrap_or_default();
        let subscriptions: Vec<(String, Bytes)> = self
            .members
            .iter()
            .map(|(id, m)| {
                let metadata = m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, md)| md.clone())
                    .unwrap_or_default();
                (id.clone(), metadata)
            })
            .collect();
        self.protocol = Some(protocol.clone());
        self.state = State::CompletingRebalance;
        for (id, m) in self.members.iter_mut() {
            m.assignment = Bytes::new();
            m.expires = now + m.session_timeout;
            if let Some(j) = m.joining.take() {
                let _ = j.send(Ok(Joined {
                    generation: self.generation,
                    protocol_type: self.protocol_type.clone(),
                    protocol: protocol.clone(),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        subscriptions.clone()
                    } else {
                        Vec::new()
                    },
                }));
            }
        }
    }

    /// The member exists and is in this generation.
    pub(crate) fn check(&self, member_id: &str, generation: i32) -> Result<(), ResponseError> {
        if !self.members.contains_key(member_id) {
            return Err(ResponseError::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        Ok(())
    }

    pub(crate) fn remove(&mut self, member_id: &str) -> bool {
        let Some(m) = self.members.remove(member_id) else {
            return false;
        };
        if let Some(j) = m.joining {
            let _ = j.send(Err(ResponseError::UnknownMemberId));
        }
        if let Some(s) = m.syncing {
            let _ = s.send(Err(ResponseError::UnknownMemberId));
        }
        if self.members.is_empty() {
            self.state = State::Empty;
            self.leader = None;
            self.protocol = None;
            self.generation = self.generation.wrapping_add(1).max(1);
        } else {
            self.prepare_rebalance();
            self.try_complete_join(Instant::now());
        }
        true
    }
}
