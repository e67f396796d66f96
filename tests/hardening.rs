//! The defects outside clients and a code review found (issue "Hardening"), each as what a
//! user does and what must happen: against a real `weir serve` process where the symptom is
//! the process's (CPU, exit), over gRPC against an in-process server otherwise, and with a
//! store that fails on command where the fault is the disk's.
//! (Over 500 lines because it is one issue's checklist, a test per defect, sharing the
//! helpers at its top.)

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{balance, paid, plugin_wasm, start_with, topic_end, weir_cli, WeirProcess};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use weir_api::pb;
use weir_api::{Client, ClientError, Deploy};
use weir_broker::StartAt;
use weir_core::{Record, TopicConfig};
use weir_log::faulty::{Faults, FaultyStore};
use weir_server::server::{self, RunningServer, ServerConfig};

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// CPU seconds used over the next `window`.
fn cpu_over(pid: u32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(window);
    cpu_seconds(pid) - before
}

/// Whether the process burns at least half a core over some 1 s window within 10 s (on a
/// loaded machine one window may fall short while other tests run).
fn burns_a_core(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cpu_over(pid, Duration::from_secs(1)) > 0.5 {
            return true;
        }
    }
    false
}

fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>, code: Code, needles: &[&str]) {
    let e = result.expect_err("the call should have been refused");
    assert_eq!(e.code(), Some(code), "{e}");
    let message = e.to_string();
    for n in needles {
        assert!(message.contains(n), "{message:?} lacks {n:?}");
    }
}

fn chaos(timeout_ms: u32) -> Deploy {
    Deploy {
        name: "chaos".into(),
        wasm: plugin_wasm("chaos").to_vec(),
        input: "in".into(),
        outputs: vec!["chaos.out".into()],
        timeout_ms,
        ..Default::default()
    }
}

/// A plugin that loops for ever under a time limit of 49 days: the deploy is refused above
/// the server's ceiling, and pause, upgrade, remove and shutdown stop the loop at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_plugin_is_capped_and_interrupted_by_pause_upgrade_remove_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let server = WeirProcess::spawn(
        dir.path(),
        "127.0.0.1:0",
        &["--max-plugin-timeout-ms", "600000", "--fsync", "never"],
    );
    let pid = server.child.id();
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic(&TopicConfig::new("in", 1))
        .await
        .unwrap();
    client
        .create_topic(&TopicConfig::new("chaos.out", 1))
        .await
        .unwrap();
    refused(
        client.deploy_plugin(chaos(u32::MAX)).await,
        Code::InvalidArgument,
        &[
            "--timeout-ms 4294967295",
            "--max-plugin-timeout-ms",
            "600000",
        ],
    );
    let info = client.deploy_plugin(chaos(600_000)).await.unwrap();
    assert_eq!(info.timeout_ms, 600_000);
    client
        .publish("in", Some(0), vec![Record::from_value("loop")])
        .await
        .unwrap();
    assert!(burns_a_core(pid), "the loop should burn a core");

    // Pause: the running call stops within a tick; nothing is committed or spent.
    let started = Instant::now();
    client.pause_plugin("chaos", true).await.unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let paused = cpu_over(pid, Duration::from_secs(1));
    assert!(paused < 0.3, "paused, yet {paused:.2} s of CPU in 1 s");
    let p = &client.list_plugins().await.unwrap()[0];
    let part = &p.partitions[0];
    assert_eq!(
        (part.committed, part.processed, part.dead_lettered),
        (0, 0, 0)
    );
    assert_eq!(part.state, "paused");
    let logs = client.plugin_logs("chaos").await.unwrap().join("\n");
    assert!(
        !logs.contains("attempt"),
        "an interrupt is not a failed attempt: {logs}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Resume: it loops again (the record was not skipped); upgrade interrupts it.
    client.pause_plugin("chaos", false).await.unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(burns_a_core(pid), "resumed: the record runs again");
    let started = Instant::now();
    client
        .upgrade_plugin("chaos", plugin_wasm("chaos").to_vec())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "upgrade took {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(burns_a_core(pid), "the upgraded version runs the record");

    // Remove returns at once and leaves no thread burning.
    let started = Instant::now();
    client.remove_plugin("chaos").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "remove took {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    let removed = cpu_over(pid, Duration::from_secs(1));
    assert!(removed < 0.3, "removed, yet {removed:.2} s of CPU in 1 s");

    // Shutdown interrupts it too: SIGTERM ends the process promptly and cleanly.
    client.deploy_plugin(chaos(600_000)).await.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(burns_a_core(pid), "the loop runs again after a new deploy");
    let status = server.terminate(Duration::from_secs(10));
    assert!(status.success(), "weir serve exited with {status}");
}

/// `--retention-ms 18446744073709551615` ("keep for ever") used to wrap negative and delete
/// every record at the next retention pass.
#[tokio::test]
async fn absurd_retention_is_refused_and_the_longest_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = WeirProcess::spawn(dir.path(), "127.0.0.1:0", &["--retention-check-ms", "50"]);
    let (ok, _, err) = weir_cli(
        &server.addr,
        &[
            "topic",
            "create",
            "t",
            "--retention-ms",
            "18446744073709551615",
        ],
        "",
    );
    assert!(!ok);
    assert!(
        err.contains("0 to keep records forever") && err.contains("9223372036854775807"),
        "{err}"
    );
    let (ok, _, err) = weir_cli(
        &server.addr,
        &[
            "topic",
            "create",
            "t",
            "--retention-ms",
            "9223372036854775807",
        ],
        "",
    );
    assert!(ok, "{err}");
    let client = Client::connect(&server.addr).await.unwrap();
    let old = Record {
        timestamp_ms: 1,
        ..Record::from_value("from 1970")
    };
    client
        .publish("t", Some(0), vec![old, Record::from_value("now")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = client.describe_topic("t").await.unwrap();
    assert_eq!(
        (
            info.partitions[0].start_offset,
            info.partitions[0].end_offset
        ),
        (0, 2),
        "retention removed records younger than the retention"
    );
}

/// 80 records of 1 MB in one partition: every subscriber, a stock gRPC client with its 4 MiB
/// receive limit included, reads them all, one message at a time; and max_batch_records is an
/// exact bound.
#[tokio::test]
async fn large_records_reach_stock_clients_and_batch_bounds_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = WeirProcess::spawn(dir.path(), "127.0.0.1:0", &["--fsync", "never"]);
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic(&TopicConfig::new("big", 1))
        .await
        .unwrap();
    for i in 0..8 {
        let records = (0..10)
            .map(|j| Record::from_value(vec![(i * 10 + j) as u8; 1_000_000]))
            .collect();
        client.publish("big", Some(0), records).await.unwrap();
    }
    // A stock client: generated code, default 4 MiB decoding limit.
    let mut stock = pb::weir_client::WeirClient::connect(server.addr.clone())
        .await
        .unwrap();
    let request = pb::SubscribeRequest {
        topic: "big".into(),
        start: Some(weir_api::convert::start_position(StartAt::Earliest)),
        ..Default::default()
    };
    let mut stream = stock.subscribe(request).await.unwrap().into_inner();
    let mut seen = 0u64;
    while seen < 80 {
        let message = stream.message().await.unwrap().unwrap();
        for r in &message.records {
            assert_eq!(r.offset, seen);
            assert_eq!(r.value[0], seen as u8);
            seen += 1;
        }
    }
    // The CLI reads them too.
    let (ok, out, err) = weir_cli(
        &server.addr,
        &[
            "consume", "big", "--from", "earliest", "--max", "80", "--json",
        ],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 80);

    client
        .create_topic(&TopicConfig::new("small", 1))
        .await
        .unwrap();
    client
        .publish("small", Some(0), common::records("s", 10))
        .await
        .unwrap();
    let request = pb::SubscribeRequest {
        topic: "small".into(),
        start: Some(weir_api::convert::start_position(StartAt::Earliest)),
        max_batch_records: 3,
        ..Default::default()
    };
    let mut stream = stock.subscribe(request).await.unwrap().into_inner();
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < 10 {
        sizes.push(stream.message().await.unwrap().unwrap().records.len());
    }
    assert_eq!(sizes, vec![3, 3, 3, 1]);
}

/// CommitOffsets past the end used to be stored, and the group then skipped every new record
/// with lag 0; a partition listed twice was delivered twice.
#[tokio::test]
async fn commits_past_the_end_and_partitions_listed_twice_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = WeirProcess::spawn(dir.path(), "127.0.0.1:0", &["--fsync", "never"]);
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic(&TopicConfig::new("t", 1))
        .await
        .unwrap();
    client
        .publish("t", Some(0), vec![Record::from_value("one")])
        .await
        .unwrap();
    refused(
        client
            .commit_offsets("g", "t", &[(0, 1_000_000_000_000)])
            .await,
        Code::OutOfRange,
        &["1000000000000", "ends at 1"],
    );
    assert!(client.fetch_offsets("g", "t").await.unwrap().is_empty());
    client.commit_offsets("g", "t", &[(0, 1)]).await.unwrap();
    refused(
        client
            .subscribe("t", &[0, 0], StartAt::Earliest, None)
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        &["partition 0 is listed twice"],
    );
}

/// A request that is not valid protobuf is the client's mistake, not the server's.
#[tokio::test]
async fn malformed_requests_are_invalid_argument_not_internal() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path()).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let call = |body: Vec<u8>| {
        let channel = channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let path =
                tonic::codegen::http::uri::PathAndQuery::from_static("/weir.v1.Weir/CreateTopic");
            grpc.unary(tonic::Request::new(body), path, RawCodec)
                .await
                .map(|_| ())
        }
    };
    // Field 1 (name), wire type 2, holding bytes that are not UTF-8.
    let not_utf8 = vec![0x0a, 0x02, 0xff, 0xfe, 0x10, 0x01];
    // A length that runs past the end of the message.
    let truncated = vec![0x0a, 0x10, b'a', b'b'];
    for body in [not_utf8, truncated] {
        let status = call(body).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("malformed message"), "{status:?}");
    }
    // An empty publish names no topic: say so, without a broken suggestion.
    let client = Client::connect(&server.url()).await.unwrap();
    let e = client
        .publish("", None, vec![Record::from_value("x")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("names no topic"), "{e}");
    assert!(!e.to_string().contains("weir topic create  "), "{e}");
    server.stop().await.unwrap();
}

/// Sends raw bytes as the request and ignores the response body.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// An in-process server on a sled store that fails on command.
async fn faulty_server(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut ServerConfig),
) -> (RunningServer, Arc<Faults>) {
    let mut config = ServerConfig::new(dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.cache_bytes = 64 << 20;
    tweak(&mut config);
    let sled = server::open_sled(&config).await.unwrap();
    let (store, faults) = FaultyStore::wrap(sled);
    let store: Arc<dyn weir_log::Store> = store;
    let running = server::start_on(config, store, CancellationToken::new())
        .await
        .unwrap();
    (running, faults)
}

/// Records ever written to a topic (the sum of its partitions' ends).
async fn points_on(client: &Client, on_error: &str) {
    client
        .create_topic(&TopicConfig::new("order.paid", 2))
        .await
        .unwrap();
    client
        .create_topic(&TopicConfig::new("points.credited", 2))
        .await
        .unwrap();
    client
        .deploy_plugin(Deploy {
            name: "points".into(),
            wasm: plugin_wasm("points").to_vec(),
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            on_error: on_error.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn wait_for(secs: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A disk that fails for a few seconds is the server's condition, never the record's: the
/// plugin waits (and says so) instead of halting or dead-lettering good records, nothing is
/// cached from a failed read, and a publish that failed says it may be stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_disk_makes_plugins_wait_and_publishes_say_what_happened() {
    for policy in ["halt", "dlq"] {
        let dir = tempfile::tempdir().unwrap();
        let (server, faults) =
            faulty_server(dir.path(), |c| c.fsync = weir_log::FsyncPolicy::Never).await;
        let client = Client::connect(&server.url()).await.unwrap();
        points_on(&client, policy).await;
        let mut producer = client.producer().await.unwrap();
        producer
            .send(
                "order.paid",
                (0..20).map(|i| paid(i, "ann", 10.0)).collect(),
            )
            .await
            .unwrap();
        wait_for(30, "the first orders", async || {
            balance(&client, "ann").await == Some(200)
        })
        .await;
        // The outage: orders published before it arrive while the disk fails.
        faults.outage(true);
        let e = client
            .publish("order.paid", Some(0), vec![paid(100, "bob", 10.0)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
        let message = e.to_string();
        assert!(
            message.contains("may or may not be stored") && message.contains("idempotent"),
            "{message}"
        );
        assert!(
            !message.contains("Os {"),
            "debug text reached the client: {message}"
        );
        faults.outage(false);
        // The plugins' store fails while the log works: orders arrive, commits cannot land.
        faults.kv.store(true, Ordering::SeqCst);
        producer
            .send(
                "order.paid",
                (20..40).map(|i| paid(i, "ann", 10.0)).collect(),
            )
            .await
            .unwrap();
        wait_for(30, "partitions waiting for the store", async || {
            let info = server.plugins.info("points").unwrap();
            info.partitions
                .iter()
                .any(|p| p.state.to_string().starts_with("waiting: the store failed"))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let info = server.plugins.info("points").unwrap();
        assert!(
            info.partitions
                .iter()
                .all(|p| !p.state.is_halted() && p.dead_lettered == 0),
            "{policy}: {:?}",
            info.partitions
        );
        faults.kv.store(false, Ordering::SeqCst);
        faults.outage(false);
        wait_for(30, "the orders after the outage", async || {
            balance(&client, "ann").await == Some(400)
        })
        .await;
        let info = server.plugins.info("points").unwrap();
        let processed: u64 = info.partitions.iter().map(|p| p.processed).sum();
        let dead: u64 = info.partitions.iter().map(|p| p.dead_lettered).sum();
        assert_eq!(
            (processed, dead),
            (40, 0),
            "{policy}: {:?}",
            info.partitions
        );
        let logs = server.plugins.logs("points").await.unwrap().join("\n");
        assert!(logs.contains("waiting for the store"), "{logs}");
        assert!(
            !logs.contains("attempt"),
            "a disk failure spent attempts: {logs}"
        );
        server.stop().await.unwrap();
    }
}

/// A panic inside a store call (a bug) while the commit lock is held used to poison the lock:
/// every later commit of that plugin panicked. Now the batch is retried and carries on.
#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_a_commit_does_not_poison_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let (server, faults) = faulty_server(dir.path(), |_| {}).await;
    let client = Client::connect(&server.url()).await.unwrap();
    points_on(&client, "halt").await;
    faults.panics.store(2, Ordering::SeqCst);
    let mut producer = client.producer().await.unwrap();
    producer
        .send(
            "order.paid",
            (0..30).map(|i| paid(i, "ann", 10.0)).collect(),
        )
        .await
        .unwrap();
    wait_for(30, "every order credited once", async || {
        balance(&client, "ann").await == Some(300)
    })
    .await;
    assert_eq!(
        faults.panics.load(Ordering::SeqCst),
        0,
        "the injected panics happened"
    );
    let info = server.plugins.info("points").unwrap();
    assert!(
        info.partitions.iter().all(|p| !p.state.is_halted()),
        "{:?}",
        info.partitions
    );
    server.stop().await.unwrap();
}

/// After a failed fsync the server used to keep running, refusing writes for ever while a
/// supervisor saw nothing. Now it stops with the reason (fail-stop).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_sync_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (server, faults) = faulty_server(dir.path(), |_| {}).await;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig::new("t", 1))
        .await
        .unwrap();
    client
        .publish("t", Some(0), vec![Record::from_value("safe")])
        .await
        .unwrap();
    faults.sync.store(true, Ordering::SeqCst);
    let e = client
        .publish("t", Some(0), vec![Record::from_value("lost?")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    assert!(e.to_string().contains("may or may not be stored"), "{e}");
    // The unsynced record is not shown: the end clients see is what they can read.
    let end = server.broker.describe_topic("t").unwrap().partitions[0].end_offset;
    let readable = server.broker.read("t", 0, 0, usize::MAX).await.unwrap();
    assert_eq!(
        (end, readable.len()),
        (1, 1),
        "shown end and readable records"
    );
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.shutdown.cancelled()).await;
    assert!(
        stopped.is_ok(),
        "the server did not stop after a failed sync"
    );
    let result = server.stop().await;
    let message = result.expect_err("stop reports the failure").to_string();
    assert!(
        message.contains("syncing the store failed") && message.contains("fail-stop"),
        "{message}"
    );
    // The acknowledged record is there after a restart.
    let server = common::start_server(dir.path()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let info = client.describe_topic("t").await.unwrap();
    assert!(info.partitions[0].end_offset >= 1);
    server.stop().await.unwrap();
}

fn auth_file() -> (String, String, String, String) {
    let (ops, ops_h) = weir_server::auth::mint_token();
    let (team_a, a_h) = weir_server::auth::mint_token();
    let (team_b, b_h) = weir_server::auth::mint_token();
    let text = format!(
        r#"
[[principal]]
name = "ops"
tokens = ["{ops_h}"]
admin = true

[[principal]]
name = "team-a"
tokens = ["{a_h}"]
grants = [
  {{ allow = ["publish", "subscribe", "create"], topics = ["*"] }},
  {{ allow = ["deploy"], plugins = ["*"] }},
]

[[principal]]
name = "team-b"
tokens = ["{b_h}"]
grants = [{{ allow = ["publish", "subscribe", "create"], topics = ["*"] }}]
"#
    );
    (text, ops, team_a, team_b)
}

async fn with_token(server: &RunningServer, token: &str) -> Client {
    let options = weir_api::ConnectOptions {
        token: Some(token.into()),
        tls_ca_pem: None,
    };
    Client::connect_with(&server.url(), &options).await.unwrap()
}

/// Any authenticated principal used to be able to fence a plugin's producer (ids are
/// sequential) and stop its outputs for good. Producer ids now belong to the principal that
/// created them, and plugins' to the server.
#[tokio::test(flavor = "multi_thread")]
async fn producers_belong_to_their_principal_and_plugin_producers_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (text, ops, team_a, team_b) = auth_file();
    let auth = Arc::new(weir_server::auth::Authority::parse(&text).unwrap());
    let server = start_with(dir.path(), |c| c.auth = auth).await;
    let (ops, a, b) = (
        with_token(&server, &ops).await,
        with_token(&server, &team_a).await,
        with_token(&server, &team_b).await,
    );
    points_on(&a, "halt").await;
    let (a_id, _) = a.init_producer(None).await.unwrap();
    let (b_id, _) = b.init_producer(None).await.unwrap();
    // Team B tries every id issued so far: only its own may be bumped.
    for id in 1..=b_id.max(a_id) {
        let result = b.init_producer(Some(id)).await;
        if id == b_id {
            result.unwrap();
        } else {
            refused(result, Code::PermissionDenied, &["may not use it"]);
        }
        // Publishing with another's producer is refused too.
        let mut raw_client = b.raw();
        let raw = raw_client.publish(pb::PublishRequest {
            topic: "points.credited".into(),
            partition: Some(0),
            records: vec![Record::from_value("forged").into()],
            producer: Some(pb::ProducerFields {
                producer_id: id,
                epoch: 0,
                base_sequence: 0,
            }),
            request_id: 0,
        });
        if id != b_id {
            let status = raw.await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        }
    }
    // An admin may bump a principal's producer, never a plugin's.
    ops.init_producer(Some(a_id)).await.unwrap();
    let plugin_ids: Vec<u64> = (1..a_id).collect();
    for id in plugin_ids {
        refused(
            ops.init_producer(Some(id)).await,
            Code::PermissionDenied,
            &["the server"],
        );
    }
    // The plugin's outputs still flow.
    let mut producer = a.producer().await.unwrap();
    producer
        .send("order.paid", vec![paid(1, "ann", 5.0)])
        .await
        .unwrap();
    wait_for(30, "points credited and forwarded", async || {
        topic_end(&a, "points.credited").await == 1
    })
    .await;
    server.stop().await.unwrap();
}

/// A forward that cannot succeed used to loop silently for ever; now it shows in the
/// partition's status, in `weir lag` and in a metric. An admission limit on an output topic
/// does not hold plugin outputs back.
#[tokio::test(flavor = "multi_thread")]
async fn blocked_outputs_show_and_admission_does_not_block_plugin_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.monitor.sample_interval = Duration::from_millis(100);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig::new("order.paid", 1))
        .await
        .unwrap();
    // One record per key per minute on the output topic: the plugin emits three for ann.
    let limited =
        TopicConfig::new("points.credited", 1).with_admission(Some(weir_core::Admission {
            per_key: 1,
            window_ms: 60_000,
        }));
    client.create_topic(&limited).await.unwrap();
    client
        .deploy_plugin(Deploy {
            name: "points".into(),
            wasm: plugin_wasm("points").to_vec(),
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .publish(
            "order.paid",
            Some(0),
            (1..=3).map(|i| paid(i, "ann", 1.0)).collect(),
        )
        .await
        .unwrap();
    wait_for(30, "three outputs past the admission limit", async || {
        client
            .describe_topic("points.credited")
            .await
            .unwrap()
            .partitions[0]
            .end_offset
            == 3
    })
    .await;
    // Take the plugin's producer state away from inside (a client cannot fence it any more,
    // and the forwarder follows a server producer's epoch): every forward is now refused.
    let producer_id = server.plugins.info("points").unwrap().spec.producer_ids[0];
    server
        .broker
        .release_server_producers(&[producer_id])
        .await
        .unwrap();
    client
        .publish("order.paid", Some(0), vec![paid(4, "bob", 1.0)])
        .await
        .unwrap();
    wait_for(30, "the blocked forward shows", async || {
        let p = &client.list_plugins().await.unwrap()[0];
        p.partitions[0].forwarding.starts_with("blocked: ")
            && p.partitions[0].forwarding.contains("expired")
    })
    .await;
    wait_for(30, "weir lag shows it", async || {
        let lag = client.lag("points").await.unwrap();
        lag.rows.iter().any(|r| r.status == "ERROR")
            && lag.consumers.iter().any(|c| {
                c.alerts
                    .iter()
                    .any(|a| a.contains("outputs of partition 0 blocked"))
            })
    })
    .await;
    let metrics = server.metrics_addr.unwrap();
    let body = http_get(metrics, "/metrics").await;
    let failures = body
        .lines()
        .find(|l| l.starts_with("weir_plugin_forward_failures_total{plugin=\"points\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "{body}");
    server.stop().await.unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Producer states and consumer groups are forgotten after their idle time (a retry after
/// that is refused as expired); plugins' producers never are.
#[tokio::test(flavor = "multi_thread")]
async fn idle_producers_and_groups_expire_plugin_producers_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.broker.retention_interval = Duration::from_millis(100);
        c.broker.producer_expiry = Duration::from_millis(700);
        c.broker.group_expiry = Duration::from_millis(700);
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    points_on(&client, "halt").await;
    let mut producer = client.producer().await.unwrap();
    let (id, epoch) = producer.id();
    producer
        .send_to("order.paid", 0, vec![paid(1, "ann", 1.0)])
        .await
        .unwrap();
    client
        .commit_offsets("g", "order.paid", &[(0, 1)])
        .await
        .unwrap();
    assert_eq!(
        client.fetch_offsets("g", "order.paid").await.unwrap(),
        vec![(0, 1)]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retry = client
        .raw()
        .publish(pb::PublishRequest {
            topic: "order.paid".into(),
            partition: Some(0),
            records: vec![paid(1, "ann", 1.0).into()],
            producer: Some(pb::ProducerFields {
                producer_id: id,
                epoch,
                base_sequence: 0,
            }),
            request_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(retry.code(), Code::FailedPrecondition, "{retry:?}");
    assert!(
        retry.message().contains("expired") && retry.message().contains("--producer-expiry-ms"),
        "{retry:?}"
    );
    assert!(
        client
            .fetch_offsets("g", "order.paid")
            .await
            .unwrap()
            .is_empty(),
        "the idle group expired"
    );
    // The plugin's producers outlived the expiry: its outputs still flow.
    let mut fresh = client.producer().await.unwrap();
    fresh
        .send_to("order.paid", 0, vec![paid(2, "ann", 1.0)])
        .await
        .unwrap();
    wait_for(30, "outputs after the expiry", async || {
        topic_end(&client, "points.credited").await == 2
    })
    .await;
    server.stop().await.unwrap();
}

/// PROCESSED used to reset on a restart while COMMITTED persisted; plugin logs were lost.
#[tokio::test(flavor = "multi_thread")]
async fn counters_and_logs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig::new("in", 1))
        .await
        .unwrap();
    client
        .create_topic(&TopicConfig::new("chaos.out", 1))
        .await
        .unwrap();
    client.deploy_plugin(chaos(5000)).await.unwrap();
    client
        .publish(
            "in",
            Some(0),
            vec![Record::from_value("hello"), Record::from_value("world")],
        )
        .await
        .unwrap();
    wait_for(30, "two records processed", async || {
        client.list_plugins().await.unwrap()[0].partitions[0].processed == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the log is written every 200 ms
    server.stop().await.unwrap();
    let server = common::start_server(dir.path()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    let p = &client.list_plugins().await.unwrap()[0];
    assert_eq!(
        (p.partitions[0].committed, p.partitions[0].processed),
        (2, 2)
    );
    let logs = client.plugin_logs("chaos").await.unwrap().join("\n");
    assert!(
        logs.contains("echo hello") && logs.contains("echo world"),
        "{logs}"
    );
    server.stop().await.unwrap();
}

/// Deploy limits that cannot work are refused with their range: 2^32-1 records per batch or
/// attempts, an output that is the input, a wasm above --max-wasm-mb (which used to be
/// unreachable: it equalled the request limit).
#[tokio::test(flavor = "multi_thread")]
async fn impossible_deploys_are_refused_with_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| c.plugins.max_wasm_bytes = 1 << 20).await;
    let client = Client::connect(&server.url()).await.unwrap();
    client
        .create_topic(&TopicConfig::new("in", 1))
        .await
        .unwrap();
    client
        .create_topic(&TopicConfig::new("chaos.out", 1))
        .await
        .unwrap();
    let request =
        |max_batch: u32, max_attempts: u32, outputs: Vec<String>| pb::DeployPluginRequest {
            name: "chaos".into(),
            wasm: plugin_wasm("chaos"),
            input: "in".into(),
            outputs,
            max_batch,
            max_attempts,
            ..Default::default()
        };
    let out = || vec!["chaos.out".to_string()];
    for (r, needle) in [
        (
            request(u32::MAX, 0, out()),
            "--max-batch 4294967295 is out of range: 1 to 10000",
        ),
        (
            request(0, u32::MAX, out()),
            "--max-attempts 4294967295 is out of range: 1 to 100",
        ),
        (request(0, 0, vec!["in".into()]), "is also the input"),
        (
            request(0, 0, vec!["chaos.out".into(), "chaos.out".into()]),
            "given twice",
        ),
        (
            pb::DeployPluginRequest {
                dedup_ids: u64::MAX,
                ..request(0, 0, out())
            },
            "--dedup-ids 18446744073709551615 is out of range: 1 to 10000000",
        ),
    ] {
        let status = client.raw().deploy_plugin(r).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    }
    let big = pb::DeployPluginRequest {
        wasm: Bytes::from(vec![0u8; 2 << 20]),
        ..request(0, 0, out())
    };
    let status = client.raw().deploy_plugin(big).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(weir_api::error_kind(&status), Some("wasm-too-large"));
    assert!(client.list_plugins().await.unwrap().is_empty());
    server.stop().await.unwrap();
}

/// A self-signed certificate from `openssl req -x509` carries CA:TRUE, which webpki refuses
/// as a server certificate; given with --tls-ca it is trusted (pinned), and an untrusted one
/// says to pass --tls-ca.
#[tokio::test(flavor = "multi_thread")]
async fn a_self_signed_ca_certificate_is_trusted_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = start_with(&dir.path().join("data"), |c| {
        c.tls = Some(weir_server::server::TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
    })
    .await;
    let url = format!("https://localhost:{}", server.addr.port());
    let options = weir_api::ConnectOptions {
        token: None,
        tls_ca_pem: Some(cert.pem().into_bytes()),
    };
    let client = Client::connect_with(&url, &options).await.unwrap();
    client.list_topics().await.unwrap();
    let untrusted = match Client::connect_with(&url, &Default::default()).await {
        Ok(c) => c.list_topics().await.map(|_| ()),
        Err(e) => Err(e),
    };
    let message = untrusted.unwrap_err().to_string();
    assert!(message.contains("--tls-ca"), "{message}");
    // Another name than the certificate's is still refused.
    let other = format!("https://127.0.0.1:{}", server.addr.port());
    let wrong_name = match Client::connect_with(&other, &options).await {
        Ok(c) => c.list_topics().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(
        wrong_name.is_err(),
        "a certificate for localhost was accepted for 127.0.0.1"
    );
    server.stop().await.unwrap();
}

/// The soak benchmark's short version: a steady flow of orders through three plugins for
/// 90 s; the server's RSS must stay flat after the warm-up (the state cache's byte budget has
/// its own tests, weir-plugins' `cache::tests`). Every bound is small so the 40 s warm-up fills it:
/// sled's page cache (8 MiB), each plugin's state cache (1 MiB, so it evicts all along) and
/// the topics' retention (1 MiB per partition, reached in ~20 s). The users are 20,000, 98%
/// of them seen within the warm-up: sled keeps ~50–80 bytes per stored key in memory beyond its cache
/// (BENCHMARKS.md, "Memory over time"), so with a keyspace still growing this would measure
/// the store's index, not a leak. The full soak (`cargo xtask bench --soak`) has 1,000,000.
/// The log's segment files must stay within 2× what retention keeps (issue 23).
/// `cargo xtask test` runs this test alone, after the others.
#[test]
fn memory_stays_flat_under_a_steady_load() {
    let dir = tempfile::tempdir().unwrap();
    let server = WeirProcess::spawn(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--state-cache-mb",
            "1",
            "--cache-mb",
            "8",
            "--retention-check-ms",
            "2000",
        ],
    );
    let wasm_dir = std::env::var("WEIR_PLUGIN_DIR").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../target/wasm32-wasip2/plugin"
        )
        .to_string()
    });
    let pid = server.child.id().to_string();
    let (ok, out, err) = weir_cli(
        &server.addr,
        &[
            "bench",
            "soak",
            "--wasm-dir",
            &wasm_dir,
            "--server-pid",
            &pid,
            "--duration-s",
            "90",
            "--users",
            "20000",
            "--rate",
            "2000",
            "--sample-s",
            "5",
            "--warmup-s",
            "40",
            "--dedup-ids",
            "20000",
            "--retention-bytes",
            "1048576",
            "--max-growth-pct",
            "15",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--max-log-disk-ratio",
            "2",
        ],
        "",
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("memory flat after warm-up: ok"), "{out}");
    assert!(out.contains("log's disk bounded by retention: ok"), "{out}");
}

/// Issue 21, item 9: `state get --after P:O` with an offset no record has (at or past the
/// partition's end) is refused with OUT_OF_RANGE naming the end, as CommitOffsets refuses a
/// commit past the end; it used to answer `pending` for ever. A real record's offset is
/// pending, then answered.
#[tokio::test(flavor = "multi_thread")]
async fn state_after_an_offset_past_the_partitions_end_is_refused_naming_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |_| {}).await;
    let client = Client::connect(&server.url()).await.unwrap();
    points_on(&client, "halt").await;
    let acks = client
        .publish(
            "order.paid",
            Some(1),
            vec![paid(1, "ann", 10.0), paid(2, "ann", 10.0)],
        )
        .await
        .unwrap();
    let last = acks[0].base_offset + u64::from(acks[0].count) - 1;
    wait_for(30, "the record processed", async || {
        matches!(
            client
                .get_state_after("points", b"balance/ann", 1, last)
                .await
                .unwrap(),
            weir_api::StateAnswer::Value(..)
        )
    })
    .await;
    let end = last + 1;
    for offset in [end, end + 1_000_000, u64::MAX] {
        let e = client
            .get_state_after("points", b"balance/ann", 1, offset)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::OutOfRange), "{offset}: {e}");
        assert_eq!(e.kind(), Some("offset-out-of-range"), "{offset}: {e}");
        let message = e.to_string();
        assert!(
            message.contains(&format!(
                "offset {offset} is past the end of partition 1 of order.paid"
            )) && message.contains(&format!("ends at {end}")),
            "{message}"
        );
    }
    // Another partition's end is its own: partition 0 has no record yet.
    let e = client
        .get_state_after("points", b"balance/ann", 0, 0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ends at 0"), "{e}");
    server.stop().await.unwrap();
}

/// Issue 21, items 8 and 10: deploy settings out of range are refused with INVALID_ARGUMENT
/// naming the field and its range (alert thresholds and --max-rate of 2^64-1, an empty config
/// key used to be accepted); a deploy naming no CPU bound gets the server's ceiling when that
/// is below the default.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_settings_out_of_range_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        c.plugins.max_timeout = Duration::from_millis(1000);
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    for topic in ["order.paid", "points.credited"] {
        client
            .create_topic(&TopicConfig::new(topic, 1))
            .await
            .unwrap();
    }
    let request = || pb::DeployPluginRequest {
        name: "points".into(),
        wasm: plugin_wasm("points"),
        input: "order.paid".into(),
        outputs: vec!["points.credited".into()],
        // Within the ceiling: each request below is refused for its one bad field.
        timeout_ms: 500,
        ..Default::default()
    };
    for (r, needle) in [
        (
            pb::DeployPluginRequest {
                alert_lag: u64::MAX,
                ..request()
            },
            "--alert-lag 18446744073709551615 is out of range: 0 (off) to 9223372036854775807 records",
        ),
        (
            pb::DeployPluginRequest {
                alert_delay_ms: u64::MAX,
                ..request()
            },
            "--alert-delay-ms 18446744073709551615 is out of range: 0 (off) to 9223372036854775807 ms",
        ),
        (
            pb::DeployPluginRequest {
                max_rate: u64::MAX,
                ..request()
            },
            "--max-rate 18446744073709551615 is out of range: 0 (off) to 1000000000 records per second",
        ),
        (
            pb::DeployPluginRequest {
                commit_records: 100_001,
                ..request()
            },
            "--commit-records 100001 is out of range: 1 to 100000 records",
        ),
        (
            pb::DeployPluginRequest {
                commit_interval_ms: u32::MAX,
                ..request()
            },
            "--commit-interval-ms 4294967295 is out of range: 1 to 60000 ms",
        ),
        (
            pb::DeployPluginRequest {
                config: vec![
                    pb::ConfigEntry {
                        key: "rate".into(),
                        value: "0.5".into(),
                    },
                    pb::ConfigEntry {
                        key: String::new(),
                        value: "secret".into(),
                    },
                ],
                ..request()
            },
            "--config entry 2 of 2 has an empty key",
        ),
    ] {
        let status = client.raw().deploy_plugin(r).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(weir_api::error_kind(&status), Some("invalid-argument"));
        assert!(status.message().contains(needle), "{status:?}");
        assert!(!status.message().contains("secret"), "{status:?}");
    }
    assert!(client.list_plugins().await.unwrap().is_empty());
    // The largest values in range are taken, and no timeout means the ceiling.
    let info = client
        .raw()
        .deploy_plugin(pb::DeployPluginRequest {
            alert_lag: i64::MAX as u64,
            alert_delay_ms: i64::MAX as u64,
            max_rate: 1_000_000_000,
            timeout_ms: 0,
            commit_records: 100_000,
            commit_interval_ms: 60_000,
            ..request()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.timeout_ms, 1000);
    assert_eq!(info.max_rate, 1_000_000_000);
    assert_eq!(
        (info.commit_records, info.commit_interval_ms),
        (100_000, 60_000)
    );
    server.stop().await.unwrap();
}

/// A deploy whose client goes away while the server works on it (a deadline shorter than the
/// compile) is finished all the same: cut short between its steps it left a taken store or
/// lease behind in cluster mode, and here nothing at all. Its client saw it fail; a retry is
/// answered "already exists", as after any deploy whose answer was lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_whose_client_went_away_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path()).await;
    let client = Client::connect(&server.url()).await.unwrap();
    for topic in ["in", "points.credited"] {
        client
            .create_topic(&TopicConfig::new(topic, 1))
            .await
            .unwrap();
    }
    let mut request = tonic::Request::new(pb::DeployPluginRequest {
        name: "points".into(),
        wasm: plugin_wasm("points"),
        input: "in".into(),
        outputs: vec!["points.credited".into()],
        ..Default::default()
    });
    // Compiling a component takes far longer than this.
    request.set_timeout(Duration::from_millis(20));
    let answer = client.raw().deploy_plugin(request).await;
    assert!(
        answer.is_err(),
        "the deploy answered within 20 ms; this test needs a deploy slower than its deadline"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let names: Vec<String> = client
            .list_plugins()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        if names == ["points"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deploy stopped when its client went away: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .publish("in", Some(0), vec![paid(1, "ann", 10.0)])
        .await
        .unwrap();
    wait_for(30, "the deployed plugin runs", async || {
        balance(&client, "ann").await.is_some()
    })
    .await;
    server.stop().await.unwrap();
}
