//! `weir migrate`: moves a single node's data directory into a cluster's JetStream — topics
//! with every stored record at its offset, idempotent producers' sequence states and records,
//! consumer groups' offsets, plugins with their wasm, state, message ids, cursors and pending
//! outputs. Run it with the node stopped, into a cluster that has none of its topics or
//! plugins yet; then start `weir serve --log ...` nodes and they carry on where the single node
//! stopped (a plugin's outbox is forwarded with the same producer sequences, which the migrated
//! producer states recognise).
//!
//! Blocking: the caller runs it off the async workers.

use std::path::Path;
use std::sync::Arc;

use weir_core::TopicPartition;
use weir_jetstream::{JetStreamLog, JetStreamOptions};
use weir_log::{codec, EncodedChunk, Log, LogError, MemoryStore, ReplicatedKv, SledStore};
use weir_plugins::{KvPluginStore, PluginStore};

use crate::server::ServerError;

/// What a migration moved.
#[derive(Debug, Default)]
pub struct Moved {
    /// Topics.
    pub topics: usize,
    /// Records (over all partitions).
    pub records: u64,
    /// Producer records.
    pub producers: usize,
    /// (group, topic) offsets.
    pub groups: usize,
    /// Plugins, and the keys of their state.
    pub plugins: usize,
    /// Keys of plugins' namespaces.
    pub plugin_keys: usize,
    /// What could not be moved as it was, in words.
    pub warnings: Vec<String>,
}

/// Names as a list of quoted strings: `"a", "b"`.
fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Chunks and bytes per append (an atomic batch holds 1,000 messages of ≤ 512 KiB).
const CHUNKS_PER_APPEND: usize = 200;
const BYTES_PER_APPEND: usize = 32 << 20;

fn failed(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Migrate(format!("{what}: {e}"))
}

/// Moves `data_dir` into the cluster at `options`. See the module documentation.
///
/// # Errors
/// The directory is not a stopped weir store, the cluster is unreachable or already has one
/// of the topics or plugins, or a write failed (what was moved before stays; run again into
/// a fresh prefix after fixing the cause).
pub fn migrate(
    data_dir: &Path,
    options: JetStreamOptions,
    say: &mut dyn FnMut(&str),
) -> Result<Moved, ServerError> {
    let source = Arc::new(SledStore::open(data_dir, &Default::default()).map_err(|e| {
        failed(
            "cannot open the data directory (stop its weir serve first)",
            e,
        )
    })?);
    let target = Arc::new(JetStreamLog::connect(options)?);
    let kv = Arc::new(ReplicatedKv::new(
        Arc::new(MemoryStore::new()),
        target.clone(),
        KvPluginStore::OWNED_PREFIX,
    ));
    let plugins = KvPluginStore::new(source.clone()).specs()?;
    let cluster_plugins = KvPluginStore::replicated(kv.clone()).specs()?;
    let topics = source.load_topics()?;
    let existing = target.load_topics()?;
    // Every clash is named in one refusal, plugins too: a cluster holding this node's topics
    // usually holds its plugins as well, and an operator removing only the topics there would
    // otherwise learn of the plugins on the next try.
    let mut clashes = Vec::new();
    let taken_topics: Vec<&str> = topics
        .iter()
        .filter(|t| existing.iter().any(|e| e.name == t.name))
        .map(|t| t.name.as_str())
        .collect();
    if !taken_topics.is_empty() {
        clashes.push(format!(
            "the cluster already has {} {}",
            if taken_topics.len() == 1 {
                "a topic"
            } else {
                "topics"
            },
            quoted(&taken_topics)
        ));
    }
    let taken_plugins: Vec<&str> = plugins
        .iter()
        .filter(|p| cluster_plugins.iter().any(|c| c.name == p.name))
        .map(|p| p.name.as_str())
        .collect();
    if !taken_plugins.is_empty() {
        clashes.push(format!(
            "the cluster already has {} {}",
            if taken_plugins.len() == 1 {
                "a plugin"
            } else {
                "plugins"
            },
            quoted(&taken_plugins)
        ));
    }
    if !clashes.is_empty() {
        return Err(ServerError::Migrate(format!(
            "{}: migrate into a cluster without this node's topics and plugins (remove them there first, or use another --log-prefix); nothing was moved",
            clashes.join("; ")
        )));
    }
    let mut moved = Moved::default();

    let producers = source.load_producers()?;
    for (id, record) in &producers.producers {
        target.put_producer(*id, record, producers.next_id)?;
    }
    moved.producers = producers.producers.len();
    say(&format!("{} producer records", moved.producers));

    for topic in &topics {
        target.put_topic(topic)?;
        for p in 0..topic.partitions {
            let tp = TopicPartition::new(&topic.name, p);
            moved.records += move_partition(&source, &target, &tp, &mut moved.warnings)?;
        }
        moved.topics += 1;
        say(&format!(
            "topic {} ({} partitions)",
            topic.name, topic.partitions
        ));
    }
    say(&format!("{} records", moved.records));

    for g in source.list_groups()? {
        let offsets = source.group_offsets(&g.group, &g.topic)?;
        target.put_group_offsets(&g.group, &g.topic, &offsets, g.last_commit_ms)?;
        moved.groups += 1;
    }
    say(&format!("{} consumer-group offsets", moved.groups));

    for spec in &plugins {
        let path = data_dir
            .join("wasm")
            .join(format!("{}.wasm", spec.wasm_sha256));
        let wasm = std::fs::read(&path).map_err(|e| {
            failed(
                &format!("plugin {}: cannot read {}", spec.name, path.display()),
                e,
            )
        })?;
        kv.put_blob(&spec.wasm_sha256, &wasm)?;
        moved.plugin_keys += weir_plugins::store::copy_plugin(&*source, &kv, spec)?;
        moved.plugins += 1;
        say(&format!(
            "plugin {} (state, cursors, pending outputs)",
            spec.name
        ));
    }
    Ok(moved)
}

/// Appends a partition's chunks at their offsets; the producers' sequence states ride on the
/// last appends, one each. Returns the records moved.
fn move_partition(
    source: &SledStore,
    target: &JetStreamLog,
    tp: &TopicPartition,
    warnings: &mut Vec<String>,
) -> Result<u64, ServerError> {
    let recovered = source.recover_partition(tp)?;
    target.recover_partition(tp)?;
    if recovered.chunks.is_empty() {
        if recovered.start_offset > 0 {
            warnings.push(format!(
                "{tp} was emptied by retention at offset {}: on the cluster it starts again at 0",
                recovered.start_offset
            ));
        }
        return Ok(0);
    }
    let mut producers = recovered.producers.clone();
    if producers.len() > recovered.chunks.len() {
        warnings.push(format!(
            "{tp}: {} producers' sequence states for {} chunks; the oldest are not moved (a retry from those producers is refused as out of sequence)",
            producers.len(),
            recovered.chunks.len()
        ));
        producers.drain(..producers.len() - recovered.chunks.len());
    }
    let read = |base: u64| -> Result<EncodedChunk, ServerError> {
        let bytes = source
            .read_chunk(tp, base)?
            .ok_or_else(|| failed(&format!("{tp}"), format!("chunk {base} vanished")))?;
        let header = codec::read_header(&bytes).map_err(|source| LogError::Corrupt {
            tp: tp.clone(),
            base_offset: base,
            source,
        })?;
        Ok(EncodedChunk { header, bytes })
    };
    let (bulk, last) = recovered
        .chunks
        .split_at(recovered.chunks.len() - producers.len());
    let mut records = 0;
    let mut pending: Vec<EncodedChunk> = Vec::new();
    let (mut first, mut bytes) = (0, 0);
    for (i, (base, _)) in bulk.iter().enumerate() {
        let chunk = read(*base)?;
        if pending.is_empty() {
            first = *base;
        }
        bytes += chunk.bytes.len();
        records += u64::from(chunk.header.count);
        pending.push(chunk);
        if pending.len() == CHUNKS_PER_APPEND || bytes >= BYTES_PER_APPEND || i + 1 == bulk.len() {
            target.append(tp, first, &std::mem::take(&mut pending), &[])?;
            bytes = 0;
        }
    }
    for ((base, _), (id, state)) in last.iter().zip(&producers) {
        let chunk = read(*base)?;
        records += u64::from(chunk.header.count);
        target.append(tp, *base, &[chunk], &[(*id, &state[..])])?;
    }
    Ok(records)
}
