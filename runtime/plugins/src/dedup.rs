//! The message ids a plugin has processed, within its window. Stored compactly, one entry per
//! commit (its newest record time and 8-byte id hashes), held in memory as a hash set for the
//! check.

use std::collections::{HashSet, VecDeque};

use foldhash::fast::RandomState;

use crate::spec::DedupWindow;
use crate::store::DedupKey;

/// 64-bit FNV-1a of a message id: stable across versions, since hashes are stored. With a
/// million ids in the window the chance of any collision is ~3·10⁻⁸.
pub fn id_hash(id: &str) -> u64 {
    weir_core::fnv1a(id.as_bytes())
}

/// One stored commit's ids.
#[derive(Debug)]
struct Entry {
    key: DedupKey,
    newest_ms: i64,
    ids: Vec<u64>,
}

/// The in-memory dedup index of one plugin (all its partitions). Its set hashes the id hashes
/// again with foldhash, seeded at random per process: three lookups per record (the batch's
/// filter, the commit's check, the insert) went through SipHash before, ~4% of points' server
/// CPU (perf); FNV-1a is public, so the set must not index by it directly (chosen ids could
/// collide in the low bits).
#[derive(Debug, Default)]
pub struct DedupIndex {
    ids: HashSet<u64, RandomState>,
    entries: VecDeque<Entry>,
}

impl DedupIndex {
    /// Whether an id hash was processed.
    pub fn contains(&self, hash: u64) -> bool {
        self.ids.contains(&hash)
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Adds a commit's ids (stored under `key`).
    pub fn insert(&mut self, key: DedupKey, newest_ms: i64, ids: Vec<u64>) {
        self.ids.extend(ids.iter().copied());
        self.entries.push_back(Entry {
            key,
            newest_ms,
            ids,
        });
    }

    /// Drops whole commits from the oldest while the window is exceeded; returns their keys
    /// (to delete from the store). By count, a commit goes only if the ids left still fill
    /// the window: at least the newest `max_ids` ids are remembered, whatever a commit holds
    /// (one covers up to `--commit-records` ids, and a window smaller than that must not
    /// forget the commit just written).
    pub fn expire(&mut self, window: &DedupWindow, now_ms: i64) -> Vec<DedupKey> {
        let mut removed = Vec::new();
        while let Some(oldest) = self.entries.front() {
            let too_many = self.ids.len().saturating_sub(oldest.ids.len()) >= window.max_ids;
            let too_old = weir_core::elapsed_ms(oldest.newest_ms, now_ms) > window.max_age_ms;
            if !(too_many || too_old) {
                break;
            }
            let entry = self.entries.pop_front().expect("front exists");
            for id in &entry.ids {
                self.ids.remove(id);
            }
            removed.push(entry.key);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_expires_oldest_commits_by_count_and_age() {
        let mut index = DedupIndex::default();
        index.insert((0, 1), 1_000, vec![id_hash("1"), id_hash("2")]);
        index.insert((1, 1), 2_000, vec![id_hash("3")]);
        assert!(index.contains(id_hash("1")) && !index.contains(id_hash("4")));
        // Dropping the oldest commit would leave 1 id of a window of 2: it stays.
        let two = DedupWindow {
            max_ids: 2,
            max_age_ms: 1_000_000,
        };
        assert!(index.expire(&two, 3_000).is_empty());
        assert_eq!(index.len(), 3);
        let removed = index.expire(
            &DedupWindow {
                max_ids: 1,
                max_age_ms: 1_000_000,
            },
            3_000,
        );
        assert_eq!(removed, vec![(0, 1)]);
        assert!(!index.contains(id_hash("1")) && index.contains(id_hash("3")));
        let removed = index.expire(
            &DedupWindow {
                max_ids: 10,
                max_age_ms: 500,
            },
            3_000,
        );
        assert_eq!(removed, vec![(1, 1)]);
        assert!(index.is_empty());
    }
}
