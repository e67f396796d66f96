//! What a node sees of the cluster: the live nodes (and where they serve Kafka) and the
//! plugins' leases, read from the `cluster` table, and the rendezvous rule that places
//! plugins over the live nodes.

use std::collections::BTreeMap;

use super::{FORGET_NODE_MS, NODE_TTL_MS};

/// How strongly `node` is preferred for `plugin`: the live node with the highest rank runs
/// it ([`weir_core::rendezvous_rank`]).
pub fn rank(node: &str, plugin: &str) -> u64 {
    weir_core::rendezvous_rank(node, plugin)
}

/// What a node sees of the cluster after a tick.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Live nodes: id → gRPC address.
    pub live: BTreeMap<String, String>,
    /// Plugin → the node holding its lease (live or not).
    pub leases: BTreeMap<String, String>,
    /// Live nodes serving Kafka clients: id → advertised `host:port`.
    pub kafka: BTreeMap<String, String>,
}

impl View {
    /// The node that should run `plugin`: the live node with the highest hash of (node,
    /// plugin), so a node joining or leaving moves only the plugins it wins or held.
    pub fn preferred(&self, plugin: &str) -> Option<&str> {
        self.live
            .keys()
            .max_by_key(|node| rank(node, plugin))
            .map(String::as_str)
    }

    /// The holder of `plugin`'s lease if it is live.
    pub fn holder(&self, plugin: &str) -> Option<&str> {
        self.leases
            .get(plugin)
            .filter(|n| self.live.contains_key(*n))
            .map(String::as_str)
    }

    /// "node-id (address)" of `plugin`'s live holder.
    pub fn describe_holder(&self, plugin: &str) -> Option<String> {
        let node = self.holder(plugin)?;
        Some(format!("{node} ({})", self.live[node]))
    }
}

pub(super) fn parse(now: &BTreeMap<Vec<u8>, bytes::Bytes>, now_ms: i64) -> (View, Vec<Vec<u8>>) {
    let mut view = View::default();
    let mut forget = Vec::new();
    // (node, Kafka address, last heartbeat, start) of the live nodes serving Kafka.
    let mut kafka: Vec<(String, String, i64, i64)> = Vec::new();
    for (k, v) in now {
        let text = String::from_utf8_lossy(v);
        if let Some(node) = k.strip_prefix(b"n/") {
            // "<ms> <address>[ started=<ms>][ kafka=<host:port>]" (older nodes write the
            // first two alone)
            let mut fields = text.split(' ');
            let at = fields.next().unwrap_or("");
            let addr = fields.next().unwrap_or("");
            let rest: Vec<&str> = fields.collect();
            let field = |name: &str| rest.iter().find_map(|f| f.strip_prefix(name));
            let started = field("started=").and_then(|s| s.parse::<i64>().ok());
            let serves = field("kafka=");
            let at = at.parse::<i64>().unwrap_or(0);
            let age = now_ms - at;
            let node = String::from_utf8_lossy(node).into_owned();
            if age < NODE_TTL_MS {
                if let Some(serves) = serves {
                    kafka.push((node.clone(), serves.to_string(), at, started.unwrap_or(0)));
                }
                view.live.insert(node, addr.to_string());
            } else if age > FORGET_NODE_MS {
                forget.push(k.clone());
            }
        } else if let Some(plugin) = k.strip_prefix(b"l/") {
            view.leases.insert(
                String::from_utf8_lossy(plugin).into_owned(),
                text.into_owned(),
            );
        }
    }
    // A node restarted on the same Kafka address has a new id while its previous self's
    // heartbeat is still young: that one has not beaten since the new one started, so it is
    // gone. Nodes that both beat after each other's start both stay (every view alike).
    for (node, serves, at, _) in &kafka {
        let replaced = kafka
            .iter()
            .any(|(other, addr, _, started)| other != node && addr == serves && started > at);
        if !replaced {
            view.kafka.insert(node.clone(), serves.clone());
        }
    }
    (view, forget)
}
