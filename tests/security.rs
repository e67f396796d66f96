//! Tokens, grants, ownership, TLS and the API's limits: each operation allowed with its grant
//! and refused without, each limit refused with its status. docs/security.md cites these tests.
//! (Over 500 lines because it is one suite, sharing its auth file and helpers.)

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{paid, plugin_wasm, records, start_with, weir_cli, WeirProcess};
use tonic::Code;
use weir_api::{Client, ClientError, ConnectOptions, Deploy};
use weir_core::StartAt;
use weir_core::TopicConfig;
use weir_server::auth::{mint_token, Authority};
use weir_server::server::RunningServer;

/// Tokens of the principals in [`auth_file`].
struct Tokens {
    ops: String,
    loyalty: String,
    marketing: String,
    bare: String,
}

/// ops: admin. loyalty: reads orders, owns points.*, deploys points*. marketing: its own
/// marketing.* topics, and may upgrade/remove/pause any plugin name (but owns none of
/// loyalty's). bare: authenticated, no grants.
fn auth_file() -> (String, Tokens) {
    let mint = || mint_token();
    let (ops, ops_h) = mint();
    let (loyalty, loyalty_h) = mint();
    let (marketing, marketing_h) = mint();
    let (bare, bare_h) = mint();
    let text = format!(
        r#"
[[principal]]
name = "ops"
tokens = ["{ops_h}"]
admin = true

[[principal]]
name = "loyalty"
tokens = ["{loyalty_h}"]
max_plugins = 2
grants = [
  {{ allow = ["subscribe"], topics = ["order.paid"] }},
  {{ allow = ["publish", "subscribe", "create", "delete"], topics = ["points.*"] }},
  {{ allow = ["deploy", "upgrade", "remove", "pause", "read-state", "read-logs"], plugins = ["points*"] }},
]

[[principal]]
name = "marketing"
tokens = ["{marketing_h}"]
grants = [
  {{ allow = ["publish", "subscribe", "create"], topics = ["marketing.*"] }},
  {{ allow = ["upgrade", "remove", "pause"], plugins = ["*"] }},
]

[[principal]]
name = "bare"
tokens = ["{bare_h}"]
"#
    );
    (
        text,
        Tokens {
            ops,
            loyalty,
            marketing,
            bare,
        },
    )
}

async fn secured_server(dir: &std::path::Path, text: &str) -> RunningServer {
    let auth = Arc::new(Authority::parse(text).expect("auth file parses"));
    start_with(dir, |c| c.auth = auth).await
}

/// Clients of the four principals: ops, loyalty, marketing, bare.
async fn principals(server: &RunningServer, t: &Tokens) -> [Client; 4] {
    [
        as_principal(server, Some(&t.ops)).await,
        as_principal(server, Some(&t.loyalty)).await,
        as_principal(server, Some(&t.marketing)).await,
        as_principal(server, Some(&t.bare)).await,
    ]
}

async fn as_principal(server: &RunningServer, token: Option<&str>) -> Client {
    let options = ConnectOptions {
        token: token.map(str::to_string),
        tls_ca_pem: None,
    };
    Client::connect_with(&server.url(), &options).await.unwrap()
}

fn topic(name: &str) -> TopicConfig {
    TopicConfig {
        name: name.into(),
        partitions: 2,
        retention_ms: 0,
        retention_bytes: 0,
        admission: None,
    }
}

/// A refusal with `code` whose message contains every needle.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>, code: Code, needles: &[&str]) {
    let e = result.expect_err("the call should have been refused");
    assert_eq!(e.code(), Some(code), "{e}");
    let message = e.to_string();
    for n in needles {
        assert!(message.contains(n), "{message:?} lacks {n:?}");
    }
}

fn points_deploy(name: &str, outputs: &[&str]) -> Deploy {
    Deploy {
        name: name.into(),
        wasm: plugin_wasm("points").to_vec(),
        input: "order.paid".into(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn missing_or_unknown_tokens_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let (text, _) = auth_file();
    let server = secured_server(dir.path(), &text).await;
    let anonymous = as_principal(&server, None).await;
    refused(
        anonymous.list_topics().await,
        Code::Unauthenticated,
        &["requires a token", "WEIR_TOKEN"],
    );
    let (stranger, _) = mint_token();
    let stranger = as_principal(&server, Some(&stranger)).await;
    refused(
        stranger.publish("order.paid", None, records("x", 1)).await,
        Code::Unauthenticated,
        &["unknown token"],
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn topic_operations_need_their_grants() {
    let dir = tempfile::tempdir().unwrap();
    let (text, t) = auth_file();
    let server = secured_server(dir.path(), &text).await;
    let [ops, loyalty, marketing, bare] = principals(&server, &t).await;

    // create
    ops.create_topic(&topic("order.paid")).await.unwrap();
    loyalty
        .create_topic(&topic("points.credited"))
        .await
        .unwrap();
    refused(
        marketing.create_topic(&topic("points.stolen")).await,
        Code::PermissionDenied,
        &["\"marketing\"", "may not create topic \"points.stolen\""],
    );
    // publish
    ops.publish("order.paid", None, vec![paid(1, "u1", 10.0)])
        .await
        .unwrap();
    loyalty
        .publish("points.credited", None, records("p", 2))
        .await
        .unwrap();
    refused(
        marketing
            .publish("order.paid", None, records("fake", 1))
            .await,
        Code::PermissionDenied,
        &["may not publish topic \"order.paid\""],
    );
    // the streaming publish checks each request's topic
    {
        use weir_api::pb;
        let requests = vec![
            pb::PublishRequest {
                topic: "marketing.ads".into(),
                records: records("ad", 1).into_iter().map(Into::into).collect(),
                request_id: 1,
                ..Default::default()
            },
            pb::PublishRequest {
                topic: "order.paid".into(),
                records: records("fake", 1).into_iter().map(Into::into).collect(),
                request_id: 2,
                ..Default::default()
            },
        ];
        marketing
            .create_topic(&topic("marketing.ads"))
            .await
            .unwrap();
        let mut responses = marketing
            .raw()
            .publish_stream(futures::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let first = responses.message().await.unwrap().unwrap();
        assert!(first.error.is_none() && first.acks.len() == 1, "{first:?}");
        let second = responses.message().await.unwrap().unwrap();
        let error = second.error.expect("refused");
        assert_eq!(error.code, Code::PermissionDenied as i32);
        assert!(error.message.contains("order.paid"), "{}", error.message);
    }
    // subscribe, and group offsets on the topic
    let mut sub = loyalty
        .subscribe("order.paid", &[], StartAt::Earliest, Some("loyalty"))
        .await
        .unwrap();
    let read = sub.next().await.unwrap().unwrap();
    assert_eq!(read.len(), 1);
    loyalty
        .commit_offsets(
            "loyalty",
            "order.paid",
            &[(read[0].partition, read[0].offset + 1)],
        )
        .await
        .unwrap();
    loyalty
        .fetch_offsets("loyalty", "order.paid")
        .await
        .unwrap();
    refused(
        marketing
            .subscribe("order.paid", &[], StartAt::Earliest, None)
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        &["may not subscribe topic \"order.paid\""],
    );
    refused(
        marketing
            .commit_offsets("spy", "order.paid", &[(0, 1)])
            .await,
        Code::PermissionDenied,
        &["subscribe"],
    );
    refused(
        marketing.fetch_offsets("loyalty", "order.paid").await,
        Code::PermissionDenied,
        &["subscribe"],
    );
    // list and describe show only what a principal has grants on
    let seen: Vec<String> = marketing
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.config.name)
        .collect();
    assert_eq!(seen, vec!["marketing.ads".to_string()]);
    assert!(bare.list_topics().await.unwrap().is_empty());
    refused(
        bare.describe_topic("order.paid").await,
        Code::PermissionDenied,
        &["\"bare\""],
    );
    assert_eq!(ops.list_topics().await.unwrap().len(), 3);
    // delete
    refused(
        marketing.delete_topic("points.credited").await,
        Code::PermissionDenied,
        &["may not delete topic \"points.credited\""],
    );
    loyalty.delete_topic("points.credited").await.unwrap();
    // nothing a refused call touched was lost
    let info = ops.describe_topic("order.paid").await.unwrap();
    assert_eq!(info.partitions.iter().map(|p| p.end_offset).sum::<u64>(), 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn plugins_are_owned_and_act_with_their_owners_rights() {
    let dir = tempfile::tempdir().unwrap();
    let (text, t) = auth_file();
    let server = secured_server(dir.path(), &text).await;
    let [ops, loyalty, marketing, _] = principals(&server, &t).await;
    for name in ["order.paid", "points.credited", "audit"] {
        ops.create_topic(&topic(name)).await.unwrap();
    }
    ops.publish("order.paid", None, vec![paid(1, "u1", 12.0)])
        .await
        .unwrap();

    // deploy: needs the grant on the name...
    refused(
        marketing
            .deploy_plugin(points_deploy("marketing-points", &["marketing.x"]))
            .await,
        Code::PermissionDenied,
        &["may not deploy plugin \"marketing-points\""],
    );
    // ...subscribe on its input and publish on every output: a plugin cannot emit where
    // its owner may not publish.
    refused(
        loyalty
            .deploy_plugin(points_deploy("points", &["audit"]))
            .await,
        Code::PermissionDenied,
        &["\"loyalty\" may not publish topic \"audit\""],
    );
    let info = loyalty
        .deploy_plugin(points_deploy("points", &["points.credited"]))
        .await
        .unwrap();
    assert_eq!(info.name, "points");

    // read-state and read-logs need their grants
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server
        .plugins
        .state_get("points", b"balance/u1")
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: points credits u1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(loyalty
        .get_state("points", b"balance/u1")
        .await
        .unwrap()
        .is_some());
    loyalty.plugin_logs("points").await.unwrap();
    refused(
        marketing.get_state("points", b"balance/u1").await,
        Code::PermissionDenied,
        &["may not read-state plugin \"points\""],
    );
    refused(
        marketing.plugin_logs("points").await,
        Code::PermissionDenied,
        &["may not read-logs plugin \"points\""],
    );
    // list shows marketing only what its grants name: its `*` grant names every plugin
    assert_eq!(marketing.list_plugins().await.unwrap().len(), 1);

    // upgrade, pause, remove: marketing has the grants but does not own the plugin
    let wasm = plugin_wasm("points").to_vec();
    refused(
        marketing.upgrade_plugin("points", wasm.clone()).await,
        Code::PermissionDenied,
        &["owned by \"loyalty\""],
    );
    refused(
        marketing.pause_plugin("points", true).await,
        Code::PermissionDenied,
        &["owned by \"loyalty\""],
    );
    refused(
        marketing.remove_plugin("points").await,
        Code::PermissionDenied,
        &["owned by \"loyalty\""],
    );
    // the owner may; so may an admin
    loyalty.pause_plugin("points", true).await.unwrap();
    ops.pause_plugin("points", false).await.unwrap();
    assert_eq!(
        loyalty
            .upgrade_plugin("points", wasm)
            .await
            .unwrap()
            .version,
        2
    );
    // the plugin kept running through all of it
    assert_eq!(
        server.plugins.info("points").unwrap().spec.owner.as_deref(),
        Some("loyalty")
    );
    loyalty.remove_plugin("points").await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn plugins_per_principal_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let (text, t) = auth_file();
    let server = secured_server(dir.path(), &text).await;
    let [ops, loyalty, _, _] = principals(&server, &t).await;
    for name in ["order.paid", "points.credited"] {
        ops.create_topic(&topic(name)).await.unwrap();
    }
    for name in ["points-a", "points-b"] {
        loyalty
            .deploy_plugin(points_deploy(name, &["points.credited"]))
            .await
            .unwrap();
    }
    refused(
        loyalty
            .deploy_plugin(points_deploy("points-c", &["points.credited"]))
            .await,
        Code::ResourceExhausted,
        &["loyalty already owns 2 plugins, the limit is 2"],
    );
    loyalty.remove_plugin("points-a").await.unwrap();
    loyalty
        .deploy_plugin(points_deploy("points-c", &["points.credited"]))
        .await
        .unwrap();
    server.stop().await.unwrap();
}

/// Producer ids per principal are limited (issue 21, item 11): past the limit InitProducer
/// is refused with RESOURCE_EXHAUSTED saying the limit, how many the principal holds and what
/// to do; bumping the epoch of an id it holds still works, other principals are not charged,
/// plugins' producers are the server's and not limited, and once idle ids expire the principal
/// may make new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_per_principal_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let (text, t) = auth_file();
    let auth = Arc::new(Authority::parse(&text).unwrap());
    let server = start_with(dir.path(), |c| {
        c.auth = auth;
        c.broker.max_producers_per_principal = 3;
        c.broker.producer_expiry = Duration::from_secs(8);
        c.broker.retention_interval = Duration::from_millis(200);
    })
    .await;
    let [ops, loyalty, marketing, _] = principals(&server, &t).await;
    // A first deploy compiles the plugin (seconds on a loaded machine): before the producers
    // below, which would otherwise sit idle past their expiry during it.
    for name in ["order.paid", "points.credited"] {
        ops.create_topic(&topic(name)).await.unwrap();
    }
    loyalty
        .deploy_plugin(points_deploy("points", &["points.credited"]))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(loyalty.init_producer(None).await.unwrap().0);
    }
    refused(
        loyalty.init_producer(None).await,
        Code::ResourceExhausted,
        &[
            "principal \"loyalty\" holds 3 producer ids, the limit is 3",
            "--max-producers-per-principal",
            "reuse a producer id",
            "--producer-expiry-ms",
        ],
    );
    // An id it holds can still be re-initialised (its epoch bumped).
    assert_eq!(
        loyalty.init_producer(Some(held[0])).await.unwrap(),
        (held[0], 1)
    );
    // The limit is per principal.
    marketing.init_producer(None).await.unwrap();
    // Plugins' producers are the server's: a deploy by a principal at its limit still gets
    // them, and they do not count (the component is compiled already).
    loyalty
        .deploy_plugin(points_deploy("points2", &["points.credited"]))
        .await
        .unwrap();
    refused(
        loyalty.init_producer(None).await,
        Code::ResourceExhausted,
        &["holds 3 producer ids"],
    );
    // Idle ids are forgotten after --producer-expiry-ms; then new ones are issued again.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        match loyalty.init_producer(None).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                assert!(std::time::Instant::now() < deadline, "never expired: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn request_batch_stream_and_wasm_limits_are_refused_with_a_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.limits.max_request_bytes = 1 << 20;
        c.limits.max_streams_per_connection = 2;
        c.broker.max_batch_records = 100;
        c.plugins.max_wasm_bytes = 100_000;
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    client.create_topic(&topic("t")).await.unwrap();

    // a request over the size limit
    let big = weir_core::Record::from_value(vec![b'x'; 1_100_000]);
    refused(
        client.publish("t", Some(0), vec![big]).await,
        Code::OutOfRange,
        &["message length too large"],
    );
    // a batch over the record limit
    let e = client
        .publish("t", Some(0), records("r", 101))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    assert_eq!(e.kind(), Some("batch-too-large"));
    assert!(e.to_string().contains("at most 100 per request"), "{e}");
    client
        .publish("t", Some(0), records("r", 100))
        .await
        .unwrap();

    // streams per connection (one Client = one connection)
    let s1 = client
        .subscribe("t", &[], StartAt::Earliest, None)
        .await
        .unwrap();
    let _s2 = client
        .subscribe("t", &[], StartAt::Earliest, None)
        .await
        .unwrap();
    let e = client
        .subscribe("t", &[], StartAt::Earliest, None)
        .await
        .err()
        .expect("third stream refused");
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    assert_eq!(e.kind(), Some("too-many-streams"));
    // a second connection has its own allowance; a closed stream frees its slot
    let other = Client::connect(&server.url()).await.unwrap();
    other
        .subscribe("t", &[], StartAt::Earliest, None)
        .await
        .unwrap();
    drop(s1);
    let mut freed = None;
    for _ in 0..100 {
        match client.subscribe("t", &[], StartAt::Earliest, None).await {
            Ok(s) => {
                freed = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        freed.is_some(),
        "a dropped subscription did not free its slot"
    );

    // a wasm over the size limit (points.wasm is ~180 KB)
    let e = client
        .deploy_plugin(Deploy {
            name: "p".into(),
            wasm: plugin_wasm("points").to_vec(),
            input: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert_eq!(e.kind(), Some("wasm-too-large"));

    // everything accepted is still there
    let info = client.describe_topic("t").await.unwrap();
    assert_eq!(info.partitions[0].end_offset, 100);
    server.stop().await.unwrap();
}

/// GET over TLS trusting only `ca_pem`; the raw HTTP response.
async fn https_get(addr: std::net::SocketAddr, ca_pem: &str, path: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A self-signed certificate for `localhost`: (cert PEM, key PEM).
fn self_signed() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn tls_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let server = start_with(&dir.path().join("data"), |c| {
        c.tls = Some(weir_server::server::TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let url = format!("https://localhost:{}", server.addr.port());
    let options = ConnectOptions {
        token: None,
        tls_ca_pem: Some(cert.clone().into_bytes()),
    };
    let client = Client::connect_with(&url, &options).await.unwrap();
    client.create_topic(&topic("secret")).await.unwrap();
    client
        .publish("secret", Some(1), records("s", 3))
        .await
        .unwrap();
    let mut sub = client
        .subscribe("secret", &[1], StartAt::Earliest, None)
        .await
        .unwrap();
    let got = sub.next().await.unwrap().unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(&got[2].record.value[..], b"s-2");

    // without the CA the certificate is not trusted; plain HTTP/2 is not served
    let untrusted = match Client::connect_with(&url, &ConnectOptions::default()).await {
        Ok(c) => c.list_topics().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(untrusted.is_err(), "a self-signed certificate was trusted");
    let plain = match Client::connect(&format!("http://localhost:{}", server.addr.port())).await {
        Ok(c) => c.list_topics().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(plain.is_err(), "plaintext was served on the TLS port");

    // The metrics listener serves TLS with the same certificate.
    let metrics = server.metrics_addr.unwrap();
    let response = https_get(metrics, &cert, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("weir_publish_records_total"),
        "{response}"
    );
    let mut plain = tokio::net::TcpStream::connect(metrics).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("weir_publish"),
        "metrics were served in plaintext on the TLS listener"
    );
    server.stop().await.unwrap();
}

/// The CLI end to end against a real `weir serve --auth --tls-cert`: `weir auth token`,
/// `--tls-ca`, `WEIR_TOKEN`, and the messages a refused user sees.
#[test]
fn cli_with_auth_and_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    // mint with the CLI, as an operator would
    let (ok, out, err) = weir_cli("http://unused", &["auth", "token", "--quiet"], "");
    assert!(ok, "{err}");
    let (token, hash) = out.trim().split_once('\t').expect("token\thash");
    assert_eq!(weir_server::auth::token_hash(token), hash);
    let auth = format!(
        "[[principal]]\nname = \"loyalty\"\ntokens = [\"{hash}\"]\ngrants = [{{ allow = [\"create\", \"publish\", \"subscribe\"], topics = [\"points.*\"] }}]\n"
    );
    std::fs::write(dir.path().join("auth.toml"), auth).unwrap();
    let data = dir.path().join("data");
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let server = WeirProcess::spawn(
        &data,
        "127.0.0.1:0",
        &[
            "--auth",
            &p("auth.toml"),
            "--tls-cert",
            &p("cert.pem"),
            "--tls-key",
            &p("key.pem"),
        ],
    );
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let url = format!("https://localhost:{port}");
    let ca = p("cert.pem");
    let run = |token: Option<&str>, args: &[&str], stdin: &str| {
        let mut full = vec!["--tls-ca", ca.as_str()];
        if let Some(t) = token {
            full.extend(["--token", t]);
        }
        full.extend(args);
        weir_cli(&url, &full, stdin)
    };
    let (ok, _, err) = run(
        Some(token),
        &["topic", "create", "points.credited", "--partitions", "1"],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run(Some(token), &["publish", "points.credited"], "a\nb\n");
    assert!(ok, "{err}");
    let (ok, out, err) = run(
        Some(token),
        &[
            "consume",
            "points.credited",
            "--from",
            "earliest",
            "--max",
            "2",
        ],
        "",
    );
    assert!(ok, "{err}");
    assert!(out.contains('a') && out.contains('b'), "{out}");
    let (ok, _, err) = run(None, &["topic", "list"], "");
    assert!(!ok);
    assert!(err.contains("requires a token"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (ok, _, err) = run(Some(token), &["topic", "create", "orders"], "");
    assert!(!ok);
    assert!(err.contains("may not create topic \"orders\""), "{err}");
    server.terminate(Duration::from_secs(10));
}

/// A plugin cannot reach files, the environment, the network or the real clock: the chaos
/// plugin's `escape` record tries each and reports what it got.
#[tokio::test]
async fn a_plugin_cannot_escape_its_sandbox() {
    let local = common::local_chaos().await;
    local
        .publish("in", vec![weir_core::Record::from_value("escape")])
        .await
        .unwrap();
    local.run_until_idle().await.unwrap();
    let out = local.read("chaos.out").await.unwrap();
    assert_eq!(out.len(), 1);
    let report = String::from_utf8_lossy(&out[0].record.value).into_owned();
    assert_eq!(
        report,
        "fs=denied dir=denied write=denied env=0 net=denied clock_ms=0"
    );
    local.close().await;
}
