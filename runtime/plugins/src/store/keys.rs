//! The plugin store's key layout — the only place that names a plugin key.
//!
//! Registry namespace `plugins`: name → JSON spec. Each plugin's namespace `plugin/<name>`:
//! - `c/<p>/` → the partition's `Cursor`
//! - `l/<seq>` → a batch's state delta, until compaction folds it into
//! - `s/<key>` → version + value
//! - `d/<p>/<seq>` → a commit's message ids
//! - `o/<p>/<seq>` → a commit's outbox entry (output groups with producer sequences)
//! - `q/<p>/<topic>\0<out partition>` → the next producer sequence of an output partition
//! - `g/<seq>` → a log line
//!
//! `<p>` is a u32 BE, `<seq>` a u64 BE, so scans return entries in order.

pub(super) const REGISTRY: &str = "plugins";

pub(super) fn namespace(plugin: &str) -> String {
    format!("plugin/{plugin}")
}

/// `<tag>/<partition BE>/<suffix>`.
pub(super) fn partition_key(tag: u8, partition: u32, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + suffix.len());
    k.push(tag);
    k.push(b'/');
    k.extend_from_slice(&partition.to_be_bytes());
    k.push(b'/');
    k.extend_from_slice(suffix);
    k
}

pub(super) fn seq_key(tag: &[u8], seq: u64) -> Vec<u8> {
    let mut k = tag.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn key_seq(key: &[u8], prefix_len: usize) -> Option<u64> {
    key.get(prefix_len..prefix_len + 8)?
        .try_into()
        .ok()
        .map(u64::from_be_bytes)
}

pub(super) fn state_key(key: &[u8]) -> Vec<u8> {
    let mut k = b"s/".to_vec();
    k.extend_from_slice(key);
    k
}

pub(super) fn sequence_key(partition: u32, topic: &str, output_partition: u32) -> Vec<u8> {
    let mut suffix = topic.as_bytes().to_vec();
    suffix.push(0);
    suffix.extend_from_slice(&output_partition.to_be_bytes());
    partition_key(b'q', partition, &suffix)
}
