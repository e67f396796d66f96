//! weir-jetstream: weir's [`Log`](weir_log::Log) on NATS JetStream, shared by several weir
//! nodes.
//!
//! Layout (every name starts with the options' prefix, `weir` by default, so several weir
//! clusters can share one NATS cluster):
//!
//! - one stream per topic, `{prefix}-t-{token}-{8 hex}` (new at each creation; topics created
//!   by an older weir keep `{prefix}-t-{token}`), replicated `replicas` times, with a subject
//!   per partition for its chunks (`{prefix}.t.{token}.{p}.c`) and one per idempotent producer
//!   for its sequence state (`{prefix}.t.{token}.{p}.p.{id}`, rolled up so only the newest
//!   stays);
//! - one metadata stream `{prefix}-meta` keeping the newest value of each subject: topic
//!   configs (with their stream's name), producer records and the next producer id,
//!   consumer-group offsets; a deletion writes an empty value (never a purge: every write
//!   there is fenced on what its writer read, see topics.rs and meta.rs);
//! - one stream `{prefix}-kv` of changelogs and blobs ([`weir_log::Changelog`]): plugins'
//!   state, the plugin registry and ownership table, plugins' wasm (`changelog.rs`).
//!
//! An append is one JetStream atomic batch (the chunks, then the producer's new state) whose
//! first message carries `Nats-Expected-Last-Subject-Sequence` for the partition's chunk
//! subject: of two nodes appending at the same offset the engine lets exactly one through,
//! the other gets [`LogError::Fenced`], reads the tail and decides again. A batch is
//! acknowledged once the stream's quorum has it, which is what an acknowledged publish
//! promises in cluster mode. Reading a partition's tail goes many messages per request to any
//! replica (direct gets; a follower may lag) but ends only on the stream leader's answer that
//! nothing follows, so no read ends short of what was acknowledged (direct.rs).
//!
//! The [`Log`](weir_log::Log) seam is blocking; this crate runs its NATS client on a runtime
//! of its own and blocks the calling thread (the broker calls the store from tokio's blocking
//! pool) on each request.

#![deny(missing_docs)]

mod changelog;
mod close;
mod direct;
mod log;
mod meta;
mod names;
mod partition;
mod patient;
mod recover;
mod topics;

pub use partition::{CHUNK_TARGET_BYTES, FRAGMENT_BYTES};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use parking_lot::Mutex;
use weir_core::TopicPartition;
use weir_log::LogError;

pub use names::Names;

/// How a weir node reaches JetStream.
#[derive(Clone, Debug)]
pub struct JetStreamOptions {
    /// NATS server URLs (`nats://host:port`); the client fails over between them.
    pub servers: Vec<String>,
    /// Replicas of every stream weir creates (JetStream allows 1, 3 or 5 in practice).
    pub replicas: usize,
    /// Prefix of every stream and subject weir uses (letters, digits, `-`, `_`).
    pub prefix: String,
    /// How long one request (a publish's acknowledgement, a read) may take before it fails;
    /// opening the log waits three times as long (at least 5 s per server) for a first server
    /// to accept a connection.
    pub request_timeout: Duration,
}

impl JetStreamOptions {
    /// R3 under the `weir` prefix on `servers`, 10 s requests.
    pub fn new(servers: Vec<String>) -> Self {
        JetStreamOptions {
            servers,
            replicas: 3,
            prefix: "weir".into(),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Parses `nats://a:4222,nats://b:4222` (the `--log` value).
    ///
    /// # Errors
    /// An empty list or a URL that is not `nats://` or `tls://`, in words.
    pub fn parse_servers(list: &str) -> Result<Vec<String>, String> {
        let servers: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if servers.is_empty() {
            return Err(
                "no NATS server given: write --log nats://HOST:PORT[,nats://HOST:PORT...]".into(),
            );
        }
        if let Some(bad) = servers
            .iter()
            .find(|s| !(s.starts_with("nats://") || s.starts_with("tls://")))
        {
            return Err(format!(
                "{bad:?} is not a NATS URL: write nats://HOST:PORT (or tls://HOST:PORT)"
            ));
        }
        Ok(servers)
    }

    fn validate(&self) -> Result<(), LogError> {
        let bad = |reason: String| LogError::Engine {
            op: "start".into(),
            reason,
        };
        if self.prefix.is_empty()
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(format!(
                "prefix {:?} must be letters, digits, '-' and '_'",
                self.prefix
            )));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(bad(format!(
                "{} replicas requested; JetStream streams have 1 to 5",
                self.replicas
            )));
        }
        Ok(())
    }
}

/// Where a chunk is stored: the stream sequence of its first message and how many messages
/// (fragments) it spans.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seq: u64,
    frags: u32,
}

/// What this node knows of one partition's messages.
#[derive(Debug, Default)]
struct PartState {
    /// Chunks by base offset.
    index: BTreeMap<u64, Loc>,
    /// Stream sequence of the newest chunk message (the fence's expected value; 0 = none).
    last_chunk_seq: u64,
    /// Every message of the partition up to this stream sequence has been read.
    walked_seq: u64,
    /// The offset the next record gets.
    next: u64,
    /// The last walk read to the end (it was not cut short by a failure).
    walk_complete: bool,
    /// A deletion of the topic closed the partition: it takes no more appends.
    closed: bool,
    /// Producer id → stream sequence of its newest sequence state read or written here (what
    /// an expiry's purge is bounded by).
    producer_seqs: HashMap<u64, u64>,
}

/// The log on JetStream. See the crate documentation for the layout.
pub struct JetStreamLog {
    rt: Option<tokio::runtime::Runtime>,
    js: jetstream::Context,
    client: async_nats::Client,
    meta: jetstream::stream::Stream,
    names: Names,
    options: JetStreamOptions,
    streams: Mutex<HashMap<String, jetstream::stream::Stream>>,
    parts: Mutex<HashMap<TopicPartition, Arc<Mutex<PartState>>>>,
    /// The changelog stream (plugins' state), once opened.
    kv: Mutex<Option<jetstream::stream::Stream>>,
    /// Topic → the name of its stream, as its stored config says (a name new at every
    /// creation; topics created before that use [`Names::topic_stream`]).
    topic_streams: Mutex<HashMap<String, String>>,
    /// Streams whose tail is read from the leader only until then (a direct get failed).
    direct_benched: Mutex<HashMap<String, std::time::Instant>>,
    /// Metadata subjects written over ([`JetStreamLog::meta_put_over`]) → the sequence and
    /// value of this node's last acknowledged write there (the next write's compare-and-set,
    /// and what it must not undo if it is later).
    meta_seqs_known: Mutex<HashMap<String, (u64, bytes::Bytes)>>,
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn engine(op: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Engine {
        op: op.into(),
        reason: e.to_string(),
    }
}

impl JetStreamLog {
    /// Connects to the servers and creates the metadata stream if it is missing. Blocking:
    /// call it from a thread that is not running async tasks.
    ///
    /// # Errors
    /// Bad options, no server reachable, or JetStream not enabled / without a leader.
    pub fn connect(options: JetStreamOptions) -> Result<Self, LogError> {
        options.validate()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weir-nats")
            .enable_all()
            .build()
            .map_err(|e| engine("start its client runtime", e))?;
        let names = Names::new(&options.prefix);
        let (client, js, meta) = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .name("weir")
                .connection_timeout(Duration::from_secs(5))
                .request_timeout(Some(options.request_timeout))
                .retry_on_initial_connect()
                .max_reconnects(None)
                .connect(options.servers.clone());
            let client = tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .map_err(|_| {
                    engine(
                        "connect",
                        format!(
                            "no NATS server answered within 30 s at {}",
                            options.servers.join(",")
                        ),
                    )
                })?
                .map_err(|e| engine("connect", e))?;
            // Retrying the first connection, `connect` returns before any server answered:
            // wait for one here, so that a wrong address or a stopped server is named as such
            // (not as a JetStream request that timed out).
            // Each try of a server that does not answer may take the 5 s connection timeout.
            let patience = (options.request_timeout * 3)
                .max(Duration::from_secs(5 * options.servers.len() as u64 + 1));
            let deadline = tokio::time::Instant::now() + patience;
            while client.connection_state() != async_nats::connection::State::Connected {
                if tokio::time::Instant::now() >= deadline {
                    return Err(engine(
                        "connect",
                        format!(
                            "no NATS server at {} accepted a connection within {:.0?}; is \
                             nats-server running there (`cargo xtask cluster` starts a local \
                             one), and do --log's addresses and ports name it?",
                            options.servers.join(","),
                            patience
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let js = jetstream::ContextBuilder::new()
                .timeout(options.request_timeout)
                .build(client.clone());
            let meta = meta::ensure_meta_stream(&js, &names, options.replicas).await?;
            Ok::<_, LogError>((client, js, meta))
        })?;
        Ok(JetStreamLog {
            rt: Some(rt),
            js,
            client,
            meta,
            names,
            options,
            streams: Mutex::new(HashMap::new()),
            parts: Mutex::new(HashMap::new()),
            kv: Mutex::new(None),
            meta_seqs_known: Mutex::new(HashMap::new()),
            topic_streams: Mutex::new(HashMap::new()),
            direct_benched: Mutex::new(HashMap::new()),
        })
    }

    /// The options it was opened with.
    pub fn options(&self) -> &JetStreamOptions {
        &self.options
    }

    /// The stream and subject names it uses.
    pub fn names(&self) -> &Names {
        &self.names
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the log")
            .block_on(f)
    }

    fn part(&self, tp: &TopicPartition) -> Result<Arc<Mutex<PartState>>, LogError> {
        self.parts.lock().get(tp).cloned().ok_or_else(|| {
            engine(
                &format!("use partition {tp}"),
                "this node has not opened it (the topic is being deleted or created)",
            )
        })
    }
}
