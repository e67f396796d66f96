//! A plugin's state deltas (one value per batch, `l/<seq>`): folded over the per-key entries
//! for reads, and into them by compaction; and the cursor and error helpers the store's
//! reads share.

use std::collections::BTreeMap;

use bytes::Bytes;
use weir_log::{KvStore, LogError};

use super::codec::{decode_delta, decode_state, encode_state, Cursor};
use super::keys::{key_seq, namespace, partition_key, state_key};

/// A partition's cursor as stored in `kv` (a new partition's is the default).
pub(super) fn cursor_in(
    kv: &dyn KvStore,
    plugin: &str,
    partition: u32,
) -> Result<Cursor, LogError> {
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

pub(super) fn malformed(what: String, reason: &str) -> LogError {
    LogError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// Committed state of a plugin's namespace with its pending deltas folded in, for keys
/// starting with `prefix`.
pub(super) fn fold(
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

/// The writes that fold `deltas` (the namespace's `l/` entries, in order) into per-key
/// entries and delete them, and the delta sequence below which everything is folded; `None`
/// when there is no delta.
pub(super) fn compaction(
    deltas: &[(Bytes, Bytes)],
) -> Result<Option<(Vec<(Vec<u8>, Option<Vec<u8>>)>, u64)>, LogError> {
    let Some(last) = deltas.last().and_then(|(k, _)| key_seq(k, 2)) else {
        return Ok(None);
    };
    let mut latest: BTreeMap<Vec<u8>, Option<(Vec<u8>, u64)>> = BTreeMap::new();
    for (key, value) in deltas {
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
    Ok(Some((writes, last + 1)))
}
