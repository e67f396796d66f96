//! One segment file ([`Segment`]: its length, where its chunks end in offsets, its
//! descriptor, opened while it takes writes or holds unsynced ones) and where a chunk is in
//! one ([`Loc`], the value of the chunk's index entry). `segments.rs` keeps them by partition.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::LogError;

/// Where a chunk lives: the value of its index entry in sled (32 bytes, big endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Loc {
    /// The base offset (name) of the segment holding it.
    pub segment: u64,
    /// Byte position in that segment.
    pub pos: u64,
    /// Encoded length.
    pub len: u32,
    /// Records in the chunk.
    pub count: u32,
    /// Newest record timestamp in the chunk.
    pub max_timestamp_ms: i64,
}

impl Loc {
    pub const ENCODED_LEN: usize = 32;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut v = [0u8; Self::ENCODED_LEN];
        v[..8].copy_from_slice(&self.segment.to_be_bytes());
        v[8..16].copy_from_slice(&self.pos.to_be_bytes());
        v[16..20].copy_from_slice(&self.len.to_be_bytes());
        v[20..24].copy_from_slice(&self.count.to_be_bytes());
        v[24..32].copy_from_slice(&self.max_timestamp_ms.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<Loc> {
        if v.len() != Self::ENCODED_LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().expect("4 bytes"));
        Some(Loc {
            segment: u64_at(0),
            pos: u64_at(8),
            len: u32_at(16),
            count: u32_at(20),
            max_timestamp_ms: u64_at(24) as i64,
        })
    }

    /// The byte just after the chunk.
    pub fn end(&self) -> u64 {
        self.pos + u64::from(self.len)
    }
}

/// One segment file.
pub(super) struct Segment {
    /// Offset of its first chunk (its name).
    pub(super) base: u64,
    pub(super) path: PathBuf,
    /// Open while it takes writes or holds unsynced ones.
    pub(super) file: Mutex<Option<Arc<File>>>,
    /// A newer segment took over: once synced, its descriptor is closed.
    pub(super) sealed: AtomicBool,
    /// Bytes written (the next write's position).
    pub(super) len: AtomicU64,
    /// The offset after its last chunk (where the next segment would begin).
    pub(super) next_offset: AtomicU64,
    /// Written since its last fdatasync.
    pub(super) dirty: AtomicBool,
    pub(super) opened: Instant,
}

impl Segment {
    pub(super) fn new(path: PathBuf, base: u64, len: u64) -> Segment {
        Segment {
            base,
            path,
            file: Mutex::new(None),
            sealed: AtomicBool::new(false),
            len: AtomicU64::new(len),
            next_offset: AtomicU64::new(base),
            dirty: AtomicBool::new(false),
            opened: Instant::now(),
        }
    }

    pub(super) fn io(&self, source: std::io::Error) -> LogError {
        LogError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// The descriptor writes and syncs use, opened if it was closed.
    pub(super) fn writer(&self) -> Result<Arc<File>, LogError> {
        let mut file = self.file.lock();
        if let Some(f) = &*file {
            return Ok(f.clone());
        }
        let opened = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| self.io(e))?,
        );
        *file = Some(opened.clone());
        Ok(opened)
    }

    /// A descriptor to read with: the open one, or a new one for this read only; `None` when
    /// retention deleted the file.
    pub(super) fn reader(&self) -> Result<Option<Arc<File>>, LogError> {
        if let Some(f) = &*self.file.lock() {
            return Ok(Some(f.clone()));
        }
        match File::open(&self.path) {
            Ok(f) => Ok(Some(Arc::new(f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Closes the descriptor of a sealed segment with nothing left to sync.
    pub(super) fn close_if_done(&self) {
        if self.sealed.load(Ordering::Acquire) && !self.dirty.load(Ordering::Acquire) {
            *self.file.lock() = None;
        }
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

pub(super) fn remove_file(path: &Path) -> Result<(), LogError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { path, source }
}
