//! `weir migrate`: moves a single node's data directory into a cluster (docs/scale-out.md).

use weir_server::server;

/// `weir migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The single node's data directory (stop its `weir serve` first).
    #[arg(long, default_value = "weir-data")]
    pub data_dir: std::path::PathBuf,
    /// The cluster's NATS servers: `nats://HOST:PORT[,nats://HOST:PORT...]`.
    #[arg(long, value_name = "NATS_URLS")]
    pub to: String,
    /// Replicas of the streams it creates: 1, 3 or 5.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// The cluster's prefix (its nodes' `--log-prefix`).
    #[arg(long, default_value = "weir")]
    pub log_prefix: String,
}

/// JetStream options from the `--log`/`--to` list, replicas and prefix.
pub fn jetstream_options(
    list: &str,
    replicas: usize,
    prefix: &str,
) -> anyhow::Result<server::JetStreamOptions> {
    let servers = server::JetStreamOptions::parse_servers(list).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        matches!(replicas, 1 | 3 | 5),
        "--replicas must be 1, 3 or 5 (JetStream keeps an odd number of copies), not {replicas}"
    );
    let mut options = server::JetStreamOptions::new(servers);
    options.replicas = replicas;
    options.prefix = prefix.to_string();
    Ok(options)
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let options = jetstream_options(&args.to, args.replicas, &args.log_prefix)?;
    let dir = args.data_dir.clone();
    let moved = weir_core::blocking::run(move || {
        weir_server::migrate::migrate(&dir, options, &mut |line| println!("moved {line}"))
    })
    .await??;
    for w in &moved.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "{} moved into the cluster at {}: {} topics, {} records, {} producers, {} group offsets, {} plugins ({} keys of state). Start `weir serve --log {}` nodes to carry on.",
        args.data_dir.display(),
        args.to,
        moved.topics,
        moved.records,
        moved.producers,
        moved.groups,
        moved.plugins,
        moved.plugin_keys,
        args.to
    );
    Ok(())
}
