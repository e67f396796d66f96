//! Cluster mode: whether this node runs a plugin, decided in one place.
//!
//! A node runs a plugin when four things agree: the cluster's lease names it, it holds the
//! plugin's store (its takeover entry landed and no write was refused or left uncertain
//! since), it took the plugin over, and the plugin's tasks are spawned. [`Placement`] keeps
//! the middle two — every take and give-back the manager makes goes through it — and answers
//! [`Placement::runs`] from both, so they cannot disagree:
//! - the lease is the cluster loop's to follow: each tick it takes over what the lease names
//!   and this node does not run, and stops what it runs and the lease no longer names;
//! - the tasks are spawned by the manager's `start`, which asks [`Placement::runs`]; a
//!   takeover stops the standby copy first and starts the plugin again once the store is
//!   taken, a give-back stops the tasks first;
//! - the store's hold can also drop from below, without the manager: an append refused or
//!   left uncertain, a look at the changelog's end that finds another node's entry
//!   (`confirm_held`), a runtime whose commit did not land (`pipeline::lose`). `runs` reads
//!   the hold, so it is false from that moment, and the next tick takes the plugin over anew
//!   (which reopens it from what landed).
//!
//! A plugin is in one of four places on a node: on standby (open to answer queries, no
//! entry here), being taken (the store taken, its copy opening: `start` spawns its tasks),
//! running since a moment, or failing to start (how many times in a row, and when last).
//! A node that failed [`START_FAILURES`] times in a row gives the lease up and does not take
//! it again for [`GIVE_UP_FOR`], so another live node takes it once it is overdue.
//!
//! One node (no cluster): every plugin runs, nothing is taken or given back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::cluster::{Membership, View};
use crate::store::PluginStore;

/// A node keeps a plugin at least this long before giving it to a preferred node (no
/// ping-pong while nodes come and go).
const MIN_HOLD: Duration = Duration::from_secs(10);
/// A plugin taken because no node had run it for longer than the lease time-out is kept this
/// long before a hand-back (its preferred node let it lapse once).
const OVERDUE_HOLD: Duration = Duration::from_secs(60);
/// A node that failed to start a plugin it holds this many times in a row gives its lease
/// up, and does not take it again for [`GIVE_UP_FOR`]: another live node takes it once it is
/// overdue.
pub(super) const START_FAILURES: u32 = 3;
const GIVE_UP_FOR: Duration = Duration::from_secs(30);

/// Where a plugin is on this node, past standby.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// Its store is taken; its copy is being opened (after `failures` failed tries).
    Taking { failures: u32 },
    /// It runs here, since then.
    Running { since: Instant },
    /// Starting it failed `failures` times in a row, the last at `at`; it runs nowhere here.
    Failing { failures: u32, at: Instant },
}

/// Which plugins this node runs (see the module's docs).
pub(super) struct Placement {
    store: Arc<dyn PluginStore>,
    clustered: bool,
    places: Mutex<BTreeMap<String, Place>>,
}

impl Placement {
    pub(super) fn new(store: Arc<dyn PluginStore>, clustered: bool) -> Self {
        Placement {
            store,
            clustered,
            places: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether this node runs `name` (always, on one node): it took it over and still holds
    /// its store.
    pub(super) fn runs(&self, name: &str) -> bool {
        if !self.clustered {
            return true;
        }
        let taken = matches!(
            self.places.lock().get(name),
            Some(Place::Taking { .. } | Place::Running { .. })
        );
        taken && self.store.held(name)
    }

    /// Takes `name`'s store over for this node (reads what other nodes committed, then
    /// fences them out): the plugin started next runs here. `Ok(false)`: removed through
    /// another node meanwhile, and given back. Blocking.
    pub(super) fn take(&self, name: &str) -> Result<bool, weir_log::LogError> {
        let failures = match self.places.lock().get(name) {
            Some(Place::Failing { failures, .. } | Place::Taking { failures }) => *failures,
            _ => 0,
        };
        self.store.acquire(name)?;
        if !self.store.specs()?.iter().any(|s| s.name == name) {
            self.give_back(name);
            return Ok(false);
        }
        self.places
            .lock()
            .insert(name.to_string(), Place::Taking { failures });
        Ok(true)
    }

    /// Takes the store of a plugin being deployed through this node, whose lease it just
    /// took (its spec is not stored yet). Blocking.
    pub(super) fn claim(&self, name: &str) -> Result<(), weir_log::LogError> {
        self.store.acquire(name)?;
        self.places
            .lock()
            .insert(name.to_string(), Place::Taking { failures: 0 });
        Ok(())
    }

    /// The plugin taken has started: it runs here from now.
    pub(super) fn started(&self, name: &str) {
        let mut places = self.places.lock();
        if let Some(place @ Place::Taking { .. }) = places.get_mut(name) {
            *place = Place::Running {
                since: Instant::now(),
            };
        }
    }

    /// Taking `name` over failed: its store is given back and the failure counted. Returns
    /// how many times in a row it has failed; at [`START_FAILURES`] the next tick gives the
    /// lease up.
    pub(super) fn failed(&self, name: &str) -> u32 {
        self.store.release(name);
        let mut places = self.places.lock();
        let failures = match places.get(name) {
            Some(Place::Failing { failures, .. } | Place::Taking { failures }) => failures + 1,
            _ => 1,
        };
        places.insert(
            name.to_string(),
            Place::Failing {
                failures,
                at: Instant::now(),
            },
        );
        failures
    }

    /// This node stops running `name` and stops writing its store (it runs here again only
    /// after a takeover). A count of failed starts is kept.
    pub(super) fn give_back(&self, name: &str) {
        {
            let mut places = self.places.lock();
            if matches!(
                places.get(name),
                Some(Place::Taking { .. } | Place::Running { .. })
            ) {
                places.remove(name);
            }
        }
        self.store.release(name);
    }

    /// The plugins whose leases this node gives up at this tick: those it has run long
    /// enough while another node is preferred for them (plugins spread again when a node
    /// joins), and those it failed to start [`START_FAILURES`] times in a row. Forgets the
    /// failures of plugins no longer deployed (`deployed`) and of those given up long enough.
    pub(super) fn to_release(
        &self,
        membership: &Membership,
        view: &View,
        deployed: &[String],
    ) -> Vec<String> {
        let mut places = self.places.lock();
        places.retain(|name, place| match place {
            Place::Failing { failures, at } => {
                deployed.contains(name)
                    && (*failures < START_FAILURES || at.elapsed() < GIVE_UP_FOR)
            }
            _ => true,
        });
        places
            .iter()
            .filter(|(name, place)| match place {
                Place::Running { since } => {
                    let hold = if membership.took_overdue(name) {
                        OVERDUE_HOLD
                    } else {
                        MIN_HOLD
                    };
                    since.elapsed() >= hold
                        && view
                            .preferred(name)
                            .is_some_and(|p| p != membership.node.as_str())
                }
                Place::Failing { failures, .. } => *failures >= START_FAILURES,
                Place::Taking { .. } => false,
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether this node has given `name`'s lease up for failing to start it.
    pub(super) fn given_up(&self, name: &str) -> bool {
        matches!(
            self.places.lock().get(name),
            Some(Place::Failing { failures, .. }) if *failures >= START_FAILURES
        )
    }

    /// Forgets what this node took of plugins no longer deployed (`deployed`: the registry's
    /// names) and gives their stores back: a deploy through this node cut short after it
    /// took the store must not leave a hold a new deployment of the name would find. Called by
    /// the cluster loop, which deploys do not run alongside (both hold the admin lock, and the
    /// gRPC handlers run a deploy to its end even when its client goes away; an embedder that
    /// drops a deploy's future mid-way can still race this).
    pub(super) fn forget_undeployed(&self, deployed: &[String]) {
        let gone: Vec<String> = self
            .places
            .lock()
            .iter()
            .filter(|(name, place)| {
                !deployed.contains(name) && !matches!(place, Place::Failing { .. })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.give_back(&name);
        }
    }

    /// Whether this node counts itself `name`'s runner (its tasks are, or are about to be,
    /// spawned), whether or not it still holds the store.
    pub(super) fn taken(&self, name: &str) -> bool {
        matches!(
            self.places.lock().get(name),
            Some(Place::Taking { .. } | Place::Running { .. })
        )
    }
}
