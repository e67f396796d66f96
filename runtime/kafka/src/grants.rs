//! The seam between the Kafka listener and the server's authority: who a client is once it
//! logged in, and what its grants let it do to a topic (weir-server implements it over the
//! auth file; `access.rs` speaks SASL with it).

use std::sync::Arc;

use weir_broker::Caller;

/// What a principal may do to a topic, named as weir's grants name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicOp {
    /// Produce.
    Publish,
    /// Fetch, list offsets, commit and fetch group offsets.
    Subscribe,
    /// CreateTopics.
    Create,
    /// DeleteTopics.
    Delete,
}

/// A logged-in principal.
pub trait Principal: Send + Sync {
    /// Who it is to the broker (producer ownership).
    fn caller(&self) -> Caller;
    /// Whether a grant allows `op` on `topic`.
    fn may(&self, op: TopicOp, topic: &str) -> bool;
    /// Whether it may see that `topic` exists (metadata).
    fn sees(&self, topic: &str) -> bool;
}

/// The server's authority, for SASL/PLAIN logins.
pub trait Access: Send + Sync {
    /// The principal whose token `password` is; `user` must be its name (or empty).
    ///
    /// # Errors
    /// Why the login is refused, for the client.
    fn login(&self, user: &str, password: &str) -> Result<Arc<dyn Principal>, String>;
}
