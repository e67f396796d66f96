//! The group membership state machine, on tokio's paused clock.

use super::*;

/// A join of `member` ("": a new one) to group `g`.
fn request(member: &str) -> Join {
    Join {
        group: "g".into(),
        member_id: member.into(),
        client_id: "c".into(),
        host: "h".into(),
        session_timeout: Duration::from_secs(6),
        rebalance_timeout: Duration::from_secs(10),
        protocol_type: "consumer".into(),
        protocols: vec![("range".into(), Bytes::from_static(b"sub"))],
        id_required: false,
    }
}

fn join(c: &Coordinator, member: &str) -> oneshot::Receiver<Result<Joined, ResponseError>> {
    c.join(request(member)).unwrap()
}

#[tokio::test(start_paused = true)]
async fn two_members_rebalance_and_a_silent_one_is_dropped() {
    let c = Coordinator::default();
    let a = join(&c, "").await.unwrap().unwrap();
    assert_eq!(a.generation, 1);
    assert_eq!(a.leader, a.member_id, "alone, it leads");
    assert_eq!(a.members.len(), 1);
    let got = c
        .sync(
            "g",
            &a.member_id,
            1,
            vec![(a.member_id.clone(), "p0,p1".into())],
        )
        .unwrap();
    assert_eq!(got.await.unwrap().unwrap(), Bytes::from("p0,p1"));
    // A second member joins: the first is told to rejoin by its heartbeat.
    let b_join = join(&c, "");
    assert_eq!(
        c.heartbeat("g", &a.member_id, 1),
        Err(ResponseError::RebalanceInProgress)
    );
    let a_join = join(&c, &a.member_id);
    let (a2, b) = (
        a_join.await.unwrap().unwrap(),
        b_join.await.unwrap().unwrap(),
    );
    assert_eq!((a2.generation, b.generation), (2, 2));
    assert_eq!(a2.leader, a.member_id, "the leader stays the leader");
    assert_eq!(a2.members.len(), 2, "the leader sees both subscriptions");
    assert!(b.members.is_empty());
    // The follower's sync waits for the leader's.
    let b_sync = c.sync("g", &b.member_id, 2, vec![]).unwrap();
    let a_sync = c
        .sync(
            "g",
            &a.member_id,
            2,
            vec![
                (a.member_id.clone(), "p0".into()),
                (b.member_id.clone(), "p1".into()),
            ],
        )
        .unwrap();
    assert_eq!(b_sync.await.unwrap().unwrap(), Bytes::from("p1"));
    assert_eq!(a_sync.await.unwrap().unwrap(), Bytes::from("p0"));
    assert_eq!(
        c.may_commit("g", &b.member_id, 1),
        Err(ResponseError::IllegalGeneration)
    );
    assert_eq!(c.may_commit("g", &b.member_id, 2), Ok(()));
    // b stops heartbeating: once its session passes it is dropped and a rebalances alone.
    for _ in 0..2 {
        tokio::time::advance(Duration::from_millis(3100)).await;
        c.heartbeat("g", &a.member_id, 2).unwrap();
        c.tick();
    }
    assert_eq!(
        c.heartbeat("g", &b.member_id, 2),
        Err(ResponseError::UnknownMemberId)
    );
    assert_eq!(
        c.heartbeat("g", &a.member_id, 2),
        Err(ResponseError::RebalanceInProgress)
    );
    let a3 = join(&c, &a.member_id).await.unwrap().unwrap();
    assert_eq!((a3.generation, a3.members.len()), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn a_member_that_does_not_rejoin_in_time_is_left_out() {
    let c = Coordinator::default();
    // Sessions far longer than the rebalance time-out: only the rebalance deadline can
    // leave `a` out.
    let join = |member: &str| {
        c.join(Join {
            group: "g".into(),
            member_id: member.into(),
            client_id: "c".into(),
            host: "h".into(),
            session_timeout: Duration::from_secs(30),
            rebalance_timeout: Duration::from_secs(7),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"sub"))],
            id_required: false,
        })
        .unwrap()
    };
    let a = join("").await.unwrap().unwrap();
    c.sync("g", &a.member_id, 1, vec![]).unwrap();
    let b_join = join("");
    // a never rejoins: after the rebalance time-out (7 s, within its 30 s session) b goes
    // on alone.
    let mut b_join = std::pin::pin!(b_join);
    tokio::time::advance(Duration::from_secs(6)).await;
    c.tick();
    assert!(
        futures::poll!(&mut b_join).is_pending(),
        "still waiting for a"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    c.tick();
    let b = b_join.await.unwrap().unwrap();
    assert_eq!((b.generation, b.leader == b.member_id), (2, true));
    assert_eq!(
        c.heartbeat("g", &a.member_id, 1),
        Err(ResponseError::UnknownMemberId)
    );
}

#[tokio::test]
async fn after_stop_nothing_waits() {
    let c = Coordinator::default();
    let a = join(&c, "").await.unwrap().unwrap();
    let pending = c.sync("g", &a.member_id, 1, vec![]).ok();
    c.stop();
    assert!(matches!(
        c.join(Join {
            group: "g2".into(),
            member_id: String::new(),
            client_id: "c".into(),
            host: "h".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(10),
            protocol_type: "consumer".into(),
            protocols: vec![],
            id_required: false,
        }),
        Err((ResponseError::NotCoordinator, _))
    ));
    assert_eq!(
        c.sync("g", &a.member_id, 1, vec![]).unwrap_err(),
        ResponseError::NotCoordinator
    );
    // The leader's own sync had already answered (it is the only member).
    if let Some(rx) = pending {
        assert!(rx.await.is_ok());
    }
}

#[test]
fn new_members_of_v4_are_given_an_id_first_and_strangers_are_refused() {
    let c = Coordinator::default();
    let mut j = Join {
        group: "g".into(),
        member_id: String::new(),
        client_id: "rdkafka".into(),
        host: "h".into(),
        session_timeout: Duration::from_secs(10),
        rebalance_timeout: Duration::from_secs(10),
        protocol_type: "consumer".into(),
        protocols: vec![("range".into(), Bytes::new())],
        id_required: true,
    };
    let Err((ResponseError::MemberIdRequired, id)) = c.join(j.clone()) else {
        panic!("an id first")
    };
    assert!(id.starts_with("rdkafka-"));
    j.member_id = id;
    assert!(c.join(j.clone()).is_ok());
    j.member_id = "made-up".into();
    assert!(matches!(
        c.join(j.clone()),
        Err((ResponseError::UnknownMemberId, _))
    ));
    j.member_id = String::new();
    j.id_required = false;
    j.protocols = vec![("roundrobin".into(), Bytes::new())];
    assert!(matches!(
        c.join(j),
        Err((ResponseError::InconsistentGroupProtocol, _))
    ));
}

/// A group let go (it moved to another node) cannot be brought back by a join that was
/// placed before the move: the join asks where the group is under the same lock as the
/// unload, and a node without a view of the cluster takes joins only for groups it holds.
#[tokio::test(start_paused = true)]
async fn a_join_asks_where_the_group_is_under_the_groups_lock() {
    let c = Coordinator::default();
    let a = join(&c, "").await.unwrap().unwrap();
    let rejoin = |here: bool| {
        c.join_where(
            request(&a.member_id),
            // No view: held groups only.
            move |_, held| here && held,
        )
    };
    assert!(rejoin(true).is_ok(), "held: served");
    c.unload(|_| false);
    assert!(!c.holds("g"));
    assert_eq!(rejoin(true).unwrap_err().0, ResponseError::NotCoordinator);
    assert!(
        !c.holds("g"),
        "the refused join did not bring the group back"
    );
}

/// Session time-outs outside 6 s–30 min (Kafka's broker defaults) are refused, and the refused
/// join leaves no group behind.
#[tokio::test(start_paused = true)]
async fn a_session_time_out_outside_the_range_is_refused() {
    let c = Coordinator::default();
    for secs in [5, 1801] {
        let refused = c
            .join(Join {
                session_timeout: Duration::from_secs(secs),
                ..request("")
            })
            .unwrap_err();
        assert_eq!(refused.0, ResponseError::InvalidSessionTimeout, "{secs} s");
        assert!(!c.holds("g"), "{secs} s: nothing held");
    }
    for secs in [6, 1800] {
        assert!(c
            .join(Join {
                session_timeout: Duration::from_secs(secs),
                ..request("")
            })
            .is_ok());
    }
}
