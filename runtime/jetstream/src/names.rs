//! Stream and subject names. Topic names may contain `.` (a subject separator) and be 249
//! characters long, so each topic gets a token: its name with `.` as `_`, cut to 100
//! characters, and a 64-bit FNV-1a hash of the whole name.

/// The names of one weir cluster's streams and subjects.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_string(),
        }
    }

    /// A topic's subject token.
    pub fn token(topic: &str) -> String {
        let hash = weir_core::fnv1a(topic.as_bytes());
        let readable: String = topic
            .chars()
            .take(100)
            .map(|c| if c == '.' { '_' } else { c })
            .collect();
        format!("{readable}-{hash:016x}")
    }

    /// The stream of changelogs and blobs (cluster mode's plugin store).
    pub fn kv_stream(&self) -> String {
        format!("{}-kv", self.prefix)
    }

    pub(crate) fn kv_subjects(&self) -> String {
        format!("{}.kv.>", self.prefix)
    }

    pub(crate) fn changelog_subject(&self, log: &str) -> String {
        format!("{}.kv.l.{}", self.prefix, Self::token(log))
    }

    pub(crate) fn blob_subject(&self, name: &str) -> String {
        format!("{}.kv.b.{}", self.prefix, Self::token(name))
    }

    /// The metadata stream.
    pub fn meta_stream(&self) -> String {
        format!("{}-meta", self.prefix)
    }

    /// Every metadata subject.
    pub fn meta_subjects(&self) -> String {
        format!("{}.meta.>", self.prefix)
    }

    pub(crate) fn topic_key(&self, topic: &str) -> String {
        format!("{}.meta.topic.{}", self.prefix, Self::token(topic))
    }

    pub(crate) fn topic_keys(&self) -> String {
        format!("{}.meta.topic.*", self.prefix)
    }

    pub(crate) fn producer_key(&self, id: u64) -> String {
        format!("{}.meta.producer.{id}", self.prefix)
    }

    pub(crate) fn producer_keys(&self) -> String {
        format!("{}.meta.producer.*", self.prefix)
    }

    pub(crate) fn next_producer_key(&self) -> String {
        format!("{}.meta.next-producer", self.prefix)
    }

    /// A group's offset of one partition; the group name is hex-encoded (any string is a
    /// group name).
    pub(crate) fn group_key(&self, topic: &str, group: &str, partition: u32) -> String {
        format!(
            "{}.meta.group.{}.{}.{partition}",
            self.prefix,
            Self::token(topic),
            hex::encode(group)
        )
    }

    pub(crate) fn group_keys(&self, topic: &str, group: &str) -> String {
        format!(
            "{}.meta.group.{}.{}.*",
            self.prefix,
            Self::token(topic),
            hex::encode(group)
        )
    }

    pub(crate) fn topic_group_keys(&self, topic: &str) -> String {
        format!("{}.meta.group.{}.>", self.prefix, Self::token(topic))
    }

    pub(crate) fn all_group_keys(&self) -> String {
        format!("{}.meta.group.>", self.prefix)
    }

    /// A topic's stream as topics created before streams were named per creation have it;
    /// a topic created since has `<this>-<8 hex>` (recorded in its config, see topics.rs).
    pub fn topic_stream(&self, topic: &str) -> String {
        format!("{}-t-{}", self.prefix, Self::token(topic))
    }

    /// Every subject of a topic's stream.
    pub fn topic_subjects(&self, topic: &str) -> String {
        format!("{}.t.{}.>", self.prefix, Self::token(topic))
    }

    /// The subject of a partition's chunks.
    pub fn chunk_subject(&self, topic: &str, partition: u32) -> String {
        format!("{}.t.{}.{partition}.c", self.prefix, Self::token(topic))
    }

    /// Every subject of a partition (chunks and producer states).
    pub(crate) fn partition_subjects(&self, topic: &str, partition: u32) -> String {
        format!("{}.t.{}.{partition}.>", self.prefix, Self::token(topic))
    }

    /// The subject of a producer's sequence state in a partition.
    pub(crate) fn producer_state_subject(&self, topic: &str, partition: u32, id: u64) -> String {
        format!(
            "{}.t.{}.{partition}.p.{id}",
            self.prefix,
            Self::token(topic)
        )
    }

    /// The producer id of a producer-state subject of a partition, or `None` for a chunk.
    pub(crate) fn producer_of(subject: &str) -> Option<u64> {
        let (rest, id) = subject.rsplit_once('.')?;
        rest.ends_with(".p").then(|| id.parse().ok()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_subject_safe_and_distinct() {
        let a = Names::token("orders.eu");
        let b = Names::token("orders_eu");
        assert_ne!(a, b);
        assert!(!a.contains('.'));
        let long = "x".repeat(249);
        assert!(Names::token(&long).len() < 130);
    }

    #[test]
    fn producer_subjects_parse_back() {
        let n = Names::new("weir");
        assert_eq!(
            Names::producer_of(&n.producer_state_subject("a.b", 3, 42)),
            Some(42)
        );
        assert_eq!(Names::producer_of(&n.chunk_subject("a.b", 3)), None);
    }
}
