//! ApiVersions, Metadata, CreateTopics, DeleteTopics, ListOffsets and InitProducerId.

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ProducerId,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use weir_broker::{BrokerError, StartAt};
use weir_core::TopicConfig;

use crate::placement::Nodes;
use crate::wire::{encode, Ctx};
use crate::{access, apis, errors, TopicOp};

/// The ApiVersions answer: every API and version weir speaks.
pub(crate) fn api_versions() -> ApiVersionsResponse {
    ApiVersionsResponse::default().with_api_keys(
        apis::SUPPORTED
            .iter()
            .map(|&(key, min, max)| {
                ApiVersion::default()
                    .with_api_key(key as i16)
                    .with_min_version(min)
                    .with_max_version(max)
            })
            .collect(),
    )
}

/// The v0 answer to an ApiVersions request of a version weir does not speak.
pub(crate) fn api_versions_unsupported(correlation_id: i32) -> Result<Option<Bytes>, String> {
    let body = api_versions().with_error_code(ResponseError::UnsupportedVersion.code());
    encode(ApiKey::ApiVersions, 0, correlation_id, &body).map(Some)
}

fn text(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

fn topic_name(s: &str) -> TopicName {
    TopicName(text(s))
}

/// Metadata: the nodes serving Kafka as brokers, and each partition's leader among them
/// (`placement.rs`). Topics are never created by a metadata request (weir's
/// `auto.create.topics.enable` is false, as Redpanda's).
pub(crate) async fn metadata(
    ctx: &Ctx,
    request: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let broker = &ctx.broker;
    let who = access::who(ctx);
    let nodes = Nodes::or_alone(&ctx.options);
    let names: Vec<String> = match request.topics {
        // v0's empty list, and v1+'s null, ask for every topic.
        Some(t) if !(version == 0 && t.is_empty()) => t
            .into_iter()
            .filter_map(|t| t.name.map(|n| n.0.to_string()))
            .collect(),
        _ => {
            if broker.is_shared() {
                // Topics another node created since this one last looked.
                let _ = broker.refresh_topics().await;
            }
            broker
                .list_topics()
                .into_iter()
                .map(|t| t.config.name)
                .filter(|name| who.sees(name))
                .collect()
        }
    };
    let mut topics = Vec::with_capacity(names.len());
    for name in names {
        if !who.sees(&name) {
            topics.push(
                MetadataResponseTopic::default()
                    .with_name(Some(topic_name(&name)))
                    .with_error_code(ResponseError::TopicAuthorizationFailed.code()),
            );
            continue;
        }
        let found = match broker.ensure_topic(&name).await {
            Ok(()) => broker.describe_topic(&name),
            Err(e) => Err(e),
        };
        let topic = MetadataResponseTopic::default().with_name(Some(topic_name(&name)));
        topics.push(match found {
            Ok(info) => topic.with_partitions(
                (0..info.config.partitions as i32)
                    .map(|p| {
                        let leader = BrokerId(nodes.leader(&name, p as u32));
                        MetadataResponsePartition::default()
                            .with_partition_index(p)
                            .with_leader_id(leader)
                            .with_leader_epoch(if version >= 7 { 0 } else { -1 })
                            .with_replica_nodes(vec![leader])
                            .with_isr_nodes(vec![leader])
                    })
                    .collect(),
            ),
            Err(e) => topic.with_error_code(errors::wire(&e)),
        });
    }
    // Fields are set only from the version that has them: the codec refuses others.
    let response = MetadataResponse::default()
        .with_brokers(
            nodes
                .all
                .iter()
                .map(|n| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(n.id))
                        .with_host(text(n.host.clone()))
                        .with_port(i32::from(n.port))
                })
                .collect(),
        )
        .with_topics(topics);
    match version {
        0 => response,
        1 => response.with_controller_id(BrokerId(nodes.me)),
        _ => response
            .with_controller_id(BrokerId(nodes.me))
            .with_cluster_id(Some(text(ctx.options.cluster_id.clone()))),
    }
}

/// The topic a CreateTopics entry asks for, or why it cannot be made.
fn topic_config(
    name: &str,
    partitions: i32,
    configs: &[(String, Option<String>)],
) -> Result<TopicConfig, (ResponseError, String)> {
    // Kafka's default `num.partitions` is 1; -1 asks for the default.
    let partitions = match partitions {
        -1 => 1,
        p if p >= 1 => p as u32,
        p => {
            return Err((
                ResponseError::InvalidPartitions,
                format!("{p} partitions: a topic needs at least 1"),
            ))
        }
    };
    let mut config = TopicConfig::new(name, partitions);
    for (key, value) in configs {
        let Some(value) = value else { continue };
        let number = |what: &str| {
            value.parse::<i64>().map_err(|_| {
                (
                    ResponseError::InvalidConfig,
                    format!("{what}={value:?} is not a whole number"),
                )
            })
        };
        match key.as_str() {
            // Kafka's -1 is "no limit", weir's 0.
            "retention.ms" => config.retention_ms = number(key)?.max(0) as u64,
            "retention.bytes" => config.retention_bytes = number(key)?.max(0) as u64,
            // What weir does anyway, or has no equivalent worth refusing a topic over.
            "cleanup.policy" if value == "delete" => {}
            "min.insync.replicas" | "compression.type" | "segment.bytes" | "segment.ms"
            | "max.message.bytes" | "message.timestamp.type" => {}
            other => {
                return Err((
                    ResponseError::InvalidConfig,
                    format!(
                        "topic config {other}={value:?} is not supported by weir (it takes retention.ms and retention.bytes; see docs/kafka.md)"
                    ),
                ))
            }
        }
    }
    Ok(config)
}

/// CreateTopics. The replication factor is the backend's (one node's disk, or JetStream's
/// replicas), so any asked for is accepted; assignments of replicas to brokers are refused.
pub(crate) async fn create_topics(
    ctx: &Ctx,
    request: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(request.topics.len());
    for t in request.topics {
        let name = t.name.0.to_string();
        let configs: Vec<(String, Option<String>)> = t
            .configs
            .iter()
            .map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string())))
            .collect();
        let result = CreatableTopicResult::default().with_name(t.name.clone());
        let made = if !access::who(ctx).may(TopicOp::Create, &name) {
            Err((
                ResponseError::TopicAuthorizationFailed,
                access::denied(ctx, TopicOp::Create, &name),
            ))
        } else if !t.assignments.is_empty() {
            Err((
                ResponseError::InvalidRequest,
                "replica assignments are not supported: weir places replicas itself".to_string(),
            ))
        } else {
            match topic_config(&name, t.num_partitions, &configs) {
                Err(e) => Err(e),
                Ok(config) if request.validate_only => weir_core::validate_topic_name(&name)
                    .and_then(|()| config.validate())
                    .map(|()| config.partitions)
                    .map_err(|why| (ResponseError::InvalidRequest, why)),
                Ok(config) => ctx
                    .broker
                    .create_topic(config)
                    .await
                    .map(|info| info.config.partitions)
                    .map_err(|e| (errors::code(&e), e.to_string())),
            }
        };
        results.push(match made {
            // v5+ tell what was made.
            Ok(partitions) if version >= 5 => result
                .with_num_partitions(partitions as i32)
                .with_replication_factor(1),
            Ok(_) => result,
            Err((code, why)) => result
                .with_error_code(code.code())
                .with_error_message(Some(text(why))),
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

/// DeleteTopics, by name.
pub(crate) async fn delete_topics(
    ctx: &Ctx,
    request: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let names: Vec<TopicName> = if request.topic_names.is_empty() {
        request.topics.into_iter().filter_map(|t| t.name).collect()
    } else {
        request.topic_names
    };
    let mut results = Vec::with_capacity(names.len());
    for name in names {
        let result = DeletableTopicResult::default().with_name(Some(name.clone()));
        if !access::who(ctx).may(TopicOp::Delete, &name.0) {
            results.push(result.with_error_code(ResponseError::TopicAuthorizationFailed.code()));
            continue;
        }
        results.push(match ctx.broker.delete_topic(&name.0).await {
            Ok(()) => result,
            Err(e) if version >= 5 => result
                .with_error_code(errors::wire(&e))
                .with_error_message(Some(text(e.to_string()))),
            Err(e) => result.with_error_code(errors::wire(&e)),
        });
    }
    DeleteTopicsResponse::default().with_responses(results)
}

/// ListOffsets: earliest (-2), latest (-1) or the first offset at or after a timestamp.
pub(crate) async fn list_offsets(ctx: &Ctx, request: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    let who = access::who(ctx);
    for t in request.topics {
        let allowed = who.may(TopicOp::Subscribe, &t.name.0);
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            if !allowed {
                partitions.push(
                    ListOffsetsPartitionResponse::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(ResponseError::TopicAuthorizationFailed.code())
                        .with_offset(-1),
                );
                continue;
            }
            let start = match p.timestamp {
                -2 => Some(StartAt::Earliest),
                -1 => Some(StartAt::Latest),
                ts if ts >= 0 => Some(StartAt::Timestamp(ts)),
                _ => None, // -3 (max timestamp) and later specials
            };
            let answer = ListOffsetsPartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_timestamp(-1);
            let Some(start) = start else {
                partitions.push(
                    answer
                        .with_error_code(ResponseError::UnsupportedVersion.code())
                        .with_offset(-1),
                );
                continue;
            };
            let resolved = match u32::try_from(p.partition_index) {
                Ok(partition) => ctx.broker.resolve_start(&t.name.0, partition, start).await,
                Err(_) => Err(BrokerError::PartitionOutOfRange {
                    topic: t.name.0.to_string(),
                    partition: 0,
                    partitions: 0,
                }),
            };
            partitions.push(match resolved {
                Ok(offset) => answer.with_offset(offset as i64),
                Err(e) => answer.with_error_code(errors::wire(&e)).with_offset(-1),
            });
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

/// InitProducerId for idempotent producers: weir's own producer ids, so the sequence state of
/// a Kafka producer is the one a gRPC client's would be. Transactions are refused.
pub(crate) async fn init_producer_id(
    ctx: &Ctx,
    request: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let refuse = |code: ResponseError| {
        InitProducerIdResponse::default()
            .with_error_code(code.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    };
    if request
        .transactional_id
        .as_ref()
        .is_some_and(|t| !t.0.is_empty())
    {
        tracing::info!(message = "Kafka client asked for a transactional producer; weir has no Kafka transactions (docs/kafka.md).");
        return refuse(ResponseError::TransactionalIdAuthorizationFailed);
    }
    let caller = access::who(ctx).caller();
    let mut issued = match (request.producer_id.0, request.producer_epoch) {
        (-1, -1) => ctx.broker.init_producer(None, &caller).await,
        // KIP-360: a bump names the epoch its client holds; a zombie's older one is fenced.
        (id, epoch) if id >= 0 && epoch >= 0 => {
            ctx.broker
                .bump_producer_epoch(id as u64, epoch as u32, &caller)
                .await
        }
        // One of the two without the other: Kafka's INVALID_REQUEST.
        _ => return refuse(ResponseError::InvalidRequest),
    };
    // Kafka's epoch is 16 bits: an id whose epochs ran out is replaced by a new one, as Kafka
    // does on epoch exhaustion.
    if matches!(issued, Ok((_, epoch)) if epoch > i16::MAX as u32) {
        issued = ctx.broker.init_producer(None, &caller).await;
    }
    match issued {
        Ok((id, epoch)) => match (i64::try_from(id), i16::try_from(epoch)) {
            (Ok(id), Ok(epoch)) => InitProducerIdResponse::default()
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(epoch),
            _ => refuse(ResponseError::UnknownServerError),
        },
        Err(e) => {
            tracing::info!(message = "Kafka InitProducerId refused.", error = %e);
            refuse(errors::code(&e))
        }
    }
}
