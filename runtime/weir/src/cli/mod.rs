//! The `weir` command line: argument definitions and dispatch. Every command but `serve` is a
//! client of the gRPC API. `main.rs` only parses, sets up logging and calls [`run`].

mod auth;
mod bench;
mod consume;
pub mod lag;
mod migrate;
mod plugin;
mod publish;
mod scaffold;
mod soak;
mod test;
mod topic;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use weir_api::{Client, ConnectOptions, DEFAULT_SERVER};
use weir_server::server::FsyncPolicy;
use weir_server::server::{self, ServerConfig};

/// weir: a durable log with WebAssembly consumers that have exactly-once effects.
#[derive(Parser, Debug)]
#[command(name = "weir", version, about, max_term_width = 100)]
pub struct Cli {
    /// Server to talk to (not used by `serve`).
    #[arg(long, global = true, env = "WEIR_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Bearer token for a server started with `--auth` (`weir auth token` mints one).
    #[arg(long, global = true, env = "WEIR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's TLS certificate (for `https://` servers
    /// with a self-signed or private certificate).
    #[arg(long, global = true, env = "WEIR_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server on an embedded store.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Publish records (the value argument, or one record per stdin line).
    Publish(publish::PublishArgs),
    /// Print records of a topic, following the tail.
    Consume(consume::ConsumeArgs),
    /// Deploy and operate WebAssembly consumer plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Lag of plugins and consumer groups per partition, with status, alerts and probe delays.
    Lag(lag::LagArgs),
    /// Query plugin state.
    #[command(subcommand)]
    State(plugin::StateCommand),
    /// Run a plugin against JSON-lines input in a local runtime (no server needed).
    Test(test::TestArgs),
    /// Measure throughput and latency.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Tokens for servers started with `--auth`.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// Move a single node's data directory (stopped) into a cluster on NATS JetStream:
    /// topics, records, offsets, groups, producers, plugins with their state.
    Migrate(migrate::MigrateArgs),
}

/// `weir serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Directory of the embedded store (created if missing).
    #[arg(long, default_value = "weir-data")]
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free one (printed at start).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Put the log on a NATS JetStream cluster shared with other weir nodes:
    /// `nats://HOST:PORT[,nats://HOST:PORT...]` (see docs/scale-out.md). Without it the log
    /// is in the data directory's embedded store. With it plugins' state is on JetStream too
    /// (the data directory caches it) and any node runs any plugin.
    #[arg(long, env = "WEIR_NATS", value_name = "NATS_URLS")]
    pub log: Option<String>,
    /// Replicas of every stream weir creates on JetStream (with --log): 1, 3 or 5.
    #[arg(long, default_value_t = 3, requires = "log")]
    pub replicas: usize,
    /// Prefix of weir's stream and subject names on JetStream (with --log): weir nodes with
    /// the same prefix serve the same topics.
    #[arg(long, default_value = "weir", requires = "log")]
    pub log_prefix: String,
    /// When writes are synced: `always` (ack after fsync, group commit), `interval:<ms>`
    /// (ack after write, fsync every interval), `never` (fsync only at shutdown).
    #[arg(long, default_value = "always", value_parser = |s: &str| s.parse::<FsyncPolicy>())]
    pub fsync: FsyncPolicy,
    /// Largest record accepted, in encoded bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_record_bytes: usize,
    /// How often retention runs, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub retention_check_ms: u64,
    /// sled page cache in MiB.
    #[arg(long, default_value_t = 512)]
    pub cache_mb: u64,
    /// Principals, token hashes and grants (TOML, see docs/security.md). Without it every
    /// client may do everything.
    #[arg(long)]
    pub auth: Option<PathBuf>,
    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest gRPC request accepted, in MiB (a publish batch, a deploy with its wasm).
    #[arg(long, default_value_t = 64)]
    pub max_request_mb: usize,
    /// Most records in one publish request.
    #[arg(long, default_value_t = 100_000)]
    pub max_batch_records: usize,
    /// Most open subscribe / publish streams per client connection.
    #[arg(long, default_value_t = 64)]
    pub max_streams_per_connection: usize,
    /// Largest plugin wasm accepted, in MiB (below --max-request-mb: a deploy carries the
    /// wasm in one request).
    #[arg(long, default_value_t = 48)]
    pub max_wasm_mb: usize,
    /// The highest CPU bound per batch a plugin may be deployed with, ms. Pause, remove,
    /// upgrade and shutdown interrupt a running batch within an epoch tick (10 ms) anyway.
    #[arg(long, default_value_t = 60_000)]
    pub max_plugin_timeout_ms: u64,
    /// Committed-state cache per plugin, MiB (least recently used keys are evicted; reads of
    /// evicted keys go to the store).
    #[arg(long, default_value_t = 64)]
    pub state_cache_mb: usize,
    /// Forget a client's idempotent producer after it has been idle this long, ms (Kafka's
    /// transactional.id.expiration.ms); a retry after that is refused as expired. Plugins'
    /// producers never expire.
    #[arg(long, default_value_t = 7 * 24 * 3600 * 1000)]
    pub producer_expiry_ms: u64,
    /// Forget a consumer group's offsets for a topic after it has had no subscriber and no
    /// commit or fetch of its offsets for this long, ms (Kafka's offsets.retention.minutes).
    #[arg(long, default_value_t = 7 * 24 * 3600 * 1000)]
    pub group_expiry_ms: u64,
    /// Cache compiled plugins here instead of DATA_DIR/compiled (servers may share one: entries
    /// are keyed by the component's sha256 and the engine's settings).
    #[arg(long)]
    pub compiled_cache: Option<std::path::PathBuf>,
    /// Most plugins one principal may own (an auth entry's `max_plugins` overrides it).
    #[arg(long, default_value_t = 100)]
    pub max_plugins_per_principal: usize,
    /// Serve Prometheus `/metrics` and the status page (`/`) on this address (TLS too when
    /// --tls-cert is given).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// How often lag is sampled, ms.
    #[arg(long, default_value_t = 1000)]
    pub lag_sample_ms: u64,
    /// Samples in the window lag status is evaluated over (Burrow's rules).
    #[arg(long, default_value_t = 10)]
    pub lag_window: usize,
    /// Write a probe record into each partition of the watched topics this often, ms (0 = no
    /// probes). Plugins never see probes; `weir lag` reports their end-to-end delay.
    #[arg(long, default_value_t = 0)]
    pub probe_interval_ms: u64,
    /// A topic to probe (repeatable); every plugin's input topic when none is given.
    #[arg(long)]
    pub probe_topic: Vec<String>,
}

/// Runs a parsed command line until it finishes or `shutdown` is cancelled (Ctrl-C).
///
/// # Errors
/// Whatever the command failed with, as a message for the user.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let remote = Remote {
        server: cli.server,
        token: cli.token,
        tls_ca: cli.tls_ca,
    };
    match cli.command {
        Command::Serve(args) => serve(args, shutdown).await,
        Command::Topic(cmd) => topic::run(&remote.connect().await?, cmd).await,
        Command::Publish(args) => publish::run(&remote.connect().await?, args).await,
        Command::Consume(args) => consume::run(&remote.connect().await?, args, shutdown).await,
        Command::Plugin(cmd) => match plugin::local_command(&cmd) {
            Some(result) => result,
            None => plugin::run(&remote.connect().await?, cmd).await,
        },
        Command::Lag(args) => lag::run(&remote.connect().await?, args, shutdown).await,
        Command::State(cmd) => plugin::state(&remote.connect().await?, cmd).await,
        Command::Test(args) => test::run(args).await,
        Command::Bench(cmd) => bench::run(&remote.connect().await?, cmd, shutdown).await,
        Command::Auth(cmd) => auth::run(cmd),
        Command::Migrate(args) => migrate::run(args).await,
    }
}

/// The server a client command talks to, and how.
struct Remote {
    server: String,
    token: Option<String>,
    tls_ca: Option<PathBuf>,
}

impl Remote {
    async fn connect(&self) -> anyhow::Result<Client> {
        let tls_ca_pem = match &self.tls_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("cannot read --tls-ca {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let options = ConnectOptions {
            token: self.token.clone(),
            tls_ca_pem,
        };
        Ok(Client::connect_with(&self.server, &options).await?)
    }
}

async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.max_record_bytes == 0 || args.max_record_bytes > 32 * 1024 * 1024 {
        anyhow::bail!("--max-record-bytes must be between 1 and 33554432");
    }
    let mut config = ServerConfig::new(args.data_dir);
    config.listen = args.listen;
    config.fsync = args.fsync;
    config.cache_bytes = args.cache_mb * 1024 * 1024;
    if let Some(list) = &args.log {
        config.log = Some(migrate::jetstream_options(
            list,
            args.replicas,
            &args.log_prefix,
        )?);
    }
    if let Some(path) = &args.auth {
        config.auth = std::sync::Arc::new(
            weir_server::auth::Authority::load(path).map_err(anyhow::Error::msg)?,
        );
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(server::TlsFiles { cert, key });
    }
    anyhow::ensure!(
        args.max_request_mb > 0 && args.max_batch_records > 0 && args.max_streams_per_connection > 0 && args.max_wasm_mb > 0,
        "--max-request-mb, --max-batch-records, --max-streams-per-connection and --max-wasm-mb must be positive"
    );
    config.limits = weir_server::ApiLimits {
        max_request_bytes: args.max_request_mb << 20,
        max_streams_per_connection: args.max_streams_per_connection,
        max_plugins_per_principal: args.max_plugins_per_principal,
    };
    config.broker.max_batch_records = args.max_batch_records;
    anyhow::ensure!(
        args.lag_sample_ms > 0 && args.lag_window >= 2,
        "--lag-sample-ms must be positive and --lag-window at least 2"
    );
    config.metrics_listen = args.metrics;
    config.monitor = weir_server::monitor::MonitorConfig {
        sample_interval: std::time::Duration::from_millis(args.lag_sample_ms),
        window: args.lag_window,
        probe_interval: (args.probe_interval_ms > 0)
            .then(|| std::time::Duration::from_millis(args.probe_interval_ms)),
        probe_topics: args.probe_topic,
        ..Default::default()
    };
    anyhow::ensure!(
        args.max_wasm_mb < args.max_request_mb,
        "--max-wasm-mb ({}) must be below --max-request-mb ({}): a deploy sends the wasm in one request",
        args.max_wasm_mb,
        args.max_request_mb
    );
    anyhow::ensure!(
        args.max_plugin_timeout_ms > 0 && args.max_plugin_timeout_ms <= u64::from(u32::MAX),
        "--max-plugin-timeout-ms must be between 1 and {}",
        u32::MAX
    );
    anyhow::ensure!(args.state_cache_mb > 0, "--state-cache-mb must be positive");
    anyhow::ensure!(
        args.producer_expiry_ms > 0 && args.group_expiry_ms > 0,
        "--producer-expiry-ms and --group-expiry-ms must be positive"
    );
    config.plugins = weir_server::server::PluginLimits {
        max_wasm_bytes: args.max_wasm_mb << 20,
        max_timeout: std::time::Duration::from_millis(args.max_plugin_timeout_ms),
        state_cache_bytes: args.state_cache_mb << 20,
    };
    config.broker.producer_expiry = std::time::Duration::from_millis(args.producer_expiry_ms);
    config.broker.group_expiry = std::time::Duration::from_millis(args.group_expiry_ms);
    config.compiled_dir = args.compiled_cache;
    config.broker.max_record_bytes = args.max_record_bytes;
    config.broker.retention_interval =
        std::time::Duration::from_millis(args.retention_check_ms.max(1));
    server::run(config, shutdown, |server| {
        // Machine-readable for scripts and tests that start the server on port 0.
        println!("weir listening on {}", server.addr);
        if let Some(addr) = server.metrics_addr {
            println!("weir metrics on {addr}");
        }
    })
    .await?;
    Ok(())
}
