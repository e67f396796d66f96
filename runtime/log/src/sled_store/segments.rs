//! The log's record bytes in segment files: `<dir>/segments/<topic>/<partition>/<base>.seg`,
//! where `<base>` (20 digits) is the offset of the segment's first chunk. Chunks are appended
//! whole with `pwrite` at the segment's end, once, and read back with one `pread` per chunk;
//! sled keeps only the index (offset → [`Loc`]).
//!
//! A partition's segments cover consecutive offset ranges: a segment ends where the next one
//! begins. The last one takes the appends until it reaches its topic's roll size or age
//! ([`Roll`]), then a new one is created (and its directory entry synced before anything
//! points into it). Retention deletes a segment once every chunk in it is trimmed.
//!
//! Every write marks its segment dirty; [`Segments::sync_dirty`] fdatasyncs the dirty ones
//! (several at once when several partitions wrote). A segment file stays open while the store
//! holds it, and a reader holds it by an `Arc`: a segment deleted by retention under a reader
//! is still read whole (the inode lives until the last descriptor closes).

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use weir_core::{TopicConfig, TopicPartition};

use crate::{EncodedChunk, LogError};

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

/// When a topic's segments roll over to a new file.
#[derive(Clone, Copy, Debug)]
struct Roll {
    bytes: u64,
    age: Duration,
}

/// One segment file.
pub(super) struct Segment {
    /// Offset of its first chunk (its name).
    pub base: u64,
    path: PathBuf,
    file: File,
    /// Bytes written (the next write's position).
    len: AtomicU64,
    /// The offset after its last chunk (where the next segment would begin).
    next_offset: AtomicU64,
    /// Written since its last fdatasync.
    dirty: AtomicBool,
    opened: Instant,
}

impl Segment {
    fn io(&self, source: std::io::Error) -> LogError {
        LogError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
}

/// A partition's segments by base offset.
pub(super) struct PartitionSegments {
    dir: PathBuf,
    segments: Mutex<BTreeMap<u64, Arc<Segment>>>,
}

/// Every partition's segment files under `<dir>/segments`.
pub(super) struct Segments {
    root: PathBuf,
    parts: RwLock<HashMap<TopicPartition, Arc<PartitionSegments>>>,
    /// Segments written since the last [`Segments::sync_dirty`].
    dirty: Mutex<Vec<Arc<Segment>>>,
    rolls: RwLock<HashMap<String, Roll>>,
    /// The largest segment (`SledOptions::segment_bytes`).
    segment_bytes: u64,
}

/// Segments roll at least this often (Kafka's `segment.ms` is a week; retention by age is
/// what makes a shorter roll matter, and a topic with retention rolls at a quarter of it).
const MAX_SEGMENT_AGE: Duration = Duration::from_secs(3600);

impl Segments {
    pub fn new(dir: &Path, segment_bytes: u64) -> Self {
        Segments {
            root: dir.join("segments"),
            parts: RwLock::new(HashMap::new()),
            dirty: Mutex::new(Vec::new()),
            rolls: RwLock::new(HashMap::new()),
            segment_bytes: segment_bytes.max(1),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
        let path = path.to_path_buf();
        move |source| LogError::Io { path, source }
    }

    fn topic_dir(&self, topic: &str) -> PathBuf {
        self.root.join(topic)
    }

    /// Learns a topic's retention: its segments roll at a quarter of its retention size and
    /// age, so that retention gives disk back in steps of about a quarter of what it keeps.
    pub fn configure(&self, config: &TopicConfig) {
        let bytes = match config.retention_bytes {
            0 => self.segment_bytes,
            r => (r / 4).clamp(64 * 1024, self.segment_bytes.max(64 * 1024)),
        };
        let age = match config.retention_ms {
            0 => MAX_SEGMENT_AGE,
            r => Duration::from_millis(r / 4).clamp(Duration::from_secs(1), MAX_SEGMENT_AGE),
        };
        self.rolls
            .write()
            .insert(config.name.clone(), Roll { bytes, age });
    }

    fn roll(&self, topic: &str) -> Roll {
        self.rolls.read().get(topic).copied().unwrap_or(Roll {
            bytes: self.segment_bytes,
            age: MAX_SEGMENT_AGE,
        })
    }

    /// A partition's segments, listed from its directory the first time.
    pub fn partition(&self, tp: &TopicPartition) -> Result<Arc<PartitionSegments>, LogError> {
        if let Some(p) = self.parts.read().get(tp) {
            return Ok(p.clone());
        }
        let mut parts = self.parts.write();
        if let Some(p) = parts.get(tp) {
            return Ok(p.clone());
        }
        let dir = self.topic_dir(&tp.topic).join(tp.partition.to_string());
        let mut segments = BTreeMap::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(Self::io(&dir))?;
                    let name = entry.file_name();
                    let Some(base) = name
                        .to_str()
                        .and_then(|n| n.strip_suffix(".seg"))
                        .and_then(|n| n.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let segment = open_segment(&entry.path(), base, false)?;
                    segments.insert(base, Arc::new(segment));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Self::io(&dir)(e)),
        }
        let p = Arc::new(PartitionSegments {
            dir,
            segments: Mutex::new(segments),
        });
        parts.insert(tp.clone(), p.clone());
        Ok(p)
    }

    /// Writes `chunks` (the first at offset `base_offset`) at the end of the partition's last
    /// segment, rolling to a new one as its topic asks. Returns each chunk's base and place.
    /// Not durable until [`Segments::sync_dirty`].
    pub fn append(
        &self,
        tp: &TopicPartition,
        base_offset: u64,
        chunks: &[EncodedChunk],
    ) -> Result<Vec<(u64, Loc)>, LogError> {
        let part = self.partition(tp)?;
        let roll = self.roll(&tp.topic);
        let mut segments = part.segments.lock();
        let mut out = Vec::with_capacity(chunks.len());
        let mut base = base_offset;
        let mut touched: Vec<Arc<Segment>> = Vec::with_capacity(1);
        for chunk in chunks {
            let len = chunk.bytes.len() as u64;
            let active = match segments.values().next_back() {
                Some(s)
                    if s.len() == 0
                        || (s.len() + len <= roll.bytes && s.opened.elapsed() < roll.age) =>
                {
                    s.clone()
                }
                _ => {
                    let created = Arc::new(self.create(&part.dir, base)?);
                    segments.insert(base, created.clone());
                    created
                }
            };
            let pos = active.len();
            active
                .file
                .write_all_at(&chunk.bytes, pos)
                .map_err(|e| active.io(e))?;
            active.len.store(pos + len, Ordering::Release);
            active
                .next_offset
                .store(base + u64::from(chunk.header.count), Ordering::Release);
            out.push((
                base,
                Loc {
                    segment: active.base,
                    pos,
                    len: chunk.bytes.len() as u32,
                    count: chunk.header.count,
                    max_timestamp_ms: chunk.header.max_timestamp_ms,
                },
            ));
            if !touched.iter().any(|t| Arc::ptr_eq(t, &active)) {
                touched.push(active);
            }
            base += u64::from(chunk.header.count);
        }
        drop(segments);
        for segment in touched {
            if !segment.dirty.swap(true, Ordering::AcqRel) {
                self.dirty.lock().push(segment);
            }
        }
        Ok(out)
    }

    /// Creates a segment file and makes its directory entry durable (and the directories
    /// above it, the first time): an index entry pointing into it must never outlive it.
    fn create(&self, dir: &Path, base: u64) -> Result<Segment, LogError> {
        let fresh_dir = !dir.exists();
        if fresh_dir {
            std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        }
        let path = dir.join(format!("{base:020}.seg"));
        let segment = open_segment(&path, base, true)?;
        sync_dir(dir)?;
        if fresh_dir {
            // create_dir_all may have made the topic's directory and `segments` too.
            for above in [dir.parent(), Some(self.root.as_path()), self.root.parent()]
                .into_iter()
                .flatten()
            {
                sync_dir(above)?;
            }
        }
        Ok(segment)
    }

    /// Reads a chunk: one `pread` into a buffer of its length, which the chunk's records are
    /// then sliced from. `None` when retention deleted its segment.
    pub fn read(&self, tp: &TopicPartition, loc: &Loc) -> Result<Option<Bytes>, LogError> {
        let part = self.partition(tp)?;
        let Some(segment) = part.segments.lock().get(&loc.segment).cloned() else {
            return Ok(None);
        };
        let mut buf = BytesMut::zeroed(loc.len as usize);
        segment
            .file
            .read_exact_at(&mut buf, loc.pos)
            .map_err(|e| segment.io(e))?;
        Ok(Some(buf.freeze()))
    }

    /// fdatasyncs every segment written since the last call (in parallel when there are
    /// several: one journal commit serves them).
    pub fn sync_dirty(&self) -> Result<(), LogError> {
        let dirty = std::mem::take(&mut *self.dirty.lock());
        // Cleared before the sync: a write after this marks the segment dirty again.
        for s in &dirty {
            s.dirty.store(false, Ordering::Release);
        }
        let sync = |s: &Arc<Segment>| s.file.sync_data().map_err(|e| s.io(e));
        match dirty.len() {
            0 => Ok(()),
            1 => sync(&dirty[0]),
            _ => std::thread::scope(|scope| {
                let handles: Vec<_> = dirty[1..]
                    .iter()
                    .map(|s| scope.spawn(move || sync(s)))
                    .collect();
                let first = sync(&dirty[0]);
                handles
                    .into_iter()
                    .map(|h| h.join().expect("segment sync thread"))
                    .fold(first, |acc, r| acc.and(r))
            }),
        }
    }

    /// Deletes the partition's segments whose every chunk is below `start` (retention).
    /// Returns the bytes given back.
    pub fn delete_below(&self, tp: &TopicPartition, start: u64) -> Result<u64, LogError> {
        let part = self.partition(tp)?;
        let doomed: Vec<Arc<Segment>> = {
            let mut segments = part.segments.lock();
            let bases: Vec<u64> = segments.keys().copied().collect();
            let mut doomed = Vec::new();
            for (i, base) in bases.iter().enumerate() {
                let end = match bases.get(i + 1) {
                    Some(next) => *next,
                    None => segments[base].next_offset.load(Ordering::Acquire),
                };
                if end > start || end <= *base {
                    break;
                }
                doomed.extend(segments.remove(base));
            }
            doomed
        };
        let mut freed = 0;
        for segment in doomed {
            freed += segment.len();
            remove_file(&segment.path)?;
        }
        Ok(freed)
    }

    /// Makes a partition's segments agree with its durable index after a restart: the index
    /// points at `(segment, end of its last chunk)` pairs in `last_ends`. A segment's bytes
    /// past its last indexed chunk (written, never indexed: a crash before the commit) are
    /// cut off; segments no index entry points into and that lie after the last indexed one
    /// (created, never indexed) or before the first (retention that crashed before deleting
    /// them) are deleted.
    pub fn reconcile(
        &self,
        tp: &TopicPartition,
        last_ends: &BTreeMap<u64, u64>,
    ) -> Result<(), LogError> {
        let part = self.partition(tp)?;
        let mut segments = part.segments.lock();
        let first = last_ends.keys().next().copied();
        let last = last_ends.keys().next_back().copied();
        let bases: Vec<u64> = segments.keys().copied().collect();
        for base in bases {
            let segment = segments[&base].clone();
            match last_ends.get(&base) {
                Some(&end) => {
                    if segment.len() > end {
                        tracing::warn!(message = "Cutting a segment's unindexed tail (a crash before its commit).", segment = %segment.path.display(), from = end, bytes = segment.len() - end);
                        segment.file.set_len(end).map_err(|e| segment.io(e))?;
                        segment.file.sync_all().map_err(|e| segment.io(e))?;
                        segment.len.store(end, Ordering::Release);
                    }
                }
                None if first.is_none_or(|f| base < f) || last.is_none_or(|l| base > l) => {
                    segments.remove(&base);
                    remove_file(&segment.path)?;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The segment a chunk is in, and its length now (recovery's check of an index entry).
    pub fn length_of(&self, tp: &TopicPartition, segment: u64) -> Result<Option<u64>, LogError> {
        let part = self.partition(tp)?;
        let len = part.segments.lock().get(&segment).map(|s| s.len());
        Ok(len)
    }

    /// Records where each segment ends in offsets (after recovery read the index).
    pub fn set_next_offset(&self, tp: &TopicPartition, segment: u64, next: u64) {
        if let Ok(part) = self.partition(tp) {
            if let Some(s) = part.segments.lock().get(&segment) {
                s.next_offset.store(next, Ordering::Release);
            }
        }
    }

    /// Forgets and deletes every segment of a topic (deletion, or a new topic of the name).
    pub fn drop_topic(&self, topic: &str) -> Result<(), LogError> {
        self.parts.write().retain(|tp, _| tp.topic != topic);
        self.dirty
            .lock()
            .retain(|s| !s.path.starts_with(self.topic_dir(topic)));
        let dir = self.topic_dir(topic);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(&dir)(e)),
        }
    }
}

fn open_segment(path: &Path, base: u64, create: bool) -> Result<Segment, LogError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
        .map_err(Segments::io(path))?;
    let len = file.metadata().map_err(Segments::io(path))?.len();
    Ok(Segment {
        base,
        path: path.to_path_buf(),
        file,
        len: AtomicU64::new(len),
        next_offset: AtomicU64::new(base),
        dirty: AtomicBool::new(false),
        opened: Instant::now(),
    })
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(Segments::io(dir))
}

fn remove_file(path: &Path) -> Result<(), LogError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Segments::io(path)(e)),
    }
}
