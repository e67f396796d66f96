//! [`PluginStore`] on a key-value store (the layout is in `keys.rs`): a node's sled
//! ([`Local`]), or in cluster mode the replicated namespaces (`replicated::Shared`, a type of
//! its own: what differs — spec changes, creation, removal, reads at one position, holding a
//! plugin — is behind [`Namespaces`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use weir_log::{KvStore, Landing, LogError};

use super::codec::{decode_ids, decode_state, encode_delta, encode_ids, Cursor};
use super::deltas::{compaction, cursor_in, fold, malformed};
use super::keys::{key_seq, namespace, partition_key, seq_key, sequence_key, state_key, REGISTRY};
use super::{decode_groups, CommitWrite, DedupKey, Loaded, OutboxEntry, PluginStore};
use crate::spec::PluginSpec;

/// Where a plugin store's namespaces live, and what differs between one node's store and the
/// cluster's: a plugin's namespace is written only by the node holding it there, and several
/// nodes change the registry.
pub trait Namespaces: Send + Sync + Sized + 'static {
    /// The key-value store everything is kept in.
    fn kv(&self) -> &dyn KvStore;
    /// `read` over namespace `ns` as of one moment (one changelog position in the cluster).
    fn read_at_once<T>(
        &self,
        ns: &str,
        read: impl FnOnce(&dyn KvStore) -> Result<T, LogError>,
    ) -> Result<T, LogError>;
    /// [`PluginStore::replace_spec`].
    fn replace_spec(
        store: &KvPluginStore<Self>,
        spec: &PluginSpec,
        previous: &PluginSpec,
    ) -> Result<(), LogError>;
    /// [`PluginStore::create`].
    fn create(
        store: &KvPluginStore<Self>,
        spec: &PluginSpec,
        cursors: &[Cursor],
    ) -> Result<(), LogError>;
    /// Drops a removed plugin's namespace (its spec is already deleted).
    fn drop_removed(&self, plugin: &str) -> Result<(), LogError>;
    /// [`PluginStore::acquire`].
    fn acquire(&self, plugin: &str) -> Result<(), LogError>;
    /// [`PluginStore::release`].
    fn release(&self, plugin: &str);
    /// [`PluginStore::confirm_held`].
    fn confirm_held(&self, plugin: &str) -> Result<bool, LogError>;
    /// [`PluginStore::held`].
    fn held(&self, plugin: &str) -> bool;
    /// After a compaction: whatever else keeps a plugin's namespace small (the cluster's
    /// changelog snapshot, taken here rather than inside a commit).
    fn after_compaction(&self, plugin: &str) -> Result<(), LogError>;
    /// [`PluginStore::commit`]'s writes to namespace `ns`: made, or queued for the changelog.
    fn commit_writes(&self, ns: &str, writes: Writes) -> Result<Option<Landing>, LogError>;
    /// [`PluginStore::land`].
    fn land(&self, landing: &Landing) -> Result<(), LogError>;
    /// [`PluginStore::queues_commits`].
    fn queues_commits(&self) -> bool;
}

/// Keys written (`Some`) and deleted (`None`), applied together.
pub(super) type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// One node's own store: nothing is shared, everything is held.
pub struct Local(Arc<dyn KvStore>);

impl Namespaces for Local {
    fn kv(&self) -> &dyn KvStore {
        &*self.0
    }

    fn read_at_once<T>(
        &self,
        _ns: &str,
        read: impl FnOnce(&dyn KvStore) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        read(&*self.0)
    }

    fn replace_spec(
        store: &KvPluginStore<Self>,
        spec: &PluginSpec,
        _previous: &PluginSpec,
    ) -> Result<(), LogError> {
        store.put_spec(spec)
    }

    fn create(
        store: &KvPluginStore<Self>,
        spec: &PluginSpec,
        cursors: &[Cursor],
    ) -> Result<(), LogError> {
        store.reset(&spec.name, cursors)?;
        store.put_spec(spec)
    }

    fn drop_removed(&self, plugin: &str) -> Result<(), LogError> {
        self.0.kv_drop(&namespace(plugin))
    }

    fn acquire(&self, _plugin: &str) -> Result<(), LogError> {
        Ok(())
    }

    fn release(&self, _plugin: &str) {}

    fn confirm_held(&self, _plugin: &str) -> Result<bool, LogError> {
        Ok(true)
    }

    fn held(&self, _plugin: &str) -> bool {
        true
    }

    fn after_compaction(&self, _plugin: &str) -> Result<(), LogError> {
        Ok(())
    }

    fn commit_writes(&self, ns: &str, writes: Writes) -> Result<Option<Landing>, LogError> {
        self.0.kv_apply(ns, &writes).map(|()| None)
    }

    fn land(&self, _landing: &Landing) -> Result<(), LogError> {
        Ok(())
    }

    fn queues_commits(&self) -> bool {
        false
    }
}

/// The plugin store on a [`KvStore`]: one node's ([`KvPluginStore::new`]) or the cluster's
/// (`KvPluginStore::replicated`, [`ReplicatedPluginStore`](super::ReplicatedPluginStore)).
pub struct KvPluginStore<N: Namespaces = Local> {
    pub(super) namespaces: N,
    /// One compaction at a time: two that overlap a commit could write an older `s/<key>`
    /// over a newer one.
    compacting: parking_lot::Mutex<()>,
}

impl KvPluginStore<Local> {
    /// A store over one node's `kv`.
    pub fn new(kv: Arc<dyn KvStore>) -> Self {
        KvPluginStore::on(Local(kv))
    }
}

impl<N: Namespaces> KvPluginStore<N> {
    pub(super) fn on(namespaces: N) -> Self {
        KvPluginStore {
            namespaces,
            compacting: parking_lot::Mutex::new(()),
        }
    }

    fn kv(&self) -> &dyn KvStore {
        self.namespaces.kv()
    }

    /// Folds the pending state deltas into per-key entries ([`PluginStore::compact`]).
    fn fold_deltas(&self, plugin: &str) -> Result<Option<u64>, LogError> {
        let _one = self.compacting.lock();
        let ns = namespace(plugin);
        let deltas = self.kv().kv_scan(&ns, b"l/")?;
        let Some((writes, below)) = compaction(&deltas)? else {
            return Ok(None);
        };
        self.kv().kv_apply(&ns, &writes)?;
        Ok(Some(below))
    }

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
        self.namespaces
            .read_at_once(&ns, |kv| fold(kv, &ns, prefix))
    }

    /// Drops whatever the namespace of `plugin` holds and writes the partitions' starting
    /// cursors.
    pub(super) fn reset(&self, plugin: &str, cursors: &[Cursor]) -> Result<(), LogError> {
        let ns = namespace(plugin);
        self.kv().kv_drop(&ns)?;
        let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = cursors
            .iter()
            .enumerate()
            .map(|(p, c)| (partition_key(b'c', p as u32, b""), Some(c.encode())))
            .collect();
        self.kv().kv_apply(&ns, &writes)
    }
}

impl<N: Namespaces> PluginStore for KvPluginStore<N> {
    fn specs(&self) -> Result<Vec<PluginSpec>, LogError> {
        self.kv()
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
        self.kv()
            .kv_apply(REGISTRY, &[(spec.name.as_bytes().to_vec(), Some(json))])
    }

    fn replace_spec(&self, spec: &PluginSpec, previous: &PluginSpec) -> Result<(), LogError> {
        N::replace_spec(self, spec, previous)
    }

    fn create(&self, spec: &PluginSpec, cursors: &[Cursor]) -> Result<(), LogError> {
        N::create(self, spec, cursors)
    }

    fn remove(&self, plugin: &str) -> Result<(), LogError> {
        // The spec first: a crash half-way leaves an orphan namespace (dropped by the next
        // deploy of the name), never a plugin without its state.
        self.kv()
            .kv_apply(REGISTRY, &[(plugin.as_bytes().to_vec(), None)])?;
        self.namespaces.drop_removed(plugin)
    }

    fn sync(&self) -> Result<(), LogError> {
        self.kv().sync()
    }

    fn load(&self, plugin: &str, partitions: u32) -> Result<Loaded, LogError> {
        let ns = namespace(plugin);
        let mut loaded = Loaded {
            cursors: self.cursors(plugin, partitions)?,
            ..Loaded::default()
        };
        for (key, value) in self.kv().kv_scan(&ns, b"d/")? {
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
            .kv()
            .kv_scan(&ns, b"l/")?
            .last()
            .and_then(|(k, _)| key_seq(k, 2))
            .map_or(0, |s| s + 1);
        let lines = self.kv().kv_scan(&ns, b"g/")?;
        let first = lines.first().and_then(|(k, _)| key_seq(k, 2)).unwrap_or(0);
        let next = lines
            .last()
            .and_then(|(k, _)| key_seq(k, 2))
            .map_or(0, |s| s + 1);
        loaded.log_range = (first, next);
        Ok(loaded)
    }

    fn cursor(&self, plugin: &str, partition: u32) -> Result<Cursor, LogError> {
        cursor_in(self.kv(), plugin, partition)
    }

    fn cursors(&self, plugin: &str, partitions: u32) -> Result<Vec<Cursor>, LogError> {
        let read = |kv: &dyn KvStore| {
            (0..partitions)
                .map(|p| cursor_in(kv, plugin, p))
                .collect::<Result<Vec<_>, _>>()
        };
        // In the cluster, one look at the changelog's tail for all partitions, not one each.
        self.namespaces.read_at_once(&namespace(plugin), read)
    }

    fn state(&self, plugin: &str, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, LogError> {
        match self.kv().kv_get(&namespace(plugin), &state_key(key))? {
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
        self.namespaces.acquire(plugin)
    }

    fn release(&self, plugin: &str) {
        self.namespaces.release(plugin)
    }

    fn confirm_held(&self, plugin: &str) -> Result<bool, LogError> {
        self.namespaces.confirm_held(plugin)
    }

    fn held(&self, plugin: &str) -> bool {
        self.namespaces.held(plugin)
    }

    fn compact(&self, plugin: &str) -> Result<Option<u64>, LogError> {
        let folded = self.fold_deltas(plugin);
        // Whether or not the fold landed (a fold failing for good must not stop the
        // snapshots too); a refused snapshot means the hold is lost, which the next commit
        // finds.
        if let Err(e) = self.namespaces.after_compaction(plugin) {
            tracing::warn!(message = "A changelog snapshot failed; the changelog keeps growing until the next one.", plugin = %plugin, error = %e);
        }
        folded
    }

    fn output_sequence(
        &self,
        plugin: &str,
        partition: u32,
        topic: &str,
        output_partition: u32,
    ) -> Result<u64, LogError> {
        Ok(self
            .kv()
            .kv_get(
                &namespace(plugin),
                &sequence_key(partition, topic, output_partition),
            )?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    fn commit(&self, plugin: &str, w: &CommitWrite<'_>) -> Result<Option<Landing>, LogError> {
        let seq = w.cursor.seq - 1;
        let mut writes: Writes = Vec::new();
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
        self.namespaces.commit_writes(&namespace(plugin), writes)
    }

    fn land(&self, landing: &Landing) -> Result<(), LogError> {
        self.namespaces.land(landing)
    }

    fn forget_ids(&self, plugin: &str, keys: &[DedupKey]) -> Result<(), LogError> {
        let deletes: Vec<(Vec<u8>, Option<Vec<u8>>)> = keys
            .iter()
            .map(|(p, seq)| (partition_key(b'd', *p, &seq.to_be_bytes()), None))
            .collect();
        // In cluster mode queued, not landed: the deletes ride with the next group (a commit
        // waiting here for its own round trip would hold the plugin's commit lock across it).
        // If that group fails they are lost, which the next open's expiry makes good.
        self.namespaces
            .commit_writes(&namespace(plugin), deletes)
            .map(|_| ())
    }

    fn queues_commits(&self) -> bool {
        self.namespaces.queues_commits()
    }

    fn outbox(
        &self,
        plugin: &str,
        partition: u32,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, LogError> {
        let prefix = partition_key(b'o', partition, b"");
        Ok(self
            .kv()
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
        self.kv().kv_apply(&namespace(plugin), &deletes)
    }

    fn pending_outputs(&self, plugin: &str) -> Result<usize, LogError> {
        Ok(self.kv().kv_scan(&namespace(plugin), b"o/")?.len())
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
            .kv()
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
        self.kv().kv_apply(&ns, &writes)
    }

    fn log_lines(&self, plugin: &str) -> Result<Vec<String>, LogError> {
        Ok(self
            .kv()
            .kv_scan(&namespace(plugin), b"g/")?
            .into_iter()
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
            .collect())
    }
}
