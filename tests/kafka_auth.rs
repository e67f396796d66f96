//! The Kafka listener on a server with `--auth`: librdkafka logs in with SASL/PLAIN, a weir
//! token as the password, and may do to topics what the token's principal may through gRPC.

use crate::common;
use crate::kafka::{run_script, stored};

use std::process::Command;
use std::sync::Arc;

use weir_core::TopicConfig;
use weir_server::auth::{mint_token, Authority};

fn sasl(user: &str, token: &str) -> Vec<String> {
    [
        "security.protocol=SASL_PLAINTEXT".to_string(),
        "sasl.mechanism=PLAIN".to_string(),
        format!("sasl.username={user}"),
        format!("sasl.password={token}"),
        // Refusals are final: no need to wait out the default delivery time-out.
        "message.timeout.ms=5000".to_string(),
    ]
    .into_iter()
    .flat_map(|kv| ["--set".to_string(), kv])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clients_log_in_with_a_token_and_get_its_grants() {
    let dir = tempfile::tempdir().unwrap();
    let (loyalty, loyalty_h) = mint_token();
    let (bare, bare_h) = mint_token();
    let text = format!(
        r#"
[[principal]]
name = "loyalty"
tokens = ["{loyalty_h}"]
grants = [
  {{ allow = ["subscribe"], topics = ["order.paid"] }},
  {{ allow = ["publish", "subscribe", "create"], topics = ["points.*"] }},
]

[[principal]]
name = "bare"
tokens = ["{bare_h}"]
"#
    );
    let auth = Arc::new(Authority::parse(&text).unwrap());
    let server = common::start_with(dir.path(), |c| {
        c.auth = auth;
        c.kafka_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let kafka = server.kafka_addr.unwrap().to_string();
    for topic in ["order.paid", "points.credited"] {
        server
            .broker
            .create_topic(TopicConfig::new(topic, 1))
            .await
            .unwrap();
    }
    let produce = |topic: &str, user: &str, token: &str| {
        let mut args = vec![kafka.clone(), topic.to_string(), "20".to_string()];
        args.extend(sasl(user, token));
        run_script("produce.py", args)
    };
    // Granted: stored.
    let out = produce("points.credited", "loyalty", &loyalty).await;
    assert_eq!(out["acked"], 20, "{out}");
    assert_eq!(stored(&server, "points.credited").await.len(), 20);
    // The token's principal may only read order.paid: refused, nothing stored.
    let out = produce("order.paid", "loyalty", &loyalty).await;
    assert_eq!(out["acked"], 0, "{out}");
    assert!(
        out["errors"][0]
            .as_str()
            .unwrap()
            .contains("TOPIC_AUTHORIZATION_FAILED"),
        "{out}"
    );
    // No grants at all, a wrong token, a user name that is not the token's: nothing stored.
    for (user, token) in [
        ("bare", bare.as_str()),
        ("loyalty", "weir_not-a-token"),
        ("ops", loyalty.as_str()),
    ] {
        let out = produce("points.credited", user, token).await;
        assert_eq!(out["acked"], 0, "{user}: {out}");
    }
    assert_eq!(stored(&server, "points.credited").await.len(), 20);
    assert!(stored(&server, "order.paid").await.is_empty());
    // Without SASL the connection is closed at its first request past ApiVersions.
    let plain = Command::new("kcat")
        .args(["-b", &kafka, "-L", "-m", "5"])
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "an unauthenticated client was answered"
    );
    // Metadata shows a principal only the topics its grants name.
    let listed = Command::new("kcat")
        .args([
            "-b",
            &kafka,
            "-L",
            "-m",
            "5",
            "-X",
            "security.protocol=SASL_PLAINTEXT",
        ])
        .args(["-X", "sasl.mechanism=PLAIN", "-X", "sasl.username=bare"])
        .arg("-X")
        .arg(format!("sasl.password={bare}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(text.contains(" 0 topics"), "{text}");
    server.stop().await.unwrap();
}
