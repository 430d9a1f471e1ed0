//! Session approvals: "approve for this session".
//!
//! When a user approves a call "for this session", the same tool called with the same arguments
//! (canonically: key order and whitespace do not matter) in the same session is allowed without
//! asking again. The key is (session, tool, [`call_digest`]) — never the tool alone, so approving
//! `fs/write {path: "/tmp/a"}` does not approve `fs/write {path: "/etc/passwd"}`.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use serde_json::Value;

use crate::canonical::call_digest;

/// Storage for session approvals. In memory today ([`SessionApprovals`]); a trait so a store can
/// persist approvals later (a job waiting on approval survives restarts, and so should these).
pub trait SessionApprovalStore: Send + Sync {
    /// Whether `digest` (see [`call_digest`]) of `tool` has been approved for `session`.
    fn is_approved(&self, session: &str, tool: &str, digest: &str) -> bool;

    /// Record that `digest` of `tool` is approved for the rest of `session`.
    fn approve(&self, session: &str, tool: &str, digest: &str);

    /// Whether anything at all is approved for `tool` in `session`. The engine asks this first so a
    /// miss skips hashing the arguments; the default (`true`) is always correct, just slower.
    fn may_have_approvals(&self, session: &str, tool: &str) -> bool {
        let _ = (session, tool);
        true
    }

    /// Forget every approval of `session` (the session ended).
    fn revoke_session(&self, session: &str);

    /// Approve the call `tool(arguments)` for `session`.
    fn approve_call(&self, session: &str, tool: &str, arguments: &Value) {
        self.approve(session, tool, &call_digest(tool, arguments));
    }

    /// Whether the call `tool(arguments)` has been approved for `session`.
    fn is_call_approved(&self, session: &str, tool: &str, arguments: &Value) -> bool {
        self.is_approved(session, tool, &call_digest(tool, arguments))
    }
}

/// Thread-safe, in-memory [`SessionApprovalStore`].
#[derive(Debug, Default)]
pub struct SessionApprovals {
    /// session -> tool -> approved call digests. Nested maps so lookups borrow `&str` (no key
    /// allocation on the check path) and a session can be dropped in one step.
    inner: RwLock<HashMap<String, HashMap<String, HashSet<String>>>>,
}

impl SessionApprovals {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of approved calls across all sessions.
    pub fn len(&self) -> usize {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.values().flat_map(|t| t.values()).map(HashSet::len).sum()
    }

    /// Whether no call is approved.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// A poisoned lock only means another thread panicked mid-insert; the sets are still valid, so
// recover the guard instead of propagating the panic into every policy check.
impl SessionApprovalStore for SessionApprovals {
    fn is_approved(&self, session: &str, tool: &str, digest: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(session)
            .and_then(|tools| tools.get(tool))
            .is_some_and(|digests| digests.contains(digest))
    }

    fn may_have_approvals(&self, session: &str, tool: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(session).is_some_and(|tools| tools.contains_key(tool))
    }

    fn approve(&self, session: &str, tool: &str, digest: &str) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.entry(session.to_owned())
            .or_default()
            .entry(tool.to_owned())
            .or_default()
            .insert(digest.to_owned());
    }

    fn revoke_session(&self, session: &str) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.remove(session);
    }
}
