//! Who may do what: principals identified by bearer tokens, and grants of operations on topic
//! and plugin name patterns (Kafka's principal / operation / resource-pattern ACLs).
//!
//! The auth file (`weir serve --auth FILE`) is TOML:
//!
//! ```toml
//! [[principal]]
//! name = "loyalty"
//! tokens = ["<sha256 hex of a token, as `weir auth token` prints it>"]
//! max_plugins = 8                      # optional; the server's default otherwise
//! grants = [
//!   { allow = ["subscribe"], topics = ["order.paid"] },
//!   { allow = ["publish", "create"], topics = ["points.*"] },
//!   { allow = ["deploy", "upgrade", "remove", "pause", "read-state", "read-logs"], plugins = ["points*"] },
//! ]
//!
//! [[principal]]
//! name = "ops"
//! tokens = ["..."]
//! admin = true                         # every operation, on every resource, whoever owns it
//! ```
//!
//! A pattern is an exact name, or a prefix followed by `*` (`*` alone matches everything).
//! Tokens are stored only as SHA-256 hashes; a token is 32 random bytes, so a hash cannot be
//! reversed by guessing.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// What a grant allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Publish records to a topic.
    Publish,
    /// Read a topic; commit and fetch consumer-group offsets on it.
    Subscribe,
    /// Create a topic.
    Create,
    /// Delete a topic.
    Delete,
    /// Deploy a plugin under a name.
    Deploy,
    /// Replace a plugin's code.
    Upgrade,
    /// Remove a plugin.
    Remove,
    /// Pause and resume a plugin.
    Pause,
    /// Read a plugin's state.
    ReadState,
    /// Read a plugin's logs.
    ReadLogs,
}

impl Operation {
    fn on_topics(self) -> bool {
        matches!(
            self,
            Operation::Publish | Operation::Subscribe | Operation::Create | Operation::Delete
        )
    }

    /// The name used in the auth file and in refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Deploy => "deploy",
            Operation::Upgrade => "upgrade",
            Operation::Remove => "remove",
            Operation::Pause => "pause",
            Operation::ReadState => "read-state",
            Operation::ReadLogs => "read-logs",
        }
    }
}

/// What an operation acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A topic by name.
    Topic(&'a str),
    /// A plugin by name.
    Plugin(&'a str),
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Topic(t) => write!(f, "topic {t:?}"),
            Resource::Plugin(p) => write!(f, "plugin {p:?}"),
        }
    }
}

/// An exact name or a `prefix*`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        match s.find('*') {
            None if s.is_empty() => Err("an empty resource pattern matches nothing".into()),
            None => Ok(Pattern::Exact(s.to_string())),
            Some(i) if i == s.len() - 1 => Ok(Pattern::Prefix(s[..i].to_string())),
            Some(_) => Err(format!(
                "pattern {s:?}: `*` may only end a pattern (a prefix match)"
            )),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(n) => n == name,
            Pattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGrant {
    allow: Vec<Operation>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    plugins: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePrincipal {
    name: String,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    admin: bool,
    max_plugins: Option<usize>,
    #[serde(default)]
    grants: Vec<FileGrant>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    principal: Vec<FilePrincipal>,
}

#[derive(Clone, Debug)]
struct Grant {
    allow: Vec<Operation>,
    topics: Vec<Pattern>,
    plugins: Vec<Pattern>,
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// Its name (owner of the plugins it deploys).
    pub name: String,
    /// Every operation on every resource, ownership aside.
    pub admin: bool,
    /// Most plugins it may own; `None` for the server's default.
    pub max_plugins: Option<usize>,
    grants: Vec<Grant>,
}

impl Principal {
    /// The caller of a server started without `--auth`: may do everything.
    pub fn anonymous() -> Arc<Principal> {
        Arc::new(Principal {
            name: ANONYMOUS.into(),
            admin: true,
            max_plugins: None,
            grants: Vec::new(),
        })
    }

    /// Whether a grant allows `op` on `resource`.
    pub fn allows(&self, op: Operation, resource: Resource<'_>) -> bool {
        self.admin
            || self
                .grants
                .iter()
                .any(|g| g.allow.contains(&op) && g.names(resource))
    }

    /// Whether any grant names `resource` (it may see the resource exists: list, describe).
    pub fn sees(&self, resource: Resource<'_>) -> bool {
        self.admin || self.grants.iter().any(|g| g.names(resource))
    }
}

impl Grant {
    /// Whether one of the grant's patterns matches the resource.
    fn names(&self, resource: Resource<'_>) -> bool {
        match resource {
            Resource::Topic(t) => self.topics.iter().any(|p| p.matches(t)),
            Resource::Plugin(n) => self.plugins.iter().any(|p| p.matches(n)),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No token, or one nobody holds.
    #[error("{0}")]
    Unauthenticated(String),
    /// The principal lacks a grant.
    #[error("principal {principal:?} may not {} {resource}: {hint}", .op.as_str())]
    Denied {
        /// Who asked.
        principal: String,
        /// What for.
        op: Operation,
        /// On what.
        resource: String,
        /// How to get it.
        hint: String,
    },
}

/// The server's access policy: open (no `--auth`) or the principals of an auth file.
#[derive(Debug, Default)]
pub struct Authority {
    /// sha256(token) → principal. Empty when open.
    by_token: HashMap<[u8; 32], Arc<Principal>>,
    open: bool,
}

pub use weir_api::AUTHORIZATION;
pub use weir_core::ANONYMOUS;

impl Authority {
    /// Anyone may do anything (local development).
    pub fn open() -> Authority {
        Authority {
            by_token: HashMap::new(),
            open: true,
        }
    }

    /// Whether the server runs without authentication.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Reads and validates an auth file.
    ///
    /// # Errors
    /// A message naming the file and what is wrong in it.
    pub fn load(path: &Path) -> Result<Authority, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the auth file {}: {e}", path.display()))?;
        Authority::parse(&text).map_err(|e| format!("auth file {}: {e}", path.display()))
    }

    /// Parses an auth file's text.
    ///
    /// # Errors
    /// TOML errors, unknown operations, operations on the wrong kind of resource, malformed
    /// token hashes, a hash given to two principals.
    pub fn parse(text: &str) -> Result<Authority, String> {
        let file: AuthFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_token = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for p in file.principal {
            if p.name.is_empty() || !names.insert(p.name.clone()) {
                return Err(format!(
                    "principal name {:?} is empty or used twice",
                    p.name
                ));
            }
            if p.name == ANONYMOUS {
                return Err(format!(
                    "principal name {ANONYMOUS:?} is reserved: it owns the plugins deployed while \
                     the server ran without --auth"
                ));
            }
            if p.tokens.is_empty() {
                return Err(format!(
                    "principal {:?} has no tokens: mint one with `weir auth token`",
                    p.name
                ));
            }
            let mut grants = Vec::new();
            for g in p.grants {
                for op in &g.allow {
                    let named = if op.on_topics() {
                        &g.topics
                    } else {
                        &g.plugins
                    };
                    if named.is_empty() {
                        let kind = if op.on_topics() { "topics" } else { "plugins" };
                        return Err(format!(
                            "principal {:?}: a grant allowing {:?} needs `{kind} = [...]` patterns",
                            p.name,
                            op.as_str()
                        ));
                    }
                }
                let parse = |v: &[String]| -> Result<Vec<Pattern>, String> {
                    v.iter().map(|s| Pattern::parse(s)).collect()
                };
                grants.push(Grant {
                    allow: g.allow,
                    topics: parse(&g.topics)?,
                    plugins: parse(&g.plugins)?,
                });
            }
            let principal = Arc::new(Principal {
                name: p.name.clone(),
                admin: p.admin,
                max_plugins: p.max_plugins,
                grants,
            });
            for t in &p.tokens {
                let hash = parse_hash(t).ok_or_else(|| {
                    format!(
                        "principal {:?}: token {t:?} is not a sha256 hex digest (64 hex digits, \
                         as `weir auth token` prints)",
                        p.name
                    )
                })?;
                if by_token.insert(hash, principal.clone()).is_some() {
                    return Err(format!("token hash {t} is given to two principals"));
                }
            }
        }
        Ok(Authority {
            by_token,
            open: false,
        })
    }

    /// The caller of a request, from the value of its `authorization` header (`Bearer
    /// <token>`; the scheme is case-insensitive, RFC 7235). `None` when there is none.
    ///
    /// # Errors
    /// [`AuthError::Unauthenticated`] when the header is missing, malformed or its token unknown.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Principal>, AuthError> {
        if self.open {
            return Ok(Principal::anonymous());
        }
        let value = authorization.ok_or_else(|| {
            AuthError::Unauthenticated(
                "this server requires a token: pass --token or set WEIR_TOKEN \
                 (gRPC metadata `authorization: Bearer <token>`)"
                    .into(),
            )
        })?;
        let token = value
            .trim()
            .split_once(char::is_whitespace)
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| {
                AuthError::Unauthenticated(
                    "malformed authorization metadata: expected `Bearer <token>`".into(),
                )
            })?;
        let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        self.by_token.get(&hash).cloned().ok_or_else(|| {
            AuthError::Unauthenticated(
                "unknown token: it is not in the server's auth file (revoked, or mistyped)".into(),
            )
        })
    }

    /// Authenticates and checks one grant.
    ///
    /// # Errors
    /// Unauthenticated, or [`AuthError::Denied`] naming the operation and resource.
    pub fn require(
        &self,
        authorization: Option<&str>,
        op: Operation,
        resource: Resource<'_>,
    ) -> Result<Arc<Principal>, AuthError> {
        let principal = self.authenticate(authorization)?;
        check(&principal, op, resource)?;
        Ok(principal)
    }
}

/// Checks one grant of an authenticated principal.
///
/// # Errors
/// [`AuthError::Denied`] naming the operation and resource.
pub fn check(
    principal: &Principal,
    op: Operation,
    resource: Resource<'_>,
) -> Result<(), AuthError> {
    if principal.allows(op, resource) {
        return Ok(());
    }
    let kind = match resource {
        Resource::Topic(_) => "topics",
        Resource::Plugin(_) => "plugins",
    };
    Err(AuthError::Denied {
        principal: principal.name.clone(),
        op,
        resource: resource.to_string(),
        hint: format!(
            "ask an admin for a grant `{{ allow = [{:?}], {kind} = [...] }}` in the auth file",
            op.as_str()
        ),
    })
}

/// Checks that `principal` may act on an existing plugin owned by `owner`: the grant, and
/// ownership (admins act on every plugin; a plugin stored before ownership was recorded has
/// no owner, and only admins may change it).
///
/// # Errors
/// [`AuthError::Denied`].
pub fn check_owner(
    principal: &Principal,
    op: Operation,
    plugin: &str,
    owner: Option<&str>,
) -> Result<(), AuthError> {
    check(principal, op, Resource::Plugin(plugin))?;
    if principal.admin || owner == Some(principal.name.as_str()) {
        return Ok(());
    }
    Err(AuthError::Denied {
        principal: principal.name.clone(),
        op,
        resource: Resource::Plugin(plugin).to_string(),
        hint: match owner {
            Some(o) => format!("the plugin is owned by {o:?}; only its owner or an admin may"),
            None => "the plugin has no recorded owner; only an admin may".into(),
        },
    })
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(s.trim()).ok()?;
    bytes.try_into().ok()
}

/// A new random token and its sha256 hex digest (what the auth file stores).
pub fn mint_token() -> (String, String) {
    let mut raw = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut raw);
    let token = format!(
        "weir_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let hash = token_hash(&token);
    (token, hash)
}

/// The sha256 hex digest of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

#[cfg(test)]
mod tests;
