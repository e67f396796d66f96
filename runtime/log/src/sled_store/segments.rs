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
//! (several at once when several partitions wrote). Only a partition's last segment (and one
//! rolled past but not yet synced) keeps a descriptor open; an older one is opened for each
//! read, so descriptors stay bounded by the partitions written, not by the segments kept. A
//! read holds its descriptor by an `Arc`: a segment deleted by retention after the read
//! opened it is still read whole (the inode lives until the last descriptor closes); one
//! deleted before reads as gone (trimmed).

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use weir_core::{TopicConfig, TopicPartition};

use super::helpers::SyncHelpers;
use super::segment::{io, remove_file, sync_dir, Loc, Segment};
use crate::{EncodedChunk, LogError};

/// When a topic's segments roll over to a new file.
#[derive(Clone, Copy, Debug)]
struct Roll {
    bytes: u64,
    /// Only a topic with retention by age rolls by age.
    age: Option<Duration>,
}

/// A partition's segments by base offset.
pub(super) struct PartitionSegments {
    dir: PathBuf,
    segments: Mutex<BTreeMap<u64, Arc<Segment>>>,
    /// The directories above were synced by this process (their entries are durable).
    dirs_synced: AtomicBool,
}

/// Every partition's segment files under `<dir>/segments`.
pub(super) struct Segments {
    root: PathBuf,
    parts: RwLock<HashMap<TopicPartition, Arc<PartitionSegments>>>,
    /// Segments written since the last [`Segments::sync_dirty`].
    dirty: Mutex<Vec<Arc<Segment>>>,
    rolls: RwLock<HashMap<String, Roll>>,
    /// How many times each topic's segments were dropped: a read that began before a drop
    /// (a `Loc` of the old topic) must not read a new topic's file of the same name.
    generations: RwLock<HashMap<String, u64>>,
    /// The largest segment (`SledOptions::segment_bytes`).
    segment_bytes: u64,
    /// Threads that sync several dirty segments at once.
    helpers: SyncHelpers,
}

/// A topic with retention by age rolls its segments at a quarter of it, and at least this
/// often (Kafka's `segment.ms` is a week; it is what lets retention by age give disk back).
const MAX_SEGMENT_AGE: Duration = Duration::from_secs(3600);

impl Segments {
    pub fn new(dir: &Path, segment_bytes: u64) -> Self {
        Segments {
            root: dir.join("segments"),
            parts: RwLock::new(HashMap::new()),
            dirty: Mutex::new(Vec::new()),
            rolls: RwLock::new(HashMap::new()),
            generations: RwLock::new(HashMap::new()),
            segment_bytes: segment_bytes.max(1),
            helpers: SyncHelpers::default(),
        }
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
            0 => None,
            r => Some(Duration::from_millis(r / 4).clamp(Duration::from_secs(1), MAX_SEGMENT_AGE)),
        };
        self.rolls
            .write()
            .insert(config.name.clone(), Roll { bytes, age });
    }

    fn roll(&self, topic: &str) -> Roll {
        self.rolls.read().get(topic).copied().unwrap_or(Roll {
            bytes: self.segment_bytes,
            age: None,
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
                    let entry = entry.map_err(io(&dir))?;
                    let name = entry.file_name();
                    let Some(base) = name
                        .to_str()
                        .and_then(|n| n.strip_suffix(".seg"))
                        .and_then(|n| n.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let len = entry.metadata().map_err(io(&entry.path()))?.len();
                    segments.insert(base, Arc::new(Segment::new(entry.path(), base, len)));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        // Every listed segment but the last is sealed.
        for s in segments.values().rev().skip(1) {
            s.sealed.store(true, Ordering::Release);
        }
        let p = Arc::new(PartitionSegments {
            dir,
            segments: Mutex::new(segments),
            dirs_synced: AtomicBool::new(false),
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
        let mut created: Vec<Arc<Segment>> = Vec::new();
        let written = self.write_chunks(
            &part,
            &mut segments,
            &mut created,
            roll,
            base_offset,
            chunks,
        );
        if written.is_err() {
            // A segment this append created and left empty goes: the next append (at the
            // same offset) must not find a segment named after an offset it never reached.
            for segment in created.iter().filter(|s| s.len() == 0) {
                segments.remove(&segment.base);
                // Best effort: recovery deletes a segment no index entry points into.
                let _ = std::fs::remove_file(&segment.path);
                let _ = sync_dir(&part.dir);
            }
            if let Some(last) = segments.values().next_back() {
                last.sealed.store(false, Ordering::Release);
            }
        }
        drop(segments);
        let (out, touched) = written?;
        for segment in touched {
            if !segment.dirty.swap(true, Ordering::AcqRel) {
                self.dirty.lock().push(segment);
            }
        }
        Ok(out)
    }

    /// [`Segments::append`]'s writes, under the partition's segment lock.
    #[allow(clippy::type_complexity)]
    fn write_chunks(
        &self,
        part: &PartitionSegments,
        segments: &mut BTreeMap<u64, Arc<Segment>>,
        created: &mut Vec<Arc<Segment>>,
        roll: Roll,
        base_offset: u64,
        chunks: &[EncodedChunk],
    ) -> Result<(Vec<(u64, Loc)>, Vec<Arc<Segment>>), LogError> {
        let mut out = Vec::with_capacity(chunks.len());
        let mut base = base_offset;
        let mut touched: Vec<Arc<Segment>> = Vec::with_capacity(1);
        for chunk in chunks {
            let len = chunk.bytes.len() as u64;
            let last = segments.values().next_back().cloned();
            let active = match last {
                Some(s) if s.len() == 0 && s.base == base => s,
                Some(s)
                    if s.len() > 0
                        && s.len() + len <= roll.bytes
                        && roll.age.is_none_or(|age| s.opened.elapsed() < age) =>
                {
                    s
                }
                previous => {
                    if let Some(previous) = previous {
                        if previous.len() == 0 {
                            // Empty and named after another offset: nothing points into it.
                            segments.remove(&previous.base);
                            remove_file(&previous.path)?;
                        } else {
                            previous.sealed.store(true, Ordering::Release);
                            previous.close_if_done();
                        }
                    }
                    let segment = Arc::new(self.create(part, base)?);
                    segments.insert(base, segment.clone());
                    created.push(segment.clone());
                    segment
                }
            };
            let pos = active.len();
            active
                .writer()?
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
        Ok((out, touched))
    }

    /// Creates a segment file and makes its directory entry durable (and, the first time in
    /// this process, the directories above it, which it may have created or a killed process
    /// may have left unsynced): an index entry pointing into it must never outlive it. An
    /// empty file of the name (a create whose directory sync failed) is taken as it is.
    fn create(&self, part: &PartitionSegments, base: u64) -> Result<Segment, LogError> {
        let dir = &part.dir;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(format!("{base:020}.seg"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        let len = file.metadata().map_err(io(&path))?.len();
        if len != 0 {
            return Err(LogError::Malformed {
                what: format!("segment file {}", path.display()),
                reason: format!(
                    "it holds {len} bytes no index entry points at: move it away and restart"
                ),
            });
        }
        let synced = sync_dir(dir).and_then(|()| {
            if !part.dirs_synced.load(Ordering::Acquire) {
                for above in [dir.parent(), Some(self.root.as_path()), self.root.parent()]
                    .into_iter()
                    .flatten()
                {
                    sync_dir(above)?;
                }
                part.dirs_synced.store(true, Ordering::Release);
            }
            Ok(())
        });
        if let Err(e) = synced {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let segment = Segment::new(path, base, 0);
        *segment.file.lock() = Some(Arc::new(file));
        Ok(segment)
    }

    /// The topic's drop count, taken before looking a chunk up ([`Segments::read`]).
    pub fn generation(&self, topic: &str) -> u64 {
        self.generations.read().get(topic).copied().unwrap_or(0)
    }

    /// Reads a chunk: one `pread` into a buffer of its length, which the chunk's records are
    /// then sliced from. `None` when retention deleted its segment, or when the topic was
    /// dropped since `generation` (taken before `loc` was looked up) was read.
    pub fn read(
        &self,
        tp: &TopicPartition,
        loc: &Loc,
        generation: u64,
    ) -> Result<Option<Bytes>, LogError> {
        let part = self.partition(tp)?;
        let Some(segment) = part.segments.lock().get(&loc.segment).cloned() else {
            return Ok(None);
        };
        let Some(file) = segment.reader()? else {
            return Ok(None);
        };
        if self.generation(&tp.topic) != generation {
            // The file opened may be a new topic's of the same name.
            return Ok(None);
        }
        let mut buf = BytesMut::zeroed(loc.len as usize);
        file.read_exact_at(&mut buf, loc.pos)
            .map_err(|e| segment.io(e))?;
        Ok(Some(buf.freeze()))
    }

    /// fdatasyncs every segment written since the last call (in parallel on the helper
    /// threads when there are several: one journal commit serves them).
    pub fn sync_dirty(&self) -> Result<(), LogError> {
        let dirty = std::mem::take(&mut *self.dirty.lock());
        // Cleared before the sync: a write after this marks the segment dirty again.
        for s in &dirty {
            s.dirty.store(false, Ordering::Release);
        }
        let jobs: Vec<_> = dirty
            .into_iter()
            .map(|s| {
                move || {
                    match s.writer() {
                        Ok(file) => file.sync_data().map_err(|e| s.io(e))?,
                        // Its topic was dropped after the write: nothing of it is left to sync.
                        Err(LogError::Io { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                    s.close_if_done();
                    Ok(())
                }
            })
            .collect();
        self.helpers.run_all(jobs)
    }

    /// Deletes the partition's segments whose every chunk is below `start` (retention),
    /// calling `first` (which makes the trim durable) only when there are some. Returns the
    /// bytes given back.
    pub fn delete_below(
        &self,
        tp: &TopicPartition,
        start: u64,
        first: impl FnOnce() -> Result<(), LogError>,
    ) -> Result<u64, LogError> {
        let part = self.partition(tp)?;
        let doomed: Vec<Arc<Segment>> = {
            let mut segments = part.segments.lock();
            let bases: Vec<u64> = segments.keys().copied().collect();
            let mut doomed = Vec::new();
            for (i, base) in bases.iter().enumerate() {
                // Where its chunks end: the next segment's name, unless (a retried append
                // after a failed roll) it went on past it.
                let written = segments[base].next_offset.load(Ordering::Acquire);
                let end = bases.get(i + 1).map_or(written, |next| written.max(*next));
                if end > start || end <= *base {
                    break;
                }
                doomed.extend(segments.remove(base));
            }
            doomed
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        // Out of the map already: a failure here leaves files no entry points into, which
        // recovery deletes.
        first()?;
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
    /// cut off; segments no index entry points into hold nothing live (created and never
    /// indexed, left by a failed roll, or retention's that a crash kept from being deleted)
    /// and are deleted.
    pub fn reconcile(
        &self,
        tp: &TopicPartition,
        last_ends: &BTreeMap<u64, u64>,
    ) -> Result<(), LogError> {
        let part = self.partition(tp)?;
        let mut segments = part.segments.lock();
        let bases: Vec<u64> = segments.keys().copied().collect();
        for base in bases {
            let segment = segments[&base].clone();
            match last_ends.get(&base) {
                Some(&end) => {
                    if segment.len() > end {
                        tracing::warn!(message = "Cutting a segment's unindexed tail (a crash before its commit).", segment = %segment.path.display(), from = end, bytes = segment.len() - end);
                        let file = segment.writer()?;
                        file.set_len(end).map_err(|e| segment.io(e))?;
                        file.sync_all().map_err(|e| segment.io(e))?;
                        segment.close_if_done();
                        segment.len.store(end, Ordering::Release);
                    }
                }
                None => {
                    segments.remove(&base);
                    remove_file(&segment.path)?;
                }
            }
        }
        // The newest left takes the appends: its descriptor stays open.
        if let Some(last) = segments.values().next_back() {
            last.sealed.store(false, Ordering::Release);
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
        *self
            .generations
            .write()
            .entry(topic.to_string())
            .or_default() += 1;
        self.parts.write().retain(|tp, _| tp.topic != topic);
        self.dirty
            .lock()
            .retain(|s| !s.path.starts_with(self.topic_dir(topic)));
        let dir = self.topic_dir(topic);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&dir)(e)),
        }
    }
}
