//! Consumer groups: FindCoordinator, the membership calls (over [`Coordinator`]) and
//! DescribeGroups/ListGroups. Their offsets are weir's own group offsets (`offsets.rs`), so
//! `weir lag`, the status page and gRPC consumers see a Kafka group's progress, and a group
//! can move between the two APIs.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    BrokerId, DescribeGroupsRequest, DescribeGroupsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;

use crate::coordinator::{Join, Joined};
use crate::placement::{self, KafkaNode, Nodes};
use crate::wire::Ctx;
use crate::{access, errors};

pub(crate) fn text(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

fn millis(ms: i32) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// FindCoordinator: the node a group's members are sent to (`placement.rs`); transaction
/// coordinators are refused (no Kafka transactions).
pub(crate) fn find_coordinator(
    ctx: &Ctx,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let nodes = Nodes::of(&ctx.options);
    // (error code, message, node) for one key.
    let find = |key: &str| -> (i16, Option<StrBytes>, Option<KafkaNode>) {
        if request.key_type != 0 {
            return (
                ResponseError::CoordinatorNotAvailable.code(),
                Some(text("weir has no Kafka transactions (docs/kafka.md)")),
                None,
            );
        }
        match &nodes {
            Some(n) => (0, None, Some(n.coordinator(key).clone())),
            None => (
                ResponseError::CoordinatorNotAvailable.code(),
                Some(text("this weir node cannot see the cluster's members just now; ask again or ask another node")),
                None,
            ),
        }
    };
    let where_ = |node: &Option<KafkaNode>| match node {
        Some(n) => (n.id, n.host.clone(), i32::from(n.port)),
        None => (-1, String::new(), -1),
    };
    let response = FindCoordinatorResponse::default();
    if version >= 4 {
        let keys = if request.coordinator_keys.is_empty() {
            vec![request.key.clone()]
        } else {
            request.coordinator_keys.clone()
        };
        return response.with_coordinators(
            keys.into_iter()
                .map(|key| {
                    let (code, message, node) = find(&key);
                    let (id, host, port) = where_(&node);
                    CoordinatorEntry::default()
                        .with_key(key)
                        .with_node_id(BrokerId(id))
                        .with_host(text(host))
                        .with_port(port)
                        .with_error_code(code)
                        .with_error_message(message)
                })
                .collect(),
        );
    }
    let (code, message, node) = find(&request.key);
    let (id, host, port) = where_(&node);
    let response = if version >= 1 {
        response.with_error_message(message)
    } else {
        response
    };
    response
        .with_error_code(code)
        .with_node_id(BrokerId(id))
        .with_host(text(host))
        .with_port(port)
}

/// NOT_COORDINATOR when another node coordinates `group`: the client finds it again.
pub(crate) fn elsewhere(ctx: &Ctx, group: &str) -> Option<ResponseError> {
    (!placement::coordinates(ctx, group)).then_some(ResponseError::NotCoordinator)
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
    let options = ctx.options.clone();
    let joined = ctx.coordinator.join_where(join, |group, held| {
        placement::placed_here(&options, group, held)
    });
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
    let rx = match elsewhere(ctx, &request.group_id.0) {
        Some(code) => Err(code),
        None => ctx.coordinator.sync(
            &request.group_id.0,
            &request.member_id,
            request.generation_id,
            assignments,
        ),
    };
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
    let result = match elsewhere(ctx, &request.group_id.0) {
        Some(code) => Err(code),
        None => ctx.coordinator.heartbeat(
            &request.group_id.0,
            &request.member_id,
            request.generation_id,
        ),
    };
    HeartbeatResponse::default().with_error_code(result.err().map_or(0, |c| c.code()))
}

/// LeaveGroup: v0–2 name one member, v3+ a list.
pub(crate) fn leave_group(
    ctx: &Ctx,
    request: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let group = request.group_id.0.to_string();
    if let Some(code) = elsewhere(ctx, &group) {
        return LeaveGroupResponse::default().with_error_code(code.code());
    }
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
            if let Some(code) = elsewhere(ctx, &name) {
                return described
                    .with_error_code(code.code())
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
            // On a cluster each node lists the groups it coordinates, as a Kafka broker does
            // (clients ask every broker and merge).
            let nodes = Nodes::of(&ctx.options);
            for (group, _) in all {
                let here = match &nodes {
                    Some(n) => n.coordinator(&group).id == n.me,
                    None => ctx.coordinator.holds(&group),
                };
                if here {
                    listed
                        .entry(group)
                        .or_insert_with(|| ("consumer".into(), "Empty".into()));
                }
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
