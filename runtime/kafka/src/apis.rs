//! Which Kafka APIs and versions weir speaks: the ApiVersions answer, and the check every
//! request passes before it is decoded.

use kafka_protocol::messages::ApiKey;

/// Every API weir answers, with the versions it speaks (a subset of what the codec knows).
///
/// The ranges start where the record batch format v2 and idempotent producers begin (Produce
/// v3, Fetch v4), and stop before versions that address topics by id only (Fetch v13,
/// Produce v13) or need features weir does not have.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    // v0 is listed because librdkafka looks for it, but answered UNSUPPORTED_VERSION: its
    // raw token exchange after the handshake is not spoken (v1 + SaslAuthenticate is).
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// The versions of `key` weir speaks, if any.
pub fn versions(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, min, max)| (min, max))
}

/// Whether weir speaks `version` of `key`.
pub fn speaks(key: ApiKey, version: i16) -> bool {
    versions(key).is_some_and(|(min, max)| (min..=max).contains(&version))
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::Message;

    use super::*;

    /// A version weir advertises that its codec cannot encode would fail a client's request.
    #[test]
    fn every_advertised_version_is_one_the_codec_knows() {
        for &(key, min, max) in SUPPORTED {
            let known = key.valid_versions();
            assert!(
                known.min <= min && max <= known.max,
                "{key:?} {min}..={max} outside the codec's {}..={}",
                known.min,
                known.max
            );
        }
        assert_eq!(ProduceRequest::VERSIONS.min, 3);
    }
}
