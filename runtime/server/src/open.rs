//! Opening a node's store: the embedded sled store of the data directory, or the log on
//! JetStream beside that sled for the plugins' state ([`open_store`]).

use std::sync::Arc;

use weir_jetstream::JetStreamLog;
use weir_log::{Durable, KvStore, Log, ReplicatedKv, SledStore, Store};
use weir_plugins::KvPluginStore;

use crate::config::{FsyncPolicy, ServerConfig, ServerError};

/// A node's store as the server opened it: the broker's log, what the group commit syncs,
/// and where plugins keep their state.
pub struct OpenedStore {
    /// The broker's log: the data directory's store, or the log on JetStream.
    pub log: Arc<dyn Log>,
    /// What the group commit syncs: the data directory's store. (A log on JetStream is
    /// durable when it acknowledges a write; its own sync does nothing.)
    pub durable: Arc<dyn Durable>,
    /// Where plugins keep their state.
    pub plugins: PluginNamespaces,
}

/// Where plugins keep their state.
pub enum PluginNamespaces {
    /// The data directory's store, beside the log (one node).
    Local(Arc<dyn KvStore>),
    /// Changelogs on JetStream cached in the data directory's store (cluster mode); the
    /// plugin manager also takes ownership through them (heartbeats, leases).
    Replicated(Arc<ReplicatedKv>),
}

impl From<Arc<dyn Store>> for OpenedStore {
    /// One node's own store (embedded; tests wrap the sled store to inject faults): the log,
    /// the syncs and the plugins' state all on it.
    fn from(store: Arc<dyn Store>) -> Self {
        OpenedStore {
            log: store.clone(),
            durable: store.clone(),
            plugins: PluginNamespaces::Local(store),
        }
    }
}

/// The store `config` names: the embedded store of the data directory, or (with
/// `config.log`) the log on JetStream beside the data directory's store for plugins' state.
///
/// # Errors
/// The data directory or the NATS servers cannot be opened.
pub async fn open_store(config: &ServerConfig) -> Result<OpenedStore, ServerError> {
    let local = open_sled(config).await?;
    let Some(options) = config.log.clone() else {
        return Ok(local.into());
    };
    let servers = options.servers.join(",");
    let log = weir_core::blocking::run(move || -> Result<JetStreamLog, ServerError> {
        Ok(JetStreamLog::connect(options)?)
    })
    .await??;
    tracing::info!(message = "The log is on NATS JetStream.", servers = %servers, replicas = log.options().replicas, prefix = %log.options().prefix);
    let log = Arc::new(log);
    // Plugins' state: changelogs on JetStream, this data directory's key-value store as their
    // cache.
    let kv = Arc::new(ReplicatedKv::new(
        local,
        log.clone(),
        KvPluginStore::OWNED_PREFIX,
    ));
    Ok(OpenedStore {
        log,
        durable: kv.clone(),
        plugins: PluginNamespaces::Replicated(kv),
    })
}

/// Opens the embedded sled store of `config.data_dir`.
///
/// # Errors
/// The directory is not a weir store, or sled cannot open it.
pub async fn open_sled(config: &ServerConfig) -> Result<Arc<dyn Store>, ServerError> {
    let (data_dir, cache_bytes, fsync) =
        (config.data_dir.clone(), config.cache_bytes, config.fsync);
    let store = weir_core::blocking::run(move || -> Result<Arc<dyn Store>, ServerError> {
        let options = weir_log::sled_store::SledOptions {
            cache_bytes,
            // Under `never` sled's own flusher moves writes to the OS every 500 ms; otherwise
            // weir's syncer drives every flush.
            background_flush_ms: (fsync == FsyncPolicy::Never).then_some(500),
            // Only `always` acknowledges after a sync; under `interval` and `never` records are
            // read before one, and their index goes to sled at once (SledOptions).
            index_after_sync: fsync == FsyncPolicy::Always,
            ..Default::default()
        };
        Ok(Arc::new(SledStore::open(&data_dir, &options)?))
    })
    .await??;
    Ok(store)
}
