//! Records: as producers send them, as they are stored and read back; their size rules (the
//! unit of the record limit), the key partitioner, the probe marker, and time arithmetic.

use bytes::Bytes;

/// A record as a producer hands it to weir.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Partitioning key; records with the same key land in the same partition.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Application headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the Unix epoch; 0 means "stamp with broker time at append".
    pub timestamp_ms: i64,
    /// Message id, used by consumers to drop redeliveries (exactly-once effects).
    pub id: Option<String>,
}

impl Record {
    /// A record with only a value.
    pub fn from_value(value: impl Into<Bytes>) -> Self {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    /// Bytes this record occupies in a stored chunk; the unit of the record size limit. The
    /// chunk codec (weir-log) lays records out in exactly this many bytes.
    pub fn encoded_len(&self) -> usize {
        stored_len(
            self.key.as_deref(),
            &self.value,
            self.id.as_deref(),
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
        )
    }

    /// Checks the limits the stored form puts on one record's fields (16-bit lengths of the
    /// id, the header count and header names).
    ///
    /// # Errors
    /// A message naming the field over its limit.
    pub fn check_shape(&self) -> Result<(), String> {
        if let Some(id) = &self.id {
            if id.len() > usize::from(u16::MAX) {
                return Err(format!(
                    "record id is {} bytes; the limit is 65535",
                    id.len()
                ));
            }
        }
        if self.headers.len() > usize::from(u16::MAX) {
            return Err(format!(
                "record has {} headers; the limit is 65535",
                self.headers.len()
            ));
        }
        if let Some((name, _)) = self
            .headers
            .iter()
            .find(|(name, _)| name.len() > usize::from(u16::MAX))
        {
            return Err(format!(
                "header name of {} bytes; the limit is 65535",
                name.len()
            ));
        }
        Ok(())
    }
}

/// [`Record::encoded_len`] of a record given by its parts (for records not yet materialised,
/// such as a plugin's outputs read straight from its blob).
pub fn stored_len<'a>(
    key: Option<&[u8]>,
    value: &[u8],
    id: Option<&str>,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> usize {
    4 + 8
        + 1
        + key.map_or(0, |k| 4 + k.len())
        + 4
        + value.len()
        + id.map_or(0, |id| 2 + id.len())
        + 2
        + headers
            .map(|(k, v)| 2 + k.len() + 4 + v.len())
            .sum::<usize>()
}

/// A record read back from a partition, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The partition it was read from.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
    /// The record as stored (its timestamp is the broker's when the producer gave none).
    pub record: Record,
}

/// One partition of one topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition index, `0..partitions`.
    pub partition: u32,
}

impl TopicPartition {
    /// Builds a topic-partition pair.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Header that marks a probe record (the monitor's end-to-end probe, the seed's 监控消息); its
/// value is `<run>:<seq>`. Plugins never see probes.
pub const PROBE_HEADER: &str = "weir-probe";

/// Which probe a record is: the monitor run that wrote it and its sequence in the partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeMarker {
    /// Random per monitor start, so sequences restart cleanly after a restart.
    pub run: u64,
    /// 1, 2, 3, ... per partition within a run.
    pub seq: u64,
}

impl ProbeMarker {
    /// The header value.
    pub fn encode(&self) -> String {
        format!("{:016x}:{}", self.run, self.seq)
    }

    /// The marker of a record, if it is a probe.
    pub fn of(record: &Record) -> Option<ProbeMarker> {
        let (_, value) = record.headers.iter().find(|(k, _)| k == PROBE_HEADER)?;
        let text = std::str::from_utf8(value).ok()?;
        let (run, seq) = text.split_once(':')?;
        Some(ProbeMarker {
            run: u64::from_str_radix(run, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// The partition a keyed record goes to: FNV-1a 64 of the key modulo the partition count.
///
/// Stable across versions and platforms, so clients can partition before sending (the
/// idempotent producer must, because sequences are per partition).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (crate::fnv1a(key) % u64::from(partitions.max(1))) as u32
}

/// How many ms lie between `earlier` and `later` (0 when `later` is not after it), without
/// overflow whatever the two timestamps are.
pub fn elapsed_ms(earlier: i64, later: i64) -> u64 {
    u64::try_from(i128::from(later) - i128::from(earlier)).unwrap_or(0)
}

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `text` cut to at most `max` bytes at a character boundary, ending in `…` when cut (for
/// texts a server keeps or forwards from untrusted sources: plugin logs, errors).
pub fn cut_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let Some(mut end) = max.checked_sub('…'.len_utf8()) else {
        return String::new();
    };
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_cut_at_character_boundaries() {
        assert_eq!(cut_text("short", 10), "short");
        assert_eq!(cut_text("ééé", 6), "ééé");
        assert_eq!(cut_text("éééé", 6), "é…");
        assert!(cut_text(&"é".repeat(1000), 100).len() <= 100);
        assert_eq!(cut_text("abc", 2), "");
    }

    #[test]
    fn probe_markers_round_trip() {
        let marker = ProbeMarker {
            run: 0xabc,
            seq: 42,
        };
        let record = Record {
            headers: vec![(PROBE_HEADER.into(), marker.encode().into())],
            ..Default::default()
        };
        assert_eq!(ProbeMarker::of(&record), Some(marker));
        assert_eq!(ProbeMarker::of(&Record::default()), None);
        assert_eq!(elapsed_ms(i64::MIN, i64::MAX), u64::MAX);
        assert_eq!(elapsed_ms(10, 5), 0);
    }

    #[test]
    fn partitioner_is_stable_and_in_range() {
        // Pinned values: changing the hash would move keys between partitions on upgrade.
        assert_eq!(
            partition_for_key(b"user-1", 8),
            partition_for_key(b"user-1", 8)
        );
        assert_eq!(
            partition_for_key(b"", 4),
            (0xcbf2_9ce4_8422_2325u64 % 4) as u32
        );
        for i in 0..1000 {
            assert!(partition_for_key(format!("k{i}").as_bytes(), 7) < 7);
        }
        let spread: std::collections::HashSet<u32> = (0..100)
            .map(|i| partition_for_key(format!("user-{i}").as_bytes(), 4))
            .collect();
        assert_eq!(spread.len(), 4, "keys spread over all partitions");
    }
}
