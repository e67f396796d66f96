//! weir-log: durable storage, behind two seams and nothing else.
//!
//! - [`Log`]: partitioned record logs with their topic metadata, idempotent-producer records,
//!   consumer-group offsets and retention — what the broker needs. An append names the offset
//!   it expects to write at; a backend shared by several processes refuses it when another
//!   writer got there first ([`LogError::Fenced`]).
//! - [`KvStore`]: namespaces of keys written atomically several at a time — what the plugin
//!   store (weir-plugins) builds its layout on.
//!
//! Both are [`Durable`]: nothing written is durable until `sync` returns, and [`Durability`]
//! runs the group commit over it. Backends: [`SledStore`] (the embedded default, the only code
//! that knows sled), [`MemoryStore`] (tests; it models a power cut) and [`faulty::FaultyStore`]
//! (fault injection). The on-disk layout is the backend's own; ARCHITECTURE.md describes the
//! sled one.
//!
//! The unit of storage is the *chunk* ([`codec`]): consecutive records encoded once, stored
//! under its base offset — in [`SledStore`], written once into a partition's segment file and
//! indexed in sled; in the other backends, a value. Publishes are packed into chunks of about
//! [`CHUNK_TARGET_BYTES`]. Stores before weir-log/3 kept chunks in sled, and before
//! weir-log/4 key-value values too, split into fragments of at most [`FRAGMENT_MAX_BYTES`]
//! (sled wrote larger pages to blob files it never fsyncs); they are still read that way.

#![deny(missing_docs)]

pub mod changelog;
pub mod codec;
pub mod durability;
pub mod faulty;
mod memory;
mod replicated;
pub mod sled_store;

use bytes::Bytes;

pub use changelog::{Changelog, MemoryChangelog};
pub use codec::{ChunkHeader, CodecError, EncodedChunk};
pub use durability::{Durability, FsyncPolicy, SlowSyncs, SyncFailed};
pub use memory::MemoryStore;
pub use replicated::{Landing, ReplicatedKv, GROUP_MAX_BYTES, SNAPSHOT_EVERY};
pub use sled_store::SledStore;

use weir_core::{TopicConfig, TopicPartition};

/// Records of one publish are packed into chunks of about this many encoded bytes.
pub const CHUNK_TARGET_BYTES: usize = 32 * 1024;
/// The fragment size of chunks and key-value values in sled, in stores before weir-log/3 and
/// /4 (read as they are); segment files and redb take any size.
pub const FRAGMENT_MAX_BYTES: usize = 32 * 1024;

/// Errors of the storage layer. Each message is a sentence an operator can act on; the
/// underlying error stays attached as the source.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// sled reported an error (an I/O failure underneath, or a damaged store).
    #[error("the store failed: {}", describe_sled(.0))]
    Sled(#[source] sled::Error),
    /// The key-value file (redb) reported an error (an I/O failure underneath, or damage).
    #[error("the key-value store {path} failed: {reason}")]
    Kv {
        /// The file.
        path: std::path::PathBuf,
        /// What redb said.
        reason: String,
    },
    /// A file operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data directory holds something that is not a weir store.
    #[error("data directory {path} is not a weir store: {reason}")]
    ForeignDirectory {
        /// The directory.
        path: std::path::PathBuf,
        /// What was found.
        reason: String,
    },
    /// The store could not be opened.
    #[error("cannot open the store in {path}: {reason}")]
    Open {
        /// The directory.
        path: std::path::PathBuf,
        /// Why, in words.
        reason: String,
    },
    /// A stored chunk failed to decode.
    #[error("corrupt chunk in {tp} at base offset {base_offset}: {source}")]
    Corrupt {
        /// Where.
        tp: TopicPartition,
        /// The chunk's key.
        base_offset: u64,
        /// What was wrong.
        source: CodecError,
    },
    /// A stored value is not in the shape this weir writes (damaged, or written by another
    /// version).
    #[error("unreadable stored {what}: {reason}")]
    Malformed {
        /// Which value.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An append expected to write at `expected` but the partition already ends elsewhere:
    /// another writer appended first (backends shared by several processes).
    #[error("append to {tp} at offset {expected} refused: the partition ends at {actual} (another writer appended first)")]
    Fenced {
        /// Where.
        tp: TopicPartition,
        /// The offset the append expected to write at.
        expected: u64,
        /// Where the partition really ends.
        actual: u64,
    },
    /// A conditional write lost to another writer (backends shared by several processes): the
    /// caller reloads what it decided from and tries again.
    #[error("another weir node changed {what} at the same moment; retry the request")]
    Conflict {
        /// What was written.
        what: String,
    },
    /// The replicated engine refused or did not answer (a leader election, a lost
    /// connection, a full stream). Whether a write that failed this way landed is unknown
    /// until the log is read again.
    #[error("the replicated log failed to {op}: {reason}; retry once the NATS cluster answers (a leader election takes seconds)")]
    Engine {
        /// What was being done.
        op: String,
        /// The engine's reason, in its words.
        reason: String,
    },
    /// A write to a namespace this node does not hold (cluster mode: another node took the
    /// plugin over, or an append of this node's was refused or left uncertain).
    #[error("this node does not hold {what}: another weir node took it over, or the replicated log refused or did not confirm a write to it; it is reacquired before writing again")]
    NotHeld {
        /// The namespace.
        what: String,
    },
    /// An append to a topic whose deletion has closed it (shared logs: a deletion begun through
    /// any node); nothing was stored.
    #[error("topic {topic} is being deleted: it takes no more records")]
    Closed {
        /// The topic.
        topic: String,
    },
    /// The write can never succeed as sent (a limit of the engine): nothing was stored.
    #[error("the replicated log cannot take this write: {reason}")]
    TooLarge {
        /// What limit, and what to do.
        reason: String,
    },
}

impl LogError {
    /// Whether the stored data itself is damaged (retrying will not help), as opposed to a
    /// failure of the disk or the store that may pass.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            LogError::Corrupt { .. }
                | LogError::Malformed { .. }
                | LogError::Sled(sled::Error::Corruption { .. })
        )
    }
}

/// sled's errors in words: its Display shows an I/O error's debug form
/// (`IO error: Os { code: 5, kind: Uncategorized, ... }`).
fn describe_sled(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => format!("I/O error: {}", plain_io(io)),
        sled::Error::Corruption { at, .. } => match at {
            Some(at) => format!("the store's files are damaged at {at}"),
            None => "the store's files are damaged".into(),
        },
        sled::Error::CollectionNotFound(name) => {
            format!("tree {:?} not found", String::from_utf8_lossy(name))
        }
        sled::Error::Unsupported(what) => format!("unsupported operation: {what}"),
        sled::Error::ReportableBug(what) => format!("sled bug: {what}"),
    }
}

/// An I/O error in words. Once a write failed, sled hands back copies of that error whose
/// text is the original's Rust debug form (`Os { code: 5, kind: Uncategorized, message:
/// "Input/output error" }`): that reached clients and plugin states; it is told as the OS
/// error it is.
fn plain_io(io: &std::io::Error) -> String {
    let text = io.to_string();
    if let Some(code) = text
        .strip_prefix("Os { code: ")
        .and_then(|rest| rest.split(',').next())
        .and_then(|code| code.parse::<i32>().ok())
    {
        return std::io::Error::from_raw_os_error(code).to_string();
    }
    text
}

impl From<sled::Error> for LogError {
    fn from(e: sled::Error) -> Self {
        LogError::Sled(e)
    }
}

/// What the index of a partition keeps per stored chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    /// Records in the chunk.
    pub count: u32,
    /// Stored bytes (all fragments).
    pub bytes: u32,
    /// Newest record timestamp in the chunk.
    pub max_timestamp_ms: i64,
}

/// Everything needed to rebuild a partition's in-memory state after a restart.
#[derive(Debug, Default)]
pub struct RecoveredPartition {
    /// First offset still stored (after retention), even when no chunk is left.
    pub start_offset: u64,
    /// Chunks by base offset, ascending.
    pub chunks: Vec<(u64, ChunkMeta)>,
    /// Encoded idempotent-producer state per producer id (see `broker::producer`).
    pub producers: Vec<(u64, Bytes)>,
}

/// What other processes appended to a partition since this one last looked (backends shared
/// by several processes; always empty for a store with one writer).
#[derive(Debug, Default)]
pub struct Tail {
    /// New chunks by base offset, ascending, continuing the partition's end.
    pub chunks: Vec<(u64, ChunkMeta)>,
    /// Producer sequence states written with them, oldest first (a later one replaces an
    /// earlier one of the same producer).
    pub producers: Vec<(u64, Bytes)>,
    /// The read stopped early (the engine did not answer): what is here is true, but more
    /// may follow.
    pub partial: bool,
}

/// Producer records as stored, and the next producer id to issue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredProducers {
    /// (producer id, its record in the broker's encoding).
    pub producers: Vec<(u64, Bytes)>,
    /// The next id to issue (ids are never reused, even after expiry).
    pub next_id: u64,
}

/// A consumer group's offsets for one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub group: String,
    /// Topic name.
    pub topic: String,
    /// When it last committed, ms since the epoch (0 = not recorded).
    pub last_commit_ms: i64,
}

/// A group offset value: the offset, then the commit time (absent in values stored before it
/// was recorded).
fn encode_group_offset(offset: u64, at_ms: i64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&offset.to_be_bytes());
    v[8..].copy_from_slice(&at_ms.to_be_bytes());
    v
}

fn decode_group_offset(v: &[u8]) -> Option<(u64, i64)> {
    let offset = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let at = match v.get(8..16) {
        Some(t) => i64::from_be_bytes(t.try_into().ok()?),
        None => 0,
    };
    Some((offset, at))
}

/// A store whose writes become durable (survive power loss) when `sync` returns.
pub trait Durable: Send + Sync + 'static {
    /// Makes every write that returned before this call durable.
    fn sync(&self) -> Result<(), LogError>;
}

/// Partitioned, durable record logs plus the small metadata the broker needs.
///
/// Every write is atomic on its own (a crash leaves all of it or none); none is durable until
/// [`Durable::sync`] returns. Implementations are shared between threads.
pub trait Log: Durable {
    /// All topics, in name order.
    fn load_topics(&self) -> Result<Vec<TopicConfig>, LogError>;
    /// Records a new topic.
    fn put_topic(&self, config: &TopicConfig) -> Result<(), LogError>;
    /// Removes a topic's metadata, partitions and group offsets.
    fn delete_topic(&self, config: &TopicConfig) -> Result<(), LogError>;
    /// Reads what a partition holds to rebuild its index.
    fn recover_partition(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError>;
    /// Stores `chunks` at consecutive offsets from `base_offset`, which must be the
    /// partition's end, together with the new states of the producers whose batches they
    /// hold (one per producer id), atomically. In one process the
    /// broker's partition lock makes it the only writer; a backend written by several
    /// processes refuses an append whose base is not the end ([`LogError::Fenced`]).
    fn append(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        chunks: &[EncodedChunk],
        producers: &[(u64, &[u8])],
    ) -> Result<(), LogError>;
    /// The encoded chunk stored at `base_offset`, if it is (still) there.
    fn read_chunk(&self, tp: &TopicPartition, base_offset: u64) -> Result<Option<Bytes>, LogError>;
    /// Deletes the chunks at `bases` and records `new_start` as the partition's first offset.
    fn trim(&self, tp: &TopicPartition, bases: &[u64], new_start: u64) -> Result<(), LogError>;
    /// Forgets the sequence states of producers in a partition (expired producers).
    fn remove_producers(&self, tp: &TopicPartition, ids: &[u64]) -> Result<(), LogError>;
    /// Every producer's stored record (epoch, owner, creation; the broker's encoding) and the
    /// next producer id to issue.
    fn load_producers(&self) -> Result<StoredProducers, LogError>;
    /// Records a producer (its encoded record) and the next id to issue, atomically.
    fn put_producer(&self, producer_id: u64, record: &[u8], next_id: u64) -> Result<(), LogError>;
    /// Removes producers' records (expired producers).
    fn delete_producers(&self, ids: &[u64]) -> Result<(), LogError>;
    /// Stores a consumer group's next offsets for some partitions of a topic, committed at
    /// `at_ms`.
    fn put_group_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
        at_ms: i64,
    ) -> Result<(), LogError>;
    /// A consumer group's committed offsets for a topic, by partition.
    fn group_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError>;
    /// Every (group, topic) with committed offsets, and when it last committed (ms since the
    /// epoch; 0 when stored by a weir that did not record it).
    fn list_groups(&self) -> Result<Vec<GroupEntry>, LogError>;
    /// Removes a consumer group's offsets for a topic (expired groups).
    fn delete_group(&self, group: &str, topic: &str) -> Result<(), LogError>;

    /// The shared-log operations, when other processes write this log too (a replicated
    /// engine shared by several weir nodes); `None` for a log with one writer. A shared log
    /// acknowledges a write once it is replicated, so the broker does not wait for
    /// [`Durable::sync`]; it follows the others' appends with [`SharedLog::tail`], retries
    /// fenced appends, issues producers with [`SharedLog::issue_producer`], and reloads topics
    /// and producers it does not know.
    fn shared(&self) -> Option<&dyn SharedLog>;
    /// The encoded size the broker packs a publish's records into per chunk
    /// ([`CHUNK_TARGET_BYTES`] unless the engine's messages favour another).
    fn chunk_target_bytes(&self) -> usize;
    /// Refuses ([`LogError::TooLarge`]) an append of `chunks` and `producers` producer states
    /// this log could never take in one write, before anything of the publish is stored.
    fn check_append(&self, chunks: &[EncodedChunk], producers: usize) -> Result<(), LogError>;
}

/// What a log that other processes write too adds to [`Log`] (reached through
/// [`Log::shared`]): what the others appended, retention they ran, producers they issued,
/// topics they created again. Every method blocks.
pub trait SharedLog: Send + Sync {
    /// What other writers appended to a partition since this process last looked.
    fn tail(&self, tp: &TopicPartition) -> Result<Tail, LogError>;
    /// The first offset still stored in a partition (another process's retention may have
    /// moved it); `None` when the partition holds nothing.
    fn first_offset(&self, tp: &TopicPartition) -> Result<Option<u64>, LogError>;
    /// One producer's stored record, read again (another node may have issued it or bumped
    /// its epoch).
    fn load_producer(&self, producer_id: u64) -> Result<Option<Bytes>, LogError>;
    /// Which creation of a topic the last [`Log::load_topics`] saw: a topic deleted and
    /// created again elsewhere with the same configuration is another topic, to be opened
    /// anew.
    fn incarnation(&self, topic: &str) -> Option<String>;
    /// Records a newly issued producer id and the next id to issue; refused
    /// ([`LogError::Conflict`]) when another node issued that id first. (A log with one writer
    /// takes [`Log::put_producer`].)
    fn issue_producer(&self, producer_id: u64, record: &[u8], next_id: u64)
        -> Result<(), LogError>;
    /// Replaces a producer's record (an epoch bump, a claim) if the stored one is still
    /// `previous`; refused ([`LogError::Conflict`]) when another node changed it first.
    fn replace_producer(
        &self,
        producer_id: u64,
        previous: &[u8],
        record: &[u8],
    ) -> Result<(), LogError>;
}

/// Both seams over one durable store (one sync covers the log and the key-value namespaces).
pub trait Store: Log + KvStore {}

impl<T: Log + KvStore> Store for T {}

/// Namespaces of keys, several written atomically: the ground the plugin store builds its
/// layout on. A namespace is independent of every other.
pub trait KvStore: Durable {
    /// A value of a namespace.
    fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>, LogError>;
    /// The first `limit` entries of a namespace whose keys start with `prefix`, in key order
    /// (a reader of a long prefix takes it a page at a time).
    fn kv_scan_first(
        &self,
        namespace: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, LogError>;
    /// Entries of a namespace whose keys start with `prefix`, in key order.
    fn kv_scan(&self, namespace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, LogError> {
        self.kv_scan_first(namespace, prefix, usize::MAX)
    }
    /// Writes (`Some`) and deletes (`None`) keys of a namespace, atomically.
    fn kv_apply(
        &self,
        namespace: &str,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LogError>;
    /// Removes a namespace and everything in it.
    fn kv_drop(&self, namespace: &str) -> Result<(), LogError>;
}

/// Keys of stored group offsets: topic \0 group \0 partition (u32 BE), so that both "all
/// offsets of a group for a topic" and "everything of a topic" are prefix scans.
struct GroupKeys {
    prefix: Vec<u8>,
}

impl GroupKeys {
    fn new(topic: &str, group: &str) -> Self {
        let mut prefix = Vec::with_capacity(topic.len() + group.len() + 2);
        prefix.extend_from_slice(topic.as_bytes());
        prefix.push(0);
        prefix.extend_from_slice(group.as_bytes());
        prefix.push(0);
        GroupKeys { prefix }
    }

    fn key(&self, partition: u32) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(&partition.to_be_bytes());
        key
    }

    /// The prefix of every group key of a topic.
    fn topic_prefix(topic: &str) -> Vec<u8> {
        let mut prefix = topic.as_bytes().to_vec();
        prefix.push(0);
        prefix
    }

    /// The (group, topic) of any group key.
    fn parse(key: &[u8]) -> Option<(String, String)> {
        let mut parts = key.splitn(3, |&b| b == 0);
        let topic = std::str::from_utf8(parts.next()?).ok()?;
        let group = std::str::from_utf8(parts.next()?).ok()?;
        parts.next()?;
        Some((group.to_string(), topic.to_string()))
    }

    /// The partition of a key under this prefix.
    fn partition(&self, key: &[u8]) -> Option<u32> {
        let rest = key.strip_prefix(self.prefix.as_slice())?;
        <[u8; 4]>::try_from(rest).ok().map(u32::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::LogError;

    #[test]
    fn a_copied_io_error_is_told_in_words_not_rust_debug_text() {
        let copied = std::io::Error::other(
            "Os { code: 5, kind: Uncategorized, message: \"Input/output error\" }",
        );
        let shown = LogError::Sled(sled::Error::Io(copied)).to_string();
        assert!(!shown.contains("Os {"), "{shown}");
        assert!(shown.contains("(os error 5)"), "{shown}");
        let plain = LogError::Sled(sled::Error::Io(std::io::Error::other("disk full"))).to_string();
        assert!(plain.contains("disk full"), "{plain}");
    }
}
