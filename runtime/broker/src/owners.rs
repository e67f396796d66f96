//! Who may use a producer id. A producer id belongs to the principal that initialised it, and
//! a plugin's producers to the server: another principal can neither bump its epoch (fencing
//! its owner) nor publish with it (stealing its sequences). Producers idle for longer than the
//! expiry are forgotten, except the server's, whose outbox may need them after any pause.

use std::collections::HashMap;

/// Who acts on a producer id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The server itself: plugin forwarders. Never refused, never charged admission.
    Server,
    /// A client principal (`anonymous` on a server without `--auth`).
    Client {
        /// Principal name.
        name: String,
        /// Admins may use any client's producer (not the server's).
        admin: bool,
    },
}

impl Default for Caller {
    /// The client of a server without `--auth`.
    fn default() -> Self {
        Caller::Client {
            name: weir_core::ANONYMOUS.into(),
            admin: true,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Server => f.write_str("the server"),
            Caller::Client { name, .. } => write!(f, "principal {name:?}"),
        }
    }
}

/// Who owns a producer id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Issued before ownership was recorded: anyone may use it, as before.
    Unrecorded,
    /// A plugin's producer.
    Server,
    /// A client principal.
    Principal(String),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Unrecorded => f.write_str("nobody recorded"),
            Owner::Server => f.write_str("the server (a plugin's outputs)"),
            Owner::Principal(name) => write!(f, "principal {name:?}"),
        }
    }
}

impl Owner {
    /// The owner a caller's new producer gets.
    pub fn of(caller: &Caller) -> Owner {
        match caller {
            Caller::Server => Owner::Server,
            Caller::Client { name, .. } => Owner::Principal(name.clone()),
        }
    }

    /// Whether `caller` may publish with, or bump the epoch of, a producer owned by `self`.
    pub fn admits(&self, caller: &Caller) -> bool {
        match (self, caller) {
            (_, Caller::Server) => true,
            (Owner::Server, Caller::Client { .. }) => false,
            (Owner::Unrecorded, Caller::Client { .. }) => true,
            (Owner::Principal(owner), Caller::Client { name, admin }) => *admin || owner == name,
        }
    }
}

/// One producer id's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerRecord {
    /// Current epoch.
    pub epoch: u32,
    /// Who may use it.
    pub owner: Owner,
    /// Last init or append, ms since the epoch (in memory; rebuilt at open).
    pub last_used_ms: i64,
}

impl ProducerRecord {
    /// Stored form: epoch u32 BE, owner tag u8 (1 server, 2 principal), principal name. A
    /// bare 4-byte epoch (before ownership) reads as [`Owner::Unrecorded`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.epoch.to_be_bytes().to_vec();
        match &self.owner {
            Owner::Unrecorded => {}
            Owner::Server => out.push(1),
            Owner::Principal(name) => {
                out.push(2);
                out.extend_from_slice(name.as_bytes());
            }
        }
        out
    }

    /// Reads the stored form (`last_used_ms` is set by the caller).
    pub fn decode(bytes: &[u8]) -> Option<ProducerRecord> {
        let epoch = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
        let owner = match bytes.get(4) {
            None => Owner::Unrecorded,
            Some(1) if bytes.len() == 5 => Owner::Server,
            Some(2) => Owner::Principal(std::str::from_utf8(&bytes[5..]).ok()?.to_string()),
            Some(_) => return None,
        };
        Some(ProducerRecord {
            epoch,
            owner,
            last_used_ms: 0,
        })
    }
}

/// Every producer id with its record, and the next id to issue.
#[derive(Debug, Default)]
pub struct ProducerTable {
    /// By id.
    pub records: HashMap<u64, ProducerRecord>,
    /// Next id (ids are never reused).
    pub next_id: u64,
}

impl ProducerTable {
    /// Producers that may expire at `now_ms`: idle for longer than `expiry_ms`, not the
    /// server's (a plugin's outbox may need its sequences after any pause).
    pub fn expired(&self, now_ms: i64, expiry_ms: u64) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .records
            .iter()
            .filter(|(_, r)| {
                r.owner != Owner::Server
                    && weir_core::elapsed_ms(r.last_used_ms, now_ms) > expiry_ms
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, admin: bool) -> Caller {
        Caller::Client {
            name: name.into(),
            admin,
        }
    }

    #[test]
    fn owners_admit_themselves_admins_and_the_server_only() {
        let ann = Owner::Principal("ann".into());
        assert!(ann.admits(&client("ann", false)));
        assert!(!ann.admits(&client("bob", false)));
        assert!(ann.admits(&client("ops", true)));
        assert!(ann.admits(&Caller::Server));
        // A plugin's producer: no client, admin or not.
        assert!(!Owner::Server.admits(&client("ops", true)));
        assert!(Owner::Server.admits(&Caller::Server));
        assert!(Owner::Unrecorded.admits(&client("bob", false)));
    }

    #[test]
    fn records_round_trip_and_legacy_epochs_read_as_unrecorded() {
        for owner in [
            Owner::Server,
            Owner::Principal("team-a".into()),
            Owner::Unrecorded,
        ] {
            let r = ProducerRecord {
                epoch: 7,
                owner,
                last_used_ms: 0,
            };
            assert_eq!(ProducerRecord::decode(&r.encode()), Some(r));
        }
        let legacy = ProducerRecord::decode(&3u32.to_be_bytes()).unwrap();
        assert_eq!((legacy.epoch, legacy.owner), (3, Owner::Unrecorded));
        assert_eq!(ProducerRecord::decode(&[0, 0, 0, 1, 9]), None);
    }

    #[test]
    fn idle_client_producers_expire_the_servers_never() {
        let mut t = ProducerTable::default();
        let rec = |owner, last_used_ms| ProducerRecord {
            epoch: 0,
            owner,
            last_used_ms,
        };
        t.records.insert(1, rec(Owner::Principal("a".into()), 0));
        t.records.insert(2, rec(Owner::Server, 0));
        t.records.insert(3, rec(Owner::Unrecorded, 900));
        t.records
            .insert(4, rec(Owner::Principal("a".into()), i64::MIN));
        assert_eq!(t.expired(1_000, 500), vec![1, 4]);
        assert_eq!(t.expired(1_000, u64::MAX), Vec::<u64>::new());
    }
}
