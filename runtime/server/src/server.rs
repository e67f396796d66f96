//! `weir serve`: opens the store, starts the syncer, the broker and the retention task, and
//! serves gRPC until the shutdown token is cancelled; then drains, syncs and returns. A failed
//! sync stops the server with an error (fail-stop, see [`weir_log::SyncFailed`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use weir_broker::Broker;
use weir_log::Durability;
use weir_plugins::{KvPluginStore, PluginManager, PluginStore, Seams};

use crate::io::BrokerIo;
use crate::monitor::probe::ProbeBook;
use crate::monitor::Monitor;
use crate::service::WeirService;

pub use crate::config::{
    FsyncPolicy, JetStreamOptions, PluginLimits, ServerConfig, ServerError, TlsFiles,
};
pub use crate::open::{open_sled, open_store, OpenedStore, PluginNamespaces};

/// A server started with [`start`], running on its own tasks.
pub struct RunningServer {
    /// The address it listens on (the real port when 0 was asked).
    pub addr: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    /// The broker, for in-process callers (tests, benchmarks).
    pub broker: Arc<Broker>,
    /// The plugins, for in-process callers.
    pub plugins: Arc<PluginManager>,
    /// Whether it serves TLS.
    pub tls: bool,
    /// Lag, alerts and probes.
    pub monitor: Arc<Monitor>,
    /// Where `/metrics` and the status page are served, if asked.
    pub metrics_addr: Option<SocketAddr>,
    /// Where Kafka clients are served, if asked.
    pub kafka_addr: Option<SocketAddr>,
    handle: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Cancels and waits for a clean stop (everything synced).
    ///
    /// # Errors
    /// The server's own error, if it failed.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.handle
            .await
            .unwrap_or_else(|e| panic!("server task panicked: {e}"))
    }

    /// The server's URL for clients.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

/// Opens the store and binds, then serves on background tasks until `shutdown` is cancelled
/// (or a sync fails, which cancels it).
///
/// # Errors
/// Store, recovery or bind failures, before anything is served.
pub async fn start(
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServerError> {
    let store = open_store(&config).await?;
    start_on(config, store, shutdown).await
}

/// [`start`] on a store the caller opened (tests wrap the sled store to inject faults).
///
/// # Errors
/// As [`start`].
pub async fn start_on(
    config: ServerConfig,
    store: impl Into<OpenedStore>,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServerError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    // HTTP/2's own stream limit stays above weir's per-connection limit on long-lived calls,
    // so an extra stream gets weir's RESOURCE_EXHAUSTED instead of waiting in the client.
    let h2_streams = u32::try_from(config.limits.max_streams_per_connection)
        .unwrap_or(u32::MAX)
        .saturating_add(100);
    let mut builder = tonic::transport::Server::builder().max_concurrent_streams(h2_streams);
    if let Some(tls) = &config.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| ServerError::Tls(format!("cannot read {}: {e}", p.display())))
        };
        let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    let core = Core::open_on(&config, store, &format!("{addr}")).await?;
    if config.auth.is_open() {
        tracing::warn!(message = "No --auth file: every client may do everything (fine for local development, not for a shared server).");
    }
    tracing::info!(message = "weir is serving.", %addr, data_dir = %config.data_dir.display(), fsync = %config.fsync, topics = core.broker.list_topics().len());
    let (broker, plugins) = (core.broker.clone(), core.plugins.clone());
    let tracker = TaskTracker::new();
    // Fail-stop: a failed sync shuts everything down; `stop`/`run` then return the failure.
    let durability = core.durability.clone();
    let fatal_shutdown = shutdown.clone();
    tracker.spawn(async move {
        tokio::select! {
            failed = durability.failure() => {
                tracing::error!(message = "Stopping: the store could not be synced.", error = %failed);
                fatal_shutdown.cancel();
            }
            _ = fatal_shutdown.cancelled() => {}
        }
    });
    tracker.spawn(crate::background::retention_loop(
        broker.clone(),
        shutdown.clone(),
    ));
    if broker.is_shared() {
        tracker.spawn(crate::background::follow_loop(
            broker.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(plugins.clone().run_cluster(shutdown.clone()));
    }
    let monitor = Monitor::new(
        broker.clone(),
        plugins.clone(),
        core.probes.clone(),
        config.monitor.clone(),
    );
    tracker.spawn(monitor.clone().run(shutdown.clone()));
    let metrics_addr = match config.metrics_listen {
        Some(listen) => {
            let listener =
                crate::monitor::http::bind(listen)
                    .await
                    .map_err(|source| ServerError::Bind {
                        addr: listen,
                        source,
                    })?;
            let bound = listener.local_addr().map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
            let tls = match &config.tls {
                Some(files) => Some(
                    crate::monitor::http::tls_acceptor(&files.cert, &files.key, &[b"http/1.1"])
                        .map_err(ServerError::Tls)?,
                ),
                None => None,
            };
            tracker.spawn(crate::monitor::http::serve(
                listener,
                tls,
                crate::monitor::http::router(monitor.clone()),
                shutdown.clone(),
            ));
            tracing::info!(message = "Serving metrics and the status page.", addr = %bound);
            Some(bound)
        }
        None => None,
    };
    let kafka_addr = match config.kafka_listen {
        Some(listen) => Some(
            start_kafka(
                &config,
                listen,
                &broker,
                plugins.membership(),
                &tracker,
                &shutdown,
            )
            .await?,
        ),
        None => None,
    };
    let service = WeirService::new(
        broker.clone(),
        plugins.clone(),
        shutdown.clone(),
        config.auth.clone(),
        config.limits,
        monitor.clone(),
        config.plugins.max_timeout,
        tracker.clone(),
    );
    let tls = config.tls.is_some();
    let serve_shutdown = shutdown.clone();
    let handle = tokio::spawn(async move {
        // Nagle must be off on every accepted socket (tonic's builder flag does not reach a
        // listener we bound ourselves): with it, small acks wait ~40 ms for delayed ACKs.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let result = builder
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(incoming, serve_shutdown.cancelled())
            .await;
        tracker.close();
        tracker.wait().await;
        let failed = core.durability.failed();
        core.close().await;
        if let Some(failed) = failed {
            return Err(ServerError::SyncFailed(failed));
        }
        Ok(result?)
    });
    Ok(RunningServer {
        addr,
        shutdown,
        broker,
        plugins,
        tls,
        monitor,
        metrics_addr,
        kafka_addr,
        handle,
    })
}

async fn start_kafka(
    config: &ServerConfig,
    listen: SocketAddr,
    broker: &Arc<Broker>,
    membership: Option<&Arc<weir_plugins::cluster::Membership>>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<SocketAddr, ServerError> {
    let bind_error = |source| ServerError::Bind {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let options = weir_kafka::KafkaOptions {
        advertised: config
            .kafka_advertise
            .clone()
            .unwrap_or_else(|| weir_kafka::default_advertised(bound)),
        cluster_id: "weir".into(),
        // With --auth, Kafka clients log in with SASL/PLAIN and a token, and get its grants.
        access: (!config.auth.is_open()).then(|| {
            Arc::new(crate::kafka_access::AuthFileAccess(config.auth.clone()))
                as Arc<dyn weir_kafka::Access>
        }),
        tls: match &config.tls {
            Some(files) => Some(
                crate::monitor::http::tls_acceptor(&files.cert, &files.key, &[])
                    .map_err(ServerError::Tls)?,
            ),
            None => None,
        },
        // On a cluster, leaders and group coordinators are placed over the nodes serving
        // Kafka, which this node's heartbeats now include.
        placement: membership.map(|m| {
            Arc::new(crate::kafka_placement::MembershipPlacement(m.clone()))
                as Arc<dyn weir_kafka::Placement>
        }),
    };
    if let Some(m) = membership {
        m.serve_kafka(format!("{}:{}", options.advertised.0, options.advertised.1));
    }
    tracing::info!(message = "Serving Kafka clients.", addr = %bound, advertised = %format!("{}:{}", options.advertised.0, options.advertised.1));
    tracker.spawn(weir_kafka::serve(
        listener,
        broker.clone(),
        options,
        shutdown.clone(),
    ));
    Ok(bound)
}

/// The store, syncer, broker and plugins of one data directory: everything but the network.
/// The server wraps it in gRPC; the local runtime (`weir test`) uses it directly.
pub struct Core {
    /// The broker.
    pub broker: Arc<Broker>,
    /// The plugins.
    pub plugins: Arc<PluginManager>,
    /// Probe results of the plugins.
    pub probes: Arc<ProbeBook>,
    durability: Arc<Durability>,
    syncer: std::thread::JoinHandle<()>,
}

impl Core {
    /// Opens the store in `config.data_dir`, starts the syncer, rebuilds the broker and
    /// restarts every deployed plugin.
    ///
    /// # Errors
    /// Store, recovery or plugin restart failures.
    pub async fn open(config: &ServerConfig) -> Result<Core, ServerError> {
        let store = open_store(config).await?;
        Core::open_on(config, store, &config.listen.to_string()).await
    }

    /// [`Core::open`] on a store the caller opened.
    ///
    /// # Errors
    /// Recovery or plugin restart failures.
    /// In cluster mode `node_addr` is how operators are told where a plugin runs.
    pub async fn open_on(
        config: &ServerConfig,
        opened: impl Into<OpenedStore>,
        node_addr: &str,
    ) -> Result<Core, ServerError> {
        let OpenedStore {
            log,
            durable,
            plugins,
        } = opened.into();
        let (fsync, broker_config) = (config.fsync, config.broker.clone());
        let synced: Arc<dyn weir_log::Durable> = if config.debug_sync_delay.is_zero() {
            durable
        } else {
            Arc::new(weir_log::SlowSyncs::new(durable, config.debug_sync_delay))
        };
        let (broker, durability, syncer) =
            weir_core::blocking::run(move || -> Result<_, ServerError> {
                let (durability, syncer) = Durability::start(synced, fsync);
                match Broker::open(log, durability.clone(), broker_config) {
                    Ok(broker) => Ok((broker, durability, syncer)),
                    Err(e) => {
                        durability.stop();
                        let _ = syncer.join();
                        Err(e.into())
                    }
                }
            })
            .await??;
        let compiled_dir =
            (config.compiled_dir.clone()).unwrap_or_else(|| config.data_dir.join("compiled"));
        let probes = Arc::new(ProbeBook::default());
        let io = Arc::new(BrokerIo(broker.clone()));
        let (plugin_store, cluster): (Arc<dyn PluginStore>, _) = match plugins {
            PluginNamespaces::Replicated(kv) => (
                Arc::new(KvPluginStore::replicated(kv.clone())),
                Some(Arc::new(weir_plugins::cluster::Membership::new(
                    kv, node_addr,
                ))),
            ),
            PluginNamespaces::Local(kv) => (Arc::new(KvPluginStore::new(kv)), None),
        };
        let seams = Seams {
            input: io.clone(),
            output: io,
            store: plugin_store,
            cluster,
            durability: durability.clone(),
            probes: probes.clone(),
        };
        let plugins =
            match PluginManager::open(&config.data_dir, &compiled_dir, seams, config.plugins).await
            {
                Ok(plugins) => plugins,
                Err(e) => {
                    durability.stop();
                    let _ = weir_core::blocking::run(move || syncer.join()).await;
                    return Err(e.into());
                }
            };
        Ok(Core {
            broker,
            plugins,
            probes,
            durability,
            syncer,
        })
    }

    /// Stops the plugins, syncs everything and stops the syncer.
    pub async fn close(self) {
        self.plugins.shutdown().await;
        self.durability.stop();
        let syncer = self.syncer;
        tokio::task::spawn_blocking(move || syncer.join())
            .await
            .ok();
        let (syncs, mean_sync_us) = self.durability.sync_stats();
        if self.durability.failed().is_some() {
            tracing::error!(message = "weir stopped after a failed sync; the last synced state is what a restart finds.", syncs, mean_sync_us);
        } else {
            tracing::info!(message = "weir stopped; store synced.", syncs, mean_sync_us);
        }
    }
}

/// Runs a server until `shutdown` is cancelled (the `weir serve` entry point).
///
/// # Errors
/// See [`start`]; also a gRPC transport failure while serving.
pub async fn run(
    config: ServerConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&RunningServer),
) -> Result<(), ServerError> {
    let server = start(config, shutdown.clone()).await?;
    on_ready(&server);
    // Returns when asked to stop, or when the server stops itself (a failed sync).
    shutdown.cancelled().await;
    server.stop().await
}
