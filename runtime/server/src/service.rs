//! The `Weir` service: thin handlers that authorize, convert, call the broker or the plugin
//! manager and convert back. (Over 500 lines because `impl Weir` must hold every RPC in one
//! block; what is not a handler lives in `streams`, `rpc_convert` and `plugin_rpc`.)

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use weir_api::convert::{admission, start_at};
use weir_api::pb::{self, weir_server::Weir};
use weir_broker::{Broker, BrokerError, ReadLimits, StartAt};
use weir_core::TopicConfig;
use weir_plugins::PluginManager;

use crate::auth::{self, Authority, Operation, Principal, Resource};
use crate::limits::{ApiLimits, Guarded, StreamLimiter};
use crate::monitor::{ConsumerKind, Monitor};
use crate::rpc_convert::{acks_response, caller_of, consumer_health, lag_row, publish_of};
use crate::statuses::{of_broker, plain_io_errors, status, ToStatus};
use crate::streams::{Follower, STREAM_IN_FLIGHT};

/// Default and maximum records per subscribe response message.
const SUBSCRIBE_BATCH_DEFAULT: usize = 1000;
const SUBSCRIBE_BATCH_MAX: usize = 10_000;
/// Default and maximum record bytes per subscribe response message: the default fits a stock
/// gRPC client's 4 MiB receive limit with room for framing (Kafka's `fetch.max.bytes`).
const SUBSCRIBE_BYTES_DEFAULT: usize = 1 << 20;
const SUBSCRIBE_BYTES_MAX: usize = 32 << 20;

/// The gRPC service over a broker.
#[derive(Clone)]
pub struct WeirService {
    broker: Arc<Broker>,
    plugins: Arc<PluginManager>,
    /// Ends subscribe streams on server shutdown.
    shutdown: CancellationToken,
    auth: Arc<Authority>,
    limits: ApiLimits,
    streams: Arc<StreamLimiter>,
    monitor: Arc<Monitor>,
    /// `--max-plugin-timeout-ms`: a deploy naming no CPU bound gets the default or this.
    max_plugin_timeout: std::time::Duration,
    /// The server's tasks: plugin admin calls run on it to their end (`to_the_end`), and the
    /// server waits for them before it stops its plugins.
    tasks: tokio_util::task::TaskTracker,
}

impl WeirService {
    /// A service over `broker`; streams end when `shutdown` is cancelled.
    pub fn new(
        broker: Arc<Broker>,
        plugins: Arc<PluginManager>,
        shutdown: CancellationToken,
        auth: Arc<Authority>,
        limits: ApiLimits,
        monitor: Arc<Monitor>,
        max_plugin_timeout: std::time::Duration,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        WeirService {
            broker,
            plugins,
            shutdown,
            auth,
            limits,
            streams: Arc::default(),
            monitor,
            max_plugin_timeout,
            tasks,
        }
    }

    /// Runs a plugin admin call (deploy, upgrade, pause, resume, remove) to its end once it has
    /// started, on the server's task tracker: a client that goes away (a cancelled call, a
    /// deadline) drops the handler's future, and cutting the call short between its steps left
    /// a taken store or a lease behind (a deploy cancelled while it took the plugin's store).
    /// Its answer is lost, as a timed-out call's is; what it did stays done. The server waits
    /// for these calls before it stops its plugins, so none starts a plugin after that.
    async fn to_the_end<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T, weir_plugins::ManagerError>> + Send + 'static,
    ) -> Result<T, Status> {
        self.tasks
            .spawn(call)
            .await
            .map_err(|e| {
                tracing::error!(message = "A plugin admin call panicked.", error = %e);
                Status::internal("the plugin admin call failed inside the server (see its log)")
            })?
            .or_status()
    }

    /// The tonic server wrapper with weir's message size limits.
    pub fn into_server(self) -> pb::weir_server::WeirServer<Self> {
        let max = self.limits.max_request_bytes;
        pb::weir_server::WeirServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(weir_api::MAX_MESSAGE_BYTES)
    }

    /// The caller, which must hold a grant of `op` on `resource`.
    fn require<T>(
        &self,
        request: &Request<T>,
        op: Operation,
        resource: Resource<'_>,
    ) -> Result<Arc<Principal>, Status> {
        self.auth.require(bearer(request), op, resource).or_status()
    }

    /// The caller, authenticated.
    fn caller<T>(&self, request: &Request<T>) -> Result<Arc<Principal>, Status> {
        self.auth.authenticate(bearer(request)).or_status()
    }

    /// The caller, which must hold `op` on an existing plugin and own it (or be an admin).
    fn require_owner<T>(
        &self,
        request: &Request<T>,
        op: Operation,
        plugin: &str,
    ) -> Result<(), Status> {
        let principal = self.caller(request)?;
        let owner = self.plugins.owner(plugin).or_status()?;
        auth::check_owner(&principal, op, plugin, owner.as_deref()).or_status()?;
        Ok(())
    }

    /// Pause and resume: the same grant (`pause`), ownership, and call.
    async fn set_paused(
        &self,
        request: Request<pb::PluginRef>,
        paused: bool,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        self.require_owner(&request, Operation::Pause, &request.get_ref().name)?;
        let (plugins, name) = (self.plugins.clone(), request.into_inner().name);
        Ok(Response::new(crate::plugin_rpc::plugin_info(
            self.to_the_end(async move { plugins.set_paused(&name, paused).await })
                .await?,
        )))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `authorization` metadata of a request (a value that is not ASCII reads as malformed).
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(auth::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""))
}

#[tonic::async_trait]
impl Weir for WeirService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        self.require(
            &request,
            Operation::Create,
            Resource::Topic(&request.get_ref().name),
        )?;
        let r = request.into_inner();
        let config = TopicConfig {
            name: r.name,
            partitions: r.partitions,
            retention_ms: r.retention_ms,
            retention_bytes: r.retention_bytes,
            admission: admission(r.admit_per_key, r.admit_window_ms),
        };
        Ok(Response::new(
            self.broker.create_topic(config).await.or_status()?.into(),
        ))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let principal = self.caller(&request)?;
        // Topics other nodes of a shared log created or deleted.
        self.broker.refresh_topics().await.or_status()?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: self
                .broker
                .list_topics()
                .into_iter()
                .filter(|t| principal.sees(Resource::Topic(&t.config.name)))
                .map(Into::into)
                .collect(),
        }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        let principal = self.caller(&request)?;
        let name = &request.get_ref().name;
        if !principal.sees(Resource::Topic(name)) {
            // Describing needs a grant of any operation on the topic.
            auth::check(&principal, Operation::Subscribe, Resource::Topic(name)).or_status()?;
        }
        self.broker.ensure_topic(name).await.or_status()?;
        Ok(Response::new(
            self.broker
                .describe_topic(&request.into_inner().name)
                .or_status()?
                .into(),
        ))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        self.require(
            &request,
            Operation::Delete,
            Resource::Topic(&request.get_ref().name),
        )?;
        self.broker
            .ensure_topic(&request.get_ref().name)
            .await
            .or_status()?;
        self.broker
            .delete_topic(&request.into_inner().name)
            .await
            .or_status()?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn init_producer(
        &self,
        request: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        let principal = self.caller(&request)?;
        let (producer_id, epoch) = self
            .broker
            .init_producer(request.into_inner().producer_id, &caller_of(&principal))
            .await
            .or_status()?;
        Ok(Response::new(pb::InitProducerResponse {
            producer_id,
            epoch,
        }))
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let principal = self.require(
            &request,
            Operation::Publish,
            Resource::Topic(&request.get_ref().topic),
        )?;
        let r = request.into_inner();
        let id = r.request_id;
        let span = tracing::debug_span!("publish", topic = %r.topic, records = r.records.len());
        let publish = publish_of(r, caller_of(&principal));
        let acks = tracing::Instrument::instrument(self.broker.publish(publish), span)
            .await
            .or_status()?;
        Ok(Response::new(acks_response(id, acks)))
    }

    type PublishStreamStream = BoxStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let principal = self.caller(&request)?;
        let permit = self.streams.acquire(
            request.remote_addr(),
            self.limits.max_streams_per_connection,
        )?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT);
        let broker = self.broker.clone();
        tokio::spawn(crate::streams::publish_stream(
            inbound, principal, broker, tx,
        ));
        Ok(Response::new(Box::pin(Guarded::new(
            ReceiverStream::new(rx),
            permit,
            None,
        ))))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.require(
            &request,
            Operation::Subscribe,
            Resource::Topic(&request.get_ref().topic),
        )?;
        let permit = self.streams.acquire(
            request.remote_addr(),
            self.limits.max_streams_per_connection,
        )?;
        let r = request.into_inner();
        self.broker.ensure_topic(&r.topic).await.or_status()?;
        let info = self.broker.describe_topic(&r.topic).or_status()?;
        let partitions: Vec<u32> = if r.partitions.is_empty() {
            (0..info.config.partitions).collect()
        } else {
            r.partitions.clone()
        };
        let mut listed = std::collections::HashSet::new();
        if let Some(twice) = partitions.iter().find(|p| !listed.insert(**p)) {
            return Err(of_broker(BrokerError::InvalidArgument(format!(
                "partition {twice} is listed twice; list each partition once (or none for all)"
            ))));
        }
        let committed: HashMap<u32, u64> = match &r.group {
            Some(group) => self
                .broker
                .fetch_offsets(group, &r.topic)
                .await
                .or_status()?
                .into_iter()
                .collect(),
            None => HashMap::new(),
        };
        // The group is in use while the stream lives (it does not expire).
        let member = r
            .group
            .as_ref()
            .map(|g| self.broker.join_group(g, &r.topic));
        let start = start_at(r.start);
        let limits = ReadLimits {
            max_records: match r.max_batch_records as usize {
                0 => SUBSCRIBE_BATCH_DEFAULT,
                n => n.min(SUBSCRIBE_BATCH_MAX),
            },
            max_bytes: match r.max_bytes as usize {
                0 => SUBSCRIBE_BYTES_DEFAULT,
                n => n.min(SUBSCRIBE_BYTES_MAX),
            },
        };
        let mut positions = Vec::with_capacity(partitions.len());
        for p in partitions {
            let position = match committed.get(&p) {
                Some(&offset) => offset.max(
                    self.broker
                        .resolve_start(&r.topic, p, StartAt::Earliest)
                        .await
                        .or_status()?,
                ),
                None => self
                    .broker
                    .resolve_start(&r.topic, p, start)
                    .await
                    .or_status()?,
            };
            positions.push((p, position));
        }
        let (tx, rx) = mpsc::channel(2 * positions.len().max(1));
        for (p, position) in positions {
            let follower = Follower {
                broker: self.broker.clone(),
                topic: r.topic.clone(),
                partition: p,
                position,
                limits,
                tx: tx.clone(),
            };
            tokio::spawn(follower.run(self.shutdown.clone()));
        }
        Ok(Response::new(Box::pin(Guarded::new(
            ReceiverStream::new(rx),
            permit,
            member,
        ))))
    }

    async fn commit_offsets(
        &self,
        request: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        self.require(
            &request,
            Operation::Subscribe,
            Resource::Topic(&request.get_ref().topic),
        )?;
        self.broker
            .ensure_topic(&request.get_ref().topic)
            .await
            .or_status()?;
        let r = request.into_inner();
        let offsets = r
            .offsets
            .into_iter()
            .map(|o| (o.partition, o.offset))
            .collect();
        self.broker
            .commit_offsets(&r.group, &r.topic, offsets)
            .await
            .or_status()?;
        Ok(Response::new(pb::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<pb::FetchOffsetsRequest>,
    ) -> Result<Response<pb::FetchOffsetsResponse>, Status> {
        self.require(
            &request,
            Operation::Subscribe,
            Resource::Topic(&request.get_ref().topic),
        )?;
        self.broker
            .ensure_topic(&request.get_ref().topic)
            .await
            .or_status()?;
        let r = request.into_inner();
        let offsets = self
            .broker
            .fetch_offsets(&r.group, &r.topic)
            .await
            .or_status()?;
        self.broker.touch_group(&r.group, &r.topic);
        Ok(Response::new(pb::FetchOffsetsResponse {
            offsets: offsets
                .into_iter()
                .map(|(partition, offset)| pb::PartitionOffset { partition, offset })
                .collect(),
        }))
    }

    async fn deploy_plugin(
        &self,
        request: Request<pb::DeployPluginRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        let principal = self.require(
            &request,
            Operation::Deploy,
            Resource::Plugin(&request.get_ref().name),
        )?;
        let names_timeout = request.get_ref().timeout_ms != 0;
        let mut deploy = crate::plugin_rpc::deploy_request(request.into_inner())?;
        if !names_timeout {
            // The default bound, lowered to this server's ceiling: a deploy is never refused
            // for a value its user did not give.
            deploy.limits.timeout = deploy.limits.timeout.min(self.max_plugin_timeout);
        }
        weir_plugins::spec::check_settings(&deploy.alerts, deploy.max_rate, &deploy.config)
            .map_err(|m| status(Code::InvalidArgument, "invalid-argument", m))?;
        // A plugin acts with its owner's rights: it reads only what the owner may read and
        // emits only where the owner may publish.
        auth::check(
            &principal,
            Operation::Subscribe,
            Resource::Topic(&deploy.input),
        )
        .or_status()?;
        for output in &deploy.outputs {
            auth::check(&principal, Operation::Publish, Resource::Topic(output)).or_status()?;
        }
        if deploy.on_error == weir_plugins::OnError::Dlq {
            // Its dead letters go to `<name>.dlq`, which may already exist.
            let dlq = format!("{}.dlq", deploy.name);
            auth::check(&principal, Operation::Publish, Resource::Topic(&dlq)).or_status()?;
        }
        deploy.owner = Some(principal.name.clone());
        deploy.owner_quota = Some(
            principal
                .max_plugins
                .unwrap_or(self.limits.max_plugins_per_principal),
        );
        let plugins = self.plugins.clone();
        Ok(Response::new(crate::plugin_rpc::plugin_info(
            self.to_the_end(async move { plugins.deploy(deploy).await })
                .await?,
        )))
    }

    async fn upgrade_plugin(
        &self,
        request: Request<pb::UpgradePluginRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        self.require_owner(&request, Operation::Upgrade, &request.get_ref().name)?;
        let r = request.into_inner();
        let plugins = self.plugins.clone();
        Ok(Response::new(crate::plugin_rpc::plugin_info(
            self.to_the_end(async move { plugins.upgrade(&r.name, r.wasm).await })
                .await?,
        )))
    }

    async fn list_plugins(
        &self,
        request: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        let principal = self.caller(&request)?;
        Ok(Response::new(pb::ListPluginsResponse {
            plugins: self
                .plugins
                .list()
                .into_iter()
                .filter(|p| principal.sees(Resource::Plugin(&p.spec.name)))
                .map(crate::plugin_rpc::plugin_info)
                .collect(),
        }))
    }

    async fn pause_plugin(
        &self,
        request: Request<pb::PluginRef>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        self.set_paused(request, true).await
    }

    async fn resume_plugin(
        &self,
        request: Request<pb::PluginRef>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        self.set_paused(request, false).await
    }

    async fn remove_plugin(
        &self,
        request: Request<pb::PluginRef>,
    ) -> Result<Response<pb::RemovePluginResponse>, Status> {
        self.require_owner(&request, Operation::Remove, &request.get_ref().name)?;
        let (plugins, name) = (self.plugins.clone(), request.into_inner().name);
        self.to_the_end(async move { plugins.remove(&name).await })
            .await?;
        Ok(Response::new(pb::RemovePluginResponse {}))
    }

    async fn plugin_logs(
        &self,
        request: Request<pb::PluginRef>,
    ) -> Result<Response<pb::PluginLogsResponse>, Status> {
        self.require(
            &request,
            Operation::ReadLogs,
            Resource::Plugin(&request.get_ref().name),
        )?;
        let lines = self
            .plugins
            .logs(&request.into_inner().name)
            .await
            .or_status()?;
        Ok(Response::new(pb::PluginLogsResponse {
            // A line about a failing store quotes its error, which may carry sled's debug form.
            lines: lines.into_iter().map(plain_io_errors).collect(),
        }))
    }

    async fn get_lag(
        &self,
        request: Request<pb::GetLagRequest>,
    ) -> Result<Response<pb::GetLagResponse>, Status> {
        let principal = self.caller(&request)?;
        let name = request.into_inner().name;
        let snapshot = self.monitor.snapshot();
        // Plugins are seen through grants on their name, groups through grants on their topic.
        let visible = |kind: ConsumerKind, consumer: &str, topic: Option<&str>| {
            (name.is_empty() || name == consumer)
                && match kind {
                    ConsumerKind::Plugin => principal.sees(Resource::Plugin(consumer)),
                    ConsumerKind::Group => topic.is_none_or(|t| principal.sees(Resource::Topic(t))),
                }
        };
        let rows: Vec<pb::LagRow> = snapshot
            .rows
            .into_iter()
            .filter(|r| visible(r.kind, &r.name, Some(&r.topic)))
            .map(lag_row)
            .collect();
        let consumers = snapshot
            .consumers
            .into_iter()
            .filter(|c| visible(c.kind, &c.name, None) && rows.iter().any(|r| r.name == c.name))
            .map(consumer_health)
            .collect();
        if !name.is_empty() && rows.is_empty() && self.plugins.owner(&name).is_err() {
            return Err(Status::not_found(format!(
                "no plugin or consumer group named {name:?} (groups appear once they commit offsets)"
            )));
        }
        Ok(Response::new(pb::GetLagResponse { rows, consumers }))
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        self.require(
            &request,
            Operation::ReadState,
            Resource::Plugin(&request.get_ref().plugin),
        )?;
        Ok(Response::new(
            crate::plugin_rpc::get_state(&self.plugins, &self.broker, request.into_inner()).await?,
        ))
    }
}
