//! The seams a plugin talks through, besides its store: where its input comes from
//! ([`Input`]), where its outputs go ([`Output`]), where its probes are reported
//! ([`ProbeSink`]). The server implements them over its broker and monitor; tests with fakes.

use async_trait::async_trait;
use tokio::sync::watch;
use weir_core::{ProbeMarker, ReadLimits, Record, StartAt, StoredRecord};

/// What kind of failure an [`IoError`] is, so callers can tell them apart (the server maps
/// them to statuses; the forwarder to "retrying" or "blocked").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// No such topic (or partition).
    NotFound,
    /// The request is malformed or out of range (a name, a size).
    Invalid,
    /// The request cannot succeed in the current state (a sequence, an epoch, ownership, a
    /// topic that exists).
    Refused,
    /// A limit was reached.
    Exhausted,
    /// The server cannot do it now (its store failed, it is stopping); it may pass.
    Unavailable,
    /// The stored data is damaged.
    Damaged,
}

/// A failure of an input or output call.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct IoError {
    /// Its kind.
    pub kind: IoKind,
    /// The name clients see for it (`unknown-topic`, `stale-epoch`, ...), when the source
    /// has one.
    pub name: &'static str,
    /// The whole story, for the operator.
    pub message: String,
}

impl IoError {
    /// An error of `kind`.
    pub fn new(kind: IoKind, message: impl Into<String>) -> Self {
        IoError {
            kind,
            name: "",
            message: message.into(),
        }
    }
}

/// Where a plugin reads its input topic.
#[async_trait]
pub trait Input: Send + Sync + 'static {
    /// Visible records of a partition from `from`, within `limits`.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        limits: ReadLimits,
    ) -> Result<Vec<StoredRecord>, IoError>;
    /// The partition's visible end, to wait for new records (closed when the topic goes).
    fn watch(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, IoError>;
    /// A topic's partition count.
    fn partition_count(&self, topic: &str) -> Result<u32, IoError>;
    /// The offset a start position means in a partition.
    async fn resolve_start(
        &self,
        topic: &str,
        partition: u32,
        start: StartAt,
    ) -> Result<u64, IoError>;
    /// Makes sure this node knows `topic` before [`Input::watch`] or
    /// [`Input::partition_count`] (cluster mode: a topic created through another node a moment
    /// ago). Nothing to do on a single node.
    async fn know_topic(&self, _topic: &str) {}
}

/// One output partition's share of a committed batch, as the plugin's idempotent producer
/// publishes it.
#[derive(Clone, Debug)]
pub struct OutputBatch {
    /// Output topic.
    pub topic: String,
    /// Output partition.
    pub partition: u32,
    /// The plugin partition's producer id.
    pub producer_id: u64,
    /// Sequence of the first record.
    pub base_sequence: u64,
    /// The records.
    pub records: Vec<Record>,
}

/// Resolves once an appended [`OutputBatch`] is durable (see [`Output::append`]).
pub type Acked = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), IoError>> + Send>>;

/// Where a plugin's outputs go, and the topics and producers it needs there.
#[async_trait]
pub trait Output: Send + Sync + 'static {
    /// Stores a batch as the server's idempotent producer (a retry of a stored batch is
    /// acknowledged without storing it again), returning once it is applied (its offsets
    /// fixed, so a batch appended after it lands after it) with what resolves once it is
    /// durable: a forwarder appends a page of batches and waits for their durability once.
    async fn append(&self, batch: OutputBatch) -> Result<Acked, IoError>;
    /// A topic's partition count (outputs are routed by key hash).
    fn partition_count(&self, topic: &str) -> Result<u32, IoError>;
    /// The largest record the output topics take.
    fn max_record_bytes(&self) -> usize;
    /// A new producer id owned by the server.
    async fn new_producer(&self) -> Result<u64, IoError>;
    /// Marks producer ids as the server's (plugins deployed before ownership existed).
    async fn claim_producers(&self, ids: &[u64]) -> Result<(), IoError>;
    /// Releases producer ids no plugin uses any more (a removed plugin's).
    async fn release_producers(&self, ids: &[u64]) -> Result<(), IoError>;
    /// Creates a topic unless it exists (dead-letter topics).
    async fn ensure_topic(&self, name: &str, partitions: u32) -> Result<(), IoError>;
}

/// Where committed probes are reported (the monitor's probe book).
pub trait ProbeSink: Send + Sync + 'static {
    /// `plugin` committed past a probe on `partition`, `delay_ms` after it was published.
    fn record(&self, plugin: &str, partition: u32, marker: ProbeMarker, delay_ms: u64);
    /// Forgets a removed plugin.
    fn forget(&self, plugin: &str);
}
