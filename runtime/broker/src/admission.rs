//! Admission limits per key (the seed's 限流): at most `per_key` records of one key within any
//! `window_ms`, checked before a publish reaches the log. Kept in memory: a restart forgets
//! the window, which admits at most one extra window's worth per key.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use weir_core::Admission;

/// Admission times per key of one topic.
pub(crate) struct AdmissionLog {
    limit: Admission,
    seen: HashMap<Bytes, VecDeque<i64>>,
    last_sweep: i64,
}

/// A refused request: the first key over its limit and how many records were over.
pub(crate) struct Refused {
    pub key: Bytes,
    pub records: usize,
}

impl AdmissionLog {
    pub(crate) fn new(limit: Admission) -> Self {
        AdmissionLog {
            limit,
            seen: HashMap::new(),
            last_sweep: 0,
        }
    }

    /// Admits every keyed record of a request at `now`, or none of them.
    pub(crate) fn admit<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a Bytes>,
        now: i64,
    ) -> Result<(), Refused> {
        let window = i64::try_from(self.limit.window_ms).unwrap_or(i64::MAX);
        let horizon = now.saturating_sub(window);
        if weir_core::elapsed_ms(self.last_sweep, now) > self.limit.window_ms {
            self.seen
                .retain(|_, times| times.back().is_some_and(|&t| t > horizon));
            self.last_sweep = now;
        }
        let mut wanted: Vec<(&Bytes, u32)> = Vec::new();
        for key in keys {
            match wanted.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => wanted.push((key, 1)),
            }
        }
        let mut refused: Option<Refused> = None;
        for (key, n) in &wanted {
            let recent = self
                .seen
                .get(*key)
                .map_or(0, |t| t.iter().filter(|&&t| t > horizon).count() as u32);
            let over = (recent + n).saturating_sub(self.limit.per_key);
            if over > 0 {
                match &mut refused {
                    Some(r) => r.records += over as usize,
                    None => {
                        refused = Some(Refused {
                            key: (*key).clone(),
                            records: over as usize,
                        })
                    }
                }
            }
        }
        if let Some(r) = refused {
            return Err(r);
        }
        for (key, n) in wanted {
            let times = self.seen.entry(key.clone()).or_default();
            while times.front().is_some_and(|&t| t <= horizon) {
                times.pop_front();
            }
            times.extend(std::iter::repeat_n(now, n as usize));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_quota_per_sliding_window_and_a_refused_request_takes_nothing() {
        let mut log = AdmissionLog::new(Admission {
            per_key: 2,
            window_ms: 1000,
        });
        let (a, b) = (Bytes::from("a"), Bytes::from("b"));
        assert!(log.admit([&a].into_iter(), 0).is_ok());
        assert!(log.admit([&a, &b].into_iter(), 10).is_ok());
        let r = log.admit([&b, &a].into_iter(), 20).unwrap_err();
        assert_eq!((r.key, r.records), (a.clone(), 1));
        // b was not charged for the refused request
        assert!(log.admit([&b].into_iter(), 30).is_ok());
        assert!(log.admit([&b].into_iter(), 40).is_err());
        // the window slides: a's first admission (t=0) expires after t=1000
        assert!(log.admit([&a].into_iter(), 999).is_err());
        assert!(log.admit([&a].into_iter(), 1001).is_ok());
    }
}
