//! The plugin store: everything a plugin keeps — its spec in the registry, its cursors, state,
//! message ids, outbox, output sequences and log — behind [`PluginStore`], whose
//! implementation owns the key layout and every value codec. [`KvPluginStore`] lays it out on
//! a weir-log [`weir_log::KvStore`]: one node's (sled, or memory in tests), or in cluster mode
//! the replicated namespaces ([`ReplicatedPluginStore`]: each write one fenced changelog entry).
//!
//! The one write that matters is [`PluginStore::commit`]: a batch's state delta, message ids,
//! outbox entry, output sequences and the partition's new cursor, all or nothing.

mod codec;
mod copy;
mod deltas;
mod keys;
mod kv;
mod replicated;

use bytes::Bytes;
use weir_core::Record;
use weir_log::{Landing, LogError};

use crate::spec::PluginSpec;
pub use codec::Cursor;
pub use copy::copy_plugin;
pub use kv::{KvPluginStore, Local, Namespaces};
pub use replicated::{ReplicatedPluginStore, Shared};

/// A batch's state writes: key → new (value, version), `None` for a delete.
pub type StateWrites = weir_wasm::StateWrites;

/// One output partition's share of a batch's outputs, with its producer sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Output topic.
    pub topic: String,
    /// Output partition.
    pub partition: u32,
    /// Producer sequence of its first record.
    pub base_seq: u64,
    /// The records; read back from the store they are slices of the stored entry.
    pub records: Vec<Record>,
}

/// A committed batch's outputs not yet forwarded.
#[derive(Clone, Debug)]
pub struct OutboxEntry {
    /// The commit sequence that wrote it.
    pub seq: u64,
    /// Its groups, or why the stored entry cannot be read.
    pub groups: Result<Vec<Group>, String>,
}

/// Where a stored set of message ids lives: (input partition, commit sequence).
pub type DedupKey = (u32, u64);

/// What a plugin finds in the store when it opens.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Each input partition's cursor.
    pub cursors: Vec<Cursor>,
    /// Stored message ids: key, newest record time, id hashes.
    pub dedup: Vec<(DedupKey, i64, Vec<u64>)>,
    /// The next state-delta sequence.
    pub next_delta: u64,
    /// The log ring: (oldest stored line, next line) sequences.
    pub log_range: (u64, u64),
}

/// One batch's effects, written atomically by [`PluginStore::commit`].
#[derive(Debug)]
pub struct CommitWrite<'a> {
    /// The input partition.
    pub partition: u32,
    /// The partition's cursor after the batch (its `seq` is the commit's sequence + 1).
    pub cursor: Cursor,
    /// The state writes, as delta `seq`.
    pub delta: Option<(u64, &'a StateWrites)>,
    /// The batch's message ids and its newest record time.
    pub ids: Option<(i64, &'a [u64])>,
    /// The outbox entry, as encoded groups (`encode_groups`).
    pub outbox: Option<Vec<u8>>,
    /// The next producer sequence of each output partition written to.
    pub sequences: &'a [((String, u32), u64)],
}

/// Everything a plugin keeps. Every method blocks (call it through `weir_core::blocking`).
pub trait PluginStore: Send + Sync + 'static {
    /// Every deployed plugin's spec.
    fn specs(&self) -> Result<Vec<PluginSpec>, LogError>;
    /// Records a spec (deploy, upgrade, pause).
    fn put_spec(&self, spec: &PluginSpec) -> Result<(), LogError>;
    /// Records a spec in place of `previous` (upgrade, pause, resume): in cluster mode only if
    /// the stored spec is still `previous` (same deployment, version, code, pause and restart
    /// count), else
    /// [`LogError::Conflict`] — another node changed the plugin meanwhile.
    fn replace_spec(&self, spec: &PluginSpec, previous: &PluginSpec) -> Result<(), LogError>;
    /// A new plugin: drops whatever an earlier plugin of the name left, writes the
    /// partitions' starting cursors, then records the spec (in cluster mode the caller has
    /// acquired the plugin's namespace).
    fn create(&self, spec: &PluginSpec, cursors: &[Cursor]) -> Result<(), LogError>;
    /// Removes a plugin's spec and everything it kept.
    fn remove(&self, plugin: &str) -> Result<(), LogError>;
    /// Makes every write that returned before this call durable.
    fn sync(&self) -> Result<(), LogError>;

    /// What a plugin with `partitions` input partitions finds at open.
    fn load(&self, plugin: &str, partitions: u32) -> Result<Loaded, LogError>;
    /// A partition's cursor as stored.
    fn cursor(&self, plugin: &str, partition: u32) -> Result<Cursor, LogError>;
    /// Every partition's cursor, read at one changelog position in cluster mode.
    fn cursors(&self, plugin: &str, partitions: u32) -> Result<Vec<Cursor>, LogError>;
    /// A committed state value and its version (as of the last compaction: pending deltas
    /// are the caller's to know, see the state cache).
    fn state(&self, plugin: &str, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, LogError>;
    /// Every committed state entry after folding pending deltas: (key, value, version).
    fn state_entries(&self, plugin: &str) -> Result<Vec<(Vec<u8>, Vec<u8>, u64)>, LogError>;
    /// Folds pending state deltas into per-key entries; returns the sequence below which
    /// every delta is folded, if any was.
    fn compact(&self, plugin: &str) -> Result<Option<u64>, LogError>;
    /// The next producer sequence of an output partition, as last committed.
    fn output_sequence(
        &self,
        plugin: &str,
        partition: u32,
        topic: &str,
        output_partition: u32,
    ) -> Result<u64, LogError>;
    /// Writes a batch's effects atomically. In cluster mode they are queued for the plugin's
    /// changelog and land with [`PluginStore::land`] (with whatever else was queued by then:
    /// one append for many commits); `None`: written already (a store of one node).
    fn commit(&self, plugin: &str, write: &CommitWrite<'_>) -> Result<Option<Landing>, LogError>;
    /// Cluster mode: waits until a queued commit landed in the changelog. Blocking.
    ///
    /// # Errors
    /// It did not land, or may not have: the hold is dropped, and every commit queued after
    /// it failed too.
    fn land(&self, landing: &Landing) -> Result<(), LogError>;
    /// Whether commits are queued to land later (cluster mode): memory then runs ahead of
    /// the store by the commits in flight.
    fn queues_commits(&self) -> bool;
    /// Deletes message ids that left the dedup window.
    fn forget_ids(&self, plugin: &str, keys: &[DedupKey]) -> Result<(), LogError>;
    /// A partition's oldest `limit` outbox entries, oldest first.
    fn outbox(
        &self,
        plugin: &str,
        partition: u32,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, LogError>;
    /// Deletes outbox entries once forwarded (one atomic write).
    fn forwarded(&self, plugin: &str, partition: u32, seqs: &[u64]) -> Result<(), LogError>;
    /// Outbox entries not yet forwarded, over all partitions.
    fn pending_outputs(&self, plugin: &str) -> Result<usize, LogError>;
    /// Writes log lines from sequence `first` on and deletes those below `keep_from`.
    fn append_log(
        &self,
        plugin: &str,
        first: u64,
        lines: &[String],
        keep_from: u64,
    ) -> Result<(), LogError>;
    /// The stored log lines, oldest first.
    fn log_lines(&self, plugin: &str) -> Result<Vec<String>, LogError>;

    /// A committed state value with the deltas not yet compacted folded in (what a node
    /// that does not run the plugin answers from).
    fn state_now(&self, plugin: &str, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, LogError>;

    /// Cluster mode: takes a plugin's store over for this node (reads everything other
    /// nodes committed, then fences them out). A store of one node has nothing to take.
    fn acquire(&self, plugin: &str) -> Result<(), LogError>;
    /// Cluster mode: stops writing a plugin's store.
    fn release(&self, plugin: &str);
    /// Cluster mode: whether this node still holds a plugin's store as of the changelog's
    /// end (one round trip); a node that finds another's entry after its own stops holding
    /// it. Always true on one node.
    fn confirm_held(&self, plugin: &str) -> Result<bool, LogError>;
    /// Cluster mode: whether this node may write a plugin's store (it acquired it and no
    /// write was refused or left uncertain since).
    fn held(&self, plugin: &str) -> bool;
}

/// Encodes output groups as an outbox entry: per group its topic, partition, base sequence
/// and records in the weir output encoding. Records are written straight from their parts, so
/// a plugin's outputs cross from its blob into the entry with one copy.
pub fn encode_groups<'a>(groups: impl ExactSizeIterator<Item = GroupRef<'a>>) -> Vec<u8> {
    codec::encode_groups(groups)
}

/// A group about to be committed, borrowing the plugin's output blob.
pub struct GroupRef<'a> {
    /// Output topic.
    pub topic: &'a str,
    /// Output partition.
    pub partition: u32,
    /// Producer sequence of its first record.
    pub base_seq: u64,
    /// The records as the plugin emitted them.
    pub records: &'a [weir_codec::OutRecord<'a>],
}

/// Reads an outbox entry back; records are slices of `entry`.
pub fn decode_groups(entry: &Bytes) -> Option<Vec<Group>> {
    codec::decode_groups(entry)
}
