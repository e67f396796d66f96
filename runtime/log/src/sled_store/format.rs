//! The data directory's format marker (sled tree `meta`, key `format`) and what opening each
//! version takes, ending with the key-value namespaces open in redb.

use std::fs::File;
use std::path::Path;

use super::kv;
use super::redb_kv::{self, RedbKv};
use crate::LogError;

pub(super) const FORMAT_KEY: &[u8] = b"format";
/// The layout version this weir writes. Versions 1 (weir before producer ownership and
/// expiry), 2 (chunks inside sled) and 3 (key-value namespaces in sled) are migrated at open;
/// a later version is refused: this weir would misread it.
pub const FORMAT_VERSION: u32 = 4;
const FORMAT_PREFIX: &str = "weir-log/";

/// What a data directory's format marker says.
fn format_version(marker: &[u8]) -> Option<u32> {
    std::str::from_utf8(marker)
        .ok()?
        .strip_prefix(FORMAT_PREFIX)?
        .parse()
        .ok()
}

/// Checks the format marker of the store `db` in `dir`, moves an older store on to this
/// weir's format and opens its key-value namespaces (`cache_bytes` of cache).
///
/// Version 1 values all read as they are: producer records without an owner (usable by
/// anyone), cursors without counters (0), group offsets without a commit time (counted from
/// now) and producer states without an append time. Version 1 and 2 chunks stay in sled (`c`
/// keys) and are read there until retention removes them; new appends go to segment files.
/// Version 3's key-value namespaces move to redb (`kv.rs`). In that order: `kv.redb` is
/// created (its directory entry synced), then the marker moves on, synced, so that an older
/// weir — which would see neither the records in segment files nor the namespaces in redb —
/// refuses the directory even if the move is cut short; then the namespaces move. So a
/// weir-log/4 directory always had its `kv.redb`, and one without it is refused rather than
/// opened with every plugin's state gone.
///
/// # Errors
/// [`LogError::ForeignDirectory`] for a store of a newer weir, an unknown marker, a sled
/// database without one, or a weir-log/4 directory whose `kv.redb` is missing.
pub(super) fn open_kv(
    dir: &Path,
    db: &sled::Db,
    meta: &sled::Tree,
    cache_bytes: u64,
) -> Result<RedbKv, LogError> {
    let current = format!("{FORMAT_PREFIX}{FORMAT_VERSION}");
    let refuse = |reason: String| LogError::ForeignDirectory {
        path: dir.to_path_buf(),
        reason,
    };
    let from = match meta.get(FORMAT_KEY)? {
        Some(v) => match format_version(&v) {
            Some(FORMAT_VERSION) => None,
            Some(old @ 1..=3) => Some(Some(old)),
            Some(newer) if newer > FORMAT_VERSION => {
                return Err(refuse(format!(
                    "it was written by a newer weir (format weir-log/{newer}; this weir reads \
                     weir-log/1 to {current}): run that weir, or a newer one"
                )))
            }
            _ => {
                return Err(refuse(format!(
                    "format marker {:?}, this weir reads weir-log/1 to {current}",
                    String::from_utf8_lossy(&v),
                )))
            }
        },
        None if db.tree_names().len() > 2 || !db.is_empty() => {
            return Err(refuse(
                "a sled database without weir's format marker".into(),
            ))
        }
        None => Some(None),
    };
    if from.is_none() && !dir.join(redb_kv::FILE).exists() && !kv::has_sled_namespaces(db) {
        return Err(refuse(format!(
            "its key-value file {} (the plugins' state) is missing; restore it with the rest \
             of the directory, or start on an empty --data-dir",
            redb_kv::FILE
        )));
    }
    if from.is_some() {
        // Before the marker says weir-log/4 nothing was moved into `kv.redb` yet: a file left
        // by an open that was killed part-way (even inside redb's creation, which can leave
        // a zeroed file redb would refuse for good) is replaced.
        match std::fs::remove_file(dir.join(redb_kv::FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LogError::Io {
                    path: dir.join(redb_kv::FILE),
                    source: e,
                })
            }
            _ => {}
        }
    }
    let kv = RedbKv::open(dir, cache_bytes)?;
    if let Some(old) = from {
        // The new file's directory entry is durable before the marker says it exists.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| LogError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        meta.insert(FORMAT_KEY, current.as_bytes())?;
        db.flush()?;
        let data_path = dir.join("db");
        File::open(&data_path)
            .and_then(|f| f.sync_data())
            .map_err(|source| LogError::Io {
                path: data_path,
                source,
            })?;
        if let Some(old) = old {
            tracing::info!(message = "Store migrated.", from = %format!("{FORMAT_PREFIX}{old}"), to = %current, dir = %dir.display());
        }
    }
    kv::move_namespaces(db, &kv)?;
    Ok(kv)
}
