//! One client connection: length-prefixed frames in, answers out in request order.
//!
//! Requests are taken in order: a produce is applied (its offsets assigned, in the order the
//! client sent its batches) before the next request is read, and only its wait for
//! durability runs beside the reading. Answers are written in request order whatever order
//! they finish in, as Kafka clients require; at most [`IN_FLIGHT`] wait at once, then the
//! reading waits (backpressure instead of memory).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, CreateTopicsRequest, DeleteTopicsRequest, DescribeGroupsRequest,
    FetchRequest, FindCoordinatorRequest, HeartbeatRequest, InitProducerIdRequest,
    JoinGroupRequest, LeaveGroupRequest, ListGroupsRequest, ListOffsetsRequest, MetadataRequest,
    OffsetCommitRequest, OffsetFetchRequest, ProduceRequest, RequestHeader,
    SaslAuthenticateRequest, SaslHandshakeRequest, SyncGroupRequest,
};
use kafka_protocol::protocol::Decodable;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weir_broker::Broker;

use crate::coordinator::Coordinator;
use crate::wire::{encode, ready, Answer, Ctx};
use crate::{access, admin, apis, fetch, groups, offsets, produce, KafkaOptions, MAX_FRAME_BYTES};

/// Answers a connection may have waiting (Kafka clients pipeline up to 5 by default).
const IN_FLIGHT: usize = 16;

/// Largest frame before a login (Kafka's `sasl.server.max.receive.size`).
const PRE_LOGIN_FRAME_BYTES: usize = 512 * 1024;

/// How long answers still queued at shutdown may take to be read by their client.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a connection may take to log in, on a server that asks for it.
const LOGIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one connection until the client closes it, a frame does not decode, or shutdown.
pub(crate) async fn run<S>(
    socket: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    coordinator: Arc<Coordinator>,
    options: Arc<KafkaOptions>,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(socket);
    let (answers, mut to_write) = mpsc::channel::<Answer>(IN_FLIGHT);
    let write_loop = tokio::spawn(async move {
        while let Some(answer) = to_write.recv().await {
            if let Some(frame) = answer.await? {
                writer
                    .write_all(&frame)
                    .await
                    .map_err(|e| format!("writing an answer: {e}"))?;
            }
        }
        Ok::<(), String>(())
    });
    let ctx = Ctx {
        broker,
        coordinator,
        options,
        shutdown: shutdown.clone(),
        peer,
        login: Default::default(),
        closing: Default::default(),
    };
    tracing::debug!(message = "Kafka client connected.", %peer);
    let login_by = tokio::time::Instant::now() + LOGIN_WITHIN;
    let read_result = async {
        loop {
            // Until a client has logged in (on a server that asks), its frames are small and
            // its time is short: an anonymous socket cannot hold memory or a slot for long.
            let must_log_in = access::must_log_in(&ctx);
            let max = if must_log_in {
                PRE_LOGIN_FRAME_BYTES
            } else {
                MAX_FRAME_BYTES
            };
            let frame = tokio::select! {
                f = read_frame(&mut reader, max) => f?,
                _ = tokio::time::sleep_until(login_by), if must_log_in => {
                    return Err(format!("no SASL login within {LOGIN_WITHIN:?}"));
                }
                _ = shutdown.cancelled() => return Ok(()),
            };
            let Some(frame) = frame else { return Ok(()) };
            let answer = handle(frame, &ctx).await?;
            // Before a login, a client that does not read its answers must not hold the
            // connection past the login deadline either.
            let sent = if must_log_in {
                tokio::time::timeout_at(login_by, answers.send(answer))
                    .await
                    .map_err(|_| format!("no SASL login within {LOGIN_WITHIN:?}"))?
            } else {
                answers.send(answer).await
            };
            if sent.is_err() {
                return Ok(()); // the writer failed: its error is reported below
            }
            if ctx.closing.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(()); // after a failed login: its answer is written, then the end
            }
        }
    }
    .await;
    drop(answers);
    let mut write_loop = write_loop;
    let write_result = if read_result.is_err() {
        // Closing for a protocol error: answers still queued are not owed.
        write_loop.abort();
        Ok(())
    } else {
        // A client that stopped reading must not hold the server's shutdown.
        let stopping = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            r = &mut write_loop => r.unwrap_or_else(|e| Err(format!("the writer panicked: {e}"))),
            _ = stopping => {
                write_loop.abort();
                Err(format!("answers not read within {SHUTDOWN_GRACE:?} of shutdown"))
            }
        }
    };
    read_result.and(write_result)
}

/// The next frame's body, `None` at a clean end of stream.
async fn read_frame(
    reader: &mut (impl AsyncReadExt + Unpin),
    max: usize,
) -> Result<Option<Bytes>, String> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("reading a request: {e}")),
    }
    let len = i32::from_be_bytes(len);
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| (4..=max).contains(&l))
        .ok_or_else(|| {
            format!(
                "a request frame of {len} bytes (the limit is {max} here; is this a Kafka client?)"
            )
        })?;
    let mut body = BytesMut::zeroed(len);
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("reading a request of {len} bytes: {e}"))?;
    Ok(Some(body.freeze()))
}

/// Decodes one request and starts its answer. `Err` closes the connection: the frame could
/// not be understood well enough to answer it.
pub(crate) async fn handle(mut frame: Bytes, ctx: &Ctx) -> Result<Answer, String> {
    if frame.len() < 4 {
        return Err("a request shorter than its header".into());
    }
    let raw_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let key = ApiKey::try_from(raw_key).map_err(|()| format!("unknown API key {raw_key}"))?;
    if key == ApiKey::ApiVersions && !apis::speaks(key, version) {
        // KIP-511: a client asking with a newer ApiVersions than the broker's gets a v0
        // answer with UNSUPPORTED_VERSION and the versions the broker does speak.
        let correlation_id = correlation_id(&frame)?;
        return Ok(ready(admin::api_versions_unsupported(correlation_id)));
    }
    if !apis::speaks(key, version) {
        return Err(format!(
            "{key:?} v{version} is not supported (see docs/kafka.md for what weir speaks; the client should have read it from ApiVersions)"
        ));
    }
    if access::must_log_in(ctx) && !access::before_login(key) {
        return Err(format!(
            "a {key:?} request before logging in: this server asks Kafka clients for SASL/PLAIN with a weir token as the password (docs/kafka.md)"
        ));
    }
    let header = RequestHeader::decode(&mut frame, key.request_header_version(version))
        .map_err(|e| format!("a {key:?} v{version} request header: {e}"))?;
    let id = header.correlation_id;
    macro_rules! body {
        ($t:ty) => {
            <$t>::decode(&mut frame, version)
                .map_err(|e| format!("a {key:?} v{version} request: {e}"))?
        };
    }
    let answer = match key {
        ApiKey::ApiVersions => {
            let _ = body!(ApiVersionsRequest);
            ready(encode(key, version, id, &admin::api_versions()).map(Some))
        }
        ApiKey::Metadata => {
            let r = body!(MetadataRequest);
            ready(encode(key, version, id, &admin::metadata(ctx, r, version).await).map(Some))
        }
        ApiKey::CreateTopics => {
            let r = body!(CreateTopicsRequest);
            ready(
                encode(
                    key,
                    version,
                    id,
                    &admin::create_topics(ctx, r, version).await,
                )
                .map(Some),
            )
        }
        ApiKey::DeleteTopics => {
            let r = body!(DeleteTopicsRequest);
            ready(
                encode(
                    key,
                    version,
                    id,
                    &admin::delete_topics(ctx, r, version).await,
                )
                .map(Some),
            )
        }
        ApiKey::ListOffsets => {
            let r = body!(ListOffsetsRequest);
            ready(encode(key, version, id, &admin::list_offsets(ctx, r).await).map(Some))
        }
        ApiKey::InitProducerId => {
            let r = body!(InitProducerIdRequest);
            ready(encode(key, version, id, &admin::init_producer_id(ctx, r).await).map(Some))
        }
        ApiKey::Produce => {
            let r = body!(ProduceRequest);
            let silent = r.acks == 0;
            let pending = produce::produce(ctx, r, version).await;
            Box::pin(async move {
                let response = pending.await;
                if silent {
                    return Ok(None);
                }
                encode(key, version, id, &response).map(Some)
            })
        }
        ApiKey::Fetch => {
            let r = body!(FetchRequest);
            let (broker, shutdown) = (ctx.broker.clone(), ctx.shutdown.clone());
            let who = access::who(ctx);
            Box::pin(async move {
                let response = fetch::fetch(broker, who, r, version, shutdown).await;
                encode(key, version, id, &response).map(Some)
            })
        }
        ApiKey::FindCoordinator => {
            let r = body!(FindCoordinatorRequest);
            ready(encode(key, version, id, &groups::find_coordinator(ctx, r, version)).map(Some))
        }
        ApiKey::JoinGroup => {
            let r = body!(JoinGroupRequest);
            let client = header.client_id.map(|c| c.to_string()).unwrap_or_default();
            let joined = groups::join_group(ctx, r, version, client);
            Box::pin(async move { encode(key, version, id, &joined.await).map(Some) })
        }
        ApiKey::SyncGroup => {
            let r = body!(SyncGroupRequest);
            let synced = groups::sync_group(ctx, r);
            Box::pin(async move { encode(key, version, id, &synced.await).map(Some) })
        }
        ApiKey::Heartbeat => {
            let r = body!(HeartbeatRequest);
            ready(encode(key, version, id, &groups::heartbeat(ctx, r)).map(Some))
        }
        ApiKey::LeaveGroup => {
            let r = body!(LeaveGroupRequest);
            ready(encode(key, version, id, &groups::leave_group(ctx, r, version)).map(Some))
        }
        ApiKey::OffsetCommit => {
            // Committed (and durable) before the next request is read: a pipelined
            // OffsetFetch or LeaveGroup after it sees it.
            let r = body!(OffsetCommitRequest);
            ready(encode(key, version, id, &offsets::offset_commit(ctx, r).await).map(Some))
        }
        ApiKey::OffsetFetch => {
            let r = body!(OffsetFetchRequest);
            ready(encode(key, version, id, &offsets::offset_fetch(ctx, r).await).map(Some))
        }
        ApiKey::DescribeGroups => {
            let r = body!(DescribeGroupsRequest);
            ready(encode(key, version, id, &groups::describe_groups(ctx, r).await).map(Some))
        }
        ApiKey::ListGroups => {
            let r = body!(ListGroupsRequest);
            ready(
                encode(
                    key,
                    version,
                    id,
                    &groups::list_groups(ctx, r, version).await,
                )
                .map(Some),
            )
        }
        ApiKey::SaslHandshake => {
            let r = body!(SaslHandshakeRequest);
            ready(encode(key, version, id, &access::handshake(ctx, r, version)).map(Some))
        }
        ApiKey::SaslAuthenticate => {
            let r = body!(SaslAuthenticateRequest);
            let answer = access::authenticate(ctx, r).unwrap_or_else(|refused| refused);
            ready(encode(key, version, id, &answer).map(Some))
        }
        other => return Err(format!("{other:?} is not supported")),
    };
    Ok(answer)
}

/// The correlation id of a request whose header version is unknown: it always follows the
/// key and version.
fn correlation_id(frame: &Bytes) -> Result<i32, String> {
    let mut b = frame.slice(4..);
    if b.remaining() < 4 {
        return Err("a request shorter than its header".into());
    }
    Ok(b.get_i32())
}
