//! `weir migrate`: the first half of the flash sale on a single node (burst, the order
//! drain, payments published and the node stopped right after, so points, red envelopes and
//! analytics are usually part-way with outputs pending; a consumer group's offsets),
//! the node stopped and its data directory moved into a JetStream cluster with one command,
//! the sale finished on two weir nodes there — with the totals of a sale run start to end on
//! one node.

use crate::common;

use std::time::Duration;

use weir_api::Client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_moved_into_a_cluster_finishes_the_sale_with_the_same_totals() {
    let dir = tempfile::tempdir().unwrap();
    let nats = common::nats_cluster(dir.path());
    let opts = common::small_sale(false);
    let reference = flash_sale::single_phase(&opts, &dir.path().join("reference"))
        .await
        .unwrap();

    // The first half on one node.
    let data = dir.path().join("single");
    let server =
        flash_sale::Server::start(&opts.weir, &data, &dir.path().join("single.log")).unwrap();
    let client = Client::connect(&server.url).await.unwrap();
    flash_sale::setup(&client, &opts.sale, &opts.wasm_dir)
        .await
        .unwrap();
    let load = flash_sale::requests(&opts.sale);
    let report = flash_sale::burst(&client, &load, opts.sale.partitions, &|_| {})
        .await
        .unwrap();
    flash_sale::drain(
        &client,
        "order",
        Duration::from_millis(100),
        Duration::from_secs(60),
        &mut |_| {},
    )
    .await
    .unwrap();
    let payments = flash_sale::pay(&client, &opts.sale).await.unwrap();
    client
        .commit_offsets("audit", "order.paid", &[(0, 5), (3, 2)])
        .await
        .unwrap();
    let plugins = client.list_plugins().await.unwrap();
    let points = plugins.iter().find(|p| p.name == "points").unwrap();
    let done: u64 = points.partitions.iter().map(|p| p.committed).sum();
    println!(
        "stopping the single node with points at {done} records committed (payments and probes)"
    );
    server.stop().unwrap();

    // One command moves it.
    let urls = nats.url_list();
    let migrate = || {
        std::process::Command::new(common::weir_bin())
            .args(["migrate", "--data-dir"])
            .arg(&data)
            .args(["--to", &urls])
            .output()
            .unwrap()
    };
    let out = migrate();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "weir migrate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    assert!(stdout.contains("4 plugins"), "{stdout}");
    // A second migration into the same cluster is refused, naming what is there already.
    let again = migrate();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success()
            && err.contains("already has topics")
            && err.contains("already has plugins"),
        "{err}"
    );

    // The second half on the cluster.
    let a = flash_sale::Server::start_with(
        &opts.weir,
        &dir.path().join("a"),
        &dir.path().join("a.log"),
        &["--log", &urls],
    )
    .unwrap();
    let _b = flash_sale::Server::start_with(
        &opts.weir,
        &dir.path().join("b"),
        &dir.path().join("b.log"),
        &["--log", &urls],
    )
    .unwrap();
    let client = Client::connect(&a.url).await.unwrap();
    let mut offsets = client.fetch_offsets("audit", "order.paid").await.unwrap();
    offsets.sort_unstable();
    assert_eq!(offsets, vec![(0, 5), (3, 2)], "group offsets moved");
    // Producer ids continue after the moved ones (the plugins' 16): none is issued twice.
    let (id, _) = client.init_producer(None).await.unwrap();
    assert!(
        id > 16,
        "producer id {id} was issued on the single node already"
    );
    for plugin in ["order", "points", "red-envelope", "analytics-filter"] {
        flash_sale::drain(
            &client,
            plugin,
            Duration::from_millis(250),
            Duration::from_secs(90),
            &mut |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{plugin}: {e}"));
    }
    let totals = flash_sale::verify_settled(
        &client,
        &opts.sale,
        &report,
        &payments,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(totals, reference);
}

/// `weir migrate` into a cluster that already has one of the node's plugins is refused, and
/// the refusal names the plugins as well as the topics (before, the topic check answered
/// first and the plugin refusal was never reached); nothing more is written.
#[test]
fn a_migration_into_a_cluster_with_the_nodes_plugin_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let nats = common::nats_cluster(dir.path());
    let data = dir.path().join("single");
    let node = common::WeirProcess::spawn(&data, "127.0.0.1:0", &[]);
    let wasm = dir.path().join("points.wasm");
    std::fs::write(&wasm, common::plugin_wasm("points")).unwrap();
    common::cli_ok(&node.addr, &["topic", "create", "order.paid"], "");
    common::cli_ok(&node.addr, &["topic", "create", "points.credited"], "");
    common::cli_ok(
        &node.addr,
        &[
            "plugin",
            "deploy",
            "points",
            "--wasm",
            wasm.to_str().unwrap(),
            "--input",
            "order.paid",
            "--output",
            "points.credited",
        ],
        "",
    );
    assert!(node.terminate(Duration::from_secs(30)).success());
    let urls = nats.url_list();
    let migrate = || {
        std::process::Command::new(common::weir_bin())
            .args(["migrate", "--data-dir"])
            .arg(&data)
            .args(["--to", &urls])
            .output()
            .unwrap()
    };
    let first = migrate();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = migrate();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "a second migration was accepted");
    for needle in [
        "already has topics \"order.paid\", \"points.credited\"",
        "already has a plugin \"points\"",
        "nothing was moved",
    ] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}
