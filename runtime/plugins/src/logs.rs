//! A plugin's log (`weir plugin logs`): its stdout/stderr and log-import lines, retries and
//! failures. Kept in its store as a ring of the newest [`LOG_LINES`] lines, so it survives
//! restarts and takes no memory beyond the lines not yet written: lines are buffered and
//! written by the compactor every 200 ms.

use std::collections::VecDeque;

use parking_lot::Mutex;
use weir_log::LogError;

use crate::store::PluginStore;

/// Lines kept per plugin.
pub const LOG_LINES: u64 = 2_000;
/// Longest line kept, in bytes (longer ones are cut).
pub const LOG_LINE_BYTES: usize = 4096;

/// The buffered lines and the ring's position.
pub(crate) struct LogRing {
    inner: Mutex<Ring>,
}

struct Ring {
    /// Lines not yet written, oldest first.
    pending: VecDeque<String>,
    /// Sequence of the next line written.
    next: u64,
}

impl LogRing {
    /// The ring after `next`, the sequence of the next line to write.
    pub(crate) fn new(next: u64) -> Self {
        LogRing {
            inner: Mutex::new(Ring {
                pending: VecDeque::new(),
                next,
            }),
        }
    }

    /// Buffers a line (the oldest buffered lines go if more than a ring's worth wait).
    pub(crate) fn push(&self, line: String) {
        let line = if line.len() > LOG_LINE_BYTES {
            weir_core::cut_text(&line, LOG_LINE_BYTES)
        } else {
            line
        };
        let mut ring = self.inner.lock();
        if ring.pending.len() as u64 >= LOG_LINES {
            ring.pending.pop_front();
            ring.next += 1; // the dropped line keeps its place in the numbering
        }
        ring.pending.push_back(line);
    }

    /// Writes the buffered lines and deletes those older than the ring. Blocking. On a
    /// failure the lines stay buffered for the next flush.
    pub(crate) fn flush(&self, store: &dyn PluginStore, plugin: &str) -> Result<(), LogError> {
        let (lines, next) = {
            let mut ring = self.inner.lock();
            if ring.pending.is_empty() {
                return Ok(());
            }
            let lines: Vec<String> = ring.pending.drain(..).collect();
            (lines, ring.next)
        };
        let end = next + lines.len() as u64;
        match store.append_log(plugin, next, &lines, end.saturating_sub(LOG_LINES)) {
            Ok(()) => {
                let mut ring = self.inner.lock();
                ring.next = ring.next.max(end);
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
    pub(crate) fn lines(
        &self,
        store: &dyn PluginStore,
        plugin: &str,
    ) -> Result<Vec<String>, LogError> {
        let pending: Vec<String> = self.inner.lock().pending.iter().cloned().collect();
        let mut lines = store.log_lines(plugin)?;
        lines.extend(pending);
        let excess = lines.len().saturating_sub(LOG_LINES as usize);
        Ok(lines.split_off(excess))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::KvPluginStore;

    #[test]
    fn the_ring_keeps_the_newest_lines_across_reopens() {
        let store = KvPluginStore::new(Arc::new(weir_log::MemoryStore::new()));
        let ring = LogRing::new(0);
        for i in 0..(LOG_LINES + 500) {
            ring.push(format!("line {i}"));
            if i % 700 == 0 {
                ring.flush(&store, "p").unwrap();
            }
        }
        ring.push("x".repeat(10_000));
        ring.flush(&store, "p").unwrap();
        let reopened = LogRing::new(store.load("p", 0).unwrap().log_range.1);
        reopened.push("after reopen".into());
        let lines = reopened.lines(&store, "p").unwrap();
        assert_eq!(lines.len() as u64, LOG_LINES);
        assert_eq!(lines.last().unwrap(), "after reopen");
        assert!(lines[lines.len() - 2].len() <= LOG_LINE_BYTES);
        assert_eq!(lines[0], format!("line {}", 502));
        reopened.flush(&store, "p").unwrap();
        assert_eq!(store.log_lines("p").unwrap().len() as u64, LOG_LINES);
    }
}
