//! A group's offsets through Kafka: OffsetCommit (checked against the member's generation on
//! the group's coordinator) and OffsetFetch, both on weir's own group offsets.
//!
//! Kafka keeps one offset per (group, topic, partition) with a metadata string; weir keeps
//! the offset (the metadata string is not stored: an OffsetFetch answers it empty).

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, TopicName,
};

use kafka_protocol::protocol::StrBytes;

use crate::groups::{elsewhere, text};
use crate::wire::Ctx;
use crate::{access, errors, TopicOp};

/// OffsetCommit: checked against the member's generation, stored as weir group offsets (one
/// durable write per topic).
pub(crate) async fn offset_commit(ctx: &Ctx, request: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let allowed = match elsewhere(ctx, &group) {
        Some(code) => Err(code),
        None => ctx.coordinator.may_commit(
            &group,
            &request.member_id,
            request.generation_id_or_member_epoch,
        ),
    };
    let mut topics = Vec::with_capacity(request.topics.len());
    for t in request.topics {
        let partitions: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
        let result: Result<(), i16> = match &allowed {
            _ if !access::who(ctx).may(TopicOp::Subscribe, &t.name.0) => {
                Err(ResponseError::TopicAuthorizationFailed.code())
            }
            Err(code) => Err(code.code()),
            Ok(()) => {
                let offsets: Option<Vec<(u32, u64)>> = t
                    .partitions
                    .iter()
                    .map(|p| {
                        Some((
                            u32::try_from(p.partition_index).ok()?,
                            u64::try_from(p.committed_offset).ok()?,
                        ))
                    })
                    .collect();
                match offsets {
                    None => Err(ResponseError::InvalidCommitOffsetSize.code()),
                    Some(offsets) => ctx
                        .broker
                        .commit_offsets(&group, &t.name.0, offsets)
                        .await
                        .inspect(|()| {
                            ctx.coordinator
                                .in_use(&group, &t.name.0, || ctx.broker.join_group(&group, &t.name.0))
                        })
                        .map_err(|e| {
                            tracing::info!(message = "Kafka offset commit refused.", group = %group, error = %e);
                            errors::wire(&e)
                        }),
                }
            }
        };
        let code = result.err().unwrap_or(0);
        topics.push(
            OffsetCommitResponseTopic::default()
                .with_name(t.name)
                .with_partitions(
                    partitions
                        .into_iter()
                        .map(|p| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(p)
                                .with_error_code(code)
                        })
                        .collect(),
                ),
        );
    }
    OffsetCommitResponse::default().with_topics(topics)
}

/// OffsetFetch (v1–7: one group): -1 where the group committed nothing.
pub(crate) async fn offset_fetch(ctx: &Ctx, request: OffsetFetchRequest) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let wanted: Vec<(TopicName, Option<Vec<i32>>)> = match request.topics {
        Some(topics) => topics
            .into_iter()
            .map(|t| (t.name, Some(t.partition_indexes)))
            .collect(),
        // Null: every topic the group committed for.
        None => match ctx.broker.list_groups().await {
            Ok(all) => all
                .into_iter()
                .filter(|(g, topic)| *g == group && access::who(ctx).may(TopicOp::Subscribe, topic))
                .map(|(_, topic)| (TopicName(text(topic)), None))
                .collect(),
            Err(e) => {
                return OffsetFetchResponse::default().with_error_code(errors::wire(&e));
            }
        },
    };
    let mut topics = Vec::with_capacity(wanted.len());
    let who = access::who(ctx);
    for (name, partitions) in wanted {
        if !who.may(TopicOp::Subscribe, &name.0) {
            let denied = partitions
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(p)
                        .with_committed_offset(-1)
                        .with_error_code(ResponseError::TopicAuthorizationFailed.code())
                })
                .collect();
            topics.push(
                OffsetFetchResponseTopic::default()
                    .with_name(name)
                    .with_partitions(denied),
            );
            continue;
        }
        let stored = ctx.broker.fetch_offsets(&group, &name.0).await;
        if stored.is_ok() {
            ctx.broker.touch_group(&group, &name.0);
            ctx.coordinator
                .in_use(&group, &name.0, || ctx.broker.join_group(&group, &name.0));
        }
        let answer = |p: i32, offset: i64, code: i16| {
            OffsetFetchResponsePartition::default()
                .with_partition_index(p)
                .with_committed_offset(offset)
                .with_committed_leader_epoch(-1)
                .with_metadata(Some(StrBytes::default()))
                .with_error_code(code)
        };
        let partitions: Vec<OffsetFetchResponsePartition> = match (stored, partitions) {
            (Ok(stored), Some(wanted)) => wanted
                .into_iter()
                .map(|p| {
                    let offset = stored
                        .iter()
                        .find(|(sp, _)| i64::from(*sp) == i64::from(p))
                        .map_or(-1, |(_, o)| *o as i64);
                    answer(p, offset, 0)
                })
                .collect(),
            (Ok(stored), None) => stored
                .into_iter()
                .map(|(p, o)| answer(p as i32, o as i64, 0))
                .collect(),
            (Err(e), Some(wanted)) => wanted
                .into_iter()
                .map(|p| answer(p, -1, errors::wire(&e)))
                .collect(),
            (Err(_), None) => Vec::new(),
        };
        topics.push(
            OffsetFetchResponseTopic::default()
                .with_name(name)
                .with_partitions(partitions),
        );
    }
    OffsetFetchResponse::default().with_topics(topics)
}
