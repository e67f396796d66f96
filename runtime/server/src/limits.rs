//! Per-server API limits that are not a broker's business: request size, open streams per
//! connection, plugins per principal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::{Context, Poll};

use futures::Stream;
use tonic::Status;

/// Limits of the gRPC API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// Largest gRPC message accepted, in bytes (a publish request, a deploy with its wasm).
    pub max_request_bytes: usize,
    /// Most open `Subscribe` / `PublishStream` calls per client connection.
    pub max_streams_per_connection: usize,
    /// Most plugins one principal may own, unless its auth entry says otherwise.
    pub max_plugins_per_principal: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_request_bytes: weir_api::MAX_MESSAGE_BYTES,
            max_streams_per_connection: 64,
            max_plugins_per_principal: 100,
        }
    }
}

/// Counts open streams per connection (the peer's address identifies the TCP connection).
#[derive(Debug, Default)]
pub struct StreamLimiter {
    open: Mutex<HashMap<SocketAddr, usize>>,
}

/// One open stream; the count drops when the stream it guards is dropped.
pub struct StreamPermit {
    limiter: Arc<StreamLimiter>,
    peer: SocketAddr,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock();
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

impl StreamLimiter {
    /// Takes a slot for a new stream of `peer`.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED when the connection already has `max` open streams.
    pub fn acquire(
        self: &Arc<Self>,
        peer: Option<SocketAddr>,
        max: usize,
    ) -> Result<Option<StreamPermit>, Status> {
        // In-process transports have no peer address; they are not network clients.
        let Some(peer) = peer else { return Ok(None) };
        let mut open = self.open.lock();
        let n = open.entry(peer).or_insert(0);
        if *n >= max {
            return Err(crate::statuses::limit_status(
                "too-many-streams",
                format!(
                    "this connection already has {n} open streams (subscribe / publish-stream); \
                     the server allows {max} per connection (--max-streams-per-connection): \
                     close one or open another connection"
                ),
            ));
        }
        *n += 1;
        Ok(Some(StreamPermit {
            limiter: self.clone(),
            peer,
        }))
    }
}

/// A response stream that holds its connection's stream permit, and its consumer group's
/// membership, while it lives.
pub struct Guarded<S> {
    inner: S,
    _permit: Option<StreamPermit>,
    _member: Option<weir_broker::GroupMember>,
}

impl<S> Guarded<S> {
    /// Wraps `inner`.
    pub fn new(
        inner: S,
        permit: Option<StreamPermit>,
        member: Option<weir_broker::GroupMember>,
    ) -> Self {
        Guarded {
            inner,
            _permit: permit,
            _member: member,
        }
    }
}

impl<S: Stream + Unpin> Stream for Guarded<S> {
    type Item = S::Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
