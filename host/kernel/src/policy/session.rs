//! Session approvals: "approve for this session".
//!
//! When a user approves a call "for this session", the same tool called with the same arguments
//! (canonically: key order and whitespace do not matter) in the same session of the same tenant is
//! allowed without asking again. The key is ([`SessionKey`], tool, [`call_digest`]) — never the
//! tool alone, so approving `fs/write {path: "/tmp/a"}` does not approve
//! `fs/write {path: "/etc/passwd"}`, and never the session name alone, because clients choose
//! session names freely: tenant A's session "main" is not tenant B's, nor is Alice's Mallory's
//! within one tenant (a principal is the caller's identity, e.g. its API key).

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use serde_json::Value;

use crate::canonical::call_digest;

/// Which session an approval belongs to: a session name is chosen by the client, so it is unique
/// only within its tenant (scope) and principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey<'a> {
    /// The tenant (scope) the session lives in.
    pub tenant: &'a str,
    /// The principal whose session it is (`""`: none named).
    pub principal: &'a str,
    /// The session name, as the client gave it.
    pub session: &'a str,
}

impl<'a> SessionKey<'a> {
    /// The session `session` of `principal` (`""`: none named, as in
    /// [`PolicyRequest`](super::PolicyRequest)) in tenant `tenant`.
    pub fn new(tenant: &'a str, principal: &'a str, session: &'a str) -> Self {
        Self {
            tenant,
            principal,
            session,
        }
    }
}

/// Storage for session approvals. In memory today ([`SessionApprovals`]); a trait so a store can
/// persist approvals later (a job waiting on approval survives restarts, and so should these).
pub trait SessionApprovalStore: Send + Sync {
    /// Whether `digest` (see [`call_digest`]) of `tool` has been approved for `session`.
    fn is_approved(&self, session: SessionKey<'_>, tool: &str, digest: &str) -> bool;

    /// Record that `digest` of `tool` is approved for the rest of `session`.
    fn approve(&self, session: SessionKey<'_>, tool: &str, digest: &str);

    /// Whether anything at all is approved for `tool` in `session`. The engine asks this first so a
    /// miss skips hashing the arguments; the default (`true`) is always correct, just slower.
    fn may_have_approvals(&self, session: SessionKey<'_>, tool: &str) -> bool {
        let _ = (session, tool);
        true
    }

    /// Forget every approval of `session` (the session ended).
    fn revoke_session(&self, session: SessionKey<'_>);

    /// Approve the call `tool(arguments)` for `session`.
    fn approve_call(&self, session: SessionKey<'_>, tool: &str, arguments: &Value) {
        self.approve(session, tool, &call_digest(tool, arguments));
    }

    /// Whether the call `tool(arguments)` has been approved for `session`.
    fn is_call_approved(&self, session: SessionKey<'_>, tool: &str, arguments: &Value) -> bool {
        self.is_approved(session, tool, &call_digest(tool, arguments))
    }
}

/// tool -> approved call digests.
type Tools = HashMap<String, HashSet<String>>;

/// tenant -> principal -> session -> tools.
type Tenants = HashMap<String, HashMap<String, HashMap<String, Tools>>>;

/// Thread-safe, in-memory [`SessionApprovalStore`].
#[derive(Debug, Default)]
pub struct SessionApprovals {
    /// Nested maps so lookups borrow `&str` (no key allocation on the check path) and a session
    /// can be dropped in one step.
    inner: RwLock<Tenants>,
}

impl SessionApprovals {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of approved calls across all tenants and sessions.
    pub fn len(&self) -> usize {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .flat_map(HashMap::values)
            .flat_map(HashMap::values)
            .flat_map(HashMap::values)
            .map(HashSet::len)
            .sum()
    }

    /// Whether no call is approved.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn tools<'m>(map: &'m Tenants, key: SessionKey<'_>) -> Option<&'m Tools> {
        map.get(key.tenant)
            .and_then(|principals| principals.get(key.principal))
            .and_then(|sessions| sessions.get(key.session))
    }
}

// A poisoned lock only means another thread panicked mid-insert; the sets are still valid, so
// recover the guard instead of propagating the panic into every policy check.
impl SessionApprovalStore for SessionApprovals {
    fn is_approved(&self, session: SessionKey<'_>, tool: &str, digest: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Self::tools(&map, session)
            .and_then(|tools| tools.get(tool))
            .is_some_and(|digests| digests.contains(digest))
    }

    fn may_have_approvals(&self, session: SessionKey<'_>, tool: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Self::tools(&map, session).is_some_and(|tools| tools.contains_key(tool))
    }

    fn approve(&self, session: SessionKey<'_>, tool: &str, digest: &str) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.entry(session.tenant.to_owned())
            .or_default()
            .entry(session.principal.to_owned())
            .or_default()
            .entry(session.session.to_owned())
            .or_default()
            .entry(tool.to_owned())
            .or_default()
            .insert(digest.to_owned());
    }

    fn revoke_session(&self, session: SessionKey<'_>) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let Some(principals) = map.get_mut(session.tenant) else {
            return;
        };
        if let Some(sessions) = principals.get_mut(session.principal) {
            sessions.remove(session.session);
            if sessions.is_empty() {
                principals.remove(session.principal);
            }
        }
        if principals.is_empty() {
            map.remove(session.tenant);
        }
    }
}
