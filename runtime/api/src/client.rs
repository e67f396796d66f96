//! The Rust client of weir's gRPC API, used by the CLI, the benchmarks, the examples and the
//! tests, and the idempotent [`Producer`] that retries a failed publish with the same
//! sequence (the seed's 重试 2～3 次) so that the broker stores it once.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use weir_core::{Record, StartAt, StoredRecord, TopicConfig, TopicInfo};

use crate::convert::{start_position, topic_info};
use crate::pb::{self, weir_client::WeirClient};
use crate::{error_kind, tls, AUTHORIZATION, MAX_MESSAGE_BYTES};

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
    /// The address is not one weir speaks to (no call was made).
    #[error("{addr:?} is not a weir server address: {reason}")]
    Address {
        /// The address given.
        addr: String,
        /// What is wrong with it, and what to write instead.
        reason: String,
    },
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
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// The generated client over weir's transport (channel + credentials).
pub type RawClient = WeirClient<InterceptedService<Channel, Credentials>>;

/// A connection to a weir server. Cheap to clone (one HTTP/2 connection underneath).
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: RawClient,
}

impl Client {
    /// Connects to `addr` (e.g. `http://127.0.0.1:7070`).
    ///
    /// # Errors
    /// [`ClientError::Address`] for a scheme other than `http://` and `https://`;
    /// [`ClientError::Connect`] when the address is malformed or nothing answers.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Client::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects with a token and TLS settings; `https://` addresses use TLS, `http://` ones
    /// plain HTTP/2, and any other scheme is refused.
    ///
    /// # Errors
    /// [`ClientError::Address`] for a scheme other than `http://` and `https://`;
    /// [`ClientError::Connect`] when the address or token is malformed or nothing answers.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        check_scheme(addr).map_err(|reason| ClientError::Address {
            addr: addr.to_string(),
            reason,
        })?;
        let authorization = match &options.token {
            Some(token) => Some(format!("Bearer {}", token.trim()).parse().map_err(|_| {
                connect_err("the token has characters that cannot go in a header".into())
            })?),
            None => None,
        };
        let channel = match addr.strip_prefix("https://") {
            Some(rest) => {
                // TLS by our own connector (tls.rs): webpki plus certificates pinned with
                // --tls-ca. The endpoint itself is plain so tonic does not wrap it again.
                let authority = rest.trim_end_matches('/');
                let (host, port) = split_host_port(authority, 443).map_err(connect_err)?;
                let config =
                    tls::client_config(options.tls_ca_pem.as_deref()).map_err(connect_err)?;
                let endpoint = endpoint(&format!("http://{authority}")).map_err(connect_err)?;
                endpoint
                    .connect_with_connector(tls::Connector::new(config, host, port))
                    .await
            }
            None => endpoint(addr).map_err(connect_err)?.connect().await,
        }
        .map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = s.to_string();
                source = s.source();
            }
            connect_err(tls::explain(reason, options.tls_ca_pem.is_some()))
        })?;
        let inner = WeirClient::with_interceptor(channel, Credentials { authorization })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
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
            // Our own client takes messages up to MAX_MESSAGE_BYTES.
            max_bytes: 16 << 20,
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

/// Refuses an address whose scheme is not `http://` or `https://` (before this, `ftp://h:1`
/// was spoken to as plain HTTP).
fn check_scheme(addr: &str) -> Result<(), String> {
    let expected = "expected a URL like http://127.0.0.1:7070, or https://HOST:PORT for TLS";
    match addr.split_once("://") {
        Some(("http" | "https", _)) => Ok(()),
        Some((scheme, _)) => Err(format!(
            "weir speaks gRPC over http:// and https://, not {scheme}:// ({expected})"
        )),
        None => Err(format!(
            "it does not start with http:// or https:// ({expected})"
        )),
    }
}

/// An endpoint with weir's transport settings.
fn endpoint(addr: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(addr.to_string())
        .map_err(|e| format!("{e} (expected a URL like http://127.0.0.1:7070)"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_adaptive_window(true))
}

/// `host:port` (or `[v6]:port`, or a host alone with `default_port`).
fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16), String> {
    let bad = || {
        format!("{authority:?} is not host:port (expected a URL like https://weir.example:7070)")
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default_port,
            None => return Err(bad()),
        };
        return Ok((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_string(), port.parse().map_err(|_| bad())?)),
        None if !authority.is_empty() => Ok((authority.to_string(), default_port)),
        None => Err(bad()),
    }
}
