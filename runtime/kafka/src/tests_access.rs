//! SASL/PLAIN on a server that asks for it: nothing but ApiVersions and the SASL calls before
//! a login, a refused login closes the connection after its answer, and a principal sees and
//! touches only the topics its grants name.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::*;
use weir_broker::Caller;

use crate::tests::{ask, frame, produce_to_t0, s, setup};
use crate::{conn, Access, KafkaOptions, Principal, TopicOp};

/// Token "good" is principal "p", who may publish to `t` and see nothing else.
struct Fake;

struct OnlyT;

impl Principal for OnlyT {
    fn caller(&self) -> Caller {
        Caller::Client {
            name: "p".into(),
            admin: false,
        }
    }
    fn may(&self, op: TopicOp, topic: &str) -> bool {
        op == TopicOp::Publish && topic == "t"
    }
    fn sees(&self, topic: &str) -> bool {
        topic == "t"
    }
}

impl Access for Fake {
    fn login(&self, user: &str, password: &str) -> Result<Arc<dyn Principal>, String> {
        if password == "good" && (user.is_empty() || user == "p") {
            Ok(Arc::new(OnlyT))
        } else {
            Err("unknown token".into())
        }
    }
}

fn plain(user: &str, password: &str) -> SaslAuthenticateRequest {
    SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(format!("\0{user}\0{password}")))
}

#[tokio::test]
async fn a_login_is_needed_and_gives_only_the_tokens_grants() {
    let mut setup = setup().await;
    let options = KafkaOptions {
        access: Some(Arc::new(Fake)),
        ..(*setup.ctx.options).clone()
    };
    setup.ctx.options = Arc::new(options);
    setup
        .ctx
        .broker
        .create_topic(weir_core::TopicConfig::new("hidden", 1))
        .await
        .unwrap();
    let ctx = &setup.ctx;
    let metadata = MetadataRequest::default().with_topics(None);
    let refused = conn::handle(frame(ApiKey::Metadata, 12, &metadata), ctx).await;
    assert!(matches!(refused, Err(e) if e.contains("before logging in")));
    let _: ApiVersionsResponse =
        ask(ctx, ApiKey::ApiVersions, 0, &ApiVersionsRequest::default()).await;
    let hs: SaslHandshakeResponse = ask(
        ctx,
        ApiKey::SaslHandshake,
        1,
        &SaslHandshakeRequest::default().with_mechanism(s("PLAIN")),
    )
    .await;
    assert_eq!(hs.error_code, 0);
    let bad: SaslAuthenticateResponse =
        ask(ctx, ApiKey::SaslAuthenticate, 2, &plain("p", "bad")).await;
    assert_eq!(bad.error_code, 58, "SASL_AUTHENTICATION_FAILED");
    assert!(bad.error_message.unwrap().contains("unknown token"));
    assert!(
        ctx.closing.load(std::sync::atomic::Ordering::Relaxed),
        "closed after the answer"
    );
    ctx.closing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let good: SaslAuthenticateResponse =
        ask(ctx, ApiKey::SaslAuthenticate, 2, &plain("p", "good")).await;
    assert_eq!(good.error_code, 0);
    // Logged in: metadata lists only what the grants name; a named hidden topic is refused.
    let all: MetadataResponse = ask(ctx, ApiKey::Metadata, 12, &metadata).await;
    let names: Vec<String> = all
        .topics
        .iter()
        .map(|t| t.name.as_ref().unwrap().0.to_string())
        .collect();
    assert_eq!(names, vec!["t".to_string()]);
    let named: MetadataResponse = ask(
        ctx,
        ApiKey::Metadata,
        12,
        &MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(TopicName(s("hidden"))))
        ])),
    )
    .await;
    assert_eq!(named.topics[0].error_code, 29, "TOPIC_AUTHORIZATION_FAILED");
    // Publish to t is granted; fetching it is not.
    let produced: ProduceResponse = ask(
        ctx,
        ApiKey::Produce,
        9,
        &produce_to_t0(crate::tests::batch(
            kafka_protocol::records::Compression::None,
        )),
    )
    .await;
    assert_eq!(produced.responses[0].partition_responses[0].error_code, 0);
    let fetched: FetchResponse = ask(
        ctx,
        ApiKey::Fetch,
        12,
        &FetchRequest::default()
            .with_max_bytes(1 << 20)
            .with_topics(vec![fetch_request::FetchTopic::default()
                .with_topic(TopicName(s("t")))
                .with_partitions(vec![
                    fetch_request::FetchPartition::default().with_partition_max_bytes(1 << 20)
                ])]),
    )
    .await;
    assert_eq!(fetched.responses[0].partitions[0].error_code, 29);
    // No group grants in weir: groups are listed and described to admins only.
    let listed: ListGroupsResponse =
        ask(ctx, ApiKey::ListGroups, 4, &ListGroupsRequest::default()).await;
    assert_eq!(listed.error_code, 30, "GROUP_AUTHORIZATION_FAILED");
    let described: DescribeGroupsResponse = ask(
        ctx,
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
    )
    .await;
    assert_eq!(described.groups[0].error_code, 30);
    // Every advertised version of the SASL calls answers in a frame clients decode.
    for v in 0..=1 {
        let r: SaslHandshakeResponse = ask(
            ctx,
            ApiKey::SaslHandshake,
            v,
            &SaslHandshakeRequest::default().with_mechanism(s("PLAIN")),
        )
        .await;
        assert_eq!(r.error_code, if v == 0 { 35 } else { 0 }, "v{v}");
    }
    for v in 0..=2 {
        let r: SaslAuthenticateResponse =
            ask(ctx, ApiKey::SaslAuthenticate, v, &plain("", "good")).await;
        assert_eq!(r.error_code, 0, "v{v}");
    }
}

/// Before a login, a connection has 10 s and frames of 512 KiB: an anonymous socket cannot
/// hold a slot or memory for long.
#[tokio::test(start_paused = true)]
async fn a_connection_that_does_not_log_in_is_closed() {
    let mut setup = setup().await;
    let options = KafkaOptions {
        access: Some(Arc::new(Fake)),
        ..(*setup.ctx.options).clone()
    };
    setup.ctx.options = Arc::new(options);
    let ctx = &setup.ctx;
    let run = |server| crate::tests::serve(ctx, server);
    // Silent: closed at the deadline.
    let (_client, server) = tokio::io::duplex(1024);
    let silent = run(server);
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let why = silent.await.unwrap().unwrap_err();
    assert!(why.contains("no SASL login within"), "{why}");
    // A 1 MiB frame before logging in: refused at its length.
    let (client, server) = tokio::io::duplex(1024);
    let big = run(server);
    let (_rd, mut wr) = tokio::io::split(client);
    tokio::io::AsyncWriteExt::write_all(&mut wr, &(1i32 << 20).to_be_bytes())
        .await
        .unwrap();
    let why = big.await.unwrap().unwrap_err();
    assert!(why.contains("the limit is 524288"), "{why}");
}
