//! The `weir` command line: argument definitions and dispatch. Every command but `serve` is a
//! client of the gRPC API. `main.rs` only parses, sets up logging and calls [`run`].

mod auth;
mod bench;
mod bench_ceiling;
mod bench_placed;
mod bench_plugin;
mod consume;
mod flags;
pub mod lag;
mod migrate;
mod plugin;
mod publish;
mod scaffold;
mod scrape;
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

pub use bench::BenchCommand;
pub use flags::bounds;
use flags::{host_port, mib, parse_fsync, ranged, within};

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
    #[arg(long, default_value_t = 3, requires = "log", value_parser = ranged::<usize>(bounds::REPLICAS))]
    pub replicas: usize,
    /// Prefix of weir's stream and subject names on JetStream (with --log): weir nodes with
    /// the same prefix serve the same topics.
    #[arg(long, default_value = "weir", requires = "log")]
    pub log_prefix: String,
    /// When writes are synced: `always` (ack after fsync, group commit), `interval:<ms>`
    /// (ack after write, fsync every interval of 1 to 3600000 ms), `never` (fsync only at
    /// shutdown).
    #[arg(long, default_value = "always", value_parser = parse_fsync)]
    pub fsync: FsyncPolicy,
    /// Largest record accepted, in encoded bytes (1 to 33554432).
    #[arg(long, default_value_t = 1024 * 1024, value_parser = ranged::<usize>(bounds::RECORD_BYTES))]
    pub max_record_bytes: usize,
    /// How often retention and the expiry of idle producers and groups run, ms (1 to
    /// 86400000).
    #[arg(long, default_value_t = 30_000, value_parser = ranged::<u64>(bounds::RETENTION_CHECK_MS))]
    pub retention_check_ms: u64,
    /// Page caches in MiB (1 to 1048576): a quarter for sled's (the log's index), the rest
    /// for redb's (plugins' state). The default, 128, is from a measurement
    /// (BENCHMARKS.md, "sled's cache and RSS"): past 128 MiB the publish path got no faster,
    /// while the server's RSS grew with the cache (sled's nodes take more than it counts).
    #[arg(long, default_value_t = 128, value_parser = ranged::<u64>(bounds::CACHE_MB))]
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
    /// Largest gRPC request accepted, in MiB (a publish batch, a deploy with its wasm; 1 to
    /// 4095: gRPC frames a message with a 32-bit length).
    #[arg(long, default_value_t = 64, value_parser = ranged::<usize>(bounds::REQUEST_MB))]
    pub max_request_mb: usize,
    /// Most records in one publish request (1 to 10000000).
    #[arg(long, default_value_t = 100_000, value_parser = ranged::<usize>(bounds::BATCH_RECORDS))]
    pub max_batch_records: usize,
    /// Most open subscribe / publish streams per client connection (1 to 100000).
    #[arg(long, default_value_t = 64, value_parser = ranged::<usize>(bounds::STREAMS_PER_CONNECTION))]
    pub max_streams_per_connection: usize,
    /// Largest plugin wasm accepted, in MiB (1 to 4094, and below --max-request-mb: a deploy
    /// carries the wasm in one request).
    #[arg(long, default_value_t = 48, value_parser = ranged::<usize>(bounds::WASM_MB))]
    pub max_wasm_mb: usize,
    /// The highest CPU bound per batch a plugin may be deployed with, ms (1 to 4294967295); a
    /// deploy that names none gets 5000 ms or this, if lower. Pause, remove, upgrade and
    /// shutdown interrupt a running batch within an epoch tick (10 ms) anyway.
    #[arg(long, default_value_t = 60_000, value_parser = ranged::<u64>(bounds::PLUGIN_TIMEOUT_MS))]
    pub max_plugin_timeout_ms: u64,
    /// Committed-state cache per plugin, MiB (1 to 1048576; least recently used keys are
    /// evicted; reads of evicted keys go to the store).
    #[arg(long, default_value_t = 64, value_parser = ranged::<usize>(bounds::STATE_CACHE_MB))]
    pub state_cache_mb: usize,
    /// Forget a client's idempotent producer after it has been idle this long, ms (1 to
    /// 2^63-1; Kafka's transactional.id.expiration.ms); a retry after that is refused as
    /// expired. Plugins' producers never expire.
    #[arg(long, default_value_t = 7 * 24 * 3600 * 1000, value_parser = ranged::<u64>(bounds::EXPIRY_MS))]
    pub producer_expiry_ms: u64,
    /// Most idempotent producer ids one principal may hold (1 to 100000000): InitProducer
    /// without an id is refused past it until the principal's idle ones expire after
    /// --producer-expiry-ms. Plugins' producers are not counted.
    #[arg(long, default_value_t = 10_000, value_parser = ranged::<usize>(bounds::PRODUCERS_PER_PRINCIPAL))]
    pub max_producers_per_principal: usize,
    /// Forget a consumer group's offsets for a topic after it has had no subscriber and no
    /// commit or fetch of its offsets for this long, ms (1 to 2^63-1; Kafka's
    /// offsets.retention.minutes).
    #[arg(long, default_value_t = 7 * 24 * 3600 * 1000, value_parser = ranged::<u64>(bounds::EXPIRY_MS))]
    pub group_expiry_ms: u64,
    /// Cache compiled plugins here instead of DATA_DIR/compiled (servers may share one: entries
    /// are keyed by the component's sha256 and the engine's settings).
    #[arg(long)]
    pub compiled_cache: Option<std::path::PathBuf>,
    /// Most plugins one principal may own (0 to 1000000; an auth entry's `max_plugins`
    /// overrides it).
    #[arg(long, default_value_t = 100, value_parser = ranged::<usize>(bounds::PLUGINS_PER_PRINCIPAL))]
    pub max_plugins_per_principal: usize,
    /// Serve Prometheus `/metrics` and the status page (`/`) on this address (TLS too when
    /// --tls-cert is given).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Also serve the Kafka protocol on this address (e.g. 127.0.0.1:9092), for existing
    /// Kafka producers and consumers (docs/kafka.md). Off by default; TLS with --tls-cert;
    /// with --auth, clients log in with SASL/PLAIN and a weir token as the password.
    #[arg(long)]
    pub kafka_listen: Option<SocketAddr>,
    /// `host:port` Kafka clients are told to connect to (Kafka's advertised.listeners);
    /// default: the --kafka-listen address.
    #[arg(long, value_parser = host_port)]
    pub kafka_advertise: Option<(String, u16)>,
    /// How often lag is sampled, ms (1 to 3600000).
    #[arg(long, default_value_t = 1000, value_parser = ranged::<u64>(bounds::LAG_SAMPLE_MS))]
    pub lag_sample_ms: u64,
    /// Samples in the window lag status is evaluated over (Burrow's rules; 2 to 10000).
    #[arg(long, default_value_t = 10, value_parser = ranged::<usize>(bounds::LAG_WINDOW))]
    pub lag_window: usize,
    /// Write a probe record into each partition of the watched topics this often, ms (0 = no
    /// probes, at most 86400000). Plugins never see probes; `weir lag` reports their
    /// end-to-end delay.
    #[arg(long, default_value_t = 0, value_parser = ranged::<u64>(bounds::PROBE_INTERVAL_MS))]
    pub probe_interval_ms: u64,
    /// A topic to probe (repeatable); every plugin's input topic when none is given.
    #[arg(long)]
    pub probe_topic: Vec<String>,
    /// Testing only: every store sync takes this many ms longer (0 to 10000), a slow disk
    /// that keeps plugin commits and publishes waiting for durability long enough for a
    /// crash test's `kill -9` to find them in flight.
    #[arg(long, default_value_t = 0, hide = true, value_parser = ranged::<u64>(bounds::DEBUG_SYNC_DELAY_MS))]
    pub debug_sync_delay_ms: u64,
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
        Command::Bench(bench::BenchCommand::DiscardServer(args)) => {
            bench_ceiling::run(args, shutdown).await
        }
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
    // Every numeric flag was range-checked by clap (`bounds`); the products below are checked
    // again so that a `ServeArgs` built in code cannot wrap either.
    let mut config = ServerConfig::new(args.data_dir);
    config.listen = args.listen;
    config.fsync = args.fsync;
    config.debug_sync_delay = std::time::Duration::from_millis(args.debug_sync_delay_ms);
    config.cache_bytes = mib(args.cache_mb, "--cache-mb", bounds::CACHE_MB)?;
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
    let max_request_bytes = mib(args.max_request_mb, "--max-request-mb", bounds::REQUEST_MB)?;
    let max_wasm_bytes = mib(args.max_wasm_mb, "--max-wasm-mb", bounds::WASM_MB)?;
    within(
        args.max_batch_records,
        "--max-batch-records",
        bounds::BATCH_RECORDS,
    )?;
    within(
        args.max_streams_per_connection,
        "--max-streams-per-connection",
        bounds::STREAMS_PER_CONNECTION,
    )?;
    within(
        args.max_plugins_per_principal,
        "--max-plugins-per-principal",
        bounds::PLUGINS_PER_PRINCIPAL,
    )?;
    within(
        args.max_record_bytes,
        "--max-record-bytes",
        bounds::RECORD_BYTES,
    )?;
    config.limits = weir_server::ApiLimits {
        max_request_bytes,
        max_streams_per_connection: args.max_streams_per_connection,
        max_plugins_per_principal: args.max_plugins_per_principal,
    };
    config.broker.max_batch_records = args.max_batch_records;
    within(args.lag_sample_ms, "--lag-sample-ms", bounds::LAG_SAMPLE_MS)?;
    within(args.lag_window, "--lag-window", bounds::LAG_WINDOW)?;
    within(
        args.probe_interval_ms,
        "--probe-interval-ms",
        bounds::PROBE_INTERVAL_MS,
    )?;
    config.metrics_listen = args.metrics;
    config.kafka_listen = args.kafka_listen;
    config.kafka_advertise = args.kafka_advertise;
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
    within(
        args.max_plugin_timeout_ms,
        "--max-plugin-timeout-ms",
        bounds::PLUGIN_TIMEOUT_MS,
    )?;
    within(
        args.producer_expiry_ms,
        "--producer-expiry-ms",
        bounds::EXPIRY_MS,
    )?;
    within(args.group_expiry_ms, "--group-expiry-ms", bounds::EXPIRY_MS)?;
    config.plugins = weir_server::server::PluginLimits {
        max_wasm_bytes,
        max_timeout: std::time::Duration::from_millis(args.max_plugin_timeout_ms),
        state_cache_bytes: mib(
            args.state_cache_mb,
            "--state-cache-mb",
            bounds::STATE_CACHE_MB,
        )?,
    };
    config.broker.producer_expiry = std::time::Duration::from_millis(args.producer_expiry_ms);
    config.broker.max_producers_per_principal = within(
        args.max_producers_per_principal,
        "--max-producers-per-principal",
        bounds::PRODUCERS_PER_PRINCIPAL,
    )?;
    config.broker.group_expiry = std::time::Duration::from_millis(args.group_expiry_ms);
    config.compiled_dir = args.compiled_cache;
    config.broker.max_record_bytes = args.max_record_bytes;
    within(
        args.retention_check_ms,
        "--retention-check-ms",
        bounds::RETENTION_CHECK_MS,
    )?;
    config.broker.retention_interval = std::time::Duration::from_millis(args.retention_check_ms);
    server::run(config, shutdown, |server| {
        // Machine-readable for scripts and tests that start the server on port 0.
        println!("weir listening on {}", server.addr);
        // Further lines go to a reader that may have stopped reading after the first (a
        // closed pipe must not stop the server, as `println!` would).
        use std::io::Write;
        let mut out = std::io::stdout();
        if let Some(addr) = server.metrics_addr {
            let _ = writeln!(out, "weir metrics on {addr}");
        }
        if let Some(addr) = server.kafka_addr {
            let _ = writeln!(out, "weir kafka on {addr}");
        }
    })
    .await?;
    Ok(())
}
