//! Who a Kafka client is and what it may do: SASL/PLAIN (SaslHandshake v1, then
//! SaslAuthenticate) with a weir token as the password, checked by the server's own
//! authority ([`Access`], implemented by weir-server over its auth file), and the same grants
//! a gRPC client of that principal has, per topic.
//!
//! On a server with `--auth`, a connection may send ApiVersions, SaslHandshake and
//! SaslAuthenticate until it has logged in; anything else closes it (as Kafka closes an
//! unauthenticated connection). A failed login is answered with SASL_AUTHENTICATION_FAILED
//! and weir's reason, and the connection closes after the answer.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use weir_broker::Caller;

use crate::grants::{Principal, TopicOp};
use crate::wire::Ctx;

/// The principal of a server without `--auth`: the anonymous admin.
struct Open;

impl Principal for Open {
    fn caller(&self) -> Caller {
        Caller::default()
    }
    fn may(&self, _: TopicOp, _: &str) -> bool {
        true
    }
    fn sees(&self, _: &str) -> bool {
        true
    }
}

/// Nobody: what a connection is before its login (denied everything; `conn` refuses its
/// requests before they get here, this is the fail-closed default).
struct Nobody;

impl Principal for Nobody {
    fn caller(&self) -> Caller {
        Caller::Client {
            name: String::new(),
            admin: false,
        }
    }
    fn may(&self, _: TopicOp, _: &str) -> bool {
        false
    }
    fn sees(&self, _: &str) -> bool {
        false
    }
}

/// The connection's principal: the open one, whoever logged in, or [`Nobody`].
pub(crate) fn who(ctx: &Ctx) -> Arc<dyn Principal> {
    match &ctx.options.access {
        None => Arc::new(Open),
        Some(_) => ctx.login.get().cloned().unwrap_or_else(|| Arc::new(Nobody)),
    }
}

/// Whether the connection's principal is an admin (every principal of an open server is):
/// only admins see groups' members and the list of groups, as weir has no group grants.
pub(crate) fn is_admin(ctx: &Ctx) -> bool {
    matches!(
        who(ctx).caller(),
        Caller::Server | Caller::Client { admin: true, .. }
    )
}

/// Whether this connection must log in before asking anything but [`before_login`] APIs.
pub(crate) fn must_log_in(ctx: &Ctx) -> bool {
    ctx.options.access.is_some() && ctx.login.get().is_none()
}

/// The refusal of `op` on `topic`, for the answers that carry a message.
pub(crate) fn denied(ctx: &Ctx, op: TopicOp, topic: &str) -> String {
    format!(
        "{} may not {} topic {topic:?}: ask an admin for a grant in the auth file",
        who(ctx).caller(),
        format!("{op:?}").to_lowercase()
    )
}

/// Whether `key` may be asked before logging in.
pub(crate) fn before_login(key: ApiKey) -> bool {
    matches!(
        key,
        ApiKey::ApiVersions | ApiKey::SaslHandshake | ApiKey::SaslAuthenticate
    )
}

/// SaslHandshake v1: PLAIN is the one mechanism (v0 is refused: its raw token exchange is
/// not spoken).
pub(crate) fn handshake(
    ctx: &Ctx,
    request: SaslHandshakeRequest,
    version: i16,
) -> SaslHandshakeResponse {
    let response =
        SaslHandshakeResponse::default().with_mechanisms(vec![StrBytes::from_static_str("PLAIN")]);
    if version == 0 {
        return response.with_error_code(ResponseError::UnsupportedVersion.code());
    }
    if ctx.options.access.is_none() {
        // Nothing to log in to; say so rather than pretend.
        return response.with_error_code(ResponseError::IllegalSaslState.code());
    }
    if request.mechanism.as_str() != "PLAIN" {
        return response.with_error_code(ResponseError::UnsupportedSaslMechanism.code());
    }
    response
}

/// SaslAuthenticate with PLAIN's `authzid NUL user NUL password`. `Err` carries the failed
/// answer: it is sent, then the connection closes.
pub(crate) fn authenticate(
    ctx: &Ctx,
    request: SaslAuthenticateRequest,
) -> Result<SaslAuthenticateResponse, SaslAuthenticateResponse> {
    let failed = |why: String| {
        SaslAuthenticateResponse::default()
            .with_error_code(ResponseError::SaslAuthenticationFailed.code())
            .with_error_message(Some(StrBytes::from_string(why)))
    };
    let Some(access) = &ctx.options.access else {
        return Err(failed(
            "this server has no --auth: there is nothing to log in to".into(),
        ));
    };
    let parts: Vec<&[u8]> = request.auth_bytes.split(|&b| b == 0).collect();
    let [_, user, password] = parts[..] else {
        return Err(failed(
            "SASL/PLAIN expects authzid, user and password separated by NUL".into(),
        ));
    };
    let (Ok(user), Ok(password)) = (std::str::from_utf8(user), std::str::from_utf8(password))
    else {
        return Err(failed("the user or password is not UTF-8".into()));
    };
    match access.login(user, password) {
        Ok(principal) => {
            // A second login on one connection keeps the first principal.
            let _ = ctx.login.set(principal);
            Ok(SaslAuthenticateResponse::default())
        }
        Err(why) => {
            tracing::info!(message = "Kafka SASL login refused.", peer = %ctx.peer, user, reason = %why);
            ctx.closing
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Err(failed(why))
        }
    }
}
