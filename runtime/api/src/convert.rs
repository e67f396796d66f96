//! Conversions between protobuf messages and weir-core's types. Payloads move as `Bytes`
//! handles.

use bytes::Bytes;

use weir_core::{Admission, PartitionStats, Record, StartAt, StoredRecord, TopicConfig, TopicInfo};

use crate::pb;

fn headers_to_pb(headers: Vec<(String, Bytes)>) -> Vec<pb::Header> {
    headers
        .into_iter()
        .map(|(key, value)| pb::Header { key, value })
        .collect()
}

fn headers_from_pb(headers: Vec<pb::Header>) -> Vec<(String, Bytes)> {
    headers.into_iter().map(|h| (h.key, h.value)).collect()
}

impl From<pb::Record> for Record {
    fn from(r: pb::Record) -> Self {
        Record {
            key: r.key,
            value: r.value,
            headers: headers_from_pb(r.headers),
            timestamp_ms: r.timestamp_ms,
            id: r.id,
        }
    }
}

impl From<Record> for pb::Record {
    fn from(r: Record) -> Self {
        pb::Record {
            key: r.key,
            value: r.value,
            headers: headers_to_pb(r.headers),
            timestamp_ms: r.timestamp_ms,
            id: r.id,
        }
    }
}

impl From<StoredRecord> for pb::StoredRecord {
    fn from(s: StoredRecord) -> Self {
        let r = s.record;
        pb::StoredRecord {
            partition: s.partition,
            offset: s.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            value: r.value,
            headers: headers_to_pb(r.headers),
            id: r.id,
        }
    }
}

impl From<pb::StoredRecord> for StoredRecord {
    fn from(s: pb::StoredRecord) -> Self {
        StoredRecord {
            partition: s.partition,
            offset: s.offset,
            record: Record {
                key: s.key,
                value: s.value,
                headers: headers_from_pb(s.headers),
                timestamp_ms: s.timestamp_ms,
                id: s.id,
            },
        }
    }
}

impl From<PartitionStats> for pb::PartitionInfo {
    fn from(p: PartitionStats) -> Self {
        pb::PartitionInfo {
            partition: p.partition,
            start_offset: p.start_offset,
            end_offset: p.end_offset,
            size_bytes: p.size_bytes,
        }
    }
}

impl From<TopicInfo> for pb::TopicInfo {
    fn from(t: TopicInfo) -> Self {
        pb::TopicInfo {
            name: t.config.name,
            partitions: t.config.partitions,
            retention_ms: t.config.retention_ms,
            retention_bytes: t.config.retention_bytes,
            admit_per_key: t.config.admission.map_or(0, |a| a.per_key),
            admit_window_ms: t.config.admission.map_or(0, |a| a.window_ms),
            partition_info: t.partitions.into_iter().map(Into::into).collect(),
        }
    }
}

/// The admission limit of protobuf fields (`per_key` 0 = none).
pub fn admission(per_key: u32, window_ms: u64) -> Option<Admission> {
    (per_key > 0).then_some(Admission { per_key, window_ms })
}

/// The start position of a subscribe request (`None` = latest, Kafka's default).
pub fn start_at(start: Option<pb::StartPosition>) -> StartAt {
    use pb::start_position::Position;
    match start.and_then(|s| s.position) {
        Some(Position::Earliest(_)) => StartAt::Earliest,
        Some(Position::Offset(o)) => StartAt::Offset(o),
        Some(Position::TimestampMs(t)) => StartAt::Timestamp(t),
        Some(Position::Latest(_)) | None => StartAt::Latest,
    }
}

/// The protobuf form of a start position.
pub fn start_position(start: StartAt) -> pb::StartPosition {
    use pb::start_position::Position;
    let position = match start {
        StartAt::Earliest => Position::Earliest(true),
        StartAt::Latest => Position::Latest(true),
        StartAt::Offset(o) => Position::Offset(o),
        StartAt::Timestamp(t) => Position::TimestampMs(t),
    };
    pb::StartPosition {
        position: Some(position),
    }
}

/// A topic as the server describes it.
pub fn topic_info(t: pb::TopicInfo) -> TopicInfo {
    TopicInfo {
        config: TopicConfig {
            name: t.name,
            partitions: t.partitions,
            retention_ms: t.retention_ms,
            retention_bytes: t.retention_bytes,
            admission: admission(t.admit_per_key, t.admit_window_ms),
        },
        partitions: t
            .partition_info
            .into_iter()
            .map(|p| PartitionStats {
                partition: p.partition,
                start_offset: p.start_offset,
                end_offset: p.end_offset,
                size_bytes: p.size_bytes,
            })
            .collect(),
    }
}
