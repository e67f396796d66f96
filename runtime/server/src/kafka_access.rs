//! The Kafka listener's logins and grants over the server's authority: a SASL/PLAIN password
//! is a weir token, and a Kafka client may do to a topic what a gRPC client of the same
//! principal may (`publish`, `subscribe`, `create`, `delete`).

use std::sync::Arc;

use weir_broker::Caller;
use weir_kafka::{Access, Principal as KafkaPrincipal, TopicOp};

use crate::auth::{Authority, Operation, Principal, Resource};

/// [`Access`] over the auth file's principals.
pub(crate) struct AuthFileAccess(pub(crate) Arc<Authority>);

struct Granted(Arc<Principal>);

impl KafkaPrincipal for Granted {
    fn caller(&self) -> Caller {
        crate::rpc_convert::caller_of(&self.0)
    }

    fn may(&self, op: TopicOp, topic: &str) -> bool {
        let op = match op {
            TopicOp::Publish => Operation::Publish,
            TopicOp::Subscribe => Operation::Subscribe,
            TopicOp::Create => Operation::Create,
            TopicOp::Delete => Operation::Delete,
        };
        self.0.allows(op, Resource::Topic(topic))
    }

    fn sees(&self, topic: &str) -> bool {
        self.0.sees(Resource::Topic(topic))
    }
}

impl Access for AuthFileAccess {
    fn login(&self, user: &str, password: &str) -> Result<Arc<dyn KafkaPrincipal>, String> {
        let principal = self
            .0
            .authenticate(Some(&format!("Bearer {password}")))
            .map_err(|e| e.to_string())?;
        if !user.is_empty() && user != principal.name {
            return Err(format!(
                "user {user:?} is not the token's principal ({:?}): give that name, or none",
                principal.name
            ));
        }
        Ok(Arc::new(Granted(principal)))
    }
}
