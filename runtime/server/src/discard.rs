//! The discard server (`weir bench discard-server`): weir's gRPC API with nothing behind it. Every publish is
//! decoded (the same codec and message limits as `weir serve`), its records counted and
//! acknowledged with offsets, and nothing is stored. `weir bench publish` against it measures
//! what this machine's gRPC path carries — the ceiling durable publish is compared with
//! (`cargo xtask bench`, BENCHMARKS.md). Only the calls the publish bench makes are served;
//! the others answer UNIMPLEMENTED.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weir_api::pb::{self, weir_server::Weir};

/// Serves the discard API on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The gRPC transport failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let service = pb::weir_server::WeirServer::new(Discard::default())
        .max_decoding_message_size(weir_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(weir_api::MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            // As `weir serve`: small acknowledgements are not held back by Nagle's algorithm.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await
}

/// Topics by name, and the next offset of each of their partitions.
#[derive(Default)]
struct Discard {
    topics: Arc<Mutex<HashMap<String, (pb::TopicInfo, Vec<u64>)>>>,
}

impl Discard {
    fn topics(&self) -> MutexGuard<'_, HashMap<String, (pb::TopicInfo, Vec<u64>)>> {
        self.topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Acks for a publish: offsets move on as if the records were stored.
    fn ack(&self, r: pb::PublishRequest) -> Result<pb::PublishResponse, Status> {
        let (request_id, partition, topic) =
            (r.request_id, r.partition.unwrap_or(0), r.topic.clone());
        // The per-record work `weir serve` does before its broker sees a publish.
        let caller = weir_broker::Caller::Client {
            name: "discard".into(),
            admin: true,
        };
        let publish = crate::rpc_convert::publish_of(r, caller);
        let count = std::hint::black_box(publish).records.len() as u32;
        let mut topics = self.topics();
        let (_, next) = topics.get_mut(&topic).ok_or_else(|| {
            Status::not_found(format!(
                "unknown topic {topic:?}; create it first (the discard server keeps topics in memory)"
            ))
        })?;
        let end = next.get_mut(partition as usize).ok_or_else(|| {
            Status::invalid_argument(format!("topic {topic} has no partition {partition}"))
        })?;
        let ack = pb::PartitionAck {
            partition,
            base_offset: *end,
            record_count: count,
            duplicate: false,
        };
        *end += u64::from(count);
        Ok(pb::PublishResponse {
            request_id,
            acks: vec![ack],
            error: None,
        })
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented<T>(call: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "the discard server serves only topics and publishes, not {call}; use `weir serve`"
    )))
}

#[tonic::async_trait]
impl Weir for Discard {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        let r = request.into_inner();
        if r.partitions == 0 || r.partitions > 1024 {
            return Err(Status::invalid_argument("partitions must be 1 to 1024"));
        }
        let info = pb::TopicInfo {
            name: r.name.clone(),
            partitions: r.partitions,
            ..Default::default()
        };
        let mut topics = self.topics();
        if topics.contains_key(&r.name) {
            return Err(Status::already_exists(format!("topic {} exists", r.name)));
        }
        topics.insert(r.name, (info.clone(), vec![0; r.partitions as usize]));
        Ok(Response::new(info))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        let name = request.into_inner().name;
        match self.topics().get(&name) {
            Some((info, _)) => Ok(Response::new(info.clone())),
            None => Err(Status::not_found(format!("unknown topic {name:?}"))),
        }
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.ack(request.into_inner()).map(Response::new)
    }

    type PublishStreamStream = BoxStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = Discard {
            topics: self.topics.clone(),
        };
        tokio::spawn(async move {
            while let Some(next) = inbound.next().await {
                // As `weir serve`: a refused request is answered on the stream, which goes on.
                let answer = next.map(|r| {
                    let id = r.request_id;
                    this.ack(r)
                        .unwrap_or_else(|status| crate::rpc_convert::status_response(id, status))
                });
                if tx.send(answer).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_topics(
        &self,
        _: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self.topics().values().map(|(i, _)| i.clone()).collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn delete_topic(
        &self,
        _: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        unimplemented("DeleteTopic")
    }

    async fn init_producer(
        &self,
        _: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        unimplemented("InitProducer")
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        _: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        unimplemented("Subscribe")
    }

    async fn commit_offsets(
        &self,
        _: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        unimplemented("CommitOffsets")
    }

    async fn fetch_offsets(
        &self,
        _: Request<pb::FetchOffsetsRequest>,
    ) -> Result<Response<pb::FetchOffsetsResponse>, Status> {
        unimplemented("FetchOffsets")
    }

    async fn deploy_plugin(
        &self,
        _: Request<pb::DeployPluginRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        unimplemented("DeployPlugin")
    }

    async fn upgrade_plugin(
        &self,
        _: Request<pb::UpgradePluginRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        unimplemented("UpgradePlugin")
    }

    async fn list_plugins(
        &self,
        _: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        unimplemented("ListPlugins")
    }

    async fn pause_plugin(
        &self,
        _: Request<pb::PluginRef>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        unimplemented("PausePlugin")
    }

    async fn resume_plugin(
        &self,
        _: Request<pb::PluginRef>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        unimplemented("ResumePlugin")
    }

    async fn remove_plugin(
        &self,
        _: Request<pb::PluginRef>,
    ) -> Result<Response<pb::RemovePluginResponse>, Status> {
        unimplemented("RemovePlugin")
    }

    async fn plugin_logs(
        &self,
        _: Request<pb::PluginRef>,
    ) -> Result<Response<pb::PluginLogsResponse>, Status> {
        unimplemented("PluginLogs")
    }

    async fn get_state(
        &self,
        _: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        unimplemented("GetState")
    }

    async fn get_lag(
        &self,
        _: Request<pb::GetLagRequest>,
    ) -> Result<Response<pb::GetLagResponse>, Status> {
        unimplemented("GetLag")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_core::TopicConfig;

    fn request(topic: &str, partition: u32, n: usize) -> pb::PublishRequest {
        pb::PublishRequest {
            topic: topic.into(),
            partition: Some(partition),
            records: vec![
                pb::Record {
                    value: bytes::Bytes::from_static(b"v"),
                    ..Default::default()
                };
                n
            ],
            producer: None,
            request_id: 7,
        }
    }

    #[tokio::test]
    async fn publishes_are_acknowledged_at_moving_offsets_and_other_calls_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, shutdown.clone()));
        let client = weir_api::Client::connect(&format!("http://{addr}"))
            .await
            .unwrap();
        client
            .create_topic(&TopicConfig::new("t".to_string(), 2))
            .await
            .unwrap();
        let mut raw = client.raw();
        let first = raw.publish(request("t", 1, 3)).await.unwrap().into_inner();
        let second = raw.publish(request("t", 1, 2)).await.unwrap().into_inner();
        assert_eq!((first.request_id, first.acks[0].base_offset), (7, 0));
        assert_eq!(second.acks[0].base_offset, 3);
        assert_eq!(second.acks[0].record_count, 2);
        let unknown = raw.publish(request("nope", 0, 1)).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        let no_partition = raw.publish(request("t", 2, 1)).await.unwrap_err();
        assert_eq!(no_partition.code(), tonic::Code::InvalidArgument);
        let refused = raw
            .list_plugins(pb::ListPluginsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert!(
            refused.message().contains("weir serve"),
            "{}",
            refused.message()
        );
        // On a stream a refused request is answered in place and the stream goes on.
        let requests = tokio_stream::iter(vec![request("nope", 0, 1), request("t", 0, 4)]);
        let mut answers = raw.publish_stream(requests).await.unwrap().into_inner();
        let refused = answers.message().await.unwrap().unwrap();
        assert_eq!(refused.error.unwrap().code, tonic::Code::NotFound as i32);
        let stored = answers.message().await.unwrap().unwrap();
        assert_eq!(
            (stored.acks[0].base_offset, stored.acks[0].record_count),
            (0, 4)
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
