//! The Kafka listener's placement on a cluster, over the plugin cluster's membership: the
//! live nodes whose heartbeats say they serve Kafka (`Membership::serve_kafka`), each with a
//! broker id taken from its node id. Group coordinators and partition leaders are placed over
//! them by weir-kafka (`placement.rs`).

use std::sync::Arc;

use weir_kafka::{KafkaNode, Placement};
use weir_plugins::cluster::Membership;

/// [`Placement`] over this node's membership view.
pub(crate) struct MembershipPlacement(pub(crate) Arc<Membership>);

impl Placement for MembershipPlacement {
    fn me(&self) -> i32 {
        broker_id(&self.0.node)
    }

    fn nodes(&self) -> Option<Vec<KafkaNode>> {
        let view = self.0.view()?;
        Some(
            view.kafka
                .iter()
                .filter_map(|(node, advertised)| {
                    let (host, port) = advertised.rsplit_once(':')?;
                    Some(KafkaNode {
                        id: broker_id(node),
                        host: host.to_string(),
                        port: port.parse().ok()?,
                    })
                })
                .collect(),
        )
    }
}

/// A node's broker id: its node id (8 hex digits, new at every start) as a non-negative i32.
/// Two nodes of one cluster share one with a chance of 1 in 2³¹ per pair.
fn broker_id(node: &str) -> i32 {
    let bits = u32::from_str_radix(node, 16).unwrap_or_else(|_| {
        node.bytes()
            .fold(0u32, |h, b| h.rotate_left(5) ^ u32::from(b))
    });
    (bits & 0x7fff_ffff) as i32
}

#[cfg(test)]
mod tests {
    #[test]
    fn broker_ids_are_non_negative_and_differ_by_node() {
        assert_eq!(super::broker_id("0000002a"), 42);
        assert_eq!(super::broker_id("ffffffff"), i32::MAX);
        assert_ne!(super::broker_id("0a0b0c0d"), super::broker_id("0a0b0c0e"));
    }
}
