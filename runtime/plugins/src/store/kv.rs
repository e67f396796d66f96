//! [`PluginStore`] on a key-value store (the layout is in `keys.rs`): a node's sled, or in
//! cluster mode the replicated namespaces of [`ReplicatedKv`].

use std::collections::BTreeMap;
use std::sync::Arc;

use weir_log::{KvStore, LogError, ReplicatedKv};

use super::codec::{
    decode_delta, decode_ids, decode_state, encode_delta, encode_ids, encode_state, Cursor,
};
use super::keys::{key_seq, namespace, partition_key, seq_key, sequence_key, state_key, REGISTRY};
use super::replicated;
use super::{decode_groups, CommitWrite, DedupKey, Loaded, OutboxEntry, PluginStore};
use crate::spec::PluginSpec;

/// A partition's cursor as stored in `kv` (a new partition's is the default).
fn cursor_in(kv: &dyn KvStore, plugin: &str, partition: u32) -> Result<Cursor, LogError> {
    match kv.kv_get(&namespace(plugin), &partition_key(b'c', partition, b""))? {
        Some(v) => Cursor::decode(&v).ok_or_else(|| {
            malformed(
                format!("cursor of partition {partition} of plugin {plugin}"),
                "not 16 or 40 bytes",
            )
        }),
        None => Ok(Cursor::default()),
    }
}

fn malformed(what: String, reason: &str) -> LogError {
    LogError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// Committed state of a plugin's namespace with its pending deltas folded in, for keys
/// starting with `prefix`.
fn fold(
    kv: &dyn KvStore,
    ns: &str,
    prefix: &[u8],
) -> Result<BTreeMap<Vec<u8>, (Vec<u8>, u64)>, LogError> {
    let mut out: BTreeMap<Vec<u8>, (Vec<u8>, u64)> = kv
        .kv_scan(ns, &state_key(prefix))?
        .into_iter()
        .filter_map(|(k, v)| decode_state(&v).map(|s| (k[2..].to_vec(), s)))
        .collect();
    for (key, value) in kv.kv_scan(ns, b"l/")? {
        let writes = decode_delta(&value).ok_or_else(|| {
            malformed(
                format!("state delta {}", String::from_utf8_lossy(&key)),
                "truncated or not a delta",
            )
        })?;
        for (k, v) in writes {
            if !k.starts_with(prefix) {
                continue;
            }
            match v {
                Some(v) => out.insert(k, v),
                None => out.remove(&k),
            };
        }
    }
    Ok(out)
}

/// The plugin store on a [`KvStore`].
pub struct KvPluginStore {
    kv: Arc<dyn KvStore>,
    /// Cluster mode: `kv` is this, and a plugin's namespace is acquired before it is written.
    replicated: Option<Arc<ReplicatedKv>>,
    /// One compaction at a time: two that overlap a commit could write an older `s/<key>`
    /// over a newer one.
    compacting: parking_lot::Mutex<()>,
}

impl KvPluginStore {
    /// A store over `kv`.
    pub fn new(kv: Arc<dyn KvStore>) -> Self {
        KvPluginStore {
            kv,
            replicated: None,
            compacting: parking_lot::Mutex::new(()),
        }
    }

    /// Cluster mode: the store on changelogs shared by every node (the registry shared, each
    /// plugin's namespace owned by the node running it).
    pub fn replicated(kv: Arc<ReplicatedKv>) -> Self {
        KvPluginStore {
            kv: kv.clone(),
            replicated: Some(kv),
            compacting: parking_lot::Mutex::new(()),
        }
    }

    /// The namespaces a node must acquire before writing them ([`ReplicatedKv::new`]).
    pub const OWNED_PREFIX: &'static str = "plugin/";

    /// Committed state after folding the pending deltas, without writing anything.
    fn folded(
        &self,
        plugin: &str,
        prefix: &[u8],
    ) -> Result<BTreeMap<Vec<u8>, (Vec<u8>, u64)>, LogError> {
        // No compaction between the two scans (it would move deltas from one to the other):
        // this node's under the lock; another node's, in a replicated store, by reading the
        // cache at one changelog position.
        let _one = self.compacting.lock();
        let ns = namespace(plugin);
        match &self.replicated {
            Some(r) => r.read_at_once(&ns, |kv| fold(kv, &ns, prefix)),
            None => fold(&*self.kv, &ns, prefix),
        }
    }

    /// Drops whatever the namespace of `plugin` holds and writes the partitions' starting
    /// cursors.
    pub(super) fn reset(&self, plugin: &str, cursors: &[Cursor]) -> Result<(), LogError> {
        let ns = namespace(plugin);
        self.kv.kv_drop(&ns)?;
        let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = cursors
            .iter()
            .enumerate()
            .map(|(p, c)| (partition_key(b'c', p as u32, b""), Some(c.encode())))
            .collect();
        self.kv.kv_apply(&ns, &writes)
    }
}

impl PluginStore for KvPluginStore {
    fn specs(&self) -> Result<Vec<PluginSpec>, LogError> {
        self.kv
            .kv_scan(REGISTRY, b"")?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v).map_err(|e| LogError::Malformed {
                    what: format!("spec of plugin {}", String::from_utf8_lossy(&k)),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    fn put_spec(&self, spec: &PluginSpec) -> Result<(), LogError> {
        let json = serde_json::to_vec(spec).expect("spec serialises");
        self.kv
            .kv_apply(REGISTRY, &[(spec.name.as_bytes().to_vec(), Some(json))])
    }

    fn replace_spec(&self, spec: &PluginSpec, previous: &PluginSpec) -> Result<(), LogError> {
        match &self.replicated {
            Some(r) => replicated::replace_spec(r, spec, previous),
            None => self.put_spec(spec),
        }
    }

    fn create(&self, spec: &PluginSpec, cursors: &[Cursor]) -> Result<(), LogError> {
        if let Some(r) = &self.replicated {
            return replicated::create(self, r, spec, cursors);
        }
        self.reset(&spec.name, cursors)?;
        self.put_spec(spec)
    }

    fn remove(&self, plugin: &str) -> Result<(), LogError> {
        // The spec first: a crash half-way leaves an orphan namespace (dropped by the next
        // deploy of the name), never a plugin without its state.
        self.kv
            .kv_apply(REGISTRY, &[(plugin.as_bytes().to_vec(), None)])?;
        match &self.replicated {
            Some(r) => replicated::drop_removed(r, plugin),
            None => self.kv.kv_drop(&namespace(plugin)),
        }
    }

    fn sync(&self) -> Result<(), LogError> {
        self.kv.sync()
    }

    fn load(&self, plugin: &str, partitions: u32) -> Result<Loaded, LogError> {
        let ns = namespace(plugin);
        let mut loaded = Loaded {
            cursors: self.cursors(plugin, partitions)?,
            ..Loaded::default()
        };
        for (key, value) in self.kv.kv_scan(&ns, b"d/")? {
            let partition = key
                .get(2..6)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes);
            let (Some(partition), Some(seq), Some((newest, ids))) =
                (partition, key_seq(&key, 7), decode_ids(&value))
            else {
                continue; // an unreadable id set only weakens dedup for ids long gone
            };
            loaded.dedup.push(((partition, seq), newest, ids));
        }
        loaded.next_delta = self
            .kv
            .kv_scan(&ns, b"l/")?
            .last()
            .and_then(|(k, _)| key_seq(k, 2))
            .map_or(0, |s| s + 1);
        let lines = self.kv.kv_scan(&ns, b"g/")?;
        let first = lines.first().and_then(|(k, _)| key_seq(k, 2)).unwrap_or(0);
        let next = lines
            .last()
            .and_then(|(k, _)| key_seq(k, 2))
            .map_or(0, |s| s + 1);
        loaded.log_range = (first, next);
        Ok(loaded)
    }

    fn cursor(&self, plugin: &str, partition: u32) -> Result<Cursor, LogError> {
        cursor_in(&*self.kv, plugin, partition)
    }

    fn cursors(&self, plugin: &str, partitions: u32) -> Result<Vec<Cursor>, LogError> {
        let read = |kv: &dyn KvStore| {
            (0..partitions)
                .map(|p| cursor_in(kv, plugin, p))
                .collect::<Result<Vec<_>, _>>()
        };
        match &self.replicated {
            // One look at the changelog's tail for all partitions, not one each.
            Some(r) => r.read_at_once(&namespace(plugin), read),
            None => read(&*self.kv),
        }
    }

    fn state(&self, plugin: &str, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, LogError> {
        match self.kv.kv_get(&namespace(plugin), &state_key(key))? {
            None => Ok(None),
            Some(v) => decode_state(&v).map(Some).ok_or_else(|| {
                malformed(
                    format!("state value of key {}", String::from_utf8_lossy(key)),
                    "shorter than its version",
                )
            }),
        }
    }

    fn state_entries(&self, plugin: &str) -> Result<Vec<(Vec<u8>, Vec<u8>, u64)>, LogError> {
        // Folded in memory, not compacted: a node not running the plugin may not write it.
        Ok(self
            .folded(plugin, b"")?
            .into_iter()
            .map(|(k, (v, version))| (k, v, version))
            .collect())
    }

    fn state_now(&self, plugin: &str, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, LogError> {
        Ok(self.folded(plugin, key)?.remove(key))
    }

    fn acquire(&self, plugin: &str) -> Result<(), LogError> {
        match &self.replicated {
            Some(r) => r.acquire(&namespace(plugin)),
            None => Ok(()),
        }
    }

    fn release(&self, plugin: &str) {
        if let Some(r) = &self.replicated {
            r.release(&namespace(plugin));
        }
    }

    fn confirm_held(&self, plugin: &str) -> Result<bool, LogError> {
        match &self.replicated {
            Some(r) => r.confirm_held(&namespace(plugin)),
            None => Ok(true),
        }
    }

    fn held(&self, plugin: &str) -> bool {
        self.replicated
            .as_ref()
            .is_none_or(|r| r.held(&namespace(plugin)))
    }

    fn compact(&self, plugin: &str) -> Result<Option<u64>, LogError> {
        let _one = self.compacting.lock();
        let ns = namespace(plugin);
        let deltas = self.kv.kv_scan(&ns, b"l/")?;
        let Some(last) = deltas.last().and_then(|(k, _)| key_seq(k, 2)) else {
            return Ok(None);
        };
        let mut latest: BTreeMap<Vec<u8>, Option<(Vec<u8>, u64)>> = BTreeMap::new();
        for (key, value) in &deltas {
            let writes = decode_delta(value).ok_or_else(|| {
                malformed(
                    format!("state delta {}", String::from_utf8_lossy(key)),
                    "truncated or not a delta",
                )
            })?;
            latest.extend(writes);
        }
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = latest
            .into_iter()
            .map(|(k, v)| {
                (
                    state_key(&k),
                    v.map(|(v, version)| encode_state(&v, version)),
                )
            })
            .collect();
        writes.extend(deltas.iter().map(|(k, _)| (k.to_vec(), None)));
        self.kv.kv_apply(&ns, &writes)?;
        Ok(Some(last + 1))
    }

    fn output_sequence(
        &self,
        plugin: &str,
        partition: u32,
        topic: &str,
        output_partition: u32,
    ) -> Result<u64, LogError> {
        Ok(self
            .kv
            .kv_get(
                &namespace(plugin),
                &sequence_key(partition, topic, output_partition),
            )?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    fn commit(&self, plugin: &str, w: &CommitWrite<'_>) -> Result<(), LogError> {
        let seq = w.cursor.seq - 1;
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        if let Some((delta_seq, delta)) = w.delta {
            writes.push((seq_key(b"l/", delta_seq), Some(encode_delta(delta))));
        }
        if let Some((newest, ids)) = w.ids {
            writes.push((
                partition_key(b'd', w.partition, &seq.to_be_bytes()),
                Some(encode_ids(newest, ids)),
            ));
        }
        for ((topic, p), next) in w.sequences {
            writes.push((
                sequence_key(w.partition, topic, *p),
                Some(next.to_be_bytes().to_vec()),
            ));
        }
        if let Some(entry) = &w.outbox {
            writes.push((
                partition_key(b'o', w.partition, &seq.to_be_bytes()),
                Some(entry.clone()),
            ));
        }
        writes.push((
            partition_key(b'c', w.partition, b""),
            Some(w.cursor.encode()),
        ));
        self.kv.kv_apply(&namespace(plugin), &writes)
    }

    fn forget_ids(&self, plugin: &str, keys: &[DedupKey]) -> Result<(), LogError> {
        let deletes: Vec<(Vec<u8>, Option<Vec<u8>>)> = keys
            .iter()
            .map(|(p, seq)| (partition_key(b'd', *p, &seq.to_be_bytes()), None))
            .collect();
        self.kv.kv_apply(&namespace(plugin), &deletes)
    }

    fn outbox(
        &self,
        plugin: &str,
        partition: u32,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, LogError> {
        let prefix = partition_key(b'o', partition, b"");
        Ok(self
            .kv
            .kv_scan_first(&namespace(plugin), &prefix, limit)?
            .into_iter()
            .map(|(k, v)| OutboxEntry {
                seq: key_seq(&k, prefix.len()).unwrap_or(u64::MAX),
                groups: decode_groups(&v).ok_or_else(|| {
                    format!("outbox entry {} is unreadable", String::from_utf8_lossy(&k))
                }),
            })
            .collect())
    }

    fn forwarded(&self, plugin: &str, partition: u32, seqs: &[u64]) -> Result<(), LogError> {
        let deletes: Vec<_> = seqs
            .iter()
            .map(|seq| (partition_key(b'o', partition, &seq.to_be_bytes()), None))
            .collect();
        self.kv.kv_apply(&namespace(plugin), &deletes)
    }

    fn pending_outputs(&self, plugin: &str) -> Result<usize, LogError> {
        Ok(self.kv.kv_scan(&namespace(plugin), b"o/")?.len())
    }

    fn append_log(
        &self,
        plugin: &str,
        first: u64,
        lines: &[String],
        keep_from: u64,
    ) -> Result<(), LogError> {
        let ns = namespace(plugin);
        let stored_from = self
            .kv
            .kv_scan(&ns, b"g/")?
            .first()
            .and_then(|(k, _)| key_seq(k, 2))
            .unwrap_or(keep_from);
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (stored_from..keep_from)
            .map(|seq| (seq_key(b"g/", seq), None))
            .collect();
        for (i, line) in lines.iter().enumerate() {
            let seq = first + i as u64;
            if seq >= keep_from {
                writes.push((seq_key(b"g/", seq), Some(line.clone().into_bytes())));
            }
        }
        self.kv.kv_apply(&ns, &writes)
    }

    fn log_lines(&self, plugin: &str) -> Result<Vec<String>, LogError> {
        Ok(self
            .kv
            .kv_scan(&namespace(plugin), b"g/")?
            .into_iter()
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
            .collect())
    }
}
