//! What a request handler works with: its context, and the answer frame it makes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::Encodable;
use tokio_util::sync::CancellationToken;
use weir_broker::Broker;

use crate::coordinator::Coordinator;
use crate::KafkaOptions;

/// An answer being made: the encoded frame, `None` for a request answered by silence (a
/// produce with `acks=0`), or why the connection must close.
pub(crate) type Answer = Pin<Box<dyn Future<Output = Result<Option<Bytes>, String>> + Send>>;

/// What a request handler has: the broker, the group coordinator, how the listener presents
/// itself, the client's address.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) broker: Arc<Broker>,
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) options: Arc<KafkaOptions>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) peer: SocketAddr,
    /// Who logged in on this connection (SASL), once someone did.
    pub(crate) login: Arc<std::sync::OnceLock<Arc<dyn crate::grants::Principal>>>,
    /// Set when the connection must close once its queued answers are written (a failed
    /// login).
    pub(crate) closing: Arc<std::sync::atomic::AtomicBool>,
}

/// An answer that is ready.
pub(crate) fn ready(frame: Result<Option<Bytes>, String>) -> Answer {
    Box::pin(std::future::ready(frame))
}

/// A whole answer frame: length, response header, body.
pub(crate) fn encode<R: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &R,
) -> Result<Bytes, String> {
    let header_version = key.response_header_version(version);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let mut out = BytesMut::new();
    out.put_i32(0);
    header
        .encode(&mut out, header_version)
        .and_then(|()| body.encode(&mut out, version))
        .map_err(|e| format!("encoding a {key:?} v{version} answer: {e}"))?;
    let len = i32::try_from(out.len() - 4).map_err(|_| "an answer over 2 GiB".to_string())?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}
