//! Which weir node a Kafka client is sent to: the brokers of Metadata, each partition's
//! leader and each group's coordinator.
//!
//! A single node is broker [`NODE_ID`], every partition's leader and every group's
//! coordinator. On a cluster, the server gives a [`Placement`]: the live nodes that serve
//! Kafka, as its membership sees them. Leaders and coordinators are then chosen by rendezvous
//! hashing over those nodes, so every node names the same ones from the same view, and a node
//! joining or leaving moves only what it wins or held. A group is coordinated by one node (its
//! members, wherever they bootstrap, are sent there); a partition's leader is where clients
//! send its produces and fetches, though every node takes both.

use std::sync::Arc;

use crate::wire::Ctx;
use crate::{KafkaOptions, NODE_ID};

/// One node as Kafka clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaNode {
    /// Its broker id (stable for the node's life).
    pub id: i32,
    /// The host clients connect to.
    pub host: String,
    /// The port.
    pub port: u16,
}

/// The cluster's Kafka nodes as this node sees them (weir-server implements it over the
/// plugin cluster's membership).
pub trait Placement: Send + Sync {
    /// This node's broker id.
    fn me(&self) -> i32;
    /// The live nodes serving Kafka, this one included; `None` while this node cannot see
    /// the cluster (its look at the membership failed or is older than a node's time-out).
    fn nodes(&self) -> Option<Vec<KafkaNode>>;
}

/// The nodes one answer is made with.
pub(crate) struct Nodes {
    pub(crate) me: i32,
    pub(crate) all: Vec<KafkaNode>,
}

impl Nodes {
    /// The nodes of a listener: this one alone, or the placement's view (`None` while it
    /// has none).
    pub(crate) fn of(options: &KafkaOptions) -> Option<Nodes> {
        match &options.placement {
            None => Some(Nodes {
                me: NODE_ID,
                all: vec![KafkaNode {
                    id: NODE_ID,
                    host: options.advertised.0.clone(),
                    port: options.advertised.1,
                }],
            }),
            Some(p) => placed(p),
        }
    }

    /// [`Nodes::of`], or this node alone while a cluster node cannot see the cluster: it
    /// still takes every partition's produces and fetches.
    pub(crate) fn or_alone(options: &KafkaOptions) -> Nodes {
        Nodes::of(options).unwrap_or_else(|| {
            let me = options.placement.as_ref().map_or(NODE_ID, |p| p.me());
            Nodes {
                me,
                all: vec![KafkaNode {
                    id: me,
                    host: options.advertised.0.clone(),
                    port: options.advertised.1,
                }],
            }
        })
    }

    /// The node coordinating `group`.
    pub(crate) fn coordinator(&self, group: &str) -> &KafkaNode {
        self.chosen(&format!("group\u{0}{group}"))
    }

    /// The broker id of `topic`'s `partition` leader.
    pub(crate) fn leader(&self, topic: &str, partition: u32) -> i32 {
        self.chosen(&format!("partition\u{0}{topic}\u{0}{partition}"))
            .id
    }

    fn chosen(&self, what: &str) -> &KafkaNode {
        self.all
            .iter()
            .max_by_key(|n| weir_core::rendezvous_rank(&n.id.to_string(), what))
            .expect("a placement's nodes include this one")
    }
}

fn placed(p: &Arc<dyn Placement>) -> Option<Nodes> {
    let me = p.me();
    let all = p.nodes()?;
    // A view without this node (it has not seen its own heartbeat yet) is not one to send
    // clients by: they would be sent away from the node that answers.
    all.iter().any(|n| n.id == me).then_some(Nodes { me, all })
}

/// Whether this node coordinates `group`. While a cluster node cannot see the cluster, it
/// keeps the groups it holds and sends others to find their coordinator again.
pub(crate) fn coordinates(ctx: &Ctx, group: &str) -> bool {
    placed_here(&ctx.options, group, ctx.coordinator.holds(group))
}

/// [`coordinates`], given whether this node holds `group` now.
pub(crate) fn placed_here(options: &KafkaOptions, group: &str, held: bool) -> bool {
    match Nodes::of(options) {
        Some(n) => n.coordinator(group).id == n.me,
        None => held,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[i32]) -> Nodes {
        Nodes {
            me: ids[0],
            all: ids
                .iter()
                .map(|&id| KafkaNode {
                    id,
                    host: "h".into(),
                    port: id as u16,
                })
                .collect(),
        }
    }

    #[test]
    fn groups_and_partitions_spread_and_move_only_from_a_leaving_node() {
        let three = nodes(&[11, 22, 33]);
        let two = nodes(&[11, 22]);
        let mut per_node = std::collections::HashMap::new();
        for g in 0..300 {
            let group = format!("g{g}");
            let before = three.coordinator(&group).id;
            *per_node.entry(before).or_insert(0) += 1;
            let after = two.coordinator(&group).id;
            if before != 33 {
                assert_eq!(before, after, "{group} moved though its node stayed");
            }
        }
        assert!(per_node.values().all(|&n| n > 60), "{per_node:?}");
        let leaders: std::collections::HashSet<i32> =
            (0..12).map(|p| three.leader("orders", p)).collect();
        assert_eq!(leaders.len(), 3);
        // The order nodes are listed in does not matter.
        let shuffled = nodes(&[33, 11, 22]);
        for p in 0..12 {
            assert_eq!(three.leader("orders", p), shuffled.leader("orders", p));
        }
    }
}
