//! A plugin's log (`weir plugin logs`): its stdout/stderr and log-import lines, retries and
//! failures. Kept in the plugin's namespace as a ring of the newest [`LOG_LINES`] lines
//! (`g/<seq>`), so it survives restarts and takes no memory beyond the lines not yet written:
//! lines are buffered and written by the compactor every 200 ms.

use parking_lot::Mutex;

use crate::log::{LogError, LogStore};

/// Lines kept per plugin.
pub const LOG_LINES: u64 = 2_000;
/// Longest line kept, in bytes (longer ones are cut).
pub const LOG_LINE_BYTES: usize = 4096;

fn line_key(seq: u64) -> Vec<u8> {
    let mut k = b"g/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn key_seq(key: &[u8]) -> Option<u64> {
    key.get(2..10)?.try_into().ok().map(u64::from_be_bytes)
}

/// The buffered lines and the ring's position.
pub(super) struct LogRing {
    inner: Mutex<Ring>,
}

struct Ring {
    /// Lines not yet written, oldest first.
    pending: std::collections::VecDeque<String>,
    /// Sequence of the next line written.
    next: u64,
    /// Oldest sequence that may still be stored.
    first: u64,
}

impl LogRing {
    /// The ring as stored. Blocking.
    pub(super) fn open(store: &dyn LogStore, namespace: &str) -> Result<Self, LogError> {
        let stored = store.kv_scan(namespace, b"g/")?;
        let first = stored.first().and_then(|(k, _)| key_seq(k)).unwrap_or(0);
        let next = stored
            .last()
            .and_then(|(k, _)| key_seq(k))
            .map_or(0, |s| s + 1);
        Ok(LogRing {
            inner: Mutex::new(Ring {
                pending: Default::default(),
                next,
                first,
            }),
        })
    }

    /// Buffers a line (the oldest buffered lines go if more than a ring's worth wait).
    pub(super) fn push(&self, mut line: String) {
        if line.len() > LOG_LINE_BYTES {
            let mut cut = LOG_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        let mut ring = self.inner.lock();
        if ring.pending.len() as u64 >= LOG_LINES {
            ring.pending.pop_front();
            ring.next += 1; // the dropped line keeps its place in the numbering
        }
        ring.pending.push_back(line);
    }

    /// Writes the buffered lines and deletes those older than the ring. Blocking. On a
    /// failure the lines stay buffered for the next flush.
    pub(super) fn flush(&self, store: &dyn LogStore, namespace: &str) -> Result<(), LogError> {
        let (lines, next, first) = {
            let mut ring = self.inner.lock();
            if ring.pending.is_empty() {
                return Ok(());
            }
            let lines: Vec<String> = ring.pending.drain(..).collect();
            (lines, ring.next, ring.first)
        };
        let end = next + lines.len() as u64;
        let keep_from = end.saturating_sub(LOG_LINES);
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (first..keep_from.max(first))
            .map(|seq| (line_key(seq), None))
            .collect();
        for (i, line) in lines.iter().enumerate() {
            let seq = next + i as u64;
            if seq >= keep_from {
                writes.push((line_key(seq), Some(line.clone().into_bytes())));
            }
        }
        match store.kv_apply(namespace, &writes) {
            Ok(()) => {
                let mut ring = self.inner.lock();
                ring.next = ring.next.max(end);
                ring.first = ring.first.max(keep_from);
                Ok(())
            }
            Err(e) => {
                let mut ring = self.inner.lock();
                for line in lines.into_iter().rev() {
                    ring.pending.push_front(line);
                }
                while ring.pending.len() as u64 > LOG_LINES {
                    ring.pending.pop_front();
                    ring.next += 1;
                }
                Err(e)
            }
        }
    }

    /// Every kept line, oldest first: the stored ones, then the buffered ones. Blocking.
    pub(super) fn lines(
        &self,
        store: &dyn LogStore,
        namespace: &str,
    ) -> Result<Vec<String>, LogError> {
        let pending: Vec<String> = self.inner.lock().pending.iter().cloned().collect();
        let mut lines: Vec<String> = store
            .kv_scan(namespace, b"g/")?
            .into_iter()
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
            .collect();
        lines.extend(pending);
        let excess = lines.len().saturating_sub(LOG_LINES as usize);
        Ok(lines.split_off(excess))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::MemoryStore;

    #[test]
    fn the_ring_keeps_the_newest_lines_across_reopens() {
        let store = MemoryStore::new();
        let ring = LogRing::open(&store, "plugin/p").unwrap();
        for i in 0..(LOG_LINES + 500) {
            ring.push(format!("line {i}"));
            if i % 700 == 0 {
                ring.flush(&store, "plugin/p").unwrap();
            }
        }
        ring.push("x".repeat(10_000));
        ring.flush(&store, "plugin/p").unwrap();
        let reopened = LogRing::open(&store, "plugin/p").unwrap();
        reopened.push("after reopen".into());
        let lines = reopened.lines(&store, "plugin/p").unwrap();
        assert_eq!(lines.len() as u64, LOG_LINES);
        assert_eq!(lines.last().unwrap(), "after reopen");
        assert!(lines[lines.len() - 2].len() <= LOG_LINE_BYTES + 3);
        assert_eq!(lines[0], format!("line {}", 502));
        reopened.flush(&store, "plugin/p").unwrap();
        assert_eq!(
            store.kv_scan("plugin/p", b"g/").unwrap().len() as u64,
            LOG_LINES
        );
    }
}
