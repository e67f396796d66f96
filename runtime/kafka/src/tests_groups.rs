//! The consumer-group APIs at every version weir advertises (see `tests.rs`).

use bytes::Bytes;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::*;

use crate::tests::{ask, fill_t0, s, setup, versions};

#[tokio::test]
async fn every_advertised_version_of_the_group_apis_is_answered_in_a_frame_clients_decode() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    // Offsets up to 10 may be committed.
    fill_t0(ctx, 10).await;
    for v in versions(ApiKey::FindCoordinator) {
        let r: FindCoordinatorResponse = ask(
            ctx,
            ApiKey::FindCoordinator,
            v,
            &if v >= 4 {
                FindCoordinatorRequest::default().with_coordinator_keys(vec![s("g")])
            } else {
                FindCoordinatorRequest::default().with_key(s("g"))
            },
        )
        .await;
        let port = if v >= 4 {
            r.coordinators[0].port
        } else {
            r.port
        };
        assert_eq!(port, 9092, "v{v}");
    }
    for v in versions(ApiKey::JoinGroup) {
        let join = JoinGroupRequest::default()
            .with_group_id(GroupId(s(&format!("g{v}"))))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(10_000)
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(s("range"))
                .with_metadata(Bytes::from_static(b"sub"))]);
        let mut r: JoinGroupResponse = ask(ctx, ApiKey::JoinGroup, v, &join).await;
        if v >= 4 {
            assert_eq!(r.error_code, 79, "v{v}: MEMBER_ID_REQUIRED");
            r = ask(
                ctx,
                ApiKey::JoinGroup,
                v,
                &join.clone().with_member_id(r.member_id.clone()),
            )
            .await;
        }
        assert_eq!((r.error_code, r.generation_id), (0, 1), "v{v}");
        assert_eq!(r.leader, r.member_id);
        let sync: SyncGroupResponse = ask(
            ctx,
            ApiKey::SyncGroup,
            v.min(5),
            &SyncGroupRequest::default()
                .with_group_id(GroupId(s(&format!("g{v}"))))
                .with_generation_id(1)
                .with_member_id(r.member_id.clone())
                .with_assignments(vec![
                    sync_group_request::SyncGroupRequestAssignment::default()
                        .with_member_id(r.member_id.clone())
                        .with_assignment(Bytes::from_static(b"all")),
                ]),
        )
        .await;
        assert_eq!((sync.error_code, &sync.assignment[..]), (0, &b"all"[..]));
        let hb: HeartbeatResponse = ask(
            ctx,
            ApiKey::Heartbeat,
            v.min(4),
            &HeartbeatRequest::default()
                .with_group_id(GroupId(s(&format!("g{v}"))))
                .with_generation_id(1)
                .with_member_id(r.member_id.clone()),
        )
        .await;
        assert_eq!(hb.error_code, 0);
        let lv = v.min(5);
        let leave: LeaveGroupResponse = ask(
            ctx,
            ApiKey::LeaveGroup,
            lv,
            &if lv >= 3 {
                LeaveGroupRequest::default()
                    .with_group_id(GroupId(s(&format!("g{v}"))))
                    .with_members(vec![MemberIdentity::default().with_member_id(r.member_id)])
            } else {
                LeaveGroupRequest::default()
                    .with_group_id(GroupId(s(&format!("g{v}"))))
                    .with_member_id(r.member_id)
            },
        )
        .await;
        let code = if lv >= 3 {
            leave.members[0].error_code
        } else {
            leave.error_code
        };
        assert_eq!(code, 0, "v{lv}");
    }
    for v in versions(ApiKey::OffsetCommit) {
        let r: OffsetCommitResponse = ask(
            ctx,
            ApiKey::OffsetCommit,
            v,
            &OffsetCommitRequest::default()
                .with_group_id(GroupId(s("oc")))
                .with_generation_id_or_member_epoch(-1)
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s("t")))
                    .with_partitions(vec![OffsetCommitRequestPartition::default()
                        .with_partition_index(0)
                        .with_committed_offset(i64::from(v))])]),
        )
        .await;
        assert_eq!(r.topics[0].partitions[0].error_code, 0, "v{v}");
    }
    assert_eq!(
        ctx.broker.fetch_offsets("oc", "t").await.unwrap(),
        vec![(0, 8)]
    );
    for v in versions(ApiKey::OffsetFetch) {
        let r: OffsetFetchResponse = ask(
            ctx,
            ApiKey::OffsetFetch,
            v,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s("oc")))
                .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                    .with_name(TopicName(s("t")))
                    .with_partition_indexes(vec![0, 1])])),
        )
        .await;
        let p = &r.topics[0].partitions;
        assert_eq!(
            (p[0].committed_offset, p[1].committed_offset),
            (8, -1),
            "v{v}"
        );
    }
    for v in versions(ApiKey::DescribeGroups) {
        let r: DescribeGroupsResponse = ask(
            ctx,
            ApiKey::DescribeGroups,
            v,
            &DescribeGroupsRequest::default()
                .with_groups(vec![GroupId(s("oc")), GroupId(s("none"))]),
        )
        .await;
        assert_eq!(r.groups[0].group_state.as_str(), "Empty", "v{v}");
        assert_eq!(r.groups[1].group_state.as_str(), "Dead", "v{v}");
    }
    for v in versions(ApiKey::ListGroups) {
        let r: ListGroupsResponse =
            ask(ctx, ApiKey::ListGroups, v, &ListGroupsRequest::default()).await;
        assert!(
            r.groups.iter().any(|g| g.group_id.0.as_str() == "oc"),
            "v{v}"
        );
    }
}

/// A group with members here keeps its offsets however long it goes without committing (as a
/// gRPC subscription does); once its last member leaves, the broker's expiry applies again.
#[tokio::test]
async fn a_live_groups_offsets_never_expire_and_an_empty_groups_do() {
    let setup = setup().await;
    let ctx = &setup.ctx;
    fill_t0(ctx, 1).await;
    let join = JoinGroupRequest::default()
        .with_group_id(GroupId(s("live")))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![
            JoinGroupRequestProtocol::default().with_name(s("range"))
        ]);
    let joined: JoinGroupResponse = ask(ctx, ApiKey::JoinGroup, 3, &join).await;
    assert_eq!(joined.error_code, 0);
    let synced: SyncGroupResponse = ask(
        ctx,
        ApiKey::SyncGroup,
        3,
        &SyncGroupRequest::default()
            .with_group_id(GroupId(s("live")))
            .with_generation_id(joined.generation_id)
            .with_member_id(joined.member_id.clone()),
    )
    .await;
    assert_eq!(synced.error_code, 0);
    let commit: OffsetCommitResponse = ask(
        ctx,
        ApiKey::OffsetCommit,
        8,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(s("live")))
            .with_generation_id_or_member_epoch(joined.generation_id)
            .with_member_id(joined.member_id.clone())
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(s("t")))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(1)])]),
    )
    .await;
    assert_eq!(commit.topics[0].partitions[0].error_code, 0);
    // Long past the group expiry (a week by default): the member is still in the group.
    let later = weir_core::now_ms() + 30 * 24 * 3600 * 1000;
    ctx.broker.expire_idle(later).await.unwrap();
    assert_eq!(
        ctx.broker.fetch_offsets("live", "t").await.unwrap(),
        vec![(0, 1)]
    );
    // The member leaves: the group is empty and its offsets expire like any idle group's.
    let _: LeaveGroupResponse = ask(
        ctx,
        ApiKey::LeaveGroup,
        0,
        &LeaveGroupRequest::default()
            .with_group_id(GroupId(s("live")))
            .with_member_id(joined.member_id),
    )
    .await;
    ctx.coordinator.tick();
    ctx.broker.expire_idle(later).await.unwrap();
    assert!(ctx
        .broker
        .fetch_offsets("live", "t")
        .await
        .unwrap()
        .is_empty());
}
