//! Topics: their configuration (validated once, with constructors), the name rule, where a
//! read starts, and what a topic's partitions hold.

/// Most partitions a topic may have; each becomes a partition loop per plugin that reads it.
pub const MAX_PARTITIONS: u32 = 1024;

/// Longest retention or admission window, in ms: every time computation stays in `i64`
/// milliseconds since the epoch (about 292 million years).
pub const MAX_DURATION_MS: u64 = i64::MAX as u64;

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

/// Where to start reading a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest stored record.
    Earliest,
    /// Only records published after subscribing.
    Latest,
    /// This offset.
    Offset(u64),
    /// The first record with a timestamp at or after this many ms since the epoch.
    Timestamp(i64),
}

/// How much one read of a partition may return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most records.
    pub max_records: usize,
    /// Most encoded record bytes, unless the first record alone is larger.
    pub max_bytes: usize,
}

impl ReadLimits {
    /// At most `max_records`, with no byte bound.
    pub fn records(max_records: usize) -> Self {
        ReadLimits {
            max_records,
            max_bytes: usize::MAX,
        }
    }
}

/// Offsets and size of a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionStats {
    /// Partition index.
    pub partition: u32,
    /// First stored offset.
    pub start_offset: u64,
    /// Next offset to be assigned.
    pub end_offset: u64,
    /// Stored bytes.
    pub size_bytes: u64,
}

/// Description of a topic with its partitions' offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    /// Configuration.
    pub config: TopicConfig,
    /// Per partition.
    pub partitions: Vec<PartitionStats>,
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
    }
}
