//! The local runtime (no server, no network) as plugin authors use it from a Rust test, and
//! `weir test` on JSON-lines input.

use crate::common;

use bytes::Bytes;
use common::{local_chaos, paid, plugin_wasm, weir_bin};
use weir_core::Record;
use weir_server::local::{LocalError, LocalRuntime};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_plugins_in_the_local_runtime() {
    let local = LocalRuntime::start().await.unwrap();
    for topic in [
        "order.paid",
        "points.credited",
        "red-envelope.grants",
        "order.created",
        "order.rejected",
    ] {
        local.create_topic(topic, 2).await.unwrap();
    }
    // One partition: the requests are answered in publish order, so who gets the stock is known.
    local.create_topic("seckill", 1).await.unwrap();
    local
        .deploy(
            "points",
            plugin_wasm("points"),
            "order.paid",
            &["points.credited"],
            &[("rate", "0.5")],
        )
        .await
        .unwrap();
    local
        .deploy(
            "red-envelope",
            plugin_wasm("red-envelope"),
            "order.paid",
            &["red-envelope.grants"],
            &[("threshold", "2")],
        )
        .await
        .unwrap();
    local
        .deploy(
            "order",
            plugin_wasm("order"),
            "seckill",
            &["order.created", "order.rejected"],
            &[("stock", "2")],
        )
        .await
        .unwrap();
    local
        .publish(
            "order.paid",
            vec![
                paid(1, "ann", 10.0),
                paid(2, "bob", 3.0),
                paid(3, "ann", 4.0),
                paid(1, "ann", 10.0),
            ],
        )
        .await
        .unwrap();
    let requests = ["ann", "ann", "bob", "cy"]
        .iter()
        .enumerate()
        .map(|(i, u)| Record {
            key: Some(Bytes::from(u.to_string())),
            ..Record::from_value(format!(r#"{{"request":"r{i}","user":"{u}","item":"tv"}}"#))
        })
        .collect();
    local.publish("seckill", requests).await.unwrap();
    local.run_until_idle().await.unwrap();

    assert_eq!(
        local.state("points", "balance/ann").await.unwrap(),
        Some(b"7".to_vec()),
        "5 + 2, the re-sent order once"
    );
    assert_eq!(local.read("points.credited").await.unwrap().len(), 3);
    let grants = local.read("red-envelope.grants").await.unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].record.key.as_deref(), Some(&b"ann"[..]));
    assert_eq!(
        local.read("order.created").await.unwrap().len(),
        2,
        "stock of 2"
    );
    assert_eq!(
        local.read("order.rejected").await.unwrap().len(),
        2,
        "ann again, and cy after sold out"
    );
    let results = local.state_entries("order").await.unwrap();
    assert!(
        results.iter().any(
            |(k, v, _)| k == b"result/tv/cy" && String::from_utf8_lossy(v).contains("sold out")
        ),
        "the result is queryable per user"
    );
    local.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_filter_and_a_component_of_another_world_in_the_local_runtime() {
    let local = LocalRuntime::start().await.unwrap();
    local.create_topic("purchases", 1).await.unwrap();
    local.create_topic("analytics.purchases", 1).await.unwrap();
    local
        .deploy(
            "analytics",
            plugin_wasm("analytics-filter"),
            "purchases",
            &["analytics.purchases"],
            &[("fields", "order"), ("min_amount", "10")],
        )
        .await
        .unwrap();
    let events = [(1, 5), (2, 50), (3, 10)]
        .map(|(o, a)| Record::from_value(format!(r#"{{"order":{o},"amount":{a},"email":"x@y"}}"#)));
    local.publish("purchases", events.to_vec()).await.unwrap();
    local.run_until_idle().await.unwrap();
    let out: Vec<Bytes> = local
        .read("analytics.purchases")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.record.value)
        .collect();
    assert_eq!(
        out,
        vec![
            Bytes::from_static(br#"{"order":2}"#),
            Bytes::from_static(br#"{"order":3}"#)
        ]
    );

    let err = local
        .deploy("oops", plugin_wasm("not-a-consumer"), "purchases", &[], &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not implement weir:plugin/consumer@0.2.0")
            && err.contains("no export `configure`")
            && err.contains("#[weir_sdk::consumer]"),
        "{err}"
    );
    local.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_in_the_local_runtime_names_the_record_and_the_panic() {
    let local = local_chaos().await;
    local
        .publish(
            "in",
            vec![Record::from_value("fine"), Record::from_value("panic")],
        )
        .await
        .unwrap();
    match local.run_until_idle().await {
        Err(LocalError::Halted { plugin, reason, .. }) => {
            assert_eq!(plugin, "chaos");
            assert!(
                reason.contains("offset 1") && reason.contains("poison record at offset 1"),
                "{reason}"
            );
            assert!(
                !reason.contains("wasm function"),
                "no wasm backtrace in the message: {reason}"
            );
        }
        other => panic!("expected a halt, got {other:?}"),
    }
    local.close().await;
}

fn weir_test(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(weir_bin())
        .arg("test")
        .args(args)
        .env("WEIR_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn weir_test_prints_outputs_and_state_and_replays_as_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("points.wasm");
    std::fs::write(&wasm, plugin_wasm("points")).unwrap();
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, "{\"key\":\"ann\",\"value\":{\"order\":1,\"user\":\"ann\",\"amount\":50}}\n\n{\"key\":\"bob\",\"value\":{\"order\":2,\"user\":\"bob\",\"amount\":20}}\n").unwrap();
    let (ok, stdout, stderr) = weir_test(&[
        wasm.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--config",
        "rate=0.1",
        "--output",
        "points.credited",
        "--state-out",
        "--replay-twice",
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outputs: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["topic"] == "points.credited")
        .collect();
    assert_eq!(outputs.len(), 2, "the replay added no output: {stdout}");
    assert_eq!(outputs[0]["value"]["points"], 5);
    let state: Vec<(&str, &serde_json::Value)> = lines
        .iter()
        .filter_map(|l| l["state"].as_str().map(|k| (k, &l["value"])))
        .collect();
    assert_eq!(
        state,
        vec![
            ("balance/ann", &serde_json::json!(5)),
            ("balance/bob", &serde_json::json!(2))
        ]
    );
    assert!(stderr.contains("run 2: 2 record(s) in, 2 processed in all, 2 skipped as already processed, 0 new output(s)"), "{stderr}");
}

#[test]
fn weir_test_fails_with_the_trap_and_the_input_line() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("chaos.wasm");
    std::fs::write(&wasm, plugin_wasm("chaos")).unwrap();
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, "{\"value\":\"ok\"}\n{\"value\":\"panic\"}\n").unwrap();
    let (ok, _, stderr) = weir_test(&[
        wasm.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        "chaos.out",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("failed on input line 2") && stderr.contains("poison record at offset 1"),
        "{stderr}"
    );
    let (ok, _, stderr) = weir_test(&[wasm.to_str().unwrap(), "--input", "/nonexistent.jsonl"]);
    assert!(
        !ok && stderr.contains("cannot read /nonexistent.jsonl"),
        "{stderr}"
    );
}
