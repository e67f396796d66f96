//! A cluster's Kafka nodes as clients see them: every node names the same brokers, leaders
//! and group coordinators from the same view; a node that does not coordinate a group sends
//! its members away (NOT_COORDINATOR); a group whose coordinator moved is let go.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::*;
use parking_lot::Mutex;

use crate::tests::{ask, s, setup};
use crate::{KafkaNode, KafkaOptions, Placement};

/// A membership view the test sets.
struct View {
    me: i32,
    nodes: Mutex<Option<Vec<i32>>>,
}

impl Placement for View {
    fn me(&self) -> i32 {
        self.me
    }
    fn nodes(&self) -> Option<Vec<KafkaNode>> {
        self.nodes.lock().as_ref().map(|ids| {
            ids.iter()
                .map(|&id| KafkaNode {
                    id,
                    host: "127.0.0.1".into(),
                    port: 9000 + id as u16,
                })
                .collect()
        })
    }
}

async fn coordinator_of(ctx: &crate::wire::Ctx, group: &str) -> FindCoordinatorResponse {
    ask(
        ctx,
        ApiKey::FindCoordinator,
        3,
        &FindCoordinatorRequest::default().with_key(s(group)),
    )
    .await
}

fn join(group: &str) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::from_static(b"sub"))])
}

#[tokio::test]
async fn a_cluster_node_sends_clients_to_the_placed_coordinator_and_leaders() {
    let mut setup = setup().await;
    let view = Arc::new(View {
        me: 1,
        nodes: Mutex::new(Some(vec![1, 2])),
    });
    setup.ctx.options = Arc::new(KafkaOptions {
        placement: Some(view.clone()),
        ..(*setup.ctx.options).clone()
    });
    let ctx = &setup.ctx;
    // Metadata: both nodes, each partition's leader one of them, this node the controller.
    let m: MetadataResponse = ask(
        ctx,
        ApiKey::Metadata,
        12,
        &MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(TopicName(s("t"))))
        ])),
    )
    .await;
    let brokers: Vec<(i32, i32)> = m.brokers.iter().map(|b| (b.node_id.0, b.port)).collect();
    assert_eq!(brokers, vec![(1, 9001), (2, 9002)]);
    assert_eq!(m.controller_id.0, 1);
    for p in &m.topics[0].partitions {
        assert!([1, 2].contains(&p.leader_id.0), "{p:?}");
    }
    // Groups on either node: this one coordinates its own and sends the others away.
    let mut mine = None;
    let mut theirs = None;
    for g in 0..50 {
        let group = format!("g{g}");
        let r = coordinator_of(ctx, &group).await;
        assert_eq!(r.error_code, 0);
        assert_eq!(r.port, 9000 + r.node_id.0);
        match r.node_id.0 {
            1 => mine = mine.or(Some(group)),
            _ => theirs = theirs.or(Some(group)),
        }
    }
    let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
    let r: JoinGroupResponse = ask(ctx, ApiKey::JoinGroup, 3, &join(&theirs)).await;
    assert_eq!(r.error_code, 16, "NOT_COORDINATOR");
    let r: HeartbeatResponse = ask(
        ctx,
        ApiKey::Heartbeat,
        4,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s(&theirs)))
            .with_member_id(s("m"))
            .with_generation_id(1),
    )
    .await;
    assert_eq!(r.error_code, 16, "NOT_COORDINATOR");
    let r: JoinGroupResponse = ask(ctx, ApiKey::JoinGroup, 3, &join(&mine)).await;
    assert_eq!((r.error_code, r.generation_id), (0, 1));
    // Node 2 leaves: this node coordinates every group, the one it had included.
    *view.nodes.lock() = Some(vec![1]);
    assert_eq!(coordinator_of(ctx, &theirs).await.node_id.0, 1);
    // A third node joins and wins `mine`: the group is let go here, its member sent away.
    let newcomer = (3..200)
        .find(|&id| {
            *view.nodes.lock() = Some(vec![1, id]);
            crate::placement::Nodes::of(&ctx.options)
                .unwrap()
                .coordinator(&mine)
                .id
                == id
        })
        .unwrap();
    assert_eq!(coordinator_of(ctx, &mine).await.node_id.0, newcomer);
    // The listener's next look at its groups lets the group go.
    crate::tick_groups(&ctx.coordinator, &ctx.options);
    assert!(ctx.coordinator.describe(&mine).is_none());
    let r: HeartbeatResponse = ask(
        ctx,
        ApiKey::Heartbeat,
        4,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s(&mine)))
            .with_member_id(r.member_id)
            .with_generation_id(1),
    )
    .await;
    assert_eq!(r.error_code, 16, "NOT_COORDINATOR");
}

#[tokio::test]
async fn a_node_that_cannot_see_the_cluster_names_no_coordinator_but_still_serves() {
    let mut setup = setup().await;
    let view = Arc::new(View {
        me: 7,
        nodes: Mutex::new(Some(vec![7])),
    });
    setup.ctx.options = Arc::new(KafkaOptions {
        placement: Some(view.clone()),
        ..(*setup.ctx.options).clone()
    });
    let ctx = &setup.ctx;
    let held: JoinGroupResponse = ask(ctx, ApiKey::JoinGroup, 3, &join("held")).await;
    assert_eq!(held.error_code, 0);
    *view.nodes.lock() = None;
    // The group it holds is still served (a busy or cut-off moment does not rebalance it).
    let r: HeartbeatResponse = ask(
        ctx,
        ApiKey::Heartbeat,
        4,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s("held")))
            .with_member_id(held.member_id)
            .with_generation_id(held.generation_id),
    )
    .await;
    assert_eq!(r.error_code, 0);
    let r = coordinator_of(ctx, "g").await;
    assert_eq!(
        r.error_code, 15,
        "COORDINATOR_NOT_AVAILABLE: the client asks again"
    );
    let r: JoinGroupResponse = ask(ctx, ApiKey::JoinGroup, 3, &join("g")).await;
    assert_eq!(r.error_code, 16, "NOT_COORDINATOR");
    // Produces and fetches still come here: it names itself every partition's leader.
    let m: MetadataResponse = ask(
        ctx,
        ApiKey::Metadata,
        12,
        &MetadataRequest::default().with_topics(None),
    )
    .await;
    assert_eq!(m.brokers.len(), 1);
    assert_eq!(m.brokers[0].node_id.0, 7);
    assert!(m.topics[0].partitions.iter().all(|p| p.leader_id.0 == 7));
}
