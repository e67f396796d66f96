//! Domain types shared by the log, the broker and the API layers: records, topics and the
//! partitioner. Nothing here knows sled, prost or tonic.

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

    /// Bytes this record occupies in a stored chunk; the unit of the record size limit.
    pub fn encoded_len(&self) -> usize {
        crate::log::codec::record_encoded_len(self)
    }
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

/// A topic's configuration, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name (see [`validate_topic_name`]).
    pub name: String,
    /// Number of partitions; fixed for the topic's life.
    pub partitions: u32,
    /// Delete chunks whose newest record is older than this; 0 keeps forever.
    pub retention_ms: u64,
    /// Per partition, delete the oldest chunks while the partition is larger; 0 = no bound.
    pub retention_bytes: u64,
    /// Refuse a key's records beyond a count per time window (the seed's 限流).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
}

/// At most `per_key` records per key within any `window_ms` (a sliding window); keyless
/// records are not limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admission {
    /// Records admitted per key within the window.
    pub per_key: u32,
    /// Window length, ms.
    pub window_ms: u64,
}

/// Most partitions a topic may have; each is a sled tree and an executor task later.
pub const MAX_PARTITIONS: u32 = 1024;

/// Longest retention or admission window, in ms: every time computation stays in `i64`
/// milliseconds since the epoch (about 292 million years).
pub const MAX_DURATION_MS: u64 = i64::MAX as u64;

impl TopicConfig {
    /// A topic kept forever, without an admission limit.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        TopicConfig {
            name: name.into(),
            partitions,
            retention_ms: 0,
            retention_bytes: 0,
            admission: None,
        }
    }

    /// With time retention (0 keeps forever).
    pub fn with_retention_ms(mut self, retention_ms: u64) -> Self {
        self.retention_ms = retention_ms;
        self
    }

    /// With a size bound per partition (0 = none).
    pub fn with_retention_bytes(mut self, retention_bytes: u64) -> Self {
        self.retention_bytes = retention_bytes;
        self
    }

    /// With an admission limit.
    pub fn with_admission(mut self, admission: Option<Admission>) -> Self {
        self.admission = admission;
        self
    }

    /// Checks every field: the name rule, 1..=[`MAX_PARTITIONS`] partitions, durations that
    /// fit the time arithmetic, a usable admission limit.
    ///
    /// # Errors
    /// A message that names the field, what is wrong and the valid range.
    pub fn validate(&self) -> Result<(), String> {
        validate_topic_name(&self.name)?;
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(format!(
                "a topic needs 1 to {MAX_PARTITIONS} partitions, got {}",
                self.partitions
            ));
        }
        if self.retention_ms > MAX_DURATION_MS {
            return Err(format!(
                "--retention-ms {} is out of range: use 0 to keep records forever, or 1 to \
                 {MAX_DURATION_MS} ms",
                self.retention_ms
            ));
        }
        if let Some(a) = self.admission {
            if a.per_key == 0 || a.window_ms == 0 || a.window_ms > MAX_DURATION_MS {
                return Err(format!(
                    "an admission limit needs --admit-per-key above 0 and --admit-window-ms \
                     between 1 and {MAX_DURATION_MS}"
                ));
            }
        }
        Ok(())
    }
}

/// Checks a topic name: 1–249 characters of `[A-Za-z0-9._-]`, not `.` or `..` (Kafka's rule,
/// so names move between the two systems unchanged), and not starting with `-` (the CLI could
/// not tell it from an option).
///
/// # Errors
/// Returns a message that says what is wrong with the name.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > 249 {
        return Err(format!(
            "topic name is {} characters long; the limit is 249",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name {name:?} is reserved"));
    }
    if name.starts_with('-') {
        return Err(format!(
            "topic name {name:?} starts with '-', which command lines read as an option"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {bad:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// The partition a keyed record goes to: FNV-1a 64 of the key modulo the partition count.
///
/// Stable across versions and platforms, so clients can partition before sending (the
/// idempotent producer must, because sequences are per partition).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["orders", "order.paid", "a-b_c.9", &"x".repeat(249)] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            (".", "reserved"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            (&"x".repeat(250), "249"),
            ("-a", "starts with '-'"),
        ] {
            let err = validate_topic_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn configs_out_of_range_are_refused_with_the_range() {
        assert_eq!(TopicConfig::new("t", 4).validate(), Ok(()));
        let forever = TopicConfig::new("t", 1).with_retention_ms(u64::MAX);
        let err = forever.validate().unwrap_err();
        assert!(
            err.contains("0 to keep records forever") && err.contains("9223372036854775807"),
            "{err}"
        );
        assert!(TopicConfig::new("t", 1)
            .with_retention_ms(MAX_DURATION_MS)
            .validate()
            .is_ok());
        assert!(TopicConfig::new("t", 0).validate().is_err());
        let window = TopicConfig::new("t", 1).with_admission(Some(Admission {
            per_key: 1,
            window_ms: u64::MAX,
        }));
        assert!(window.validate().unwrap_err().contains("--admit-window-ms"));
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
