//! Lag, Burrow status, alerts, probes, `/metrics` and the status page.
//! (Over 500 lines because it is one suite, sharing its helpers.)

use crate::common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{paid, plugin_wasm, start_with, weir_cli};
use weir_api::pb;
use weir_api::{Client, Deploy};
use weir_core::{Record, TopicConfig};
use weir_server::monitor::MonitorConfig;
use weir_server::server::{RunningServer, ServerConfig};

fn fast_monitor(c: &mut ServerConfig) {
    c.monitor = MonitorConfig {
        sample_interval: Duration::from_millis(100),
        window: 5,
        ..MonitorConfig::default()
    };
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
}

pub(crate) async fn topics(client: &Client, names: &[(&str, u32)]) {
    for (name, partitions) in names {
        client
            .create_topic(&TopicConfig {
                name: name.to_string(),
                partitions: *partitions,
                retention_ms: 0,
                retention_bytes: 0,
                admission: None,
            })
            .await
            .unwrap();
    }
}

/// Deploys the points plugin on order.paid → points.credited, paced at `max_rate` (0 = not).
pub(crate) async fn deploy_points(client: &Client, max_rate: u64) {
    client
        .deploy_plugin(Deploy {
            name: "points".into(),
            wasm: plugin_wasm("points").to_vec(),
            input: "order.paid".into(),
            outputs: vec!["points.credited".into()],
            max_rate,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A server probing every 50 ms with the chaos plugin deployed as `name` on `in`.
async fn probed_chaos(
    name: &str,
    partitions: u32,
    on_error: &str,
) -> (tempfile::TempDir, RunningServer, Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |c| {
        fast_monitor(c);
        c.monitor.probe_interval = Some(Duration::from_millis(50));
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    topics(&client, &[("in", partitions), ("chaos.out", 1)]).await;
    client
        .deploy_plugin(Deploy {
            name: name.into(),
            wasm: plugin_wasm("chaos").to_vec(),
            input: "in".into(),
            outputs: vec!["chaos.out".into()],
            on_error: on_error.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    (dir, server, client)
}

/// Polls `weir lag NAME` through the API until `check` holds; returns that answer.
async fn lag_until(
    client: &Client,
    name: &str,
    secs: u64,
    what: &str,
    check: impl Fn(&pb::GetLagResponse) -> bool,
) -> pb::GetLagResponse {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        // Until the monitor's next sample a new plugin or group is unknown to it.
        let lag = client.lag(name).await.unwrap_or_default();
        if check(&lag) {
            return lag;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last answer:\n{}",
            weir_api::lag::table(&lag)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `weir` CLI against `server`, on a blocking thread.
async fn cli(server: &RunningServer, args: &[&str]) -> (bool, String, String) {
    let url = server.url();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        weir_cli(&url, &args, "")
    })
    .await
    .unwrap()
}

fn consumer<'a>(lag: &'a pb::GetLagResponse, name: &str) -> &'a pb::ConsumerHealth {
    found(lag, name).unwrap_or_else(|| panic!("no consumer {name} in {lag:?}"))
}

fn found<'a>(lag: &'a pb::GetLagResponse, name: &str) -> Option<&'a pb::ConsumerHealth> {
    lag.consumers.iter().find(|c| c.name == name)
}

/// A plain HTTP/1.1 GET on a blocking thread (the server runs on this test's runtime);
/// returns (status line, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get_blocking(addr, &path))
        .await
        .unwrap()
}

pub(crate) fn http_get_blocking(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test]
async fn lag_grows_while_paused_and_drains_after_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), fast_monitor).await;
    let client = Client::connect(&server.url()).await.unwrap();
    topics(&client, &[("order.paid", 2), ("points.credited", 2)]).await;
    deploy_points(&client, 0).await;
    let orders = |from: u64, n: u64| -> Vec<Record> {
        (from..from + n)
            .map(|i| paid(i, &format!("u{}", i % 7), 5.0))
            .collect()
    };
    client
        .publish("order.paid", None, orders(0, 50))
        .await
        .unwrap();
    lag_until(&client, "points", 30, "points caught up", |l| {
        l.rows.len() == 2
            && l.rows.iter().all(|r| r.lag == 0 && r.end > 0)
            && found(l, "points").is_some_and(|c| c.status == "OK")
    })
    .await;

    client.pause_plugin("points", true).await.unwrap();
    client
        .publish("order.paid", None, orders(50, 120))
        .await
        .unwrap();
    let stopped = lag_until(&client, "points", 30, "lag 120 and STOP", |l| {
        found(l, "points").is_some_and(|c| c.lag == 120 && c.status == "STOP")
    })
    .await;
    assert!(stopped.rows.iter().all(|r| r.committed + r.lag == r.end));
    assert!(consumer(&stopped, "points").time_lag_ms > 0);

    // The CLI shows the same, as a table and as JSON lines.
    let (ok, out, err) = cli(&server, &["lag", "points"]).await;
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    for column in [
        "NAME",
        "TOPIC",
        "PARTITION",
        "COMMITTED",
        "END",
        "LAG",
        "TIME-LAG",
        "STATUS",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(out.contains("STOP"), "{out}");
    let (ok, out, _) = cli(&server, &["lag", "--json"]).await;
    assert!(ok);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total: u64 = lines
        .iter()
        .filter(|v| v["type"] == "partition" && v["name"] == "points")
        .map(|v| v["lag"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 120);
    let (ok, _, err) = cli(&server, &["lag", "nobody"]).await;
    assert!(!ok);
    assert!(
        err.contains("no plugin or consumer group named \"nobody\""),
        "{err}"
    );

    client.pause_plugin("points", false).await.unwrap();
    lag_until(&client, "points", 30, "drained after resume", |l| {
        found(l, "points").is_some_and(|c| c.lag == 0 && c.status == "OK")
    })
    .await;

    // A consumer group: committed offsets behind the end, no commits since → STOP.
    client
        .commit_offsets("audit", "order.paid", &[(0, 3), (1, 0)])
        .await
        .unwrap();
    let lag = lag_until(&client, "audit", 30, "the group's lag", |l| {
        l.rows.len() == 2 && found(l, "audit").is_some_and(|c| c.status == "STOP")
    })
    .await;
    assert_eq!(consumer(&lag, "audit").lag, 170 - 3);
    assert!(lag.rows.iter().all(|r| r.kind == "group"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn probes_report_delays_and_never_reach_a_plugin() {
    let (_dir, server, client) = probed_chaos("chaos", 2, "halt").await;
    for i in 0..10 {
        client
            .publish("in", None, vec![Record::from_value(format!("hello-{i}"))])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let lag = lag_until(&client, "chaos", 30, "20 probes", |l| {
        found(l, "chaos").is_some_and(|c| c.probes_seen >= 20 && c.lag == 0)
    })
    .await;
    let c = consumer(&lag, "chaos");
    assert_eq!((c.probes_lost, c.probes_duplicated), (0, 0));
    assert!(c.probe_p50_ms <= c.probe_p99_ms && c.probe_p99_ms <= c.probe_p999_ms);
    assert!(c.probe_p999_ms < 30_000.0, "{c:?}");
    // The plugin saw the ten records and nothing else: its outputs and its counter.
    let out = server.broker.read("chaos.out", 0, 0, 1000).await.unwrap();
    let values: Vec<String> = out
        .iter()
        .map(|r| String::from_utf8_lossy(&r.record.value).into_owned())
        .collect();
    assert_eq!(values.len(), 10, "{values:?}");
    assert!(values.iter().all(|v| v.starts_with("hello-")), "{values:?}");
    let (seen, _) = server
        .plugins
        .state_get("chaos", b"seen")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, b"10");
    // The probes are in the input topic all the same.
    let info = client.describe_topic("in").await.unwrap();
    let total: u64 = info.partitions.iter().map(|p| p.end_offset).sum();
    assert!(total >= 10 + 20, "{total}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_plugin_raises_then_clears_the_delay_alert() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), fast_monitor).await;
    let client = Client::connect(&server.url()).await.unwrap();
    topics(&client, &[("in", 1), ("chaos.out", 1)]).await;
    client
        .deploy_plugin(Deploy {
            name: "slowpoke".into(),
            wasm: plugin_wasm("chaos").to_vec(),
            input: "in".into(),
            outputs: vec!["chaos.out".into()],
            alert_delay_ms: 400,
            alert_lag: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap();
    // ~40 records of tens of milliseconds each, one per batch: the oldest waits for seconds.
    let records: Vec<Record> = (0..40).map(|_| Record::from_value("slow:60")).collect();
    client.publish("in", Some(0), records).await.unwrap();
    let raised = lag_until(&client, "slowpoke", 60, "the delay alert", |l| {
        found(l, "slowpoke").is_some_and(|c| !c.alerts.is_empty())
    })
    .await;
    let c = consumer(&raised, "slowpoke");
    assert!(c.alerts[0].starts_with("delay "), "{:?}", c.alerts);
    assert_ne!(c.status, "OK");
    let metrics_addr = server.metrics_addr.unwrap();
    let (_, body) = http_get(metrics_addr, "/metrics").await;
    assert!(
        body.contains("weir_plugin_alert_active{plugin=\"slowpoke\",alert=\"delay\"} 1"),
        "{body}"
    );
    let cleared = lag_until(&client, "slowpoke", 120, "the alert cleared", |l| {
        found(l, "slowpoke").is_some_and(|c| c.alerts.is_empty() && c.lag == 0)
    })
    .await;
    assert_eq!(consumer(&cleared, "slowpoke").status, "OK");
    server.stop().await.unwrap();
}

/// Checks one line of the Prometheus / OpenMetrics text format; returns the sample's name.
fn parse_line(line: &str) -> Option<String> {
    if let Some(rest) = line.strip_prefix('#') {
        let mut words = rest.split_whitespace();
        let kind = words.next().expect("a comment keyword");
        assert!(
            ["HELP", "TYPE", "UNIT", "EOF"].contains(&kind),
            "unknown comment: {line}"
        );
        if kind == "TYPE" {
            let t = words.nth(1).expect("a type");
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "unknown",
                    "info",
                    "stateset"
                ]
                .contains(&t),
                "{line}"
            );
        }
        return None;
    }
    let name_end = line.find(['{', ' ']).expect("a sample has a value");
    let name = &line[..name_end];
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit()),
        "bad metric name in {line}"
    );
    let mut rest = &line[name_end..];
    if let Some(labels) = rest.strip_prefix('{') {
        let close = labels.rfind('}').expect("labels close");
        for pair in labels[..close].split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once("=\"")
                .unwrap_or_else(|| panic!("label in {line}"));
            assert!(
                k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            assert!(!v.contains('\n'), "{line}");
        }
        rest = &labels[close + 1..];
    }
    let value = rest.split_whitespace().next().expect("a value");
    assert!(
        value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
        "bad value in {line}"
    );
    Some(name.to_string())
}

#[tokio::test]
async fn metrics_parse_and_name_every_series() {
    let (_dir, server, client) = probed_chaos("metered", 1, "dlq").await;
    let with_id = |v: &str, id: &str| Record {
        id: Some(id.into()),
        ..Record::from_value(v.to_string())
    };
    client
        .publish(
            "in",
            Some(0),
            vec![with_id("a", "1"), with_id("a", "1"), with_id("fail", "2")],
        )
        .await
        .unwrap();
    lag_until(&client, "metered", 30, "processed, probes seen", |l| {
        found(l, "metered").is_some_and(|c| c.lag == 0 && c.probes_seen >= 2)
    })
    .await;
    let addr = server.metrics_addr.unwrap();
    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let names: std::collections::HashSet<String> = body.lines().filter_map(parse_line).collect();
    assert_eq!(body.lines().last(), Some("# EOF"));
    for series in [
        "weir_publish_records_total",
        "weir_publish_bytes_total",
        "weir_fsync_seconds_bucket",
        "weir_plugin_batch_seconds_bucket",
        "weir_plugin_records_in_total",
        "weir_plugin_records_out_total",
        "weir_plugin_traps_total",
        "weir_plugin_dlq_total",
        "weir_plugin_dedup_skips_total",
        "weir_consumer_lag_records",
        "weir_consumer_lag_seconds",
        "weir_consumer_status",
        "weir_plugin_alert_active",
        "weir_probe_delay_seconds_bucket",
        "weir_probes_seen",
        "weir_probes_lost",
    ] {
        assert!(names.contains(series), "{series} missing from:\n{body}");
    }
    assert!(
        body.contains("weir_plugin_dlq_total{plugin=\"metered\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("weir_plugin_dedup_skips_total{plugin=\"metered\"} 1"),
        "{body}"
    );
    server.stop().await.unwrap();
}

/// Debian's Chromium, or the one `WEIR_CHROMIUM` names. `cargo xtask test` installs the
/// package when it is missing and it can (root with apt-get).
fn chromium() -> String {
    if let Ok(path) = std::env::var("WEIR_CHROMIUM") {
        return path;
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!(
        "headless Chromium is needed to test the status page and none was found: install \
         Debian's `chromium` package (apt-get install chromium; `cargo xtask test` does this \
         when run as root) or set WEIR_CHROMIUM to a Chromium binary"
    );
}

fn chromium_run(url: &str, extra: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium")
}

async fn server_with_history() -> (tempfile::TempDir, RunningServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), fast_monitor).await;
    let client = Client::connect(&server.url()).await.unwrap();
    topics(&client, &[("order.paid", 2), ("points.credited", 2)]).await;
    deploy_points(&client, 0).await;
    client.pause_plugin("points", true).await.unwrap();
    for round in 0..5u64 {
        let orders: Vec<Record> = (0..40)
            .map(|i| paid(round * 100 + i, &format!("u{i}"), 3.0))
            .collect();
        client.publish("order.paid", None, orders).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    client.pause_plugin("points", false).await.unwrap();
    lag_until(&client, "points", 30, "drained", |l| {
        found(l, "points").is_some_and(|c| c.lag == 0)
    })
    .await;
    (dir, server)
}

#[tokio::test]
async fn the_status_page_renders_in_headless_chromium() {
    let (_dir, server) = server_with_history().await;
    let addr = server.metrics_addr.unwrap();
    let url = format!("http://{addr}/");
    let (status, page) = http_get(addr, "/").await;
    assert!(status.contains("200") && page.contains("<svg id=\"chart\""));
    let (_, api) = http_get(addr, "/api/status").await;
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    assert!(
        api["history"][0]["points"].as_array().unwrap().len() > 5,
        "{api}"
    );

    let url2 = url.clone();
    let dom = tokio::task::spawn_blocking(move || chromium_run(&url2, &["--dump-dom"]))
        .await
        .unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    // Rendered by the page's script from /api/status: the plugin's row and its chart line.
    assert!(html.contains("<tr data-name=\"points\">"), "{html}");
    assert!(html.contains("class=\"status OK\""), "{html}");
    assert!(
        html.contains("class=\"series\" data-name=\"points\""),
        "{html}"
    );
    assert!(html.contains("order.paid"), "{html}");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let out = tokio::task::spawn_blocking(move || {
        chromium_run(
            &url,
            &[&arg, "--window-size=1200,1100", "--hide-scrollbars"],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    server.stop().await.unwrap();
}

/// `--max-rate` paces a plugin, and `GetState` with the caller's own offset answers
/// "pending" until the plugin has processed it (the seed's 秒杀结果计算中).
#[tokio::test]
async fn a_paced_plugin_and_the_pending_answer() {
    use weir_api::StateAnswer;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), fast_monitor).await;
    let client = Client::connect(&server.url()).await.unwrap();
    topics(&client, &[("order.paid", 1), ("points.credited", 1)]).await;
    deploy_points(&client, 200).await;
    let orders: Vec<Record> = (0..300).map(|i| paid(i, "u1", 1.0)).collect();
    let acks = client.publish("order.paid", Some(0), orders).await.unwrap();
    let last = acks[0].base_offset + u64::from(acks[0].count) - 1;
    // At 200 records/s the last of 300 cannot be done at once: the answer is pending.
    let answer = client
        .get_state_after("points", b"balance/u1", 0, last)
        .await
        .unwrap();
    assert_eq!(answer, StateAnswer::Pending);
    let (ok, out, err) = cli(
        &server,
        &[
            "state",
            "get",
            "points",
            "balance/u1",
            "--after",
            &format!("0:{last}"),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("pending"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed = server.plugins.info("points").unwrap().partitions[0].committed;
    assert!(
        committed < 300,
        "paced at 200/s, yet {committed} done after 0.5 s"
    );
    lag_until(&client, "points", 30, "all 300 processed", |l| {
        found(l, "points").is_some_and(|c| c.lag == 0)
    })
    .await;
    let answer = client
        .get_state_after("points", b"balance/u1", 0, last)
        .await
        .unwrap();
    assert_eq!(
        answer,
        StateAnswer::Value(b"300".to_vec(), answer_version(&answer))
    );
    server.stop().await.unwrap();
}

fn answer_version(a: &weir_api::StateAnswer) -> u64 {
    match a {
        weir_api::StateAnswer::Value(_, v) => *v,
        _ => 0,
    }
}
