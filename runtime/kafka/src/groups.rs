//! Consumer groups: FindCoordinator, the membership calls (over [`Coordinator`]), and
//! OffsetCommit/OffsetFetch on weir's own group offsets, so `weir lag`, the status page and
//! gRPC consumers see a Kafka group's progress, and a group can move between the two APIs.
//!
//! Kafka keeps one offset per (group, topic, partition) with a metadata string; weir keeps
//! the offset (the metadata string is not stored: an OffsetFetch answers it empty).

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeGroupsRequest, DescribeGroupsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::coordinator::{Join, Joined};
use crate::wire::Ctx;
use crate::{access, errors, TopicOp, NODE_ID};

fn text(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

fn millis(ms: i32) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// FindCoordinator: this node coordinates every group its clients ask for (transaction
/// coordinators are refused: no Kafka transactions).
pub(crate) fn find_coordinator(
    ctx: &Ctx,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let (host, port) = &ctx.options.advertised;
    let group_key = request.key_type == 0;
    let (code, message) = if group_key {
        (0, None)
    } else {
        (
            ResponseError::CoordinatorNotAvailable.code(),
            Some(text("weir has no Kafka transactions (docs/kafka.md)")),
        )
    };
    let response = FindCoordinatorResponse::default();
    if version >= 4 {
        let keys = if request.coordinator_keys.is_empty() {
            vec![request.key]
        } else {
            request.coordinator_keys
        };
        return response.with_coordinators(
            keys.into_iter()
                .map(|key| {
                    CoordinatorEntry::default()
                        .with_key(key)
                        .with_node_id(BrokerId(if group_key { NODE_ID } else { -1 }))
                        .with_host(text(host.clone()))
                        .with_port(i32::from(*port))
                        .with_error_code(code)
                        .with_error_message(message.clone())
                })
                .collect(),
        );
    }
    let response = if version >= 1 {
        response.with_error_message(message)
    } else {
        response
    };
    response
        .with_error_code(code)
        .with_node_id(BrokerId(if group_key { NODE_ID } else { -1 }))
        .with_host(text(host.clone()))
        .with_port(i32::from(*port))
}

/// JoinGroup: the member joins now (before the connection's next request is read); the
/// returned answer resolves when the group's join phase ends.
pub(crate) fn join_group(
    ctx: &Ctx,
    request: JoinGroupRequest,
    version: i16,
    client_id: String,
) -> impl std::future::Future<Output = JoinGroupResponse> + Send + 'static {
    let session = millis(request.session_timeout_ms);
    // v0 has no rebalance time-out: it is the session's.
    let rebalance = if version == 0 {
        session
    } else {
        millis(request.rebalance_timeout_ms)
    };
    let join = Join {
        group: request.group_id.0.to_string(),
        member_id: request.member_id.to_string(),
        client_id,
        host: ctx.peer.ip().to_string(),
        session_timeout: session,
        rebalance_timeout: rebalance,
        protocol_type: request.protocol_type.to_string(),
        protocols: request
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        id_required: version >= 4,
    };
    let failed = |code: ResponseError, member: String| {
        JoinGroupResponse::default()
            .with_error_code(code.code())
            .with_generation_id(-1)
            .with_member_id(text(member))
    };
    let joined = ctx.coordinator.join(join);
    async move {
        let joined: Joined = match joined {
            Err((code, member)) => return failed(code, member),
            Ok(rx) => match rx.await {
                Ok(Ok(j)) => j,
                Ok(Err(code)) => return failed(code, String::new()),
                Err(_) => return failed(ResponseError::UnknownServerError, String::new()),
            },
        };
        answer_join(joined, version)
    }
}

fn answer_join(joined: Joined, version: i16) -> JoinGroupResponse {
    let response = JoinGroupResponse::default();
    // v7+ name the protocol type.
    let response = if version >= 7 {
        response.with_protocol_type(Some(text(joined.protocol_type)))
    } else {
        response
    };
    response
        .with_generation_id(joined.generation)
        .with_protocol_name(Some(text(joined.protocol)))
        .with_leader(text(joined.leader))
        .with_member_id(text(joined.member_id))
        .with_members(
            joined
                .members
                .into_iter()
                .map(|(id, metadata)| {
                    JoinGroupResponseMember::default()
                        .with_member_id(text(id))
                        .with_metadata(metadata)
                })
                .collect(),
        )
}

/// SyncGroup: handed to the coordinator now (a leader's assignment takes effect before the
/// connection's next request is read); the answer resolves with the member's assignment once
/// the leader handed them out.
pub(crate) fn sync_group(
    ctx: &Ctx,
    request: SyncGroupRequest,
) -> impl std::future::Future<Output = SyncGroupResponse> + Send + 'static {
    let assignments = request
        .assignments
        .into_iter()
        .map(|a| (a.member_id.to_string(), a.assignment))
        .collect();
    let rx = ctx.coordinator.sync(
        &request.group_id.0,
        &request.member_id,
        request.generation_id,
        assignments,
    );
    let (protocol_type, protocol_name) = (request.protocol_type, request.protocol_name);
    async move {
        let outcome = match rx {
            Ok(rx) => rx.await.unwrap_or(Err(ResponseError::UnknownServerError)),
            Err(code) => Err(code),
        };
        match outcome {
            Ok(assignment) => SyncGroupResponse::default()
                .with_protocol_type(protocol_type)
                .with_protocol_name(protocol_name)
                .with_assignment(assignment),
            Err(code) => SyncGroupResponse::default()
                .with_error_code(code.code())
                .with_assignment(Bytes::new()),
        }
    }
}

pub(crate) fn heartbeat(ctx: &Ctx, request: HeartbeatRequest) -> HeartbeatResponse {
    let result = ctx.coordinator.heartbeat(
        &request.group_id.0,
        &request.member_id,
        request.generation_id,
    );
    HeartbeatResponse::default().with_error_code(result.err().map_or(0, |c| c.code()))
}

/// LeaveGroup: v0–2 name one member, v3+ a list.
pub(crate) fn leave_group(
    ctx: &Ctx,
    request: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let group = request.group_id.0.to_string();
    if version < 3 {
        let result = ctx.coordinator.leave(&group, &request.member_id);
        return LeaveGroupResponse::default().with_error_code(result.err().map_or(0, |c| c.code()));
    }
    let members = request
        .members
        .into_iter()
        .map(|m| {
            let result = ctx.coordinator.leave(&group, &m.member_id);
            MemberResponse::default()
                .with_member_id(m.member_id)
                .with_group_instance_id(m.group_instance_id)
                .with_error_code(result.err().map_or(0, |c| c.code()))
        })
        .collect();
    LeaveGroupResponse::default().with_members(members)
}

/// OffsetCommit: checked against the member's generation, stored as weir group offsets (one
/// durable write per topic).
pub(crate) async fn offset_commit(ctx: &Ctx, request: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let allowed = ctx.coordinator.may_commit(
        &group,
        &request.member_id,
        request.generation_id_or_member_epoch,
    );
    let mut topics = Vec::with_capacity(request.topics.len());
    for t in request.topics {
        let partitions: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
        let result: Result<(), i16> = match &allowed {
            _ if !access::who(ctx).may(TopicOp::Subscribe, &t.name.0) => {
                Err(ResponseError::TopicAuthorizationFailed.code())
            }
            Err(code) => Err(code.code()),
            Ok(()) => {
                let offsets: Option<Vec<(u32, u64)>> = t
                    .partitions
                    .iter()
                    .map(|p| {
                        Some((
                            u32::try_from(p.partition_index).ok()?,
                            u64::try_from(p.committed_offset).ok()?,
                        ))
                    })
                    .collect();
                match offsets {
                    None => Err(ResponseError::InvalidCommitOffsetSize.code()),
                    Some(offsets) => ctx
                        .broker
                        .commit_offsets(&group, &t.name.0, offsets)
                        .await
                        .inspect(|()| {
                            ctx.coordinator
                                .in_use(&group, &t.name.0, || ctx.broker.join_group(&group, &t.name.0))
                        })
                        .map_err(|e| {
                            tracing::info!(message = "Kafka offset commit refused.", group = %group, error = %e);
                            errors::wire(&e)
                        }),
                }
            }
        };
        let code = result.err().unwrap_or(0);
        topics.push(
            OffsetCommitResponseTopic::default()
                .with_name(t.name)
                .with_partitions(
                    partitions
                        .into_iter()
                        .map(|p| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(p)
                                .with_error_code(code)
                        })
                        .collect(),
                ),
        );
    }
    OffsetCommitResponse::default().with_topics(topics)
}

/// OffsetFetch (v1–7: one group): -1 where the group committed nothing.
pub(crate) async fn offset_fetch(ctx: &Ctx, request: OffsetFetchRequest) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let wanted: Vec<(TopicName, Option<Vec<i32>>)> = match request.topics {
        Some(topics) => topics
            .into_iter()
            .map(|t| (t.name, Some(t.partition_indexes)))
            .collect(),
        // Null: every topic the group committed for.
        None => match ctx.broker.list_groups().await {
            Ok(all) => all
                .into_iter()
                .filter(|(g, topic)| *g == group && access::who(ctx).may(TopicOp::Subscribe, topic))
                .map(|(_, topic)| (TopicName(text(topic)), None))
                .collect(),
            Err(e) => {
                return OffsetFetchResponse::default().with_error_code(errors::wire(&e));
            }
        },
    };
    let mut topics = Vec::with_capacity(wanted.len());
    let who = access::who(ctx);
    for (name, partitions) in wanted {
        if !who.may(TopicOp::Subscribe, &name.0) {
            let denied = partitions
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(p)
                        .with_committed_offset(-1)
                        .with_error_code(ResponseError::TopicAuthorizationFailed.code())
                })
                .collect();
            topics.push(
                OffsetFetchResponseTopic::default()
                    .with_name(name)
                    .with_partitions(denied),
            );
            continue;
        }
        let stored = ctx.broker.fetch_offsets(&group, &name.0).await;
        if stored.is_ok() {
            ctx.broker.touch_group(&group, &name.0);
            ctx.coordinator
                .in_use(&group, &name.0, || ctx.broker.join_group(&group, &name.0));
        }
        let answer = |p: i32, offset: i64, code: i16| {
            OffsetFetchResponsePartition::default()
                .with_partition_index(p)
                .with_committed_offset(offset)
                .with_committed_leader_epoch(-1)
                .with_metadata(Some(StrBytes::default()))
                .with_error_code(code)
        };
        let partitions: Vec<OffsetFetchResponsePartition> = match (stored, partitions) {
            (Ok(stored), Some(wanted)) => wanted
                .into_iter()
                .map(|p| {
                    let offset = stored
                        .iter()
                        .find(|(sp, _)| i64::from(*sp) == i64::from(p))
                        .map_or(-1, |(_, o)| *o as i64);
                    answer(p, offset, 0)
                })
                .collect(),
            (Ok(stored), None) => stored
                .into_iter()
                .map(|(p, o)| answer(p as i32, o as i64, 0))
                .collect(),
            (Err(e), Some(wanted)) => wanted
                .into_iter()
                .map(|p| answer(p, -1, errors::wire(&e)))
                .collect(),
            (Err(_), None) => Vec::new(),
        };
        topics.push(
            OffsetFetchResponseTopic::default()
                .with_name(name)
                .with_partitions(partitions),
        );
    }
    OffsetFetchResponse::default().with_topics(topics)
}

/// DescribeGroups: members and state on this node; a group with offsets but no members here
/// is `Empty`, one unknown altogether `Dead` (as Kafka answers).
pub(crate) async fn describe_groups(
    ctx: &Ctx,
    request: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let stored: Vec<String> = ctx
        .broker
        .list_groups()
        .await
        .map(|all| all.into_iter().map(|(g, _)| g).collect())
        .unwrap_or_default();
    // weir has no group grants: members, hosts and assignments are shown to admins only.
    let admin = access::is_admin(ctx);
    let groups = request
        .groups
        .into_iter()
        .map(|GroupId(name)| {
            let described = DescribedGroup::default().with_group_id(GroupId(name.clone()));
            if !admin {
                return described
                    .with_error_code(ResponseError::GroupAuthorizationFailed.code())
                    .with_group_state(text("Dead"));
            }
            match ctx.coordinator.describe(&name) {
                Some(view) => described
                    .with_group_state(text(view.state.name()))
                    .with_protocol_type(text(view.protocol_type))
                    .with_protocol_data(text(view.protocol))
                    .with_members(
                        view.members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(text(m.member_id))
                                    .with_client_id(text(m.client_id))
                                    .with_client_host(text(m.host))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    ),
                None if stored.iter().any(|g| *g == *name) => {
                    described.with_group_state(text("Empty"))
                }
                None => described.with_group_state(text("Dead")),
            }
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

/// ListGroups: groups with members on this node, and every group with committed offsets
/// (gRPC consumers' too).
pub(crate) async fn list_groups(
    ctx: &Ctx,
    request: ListGroupsRequest,
    version: i16,
) -> ListGroupsResponse {
    if !access::is_admin(ctx) {
        // No group grants: only admins list groups.
        return ListGroupsResponse::default()
            .with_error_code(ResponseError::GroupAuthorizationFailed.code());
    }
    let mut listed: std::collections::BTreeMap<String, (String, String)> = ctx
        .coordinator
        .list()
        .into_iter()
        .map(|(name, kind, state)| (name, (kind, state.name().to_string())))
        .collect();
    match ctx.broker.list_groups().await {
        Ok(all) => {
            for (group, _) in all {
                listed
                    .entry(group)
                    .or_insert_with(|| ("consumer".into(), "Empty".into()));
            }
        }
        Err(e) => return ListGroupsResponse::default().with_error_code(errors::wire(&e)),
    }
    let states: Vec<String> = request
        .states_filter
        .iter()
        .map(|s| s.to_string())
        .collect();
    ListGroupsResponse::default().with_groups(
        listed
            .into_iter()
            .filter(|(_, (_, state))| states.is_empty() || states.contains(state))
            .map(|(name, (kind, state))| {
                let listed = ListedGroup::default()
                    .with_group_id(GroupId(text(name)))
                    .with_protocol_type(text(kind));
                // v4+ carry the state.
                if version >= 4 {
                    listed.with_group_state(text(state))
                } else {
                    listed
                }
            })
            .collect(),
    )
}
