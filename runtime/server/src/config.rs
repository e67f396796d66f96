//! What `weir serve` is started with ([`ServerConfig`]) and why it stops ([`ServerError`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use weir_broker::{BrokerConfig, BrokerError};
use weir_log::{LogError, SyncFailed};

use crate::auth::Authority;
use crate::limits::ApiLimits;
use crate::monitor::MonitorConfig;

pub use weir_jetstream::JetStreamOptions;
pub use weir_log::FsyncPolicy;
pub use weir_plugins::PluginConfig as PluginLimits;

/// Everything `weir serve` needs, validated by the binary before the server is started.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// When writes are synced.
    pub fsync: FsyncPolicy,
    /// Broker limits.
    pub broker: BrokerConfig,
    /// sled cache in bytes (128 MiB by default).
    pub cache_bytes: u64,
    /// Plugin bounds: wasm size, time limit ceiling, state cache.
    pub plugins: PluginLimits,
    /// Where compiled plugins are cached (`DATA_DIR/compiled` when `None`). Artifacts are keyed
    /// by the component's sha256 and the engine's settings, so servers may share a directory.
    pub compiled_dir: Option<PathBuf>,
    /// Who may do what; open when started without `--auth`.
    pub auth: Arc<Authority>,
    /// gRPC API limits.
    pub limits: ApiLimits,
    /// Certificate chain and private key (PEM) to serve TLS with (gRPC and metrics).
    pub tls: Option<TlsFiles>,
    /// Lag sampling, Burrow window, probes.
    pub monitor: MonitorConfig,
    /// Address of the metrics / status page listener, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Address of the Kafka protocol listener, if any (`--kafka-listen`).
    pub kafka_listen: Option<SocketAddr>,
    /// `host:port` the Kafka listener tells clients to connect to (`--kafka-advertise`);
    /// the bound address when `None`.
    pub kafka_advertise: Option<(String, u16)>,
    /// The log on a NATS JetStream cluster shared with other weir nodes (`--log`); `None`
    /// keeps it in the embedded sled store. Plugins' state stays in the data directory.
    pub log: Option<JetStreamOptions>,
    /// Added to every store sync (`--debug-sync-delay-ms`, hidden): a slow disk for tests
    /// that kill the server while commits wait for durability. Zero in production.
    pub debug_sync_delay: std::time::Duration,
}

/// PEM files of the server's TLS identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

impl ServerConfig {
    /// Defaults for a data directory: `127.0.0.1:7070`, fsync `always`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            fsync: FsyncPolicy::Always,
            broker: BrokerConfig::default(),
            // `weir serve --cache-mb`'s default (BENCHMARKS.md, "sled's cache and RSS").
            cache_bytes: 128 * 1024 * 1024,
            plugins: PluginLimits::default(),
            compiled_dir: None,
            auth: Arc::new(Authority::open()),
            limits: ApiLimits::default(),
            tls: None,
            monitor: MonitorConfig::default(),
            metrics_listen: None,
            kafka_listen: None,
            kafka_advertise: None,
            log: None,
            debug_sync_delay: std::time::Duration::ZERO,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] LogError),
    /// The broker could not rebuild its state.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The deployed plugins could not be restarted.
    #[error("plugins: {0}")]
    Plugins(#[from] weir_plugins::ManagerError),
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be read.
    #[error("TLS: {0}")]
    Tls(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The store could not be synced: the server stopped (fail-stop).
    #[error(transparent)]
    SyncFailed(#[from] SyncFailed),
    /// A start-up task panicked.
    #[error(transparent)]
    Panicked(#[from] weir_core::blocking::Panicked),
    /// `weir migrate` could not move the data directory.
    #[error("migrate: {0}")]
    Migrate(String),
}
