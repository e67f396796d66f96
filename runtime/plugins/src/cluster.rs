//! Cluster mode: which weir node runs which plugin. A shared namespace `cluster` of the
//! replicated store holds each node's heartbeat (`n/<node>` → time in ms, address, and where
//! it serves Kafka if it does) and each plugin's lease (`l/<plugin>` → node). A node is live while its heartbeat is younger than
//! [`NODE_TTL_MS`]; a lease is valid while its node is live. A node writes its heartbeat
//! every second; every tick it takes, in one compare-and-set, the free leases (no holder, or
//! a holder that is not live) of the plugins whose preferred node it is (rendezvous hashing
//! over the live nodes), gives back those it was asked to, and drops its own leases of
//! plugins no longer registered.
//!
//! Leases are advisory: they decide who *should* run a plugin. What makes a second runner
//! harmless is the fence of the plugin's changelog — a node that takes a plugin over appends
//! a takeover entry, and the previous holder's next commit is refused by the engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use weir_log::{KvStore, LogError, ReplicatedKv};

/// A node whose heartbeat is older than this is dead: its plugins move.
pub const NODE_TTL_MS: i64 = 4_000;
/// Heartbeats of nodes dead this long are deleted.
const FORGET_NODE_MS: i64 = 60_000;
const NS: &str = "cluster";

mod view;
use view::parse;
pub use view::{rank, View};

/// This node's membership (its heartbeat is written by [`Membership::heartbeat`]; the
/// manager calls it every second from a task of its own while its cluster loop works, and
/// calls [`Membership::withhold`] instead while that loop fails and other nodes live).
pub struct Membership {
    kv: Arc<ReplicatedKv>,
    /// Since when this node's heartbeats have been landing without a gap longer than the
    /// time-out (`None`: the last one failed). A node cut off from the engine must not judge
    /// others dead from heartbeats it could not read.
    beating_since: parking_lot::Mutex<Option<std::time::Instant>>,
    last_beat: parking_lot::Mutex<Option<std::time::Instant>>,
    /// Plugins no live node held at this node's last ticks, since when.
    free_since: parking_lot::Mutex<BTreeMap<String, std::time::Instant>>,
    /// Plugins this node took because they were overdue, not because it is preferred: kept
    /// longer before a hand-back (the preferred node let them lapse once).
    taken_overdue: parking_lot::Mutex<std::collections::BTreeSet<String>>,
    /// When this node started (ms): in its heartbeat, so a node restarted on the same Kafka
    /// address replaces its previous self in everyone's view.
    started_ms: i64,
    /// The advertised address of this node's Kafka listener, once it serves one.
    kafka: parking_lot::Mutex<Option<String>>,
    /// The view of the last heartbeat or tick, and when it was taken.
    last_view: parking_lot::Mutex<Option<(std::time::Instant, Arc<View>)>>,
    /// This node's id (new at every start).
    pub node: String,
    /// This node's gRPC address, shown to operators.
    pub addr: String,
}

fn lease_key(plugin: &str) -> Vec<u8> {
    format!("l/{plugin}").into_bytes()
}

impl Membership {
    /// A node with a new id, serving clients at `addr`.
    pub fn new(kv: Arc<ReplicatedKv>, addr: &str) -> Self {
        let node = format!(
            "{:08x}",
            crate::dedup::id_hash(&format!(
                "{addr} {} {}",
                std::process::id(),
                weir_core::record::now_ms()
            )) as u32
        );
        Membership {
            kv,
            node,
            addr: addr.to_string(),
            beating_since: parking_lot::Mutex::new(None),
            last_beat: parking_lot::Mutex::new(None),
            free_since: parking_lot::Mutex::new(BTreeMap::new()),
            taken_overdue: parking_lot::Mutex::new(Default::default()),
            started_ms: weir_core::record::now_ms(),
            kafka: parking_lot::Mutex::new(None),
            last_view: parking_lot::Mutex::new(None),
        }
    }

    /// Says in this node's heartbeats that it serves Kafka clients at `advertised`
    /// (`host:port`), so other nodes place Kafka leaders and group coordinators on it.
    pub fn serve_kafka(&self, advertised: String) {
        *self.kafka.lock() = Some(advertised);
    }

    /// The view of this node's last heartbeat or tick if it is younger than a node's
    /// time-out: a node whose heartbeats fail has none.
    pub fn view(&self) -> Option<Arc<View>> {
        let ttl = std::time::Duration::from_millis(NODE_TTL_MS as u64);
        self.last_view
            .lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, v)| v.clone())
    }

    /// This node's heartbeat value: "<ms> <address> started=<ms>[ kafka=<host:port>]".
    fn beat_value(&self) -> Vec<u8> {
        let mut v = format!(
            "{} {} started={}",
            weir_core::record::now_ms(),
            self.addr,
            self.started_ms
        );
        if let Some(kafka) = &*self.kafka.lock() {
            v.push_str(" kafka=");
            v.push_str(kafka);
        }
        v.into_bytes()
    }

    fn beat(&self, landed: bool) {
        let now = std::time::Instant::now();
        let ttl = std::time::Duration::from_millis(NODE_TTL_MS as u64);
        let mut last = self.last_beat.lock();
        let mut since = self.beating_since.lock();
        // A streak starts at a beat that lands after a failed one, a gap or a withhold (a
        // streak left unset there would never start again: no lease taken for the node's life).
        if !landed || since.is_none() || last.is_none_or(|l| now - l > ttl) {
            *since = landed.then_some(now);
        }
        if landed {
            *last = Some(now);
        }
    }

    /// Whether this node has been heartbeating for a whole time-out: only then does it trust
    /// its view of who else is live enough to take their plugins.
    fn steady(&self) -> bool {
        self.beating_since
            .lock()
            .is_some_and(|s| s.elapsed().as_millis() as i64 >= NODE_TTL_MS)
    }

    /// Writes this node's heartbeat. Blocking.
    ///
    /// # Errors
    /// The replicated store failed.
    pub fn heartbeat(&self) -> Result<(), LogError> {
        let mut seen = None;
        let result = self.kv.update(NS, |now| {
            // The table as it was read: the view of who is live, kept even while the plugin
            // loop (which ticks) is busy for longer than the time-out.
            seen = Some(parse(now, weir_core::record::now_ms()).0);
            Some(vec![(
                format!("n/{}", self.node).into_bytes(),
                Some(self.beat_value()),
            )])
        });
        self.beat(result.is_ok());
        if let (Ok(_), Some(mut view)) = (&result, seen) {
            self.add_self(&mut view);
            *self.last_view.lock() = Some((std::time::Instant::now(), Arc::new(view)));
        }
        result.map(|_| ())
    }

    /// Puts this node in `view`: live, and serving Kafka where it says. (Its previous self on
    /// the same address leaves the view once this node's heartbeat is in the table, for every
    /// node at once: see `view::parse`.)
    fn add_self(&self, view: &mut View) {
        view.live.insert(self.node.clone(), self.addr.clone());
        if let Some(kafka) = &*self.kafka.lock() {
            view.kafka.insert(self.node.clone(), kafka.clone());
        }
    }

    /// The replicated store (blobs: plugins' wasm).
    pub fn kv(&self) -> &Arc<ReplicatedKv> {
        &self.kv
    }

    /// Writes this node's heartbeat, takes the free leases of `plugins` this node is
    /// preferred for, gives back `release`, and returns the view after. Blocking.
    pub(crate) fn tick(&self, plugins: &[String], release: &[String]) -> Result<View, LogError> {
        let mut result = View::default();
        let mut took_overdue = Vec::new();
        let steady = self.steady();
        // Plugins free (no live holder) for longer than the time-out: the preferred node
        // should have taken them by now; any live node may (the compare-and-set lets one win).
        let overdue: Vec<String> = {
            let ttl = std::time::Duration::from_millis(NODE_TTL_MS as u64);
            self.free_since
                .lock()
                .iter()
                .filter(|(_, since)| since.elapsed() > ttl)
                .map(|(p, _)| p.clone())
                .collect()
        };
        let outcome = self.kv.update(NS, |now| {
            let now_ms = weir_core::record::now_ms();
            let (mut view, forget) = parse(now, now_ms);
            self.add_self(&mut view);
            // The heartbeat is the heartbeat task's: a tick writes only what changes.
            let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                forget.into_iter().map(|k| (k, None)).collect();
            // This node's leases of plugins no longer deployed (a deploy through this node
            // that failed after taking the lease, a removal that could not delete it): held
            // by a live node, they would refuse every later deploy of the name elsewhere. A
            // deploy through this node does not run meanwhile (the caller holds the admin
            // lock), so a lease taken just before its spec lands is not one of them.
            let stale: Vec<String> = view
                .leases
                .iter()
                .filter(|(p, node)| **node == self.node && !plugins.contains(*p))
                .map(|(p, _)| p.clone())
                .collect();
            for p in release.iter().chain(&stale) {
                if view.leases.get(p) == Some(&self.node) {
                    writes.push((lease_key(p), None));
                    view.leases.remove(p);
                }
            }
            for p in plugins {
                if !steady || release.contains(p) || view.holder(p).is_some() {
                    continue;
                }
                let preferred = view.preferred(p) == Some(self.node.as_str());
                if preferred || overdue.contains(p) {
                    writes.push((lease_key(p), Some(self.node.clone().into_bytes())));
                    view.leases.insert(p.clone(), self.node.clone());
                    if !preferred {
                        took_overdue.push(p.clone());
                    }
                }
            }
            result = view;
            (!writes.is_empty()).then_some(writes)
        });
        outcome?;
        *self.last_view.lock() = Some((std::time::Instant::now(), Arc::new(result.clone())));
        {
            let mut taken = self.taken_overdue.lock();
            taken.extend(took_overdue);
            taken.retain(|p| result.leases.get(p) == Some(&self.node));
        }
        self.note_free(plugins, &result);
        Ok(result)
    }

    /// Keeps when each plugin became free (no live holder) and says so — a warning naming it
    /// and the `plugin_unowned` gauge — once it has been free longer than the time-out.
    fn note_free(&self, plugins: &[String], view: &View) {
        let ttl = std::time::Duration::from_millis(NODE_TTL_MS as u64);
        let gauge = &weir_metrics::global().plugin_unowned;
        let mut free = self.free_since.lock();
        free.retain(|p, _| {
            let kept = plugins.contains(p);
            if !kept {
                // Removed: no alert left behind.
                let label = weir_metrics::PluginLabel { plugin: p.clone() };
                gauge.get_or_create(&label).set(0);
            }
            kept
        });
        for p in plugins {
            let label = weir_metrics::PluginLabel { plugin: p.clone() };
            if view.holder(p).is_some() {
                if free.remove(p).is_some_and(|since| since.elapsed() > ttl) {
                    tracing::info!(message = "A node runs the plugin again.", plugin = %p);
                }
                gauge.get_or_create(&label).set(0);
                continue;
            }
            let since = *free
                .entry(p.clone())
                .or_insert_with(std::time::Instant::now);
            if since.elapsed() > ttl {
                if gauge.get_or_create(&label).set(1) == 0 {
                    tracing::warn!(message = "No live node runs this plugin; a live node takes it over.", plugin = %p, free_ms = since.elapsed().as_millis() as u64);
                }
            }
        }
    }

    /// Whether this node holds `plugin` because it was overdue (not because it is preferred).
    pub(crate) fn took_overdue(&self, plugin: &str) -> bool {
        self.taken_overdue.lock().contains(plugin)
    }

    /// Whether no live node has run `plugin` for longer than the lease time-out, as of this
    /// node's last tick.
    pub fn unowned(&self, plugin: &str) -> bool {
        let ttl = std::time::Duration::from_millis(NODE_TTL_MS as u64);
        self.free_since
            .lock()
            .get(plugin)
            .is_some_and(|since| since.elapsed() > ttl)
    }

    /// Takes `plugin`'s lease if nobody live holds it (a deploy through this node). Returns
    /// the live holder otherwise. Blocking.
    pub(crate) fn take(&self, plugin: &str) -> Result<Option<String>, LogError> {
        let mut held_by = None;
        self.kv.update(NS, |now| {
            let (mut view, _) = parse(now, weir_core::record::now_ms());
            view.live.insert(self.node.clone(), self.addr.clone());
            held_by = view
                .holder(plugin)
                .filter(|n| *n != self.node)
                .map(String::from);
            match held_by {
                Some(_) => None,
                None => Some(vec![(
                    lease_key(plugin),
                    Some(self.node.clone().into_bytes()),
                )]),
            }
        })?;
        Ok(held_by)
    }

    /// Deletes `plugin`'s lease if `holder` still holds it: this node's after its deploy
    /// failed, or the holder read before a removal. A lease another node took meanwhile — its
    /// own deploy of the name, or a takeover while this node was cut off — is that node's to
    /// keep: deleting it left the new deployment without a runner. Blocking.
    pub(crate) fn forget(&self, plugin: &str, holder: &str) -> Result<(), LogError> {
        self.kv.update(NS, |now| {
            let held = now.get(&lease_key(plugin))?;
            (held.as_ref() == holder.as_bytes()).then(|| vec![(lease_key(plugin), None)])
        })?;
        Ok(())
    }

    /// The node `plugin`'s lease names, live or not (`None`: no lease), as of the
    /// changelog's end. Blocking.
    pub(crate) fn lease_of(&self, plugin: &str) -> Result<Option<String>, LogError> {
        Ok(self
            .kv
            .kv_get(NS, &lease_key(plugin))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether a node other than this one is live, as of the changelog's end. Blocking.
    pub(crate) fn others_live(&self) -> Result<bool, LogError> {
        let now: BTreeMap<Vec<u8>, bytes::Bytes> = self
            .kv
            .kv_scan(NS, b"n/")?
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v))
            .collect();
        let (view, _) = parse(&now, weir_core::record::now_ms());
        Ok(view.live.keys().any(|n| *n != self.node))
    }

    /// This node stops heartbeating for a while (its cluster loop fails): once it beats
    /// again it must beat for a whole time-out before it judges others dead and takes their
    /// leases, as after a start.
    pub(crate) fn withhold(&self) {
        // In `beat`'s lock order.
        let mut last = self.last_beat.lock();
        let mut since = self.beating_since.lock();
        *last = None;
        *since = None;
    }
}

#[cfg(test)]
mod tests;
