//! The streaming calls' tasks: a publish stream (requests appended in stream order, answers
//! as each becomes durable) and a subscriber's partition (records from a position, following
//! the tail until the subscriber leaves, the topic is deleted or the server shuts down).

use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use weir_api::pb;

use futures::stream::{FuturesOrdered, StreamExt};
use weir_broker::{Broker, ReadLimits};

use crate::auth::{self, Operation, Principal, Resource};
use crate::rpc_convert::{acks_response, caller_of, error_response, publish_of, status_response};
use crate::statuses::of_broker;

/// Publishes of one stream awaiting durability at once.
pub(crate) const STREAM_IN_FLIGHT: usize = 64;

/// Appends a PublishStream's requests in order and answers each once durable (at most
/// [`STREAM_IN_FLIGHT`] waiting), until the client closes the stream or goes away.
pub(crate) async fn publish_stream(
    mut inbound: tonic::Streaming<pb::PublishRequest>,
    principal: Arc<Principal>,
    broker: Arc<Broker>,
    tx: mpsc::Sender<Result<pb::PublishResponse, Status>>,
) {
    type Pending = Pin<Box<dyn Future<Output = pb::PublishResponse> + Send>>;
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut inbound_open = true;
    loop {
        tokio::select! {
            message = inbound.message(), if inbound_open && pending.len() < STREAM_IN_FLIGHT => match message {
                Ok(Some(r)) => {
                    let id = r.request_id;
                    if let Err(denied) = auth::check(&principal, Operation::Publish, Resource::Topic(&r.topic)) {
                        pending.push_back(Box::pin(std::future::ready(status_response(id, crate::statuses::of_auth(denied)))));
                        continue;
                    }
                    // Appended here, in stream order; only the durability wait overlaps.
                    let publish = publish_of(r, caller_of(&principal));
                    let future: Pending = match broker.append(publish).await {
                        Ok(p) => Box::pin(async move { match p.acked().await {
                            Ok(acks) => acks_response(id, acks),
                            Err(e) => error_response(id, e),
                        } }),
                        Err(e) => Box::pin(std::future::ready(error_response(id, e))),
                    };
                    pending.push_back(future);
                }
                Ok(None) => inbound_open = false,
                Err(status) => {
                    tracing::debug!(message = "Publish stream broke.", %status);
                    inbound_open = false;
                }
            },
            Some(response) = pending.next() => {
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            else => return,
        }
    }
}

/// Streams one partition to a subscriber, following the tail until the subscriber leaves,
/// the topic is deleted or the server shuts down.
pub(crate) struct Follower {
    pub(crate) broker: Arc<Broker>,
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) position: u64,
    pub(crate) limits: ReadLimits,
    pub(crate) tx: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
}

impl Follower {
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut watch = match self.broker.watch(&self.topic, self.partition) {
            Ok(w) => w,
            Err(e) => {
                let _ = self.tx.send(Err(of_broker(e))).await;
                return;
            }
        };
        loop {
            watch.borrow_and_update();
            let records = match self
                .broker
                .read_limited(&self.topic, self.partition, self.position, self.limits)
                .await
            {
                Ok(records) => records,
                Err(e) => {
                    let _ = self.tx.send(Err(of_broker(e))).await;
                    return;
                }
            };
            if let Some(last) = records.last() {
                self.position = last.offset + 1;
                let response = pb::SubscribeResponse {
                    records: records.into_iter().map(Into::into).collect(),
                };
                if self.tx.send(Ok(response)).await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                changed = watch.changed() => if changed.is_err() {
                    let gone = Status::not_found(format!("topic {:?} was deleted", self.topic));
                    let _ = self.tx.send(Err(gone)).await;
                    return;
                },
                _ = self.tx.closed() => return,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
