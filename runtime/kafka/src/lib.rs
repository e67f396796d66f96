//! weir-kafka: the Kafka protocol on `weir serve --kafka-listen ADDR`, so that existing Kafka
//! producers and consumers (librdkafka, the Java client, franz-go, kcat) work against weir
//! unchanged. gRPC stays the native API; both map onto the same [`Broker`]: a record produced
//! through Kafka is the record a gRPC client or a plugin reads, and an idempotent producer's
//! state is the one weir keeps (KIP-98), so a retry is stored once whichever way it comes.
//!
//! The codecs are the `kafka-protocol` crate's (generated from Kafka's message schemas); this
//! crate frames requests, decides which API versions it speaks ([`apis`]) and maps each
//! request onto the broker. What it does not support is not advertised in ApiVersions, and a
//! request for it is answered with Kafka's error code where the response can carry one
//! (docs/kafka.md has the coverage table). A frame that does not decode closes that
//! connection with a log line; the server and the other connections go on.

#![deny(missing_docs)]

mod access;
mod admin;
pub use grants::{Access, Principal, TopicOp};
pub mod apis;
mod batches;
mod conn;
mod coordinator;
mod errors;
mod fetch;
mod grants;
mod group;
mod groups;
mod offsets;
mod placement;
pub use placement::{KafkaNode, Placement};
mod produce;
// The tests run on the server's allocator. The protocol codec reserves `Vec`s for array
// counts read from the wire before reading their elements; mimalloc reserves a huge request
// lazily (the decode then fails at the short input and frees it), while the system
// allocator's refusal would abort the test process, as it would a server built with
// `--no-default-features` (docs/security.md, known gaps).
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_access;
#[cfg(test)]
mod tests_fuzz;
#[cfg(test)]
mod tests_groups;
#[cfg(test)]
mod tests_placement;
#[cfg(test)]
mod tests_produce;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weir_broker::Broker;

/// The broker id of a single node: every partition's leader and every group's coordinator
/// (a cluster's nodes have ids of their own: [`Placement`]).
pub const NODE_ID: i32 = 0;

/// The record header that carries weir's message id (gRPC's `Record.id`) through Kafka, as
/// `Nats-Msg-Id` does for NATS: taken out of a produced record's headers into its id, and
/// put back on every fetched record that has an id. Plugins skip a message id they have
/// processed, so an application's own retries are effects once whichever API sent them.
pub const ID_HEADER: &str = "weir-id";

/// Largest request frame accepted (Kafka's `socket.request.max.bytes` default, 100 MiB): a
/// longer length prefix closes the connection before anything is allocated.
pub const MAX_FRAME_BYTES: usize = 100 * 1024 * 1024;

/// How a Kafka listener presents itself.
#[derive(Clone)]
pub struct KafkaOptions {
    /// The `host:port` clients are told to connect to (Kafka's `advertised.listeners`).
    pub advertised: (String, u16),
    /// The cluster id shown in metadata.
    pub cluster_id: String,
    /// TLS on every connection (Kafka's `SSL` security protocol), with the server's
    /// certificate; `None`: plaintext.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// SASL/PLAIN logins with weir tokens and the grants that go with them; `None`: every
    /// client is the anonymous admin of an open server.
    pub access: Option<Arc<dyn Access>>,
    /// On a cluster, the nodes serving Kafka (leaders and group coordinators are placed over
    /// them); `None`: this node alone, broker [`NODE_ID`].
    pub placement: Option<Arc<dyn Placement>>,
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves Kafka clients on `listener` until `shutdown` is cancelled; connections are closed
/// then, answers in flight are finished first.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    options: KafkaOptions,
    shutdown: CancellationToken,
) {
    let options = Arc::new(options);
    let coordinator = Arc::new(coordinator::Coordinator::default());
    let connections = TaskTracker::new();
    // Sessions that time out, rebalances that run out of time and groups whose coordinator
    // is now another node are noticed here.
    let ticking = coordinator.clone();
    let tick_shutdown = shutdown.clone();
    let tick_options = options.clone();
    connections.spawn(async move {
        let mut tick = tokio::time::interval(coordinator::TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => tick_groups(&ticking, &tick_options),
                _ = tick_shutdown.cancelled() => return ticking.stop(),
            }
        }
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: the listener itself is fine; wait a moment.
                tracing::warn!(message = "Kafka listener: accept failed.", error = %e);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let (broker, options, shutdown) = (broker.clone(), options.clone(), shutdown.clone());
        let coordinator = coordinator.clone();
        connections.spawn(async move {
            let served = match options.tls.clone() {
                None => conn::run(socket, peer, broker, coordinator, options, shutdown).await,
                Some(tls) => match tokio::time::timeout(HANDSHAKE, tls.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        conn::run(stream, peer, broker, coordinator, options, shutdown).await
                    }
                    Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                    Err(_) => Err(format!("no TLS handshake within {HANDSHAKE:?}")),
                },
            };
            if let Err(why) = served {
                tracing::warn!(message = "Kafka connection closed.", %peer, reason = %why);
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// One look at the groups: sessions that expired, rebalances out of time and, on a view of
/// the cluster, groups now placed on another node (a node that cannot see the cluster keeps
/// the groups it holds).
fn tick_groups(coordinator: &coordinator::Coordinator, options: &KafkaOptions) {
    coordinator.tick();
    if let Some(nodes) = placement::Nodes::of(options) {
        coordinator.unload(|g| nodes.coordinator(g).id == nodes.me);
    }
}

/// The address to advertise for a listener bound to `bound` when none was given: the bound
/// address itself, or `localhost` for an unspecified one (0.0.0.0 is not an address a client
/// can connect to).
pub fn default_advertised(bound: SocketAddr) -> (String, u16) {
    let host = if bound.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        bound.ip().to_string()
    };
    (host, bound.port())
}
