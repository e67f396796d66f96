//! Plugins end to end on an in-process server with the real compiled components: behaviour,
//! dedup, outputs forwarded exactly once, isolation of misbehaving plugins, deploy errors,
//! upgrade.
//! (Over 500 lines because it is one suite: one subject, sharing its helpers.)

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use weir_broker::{Publish, StartAt};
use weir_core::{Record, TopicConfig};
use weir_plugins::{DeployRequest, Limits, ManagerError, OnError, PluginError, StartFrom};
use weir_server::server::RunningServer;

/// A server on a fresh directory with these topics.
async fn serve_with_topics(topics: &[(&str, u32)]) -> (tempfile::TempDir, RunningServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    for (name, partitions) in topics {
        server
            .broker
            .create_topic(TopicConfig::new(*name, *partitions))
            .await
            .unwrap();
    }
    (dir, server)
}

fn deploy(name: &str, wasm: &str, input: &str, outputs: &[&str]) -> DeployRequest {
    DeployRequest {
        name: name.into(),
        wasm: plugin_wasm(wasm),
        input: input.into(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        config: vec![],
        start: StartFrom::Earliest,
        limits: Limits::default(),
        on_error: OnError::Halt,
        max_attempts: 2,
        max_batch: 500,
        dedup: Default::default(),
        owner: None,
        owner_quota: None,
        alerts: Default::default(),
        max_rate: 0,
        commit: Default::default(),
    }
}

async fn publish_to(server: &RunningServer, topic: &str, partition: u32, records: Vec<Record>) {
    server
        .broker
        .publish(Publish {
            topic: topic.into(),
            partition: Some(partition),
            records,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn publish(server: &RunningServer, topic: &str, records: Vec<Record>) {
    server
        .broker
        .publish(Publish {
            topic: topic.into(),
            records,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Waits until the plugin has committed everything in its input topic.
async fn caught_up(server: &RunningServer, plugin: &str) {
    let info = server.plugins.info(plugin).unwrap();
    let input = info.spec.input.clone();
    eventually(30, &format!("{plugin} catches up"), || {
        let ends: Vec<u64> = server
            .broker
            .describe_topic(&input)
            .unwrap()
            .partitions
            .iter()
            .map(|p| p.end_offset)
            .collect();
        let info = server.plugins.info(plugin).unwrap();
        info.partitions
            .iter()
            .zip(&ends)
            .all(|(s, end)| s.committed == *end)
    })
    .await;
}

fn end_total(server: &RunningServer, topic: &str) -> u64 {
    server
        .broker
        .describe_topic(topic)
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end_offset)
        .sum()
}

async fn read_all(server: &RunningServer, topic: &str) -> Vec<weir_core::StoredRecord> {
    let info = server.broker.describe_topic(topic).unwrap();
    let mut out = Vec::new();
    for p in info.partitions {
        out.extend(
            server
                .broker
                .read(topic, p.partition, 0, usize::MAX)
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_credits_each_distinct_order_once_and_forwards_outputs_once() {
    points_exactly_once(plugin_wasm("points")).await;
}

/// The same test, the same expected balances and outputs, for examples/points-py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_in_python_credits_each_distinct_order_once() {
    points_exactly_once(std::fs::read(example_wasm("points-py")).unwrap().into()).await;
}

/// And for examples/points-js.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_in_javascript_credits_each_distinct_order_once() {
    points_exactly_once(std::fs::read(example_wasm("points-js")).unwrap().into()).await;
}

async fn points_exactly_once(wasm: Bytes) {
    let (_dir, server) = serve_with_topics(&[("order.paid", 2), ("points.credited", 2)]).await;
    let mut request = deploy("points", "points", "order.paid", &["points.credited"]);
    request.wasm = wasm;
    request.config = vec![("rate".into(), "0.1".into())];
    server.plugins.deploy(request).await.unwrap();

    let users = ["ann", "bob", "cy", "dee", "eve"];
    let orders: Vec<(u64, &str, f64)> = (0..200)
        .map(|i| (i, users[i as usize % 5], 10.0 + (i % 37) as f64 * 3.3))
        .collect();
    for chunk in orders.chunks(50) {
        publish(
            &server,
            "order.paid",
            chunk.iter().map(|(o, u, a)| paid(*o, u, *a)).collect(),
        )
        .await;
    }
    // Re-sent duplicates (a producer retry without idempotence, a replay upstream).
    publish(
        &server,
        "order.paid",
        orders[..30]
            .iter()
            .map(|(o, u, a)| paid(*o, u, *a))
            .collect(),
    )
    .await;
    caught_up(&server, "points").await;

    for user in users {
        let want: u64 = orders
            .iter()
            .filter(|(_, u, _)| *u == user)
            .map(|(_, _, a)| (a * 0.1).floor() as u64)
            .sum();
        let (value, _) = server
            .plugins
            .state_get("points", format!("balance/{user}").as_bytes())
            .await
            .unwrap()
            .expect("balance exists");
        assert_eq!(
            serde_json::from_slice::<u64>(&value).unwrap(),
            want,
            "balance of {user}"
        );
    }
    let info = server.plugins.info("points").unwrap();
    assert_eq!(
        info.partitions.iter().map(|p| p.skipped).sum::<u64>(),
        30,
        "duplicates skipped"
    );
    assert_eq!(
        info.partitions.iter().map(|p| p.processed).sum::<u64>(),
        200
    );
    eventually(20, "outputs forwarded", || {
        end_total(&server, "points.credited") == 200
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let credited = read_all(&server, "points.credited").await;
    assert_eq!(credited.len(), 200, "each output once");
    let mut orders_seen: Vec<u64> = credited
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.record.value).unwrap()["order"]
                .as_u64()
                .unwrap()
        })
        .collect();
    orders_seen.sort();
    assert_eq!(orders_seen, (0..200).collect::<Vec<_>>());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_records_go_to_the_dlq_and_nothing_else_stops() {
    let (_dir, server) = serve_with_topics(&[
        ("in", 1),
        ("chaos.out", 1),
        ("order.paid", 1),
        ("points.credited", 1),
    ])
    .await;
    let mut request = deploy("chaos", "chaos", "in", &["chaos.out"]);
    request.limits = Limits {
        memory_bytes: 32 << 20,
        timeout: Duration::from_millis(300),
    };
    request.on_error = OnError::Dlq;
    server.plugins.deploy(request).await.unwrap();
    server
        .plugins
        .deploy(deploy(
            "points",
            "points",
            "order.paid",
            &["points.credited"],
        ))
        .await
        .unwrap();

    let values = [
        "ok-1",
        "panic",
        "ok-2",
        "loop",
        "ok-3",
        "bomb",
        "fail",
        "emit-undeclared",
        "huge",
        "ok-4",
    ];
    publish(
        &server,
        "in",
        values.iter().map(|v| Record::from_value(*v)).collect(),
    )
    .await;
    // Publishing and another plugin go on while chaos struggles.
    publish(&server, "order.paid", vec![paid(1, "ann", 50.0)]).await;
    caught_up(&server, "points").await;
    caught_up(&server, "chaos").await;

    eventually(20, "echoes forwarded", || {
        end_total(&server, "chaos.out") == 4
    })
    .await;
    let echoed: Vec<Bytes> = read_all(&server, "chaos.out")
        .await
        .into_iter()
        .map(|r| r.record.value)
        .collect();
    assert_eq!(
        echoed,
        ["ok-1", "ok-2", "ok-3", "ok-4"].map(|s| Bytes::from(s.as_bytes()))
    );
    let (seen, _) = server
        .plugins
        .state_get("chaos", b"seen")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, b"4", "state of failed batches was never committed");

    eventually(20, "dead letters forwarded", || {
        end_total(&server, "chaos.dlq") == 6
    })
    .await;
    let dead = read_all(&server, "chaos.dlq").await;
    let reasons: Vec<(String, String)> = dead
        .iter()
        .map(|r| {
            let error = r
                .record
                .headers
                .iter()
                .find(|(k, _)| k == "weir-error")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap();
            (String::from_utf8_lossy(&r.record.value).into_owned(), error)
        })
        .collect();
    let reason = |v: &str| {
        reasons
            .iter()
            .find(|(value, _)| value == v)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("{v} not dead-lettered: {reasons:?}"))
    };
    assert!(
        reason("panic").contains("poison record at offset 1"),
        "{}",
        reason("panic")
    );
    assert!(
        reason("loop").contains("time limit of 300 ms"),
        "{}",
        reason("loop")
    );
    assert!(
        reason("bomb").contains("memory limit"),
        "{}",
        reason("bomb")
    );
    assert!(
        reason("fail").contains("refusing this record"),
        "{}",
        reason("fail")
    );
    assert!(
        reason("emit-undeclared").contains("not one of its output topics"),
        "{}",
        reason("emit-undeclared")
    );
    assert!(
        reason("huge").contains("the record limit is"),
        "{}",
        reason("huge")
    );
    let info = server.plugins.info("chaos").unwrap();
    assert_eq!(
        (
            info.partitions[0].processed,
            info.partitions[0].dead_lettered
        ),
        (4, 6)
    );
    assert!(
        server
            .plugins
            .logs("chaos")
            .await
            .unwrap()
            .iter()
            .any(|l| l.contains("echo ok-1")),
        "stdout reaches the plugin log"
    );
    let (balance, _) = server
        .plugins
        .state_get("points", b"balance/ann")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(balance, b"50");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_policy_stops_at_the_poison_record_without_committing_it() {
    let (_dir, server) = serve_with_topics(&[("in", 1), ("chaos.out", 1)]).await;
    server
        .plugins
        .deploy(deploy("chaos", "chaos", "in", &["chaos.out"]))
        .await
        .unwrap();
    publish(
        &server,
        "in",
        ["a", "b", "panic", "c"]
            .iter()
            .map(|v| Record::from_value(*v))
            .collect(),
    )
    .await;
    eventually(20, "chaos halts", || {
        server.plugins.info("chaos").unwrap().partitions[0]
            .state
            .to_string()
            .starts_with("halted")
    })
    .await;
    let status = server.plugins.info("chaos").unwrap().partitions[0].clone();
    assert_eq!(
        status.committed, 2,
        "stopped before the poison record: {status:?}"
    );
    assert!(
        status.state.to_string().contains("offset 2")
            && status.state.to_string().contains("poison record"),
        "{}",
        status.state
    );
    let (seen, _) = server
        .plugins
        .state_get("chaos", b"seen")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, b"2");

    // Resuming a halted plugin restarts it: it retries the poison record and halts again there,
    // without committing anything of it.
    server.plugins.set_paused("chaos", false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    eventually(20, "chaos halts again", || {
        server.plugins.info("chaos").unwrap().partitions[0]
            .state
            .to_string()
            .starts_with("halted")
    })
    .await;
    assert_eq!(
        server.plugins.info("chaos").unwrap().partitions[0].committed,
        2
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_plugin_commits_nothing_until_resumed_and_stays_paused_across_upgrade() {
    let (_dir, server) = serve_with_topics(&[("order.paid", 1), ("points.credited", 1)]).await;
    server
        .plugins
        .deploy(deploy(
            "points",
            "points",
            "order.paid",
            &["points.credited"],
        ))
        .await
        .unwrap();
    server.plugins.set_paused("points", true).await.unwrap();
    publish(&server, "order.paid", vec![paid(1, "ann", 10.0)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.plugins.info("points").unwrap().partitions[0].committed,
        0
    );
    let upgraded = server
        .plugins
        .upgrade("points", plugin_wasm("points"))
        .await
        .unwrap();
    assert!(upgraded.spec.paused, "an upgrade keeps the plugin paused");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.plugins.info("points").unwrap().partitions[0].committed,
        0
    );
    server.plugins.set_paused("points", false).await.unwrap();
    caught_up(&server, "points").await;
    assert!(server
        .plugins
        .state_get("points", b"balance/ann")
        .await
        .unwrap()
        .is_some());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deploys_are_refused_and_change_nothing() {
    let (_dir, server) = serve_with_topics(&[("in", 1)]).await;
    let mut garbage = deploy("bad", "points", "in", &[]);
    garbage.wasm = Bytes::from_static(b"definitely not wasm");
    assert!(matches!(
        server.plugins.deploy(garbage).await,
        Err(ManagerError::Plugin(PluginError::InvalidWasm(_)))
    ));
    let mut core = deploy("core", "points", "in", &[]);
    core.wasm = Bytes::from_static(b"\0asm\x01\0\0\0");
    let err = server.plugins.deploy(core).await.unwrap_err().to_string();
    assert!(
        err.contains("not a component") && err.contains("wasm32-wasip2"),
        "{err}"
    );
    let err = server
        .plugins
        .deploy(deploy("p", "points", "missing", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown topic \"missing\""), "{err}");
    let err = server
        .plugins
        .deploy(deploy("p", "points", "in", &["nowhere"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown topic \"nowhere\""), "{err}");
    let err = server
        .plugins
        .deploy(deploy("bad name", "points", "in", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid plugin name"), "{err}");
    assert!(server.plugins.list().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_restart_keep_state_and_offsets() {
    let (dir, server) = serve_with_topics(&[("order.paid", 1), ("points.credited", 1)]).await;
    server
        .plugins
        .deploy(deploy(
            "points",
            "points",
            "order.paid",
            &["points.credited"],
        ))
        .await
        .unwrap();
    publish(
        &server,
        "order.paid",
        vec![paid(1, "ann", 10.0), paid(2, "ann", 5.0)],
    )
    .await;
    caught_up(&server, "points").await;
    let info = server
        .plugins
        .upgrade("points", plugin_wasm("points"))
        .await
        .unwrap();
    assert_eq!(info.spec.version, 2);
    publish(
        &server,
        "order.paid",
        vec![paid(3, "ann", 1.0), paid(1, "ann", 10.0)],
    )
    .await;
    caught_up(&server, "points").await;
    async fn balance(s: &RunningServer) -> u64 {
        serde_json::from_slice::<u64>(
            &s.plugins
                .state_get("points", b"balance/ann")
                .await
                .unwrap()
                .unwrap()
                .0,
        )
        .unwrap()
    }
    assert_eq!(balance(&server).await, 16, "upgrade kept state and dedup");
    server.stop().await.unwrap();

    let server = start_server(dir.path()).await;
    assert_eq!(server.plugins.info("points").unwrap().spec.version, 2);
    publish(
        &server,
        "order.paid",
        vec![paid(2, "ann", 5.0), paid(4, "ann", 4.0)],
    )
    .await;
    caught_up(&server, "points").await;
    assert_eq!(
        balance(&server).await,
        20,
        "restart kept state, offsets and dedup"
    );
    let credited = server
        .broker
        .read("points.credited", 0, 0, 100)
        .await
        .unwrap();
    assert_eq!(credited.len(), 4);
    let _ = StartAt::Earliest;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_filter_projects_only_matching_purchases() {
    let (_dir, server) = serve_with_topics(&[("purchases", 2), ("analytics.purchases", 1)]).await;
    let mut request = deploy(
        "analytics",
        "analytics-filter",
        "purchases",
        &["analytics.purchases"],
    );
    request.config = vec![
        ("fields".into(), "order,amount,category".into()),
        ("min_amount".into(), "20".into()),
        ("categories".into(), "phone,tv".into()),
    ];
    request.dedup = weir_plugins::DedupWindow {
        max_ids: 10,
        max_age_ms: 60_000,
    };
    let info = server.plugins.deploy(request).await.unwrap();
    assert_eq!(
        info.spec.dedup.max_ids, 10,
        "the dedup window is configurable at deploy"
    );
    let events: Vec<Record> = (0..40)
        .map(|i| {
            let category = ["phone", "tv", "food", "book"][i % 4];
            Record {
                key: Some(Bytes::from(format!("user-{}", i % 7))),
                id: Some(format!("p-{i}")),
                ..Record::from_value(format!(r#"{{"order":{i},"user":"user-{}","amount":{},"category":"{category}","address":"private"}}"#, i % 7, i * 3))
            }
        })
        .collect();
    publish(&server, "purchases", events).await;
    caught_up(&server, "analytics").await;
    let want: Vec<usize> = (0..40).filter(|i| i * 3 >= 20 && i % 4 < 2).collect();
    eventually(20, "projections forwarded", || {
        end_total(&server, "analytics.purchases") == want.len() as u64
    })
    .await;
    let got = read_all(&server, "analytics.purchases").await;
    let mut orders: Vec<u64> = got
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.record.value).unwrap()["order"]
                .as_u64()
                .unwrap()
        })
        .collect();
    orders.sort();
    assert_eq!(orders, want.iter().map(|i| *i as u64).collect::<Vec<_>>());
    for r in &got {
        let v: serde_json::Value = serde_json::from_slice(&r.record.value).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["amount", "category", "order"],
            "only the asked fields, never the address"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_outputs_and_state_never_reach_sled_blob_files() {
    // sled never fsyncs its blob files; a batch's outbox entry of megabytes must be fragmented.
    let (dir, server) = serve_with_topics(&[("in", 1), ("chaos.out", 1)]).await;
    server
        .plugins
        .deploy(deploy("chaos", "chaos", "in", &["chaos.out"]))
        .await
        .unwrap();
    publish(&server, "in", vec![Record::from_value("big")]).await;
    caught_up(&server, "chaos").await;
    eventually(20, "big outputs forwarded", || {
        end_total(&server, "chaos.out") == 8
    })
    .await;
    let out = read_all(&server, "chaos.out").await;
    assert!(out
        .iter()
        .enumerate()
        .all(|(i, r)| r.record.value.len() == 400 * 1024 && r.record.value[0] == i as u8));
    let (big, _) = server
        .plugins
        .state_get("chaos", b"big")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        big.len(),
        serde_json::to_vec(&vec![7u8; 300 * 1024]).unwrap().len()
    );
    server.stop().await.unwrap();
    let blobs = std::fs::read_dir(dir.path().join("blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "no blob files");
}

/// A Python or JavaScript project from `weir plugin new`, its app replaced by `app`, built by
/// `weir plugin build`; returns the component.
fn build_script_plugin(dir: &std::path::Path, name: &str, lang: &str, app: &str) -> Bytes {
    let weir = |args: &[&str]| {
        let (ok, stdout, stderr) = weir_cli("http://127.0.0.1:1", args, "");
        assert!(ok, "weir {args:?}: {stdout}{stderr}");
        stdout
    };
    weir(&[
        "plugin",
        "new",
        name,
        "--lang",
        lang,
        "--path",
        dir.to_str().unwrap(),
    ]);
    let project = dir.join(name);
    let file = if lang == "python" { "app.py" } else { "app.js" };
    std::fs::write(project.join(file), app).unwrap();
    let built = weir(&["plugin", "build", project.to_str().unwrap()]);
    // The component's path and size (the tools print their own lines first, the next steps
    // follow).
    let last = built
        .lines()
        .rfind(|l| l.ends_with(" bytes)"))
        .unwrap_or_default();
    let wasm = last.rsplit_once(" (").map_or(last, |(path, _)| path);
    std::fs::read(wasm).unwrap().into()
}

const PY_CHAOS: &str = r#"
import weir_plugin as weir

@weir.consumer
def handle(record, ctx):
    what = record.text()
    if what == "boom":
        raise ValueError("boom is not a customer")
    if what == "bomb":
        hog = bytearray(256 << 20)
        ctx.put("hog", len(hog))
    seen = (ctx.get("seen") or 0) + 1
    ctx.put("seen", seen)
    ctx.emit("chaos.out", None, what)

WitWorld = weir.WitWorld
"#;

const JS_CHAOS: &str = r#"
import { consumer } from "./weir-plugin.js";

export default consumer((record, ctx) => {
  const what = record.text();
  if (what === "boom") throw new TypeError("boom is not a customer");
  if (what === "bomb") {
    const hog = new Uint8Array(256 << 20);
    ctx.put("hog", hog.length);
  }
  const seen = (ctx.get("seen") ?? 0) + 1;
  ctx.put("seen", seen);
  ctx.emit("chaos.out", null, what);
});
"#;

/// Errors and limits work the same in every language: a Python exception or a JavaScript
/// throw fails the record with its message and offset (here: to the dead-letter topic), a
/// 256 MiB allocation under a 96 MiB cap fails as the host's memory limit (the instance never
/// gets the memory), and the plugin goes on with the next record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_errors_and_memory_caps_behave_as_in_rust() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().to_path_buf();
    let wasm = tokio::task::spawn_blocking(move || {
        [
            (
                "chaos-py",
                build_script_plugin(&path, "chaos-py", "python", PY_CHAOS),
            ),
            (
                "chaos-js",
                build_script_plugin(&path, "chaos-js", "js", JS_CHAOS),
            ),
        ]
    })
    .await
    .unwrap();
    let (_dir, server) = serve_with_topics(&[("in", 1), ("chaos.out", 1)]).await;
    for (name, wasm) in wasm {
        let mut request = deploy(name, "noop", "in", &["chaos.out"]);
        request.wasm = wasm;
        request.limits.memory_bytes = 96 << 20;
        request.on_error = OnError::Dlq;
        server.plugins.deploy(request).await.unwrap();
    }
    let values = ["ok-1", "boom", "ok-2", "bomb", "ok-3"];
    publish(
        &server,
        "in",
        values.iter().map(|v| Record::from_value(*v)).collect(),
    )
    .await;
    for name in ["chaos-py", "chaos-js"] {
        caught_up(&server, name).await;
        let logs = server.plugins.logs(name).await.unwrap().join("\n");
        let (seen, _) = server
            .plugins
            .state_get(name, b"seen")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name} committed no state; its log:\n{logs}"));
        assert_eq!(seen, b"3", "{name}: only the good records changed state");
        assert!(
            server
                .plugins
                .state_get(name, b"hog")
                .await
                .unwrap()
                .is_none(),
            "{name} got 256 MiB under a 96 MiB cap"
        );
        let dlq = format!("{name}.dlq");
        eventually(20, "dead letters forwarded", || {
            end_total(&server, &dlq) == 2
        })
        .await;
        let reasons: Vec<String> = read_all(&server, &dlq)
            .await
            .iter()
            .map(|r| {
                let (_, error) = r
                    .record
                    .headers
                    .iter()
                    .find(|(k, _)| k == "weir-error")
                    .unwrap();
                String::from_utf8_lossy(error).into_owned()
            })
            .collect();
        let error = if name == "chaos-py" {
            "ValueError"
        } else {
            "TypeError"
        };
        assert!(
            reasons[0].contains(&format!("offset=1: {error}: boom is not a customer")),
            "{name}: {reasons:?}"
        );
        assert!(
            reasons[1].contains("exceeded its memory limit of 100663296 bytes"),
            "{name}: {reasons:?}"
        );
    }
    eventually(20, "outputs forwarded", || {
        end_total(&server, "chaos.out") == 6
    })
    .await;
    server.stop().await.unwrap();
}

/// The engine holds `MAX_INSTANCES` plugin × partition instances. When they are all in use, a
/// partition that needs one waits (state "waiting: no room ...") instead of failing its
/// records, and carries on once another plugin is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_makes_partitions_wait_not_fail() {
    use weir_wasm::MAX_INSTANCES;
    let (_dir, server) = serve_with_topics(&[("wide", MAX_INSTANCES), ("narrow", 2)]).await;
    server
        .plugins
        .deploy(deploy("big", "noop", "wide", &[]))
        .await
        .unwrap();
    for partition in 0..MAX_INSTANCES {
        publish_to(&server, "wide", partition, vec![Record::from_value("x")]).await;
    }
    caught_up(&server, "big").await;

    server
        .plugins
        .deploy(deploy("small", "noop", "narrow", &[]))
        .await
        .unwrap();
    for partition in 0..2 {
        publish_to(&server, "narrow", partition, records("n", 5)).await;
    }
    let waiting = || {
        let info = server.plugins.info("small").unwrap();
        info.partitions.iter().all(|p| {
            p.state
                .to_string()
                .starts_with("waiting: no room for another plugin instance")
        })
    };
    for _ in 0..300 {
        if waiting() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = server.plugins.info("small").unwrap();
    assert!(
        waiting(),
        "{:?}\n{:?}",
        info.partitions,
        server.plugins.logs("small").await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = server.plugins.info("small").unwrap();
    assert!(
        info.partitions
            .iter()
            .all(|p| p.committed == 0 && p.state.to_string().starts_with("waiting")),
        "still waiting, nothing failed or dead-lettered: {:?}",
        info.partitions
    );

    server.plugins.remove("big").await.unwrap();
    caught_up(&server, "small").await;
    server.stop().await.unwrap();
}

/// Servers and `weir test` may share a compiled cache (`--compiled-cache`, `WEIR_CACHE_DIR`):
/// engines compiling the same component into one directory at once all succeed and leave one
/// artifact (each write goes through a temporary file of its own), which a new engine loads.
#[test]
fn engines_sharing_a_compiled_cache_compile_the_same_component_at_once() {
    use weir_wasm::PluginEngine;
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugin_wasm("points");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let engine = PluginEngine::new(dir.path()).unwrap();
                engine.compile(&wasm).unwrap();
            });
        }
    });
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.len() == 1 && files[0].ends_with(".cwasm"),
        "one artifact, no temporary files left: {files:?}"
    );
    PluginEngine::new(dir.path())
        .unwrap()
        .compile(&wasm)
        .unwrap();
}
