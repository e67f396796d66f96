//! The Rust client of weir's gRPC API, used by the CLI, the benchmarks, the examples and the
//! tests, and the idempotent [`Producer`] that retries a failed publish with the same
//! sequence (the seed's 重试 2～3 次) so that the broker stores it once.

use std::collections::HashMap;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::broker::{StartAt, TopicInfo};
use crate::grpc::convert::start_position;
use crate::grpc::pb::{self, weir_client::WeirClient};
use crate::grpc::status::error_kind;
use crate::record::{partition_for_key, Record, StoredRecord, TopicConfig};

/// Default server address of the CLI and examples.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the weir server at {addr}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{}", status_message(.0))]
    Status(Status),
    /// The server's answer did not have the expected shape.
    #[error("unexpected response: {0}")]
    Protocol(String),
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Status(status)
    }
}

fn status_message(status: &Status) -> String {
    match status.code() {
        Code::Unavailable | Code::Unknown
            if status.message().contains("transport") || status.message().contains("connect") =>
        {
            format!("the weir server is unavailable: {}", status.message())
        }
        code => format!("{} ({code:?})", status.message()),
    }
}

impl ClientError {
    /// The gRPC status code, if the server answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// The server's error kind (`stale-epoch`, `sequence-gap`, ...), if any.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ClientError::Status(s) => error_kind(s),
            _ => None,
        }
    }
}

/// Where the records of one partition of a publish went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Partition.
    pub partition: u32,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Records stored.
    pub count: u32,
    /// The batch was a retry of a stored one: offsets are those of the first write.
    pub duplicate: bool,
}

impl From<pb::PartitionAck> for Ack {
    fn from(a: pb::PartitionAck) -> Self {
        Ack {
            partition: a.partition,
            base_offset: a.base_offset,
            count: a.record_count,
            duplicate: a.duplicate,
        }
    }
}

/// How to reach a server beyond its address: a token and the CA of its TLS certificate.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// Bearer token (`weir auth token`), sent with every call.
    pub token: Option<String>,
    /// PEM of the CA that signed the server's certificate, for `https://` servers whose
    /// certificate the system's roots do not vouch for (self-signed, private CA).
    pub tls_ca_pem: Option<Vec<u8>>,
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Credentials {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert(crate::auth::AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// The generated client over weir's transport (channel + credentials).
pub type RawClient = WeirClient<InterceptedService<Channel, Credentials>>;

/// A connection to a weir server. Cheap to clone (one HTTP/2 connection underneath).
#[derive(Clone)]
pub struct Client {
    inner: RawClient,
}

impl Client {
    /// Connects to `addr` (e.g. `http://127.0.0.1:7070`).
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the address is malformed or nothing answers.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Client::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects with a token and TLS settings; `https://` addresses use TLS.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the address or token is malformed or nothing answers.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| connect_err(format!("{e} (expected a URL like http://127.0.0.1:7070)")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_adaptive_window(true);
        let endpoint = if addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = &options.tls_ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint
                .tls_config(tls)
                .map_err(|e| connect_err(format!("TLS setup: {e}")))?
        } else {
            endpoint
        };
        let authorization = match &options.token {
            Some(token) => Some(format!("Bearer {}", token.trim()).parse().map_err(|_| {
                connect_err("the token has characters that cannot go in a header".into())
            })?),
            None => None,
        };
        let channel = endpoint.connect().await.map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = s.to_string();
                source = s.source();
            }
            connect_err(reason)
        })?;
        let inner = WeirClient::with_interceptor(channel, Credentials { authorization })
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
        Ok(Client { inner })
    }

    /// The generated client, for calls this wrapper does not cover (streaming publish).
    pub fn raw(&self) -> RawClient {
        self.inner.clone()
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// Invalid name or partitions, or the topic exists.
    pub async fn create_topic(&self, config: &TopicConfig) -> Result<TopicInfo, ClientError> {
        let request = pb::CreateTopicRequest {
            name: config.name.clone(),
            partitions: config.partitions,
            retention_ms: config.retention_ms,
            retention_bytes: config.retention_bytes,
            admit_per_key: config.admission.map_or(0, |a| a.per_key),
            admit_window_ms: config.admission.map_or(0, |a| a.window_ms),
        };
        Ok(topic_info(
            self.inner.clone().create_topic(request).await?.into_inner(),
        ))
    }

    /// Lists topics.
    ///
    /// # Errors
    /// Transport failures.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        let topics = self
            .inner
            .clone()
            .list_topics(pb::ListTopicsRequest {})
            .await?
            .into_inner()
            .topics;
        Ok(topics.into_iter().map(topic_info).collect())
    }

    /// Describes one topic.
    ///
    /// # Errors
    /// Unknown topic.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        Ok(topic_info(
            self.inner
                .clone()
                .describe_topic(pb::DescribeTopicRequest { name: name.into() })
                .await?
                .into_inner(),
        ))
    }

    /// Deletes a topic and its data.
    ///
    /// # Errors
    /// Unknown topic.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        self.inner
            .clone()
            .delete_topic(pb::DeleteTopicRequest { name: name.into() })
            .await?;
        Ok(())
    }

    /// Publishes records once, without idempotence or retries (a retry could store twice;
    /// use a [`Producer`] for that). `partition: None` partitions by key.
    ///
    /// # Errors
    /// Validation errors from the broker, transport failures.
    pub async fn publish(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<Ack>, ClientError> {
        let request = pb::PublishRequest {
            topic: topic.into(),
            partition,
            records: records.into_iter().map(Into::into).collect(),
            producer: None,
            request_id: 0,
        };
        Ok(self
            .inner
            .clone()
            .publish(request)
            .await?
            .into_inner()
            .acks
            .into_iter()
            .map(Ack::from)
            .collect())
    }

    /// Starts an idempotent producer (allocates a producer id).
    ///
    /// # Errors
    /// Transport failures.
    pub async fn producer(&self) -> Result<Producer, ClientError> {
        let r = self
            .inner
            .clone()
            .init_producer(pb::InitProducerRequest { producer_id: None })
            .await?
            .into_inner();
        Ok(Producer {
            client: self.clone(),
            id: r.producer_id,
            epoch: r.epoch,
            sequences: HashMap::new(),
            partitions: HashMap::new(),
            retries: 3,
            backoff: Duration::from_millis(100),
            sticky: 0,
        })
    }

    /// Bumps the epoch of an existing producer id (fencing its older instances).
    ///
    /// # Errors
    /// Unknown producer id.
    pub async fn init_producer(&self, producer_id: Option<u64>) -> Result<(u64, u32), ClientError> {
        let r = self
            .inner
            .clone()
            .init_producer(pb::InitProducerRequest { producer_id })
            .await?
            .into_inner();
        Ok((r.producer_id, r.epoch))
    }

    /// Opens a subscription; see [`Subscription::next`].
    ///
    /// # Errors
    /// Unknown topic or partition, offset out of range.
    pub async fn subscribe(
        &self,
        topic: &str,
        partitions: &[u32],
        start: StartAt,
        group: Option<&str>,
    ) -> Result<Subscription, ClientError> {
        let request = pb::SubscribeRequest {
            topic: topic.into(),
            partitions: partitions.to_vec(),
            start: Some(start_position(start)),
            group: group.map(str::to_string),
            max_batch_records: 0,
        };
        Ok(Subscription {
            stream: self.inner.clone().subscribe(request).await?.into_inner(),
        })
    }

    /// Commits a consumer group's next offsets.
    ///
    /// # Errors
    /// Unknown topic or partition.
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<(), ClientError> {
        let offsets = offsets
            .iter()
            .map(|&(partition, offset)| pb::PartitionOffset { partition, offset })
            .collect();
        self.inner
            .clone()
            .commit_offsets(pb::CommitOffsetsRequest {
                group: group.into(),
                topic: topic.into(),
                offsets,
            })
            .await?;
        Ok(())
    }

    /// A consumer group's committed offsets for a topic.
    ///
    /// # Errors
    /// Unknown topic.
    pub async fn fetch_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        let r = self
            .inner
            .clone()
            .fetch_offsets(pb::FetchOffsetsRequest {
                group: group.into(),
                topic: topic.into(),
            })
            .await?
            .into_inner();
        Ok(r.offsets
            .into_iter()
            .map(|o| (o.partition, o.offset))
            .collect())
    }
}

/// The answer to a state query made after publishing an input record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateAnswer {
    /// The plugin has not processed the record yet.
    Pending,
    /// Processed; the committed value and its version.
    Value(Vec<u8>, u64),
    /// Processed, and the key has no value.
    Absent,
}

/// A plugin as the server reports it.
pub type PluginStatus = pb::PluginInfo;

/// What to deploy; `Default` gives the server's defaults.
#[derive(Clone, Debug, Default)]
pub struct Deploy {
    /// Plugin name.
    pub name: String,
    /// The component's bytes.
    pub wasm: Vec<u8>,
    /// Input topic.
    pub input: String,
    /// Output topics.
    pub outputs: Vec<String>,
    /// `configure` config.
    pub config: Vec<(String, String)>,
    /// `earliest` or `latest` (empty = earliest).
    pub from: String,
    /// Memory cap in MiB (0 = default).
    pub memory_mb: u32,
    /// CPU bound per batch in ms (0 = default).
    pub timeout_ms: u32,
    /// `halt` or `dlq` (empty = halt).
    pub on_error: String,
    /// Message ids remembered for dedup (0 = default).
    pub dedup_ids: u64,
    /// How long ids are remembered, ms (0 = default).
    pub dedup_age_ms: u64,
    /// Alert above this many waiting records (0 = none).
    pub alert_lag: u64,
    /// Alert when the oldest waiting record is older than this, ms (0 = none).
    pub alert_delay_ms: u64,
    /// Most records per second over all partitions (0 = unbounded).
    pub max_rate: u64,
}

impl Client {
    /// Deploys a plugin.
    ///
    /// # Errors
    /// Invalid wasm, a component of another world, unknown topics, a taken name.
    pub async fn deploy_plugin(&self, d: Deploy) -> Result<PluginStatus, ClientError> {
        let request = pb::DeployPluginRequest {
            name: d.name,
            wasm: d.wasm.into(),
            input: d.input,
            outputs: d.outputs,
            config: d
                .config
                .into_iter()
                .map(|(key, value)| pb::ConfigEntry { key, value })
                .collect(),
            from: d.from,
            memory_mb: d.memory_mb,
            timeout_ms: d.timeout_ms,
            on_error: d.on_error,
            max_attempts: 0,
            max_batch: 0,
            dedup_ids: d.dedup_ids,
            dedup_age_ms: d.dedup_age_ms,
            alert_lag: d.alert_lag,
            alert_delay_ms: d.alert_delay_ms,
            max_rate: d.max_rate,
        };
        Ok(self
            .inner
            .clone()
            .deploy_plugin(request)
            .await?
            .into_inner())
    }

    /// Replaces a plugin's code.
    ///
    /// # Errors
    /// Unknown plugin, invalid wasm.
    pub async fn upgrade_plugin(
        &self,
        name: &str,
        wasm: Vec<u8>,
    ) -> Result<PluginStatus, ClientError> {
        Ok(self
            .inner
            .clone()
            .upgrade_plugin(pb::UpgradePluginRequest {
                name: name.into(),
                wasm: wasm.into(),
            })
            .await?
            .into_inner())
    }

    /// Every plugin with its partitions.
    ///
    /// # Errors
    /// Transport failures.
    pub async fn list_plugins(&self) -> Result<Vec<PluginStatus>, ClientError> {
        Ok(self
            .inner
            .clone()
            .list_plugins(pb::ListPluginsRequest {})
            .await?
            .into_inner()
            .plugins)
    }

    /// Pauses (`true`) or resumes a plugin.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn pause_plugin(&self, name: &str, pause: bool) -> Result<PluginStatus, ClientError> {
        let r = pb::PluginRef { name: name.into() };
        let mut inner = self.inner.clone();
        Ok(if pause {
            inner.pause_plugin(r).await?
        } else {
            inner.resume_plugin(r).await?
        }
        .into_inner())
    }

    /// Removes a plugin with its state.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn remove_plugin(&self, name: &str) -> Result<(), ClientError> {
        self.inner
            .clone()
            .remove_plugin(pb::PluginRef { name: name.into() })
            .await?;
        Ok(())
    }

    /// A plugin's log lines.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn plugin_logs(&self, name: &str) -> Result<Vec<String>, ClientError> {
        Ok(self
            .inner
            .clone()
            .plugin_logs(pb::PluginRef { name: name.into() })
            .await?
            .into_inner()
            .lines)
    }

    /// Lag, status, alerts and probe delays of one plugin or group (`""` for all).
    ///
    /// # Errors
    /// No plugin or group of that name.
    pub async fn lag(&self, name: &str) -> Result<pb::GetLagResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .get_lag(pb::GetLagRequest { name: name.into() })
            .await?
            .into_inner())
    }

    /// A plugin's committed state value and version.
    ///
    /// # Errors
    /// Unknown plugin.
    pub async fn get_state(
        &self,
        plugin: &str,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        let r = self.state_request(plugin, key, None).await?;
        Ok(r.found.then(|| (r.value.to_vec(), r.version)))
    }

    async fn state_request(
        &self,
        plugin: &str,
        key: &[u8],
        after: Option<pb::InputPosition>,
    ) -> Result<pb::GetStateResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .get_state(pb::GetStateRequest {
                plugin: plugin.into(),
                key: key.to_vec().into(),
                after,
            })
            .await?
            .into_inner())
    }

    /// A state value as seen by the publisher of the input record at `partition`/`offset`:
    /// `Pending` until the plugin has committed past that record.
    ///
    /// # Errors
    /// Unknown plugin or partition.
    pub async fn get_state_after(
        &self,
        plugin: &str,
        key: &[u8],
        partition: u32,
        offset: u64,
    ) -> Result<StateAnswer, ClientError> {
        let r = self
            .state_request(plugin, key, Some(pb::InputPosition { partition, offset }))
            .await?;
        Ok(if r.pending {
            StateAnswer::Pending
        } else if r.found {
            StateAnswer::Value(r.value.to_vec(), r.version)
        } else {
            StateAnswer::Absent
        })
    }
}

fn topic_info(t: pb::TopicInfo) -> TopicInfo {
    TopicInfo {
        config: TopicConfig {
            name: t.name,
            partitions: t.partitions,
            retention_ms: t.retention_ms,
            retention_bytes: t.retention_bytes,
            admission: crate::grpc::convert::admission(t.admit_per_key, t.admit_window_ms),
        },
        partitions: t
            .partition_info
            .into_iter()
            .map(|p| crate::broker::PartitionStats {
                partition: p.partition,
                start_offset: p.start_offset,
                end_offset: p.end_offset,
                size_bytes: p.size_bytes,
            })
            .collect(),
    }
}

/// An open subscription: batches of records as they are published.
pub struct Subscription {
    stream: tonic::Streaming<pb::SubscribeResponse>,
}

impl Subscription {
    /// The next batch (waits for new records at the tail); `None` when the server ended the
    /// stream.
    ///
    /// # Errors
    /// The stream failed (topic deleted, server gone).
    pub async fn next(&mut self) -> Result<Option<Vec<StoredRecord>>, ClientError> {
        Ok(self
            .stream
            .message()
            .await?
            .map(|r| r.records.into_iter().map(StoredRecord::from).collect()))
    }
}

/// An idempotent producer: numbers records per partition and retries a failed publish with the
/// same sequence, so that a retry whose first attempt was stored is answered with the first
/// write's offsets instead of being stored twice.
pub struct Producer {
    client: Client,
    id: u64,
    epoch: u32,
    /// Next sequence per (topic, partition).
    sequences: HashMap<(String, u32), u64>,
    /// Partition counts of topics seen, for client-side partitioning.
    partitions: HashMap<String, u32>,
    retries: u32,
    backoff: Duration,
    sticky: u32,
}

/// Whether a failed publish may be retried with the same sequence.
fn retriable(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } => true,
        ClientError::Status(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Internal
        ),
        ClientError::Protocol(_) => false,
    }
}

impl Producer {
    /// Producer id and epoch.
    pub fn id(&self) -> (u64, u32) {
        (self.id, self.epoch)
    }

    /// Sets how many times a failed publish is retried (default 3) and the first backoff
    /// (default 100 ms, doubling).
    pub fn with_retries(mut self, retries: u32, backoff: Duration) -> Self {
        self.retries = retries;
        self.backoff = backoff;
        self
    }

    /// Publishes `records` to one partition as one batch, retrying on transport failures.
    ///
    /// # Errors
    /// A refusal from the broker (not retried), or the last failure once retries are spent.
    /// After retries are spent the producer re-initialises (new epoch, sequences from 0) on
    /// its next send, as Kafka's does: whether the failed batch was stored is unknown.
    pub async fn send_to(
        &mut self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<Ack, ClientError> {
        let key = (topic.to_string(), partition);
        let base_sequence = *self.sequences.get(&key).unwrap_or(&0);
        let count = records.len() as u64;
        let request = pb::PublishRequest {
            topic: topic.into(),
            partition: Some(partition),
            records: records.into_iter().map(Into::into).collect(),
            producer: Some(pb::ProducerFields {
                producer_id: self.id,
                epoch: self.epoch,
                base_sequence,
            }),
            request_id: 0,
        };
        let mut backoff = self.backoff;
        let mut attempt = 0;
        loop {
            let result = self
                .client
                .inner
                .clone()
                .publish(request.clone())
                .await
                .map_err(ClientError::from);
            match result {
                Ok(response) => {
                    let ack = response
                        .into_inner()
                        .acks
                        .into_iter()
                        .next()
                        .map(Ack::from)
                        .ok_or_else(|| {
                            ClientError::Protocol("publish answered without an ack".into())
                        })?;
                    self.sequences.insert(key, base_sequence + count);
                    return Ok(ack);
                }
                Err(e) if attempt < self.retries && retriable(&e) => {
                    attempt += 1;
                    tracing::debug!(message = "Publish failed; retrying with the same sequence.", error = %e, attempt);
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    if retriable(&e) {
                        self.reinit().await.ok();
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn reinit(&mut self) -> Result<(), ClientError> {
        let (id, epoch) = self.client.init_producer(Some(self.id)).await?;
        self.id = id;
        self.epoch = epoch;
        self.sequences.clear();
        Ok(())
    }

    /// Publishes records to a topic, partitioned like the broker does (key hash; keyless
    /// records stick to one partition per call), one idempotent batch per partition.
    /// Returns each record's (partition, offset), in input order.
    ///
    /// # Errors
    /// As [`Producer::send_to`]; partitions already acknowledged stay stored.
    pub async fn send(
        &mut self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        let n = match self.partitions.get(topic) {
            Some(&n) => n,
            None => {
                let n = self.client.describe_topic(topic).await?.config.partitions;
                self.partitions.insert(topic.to_string(), n);
                n
            }
        };
        self.sticky = self.sticky.wrapping_add(1);
        let sticky = self.sticky % n;
        let mut by_partition: std::collections::BTreeMap<u32, Vec<(usize, Record)>> =
            Default::default();
        for (i, record) in records.into_iter().enumerate() {
            let p = record
                .key
                .as_deref()
                .map_or(sticky, |k| partition_for_key(k, n));
            by_partition.entry(p).or_default().push((i, record));
        }
        let total = by_partition.values().map(Vec::len).sum();
        let mut positions = vec![(0, 0); total];
        for (p, batch) in by_partition {
            let (indexes, records): (Vec<usize>, Vec<Record>) = batch.into_iter().unzip();
            let ack = self.send_to(topic, p, records).await?;
            for (rank, i) in indexes.into_iter().enumerate() {
                positions[i] = (p, ack.base_offset + rank as u64);
            }
        }
        Ok(positions)
    }
}
