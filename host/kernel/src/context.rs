//! The execution context every kernel operation carries.
//!
//! It names who is acting (tenant, principal, session), what is running (run, job), where it sits
//! in the trace, the budget and policy it runs under, and a cancellation token. Everything but the
//! token serializes, so a context can be checkpointed with its job and restored after a restart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rand::RngCore;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

/// Limits a run may not exceed. `None` means "no limit from the context" (budgets may still apply).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetSpec {
    /// Maximum model tokens (input + output).
    pub max_tokens: Option<u64>,
    /// Maximum cost, in the ledger currency.
    pub max_cost: Option<Decimal>,
    /// Maximum number of tool calls.
    pub max_tool_calls: Option<u64>,
    /// Maximum number of agent turns.
    pub max_turns: Option<u32>,
    /// Maximum wall-clock runtime, in milliseconds.
    pub max_runtime_ms: Option<u64>,
}

impl BudgetSpec {
    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Which policy governs a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// Policy name.
    pub name: String,
    /// Policy version (content hash or semver), pinned for the run.
    pub version: Option<String>,
    /// Per-run overrides, interpreted by the policy engine.
    #[serde(default)]
    pub overrides: BTreeMap<String, serde_json::Value>,
    /// The policy's full text (TOML), recorded with the job so every host that runs it applies
    /// the same rules, whatever policy that host loaded; `version` is its sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Versions pinned for a run, so a replay can tell what it ran against.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunVersions {
    /// Keel version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keel: Option<String>,
    /// Model identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Prompt or agent definition version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Plugin name -> content hash.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugins: BTreeMap<String, String>,
}

impl RunVersions {
    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.keel.is_none() && self.model.is_none() && self.prompt.is_none() && self.plugins.is_empty()
    }
}

/// Context carried by every kernel operation.
///
/// Serialised (a job's checkpoint) without the fields that are unset, so a call's checkpoint is
/// short; a missing field reads back as unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionContext {
    /// Tenant scope: the isolation boundary.
    pub tenant: String,
    /// Who the work is done for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Conversation or session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// One agent run (may span several jobs).
    pub run_id: Uuid,
    /// The job this context belongs to, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
    /// W3C trace id (32 hex chars).
    pub trace_id: String,
    /// Current span id (16 hex chars).
    pub span_id: String,
    /// Parent span id, if this context was derived from another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// Budget limits of the run.
    #[serde(default, skip_serializing_if = "BudgetSpec::is_unlimited")]
    pub budget: BudgetSpec,
    /// Policy governing the run.
    #[serde(default)]
    pub policy: PolicyRef,
    /// Pinned versions.
    #[serde(default, skip_serializing_if = "RunVersions::is_empty")]
    pub versions: RunVersions,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Cancellation; not serialized (a restored context gets a fresh token).
    #[serde(skip)]
    pub cancel: CancellationToken,
}

fn random_hex<const BYTES: usize>() -> String {
    let mut buf = [0u8; BYTES];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

impl ExecutionContext {
    /// A fresh root context for `tenant`: new run id, new trace.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            principal: None,
            session: None,
            run_id: Uuid::now_v7(),
            job_id: None,
            trace_id: random_hex::<16>(),
            span_id: random_hex::<8>(),
            parent_span_id: None,
            budget: BudgetSpec::default(),
            policy: PolicyRef::default(),
            versions: RunVersions::default(),
            metadata: BTreeMap::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Set the principal.
    pub fn with_principal(mut self, principal: impl Into<String>) -> Self {
        self.principal = Some(principal.into());
        self
    }

    /// Set the session.
    pub fn with_session(mut self, session: impl Into<String>) -> Self {
        self.session = Some(session.into());
        self
    }

    /// Set the job id.
    pub fn with_job(mut self, job_id: Uuid) -> Self {
        self.job_id = Some(job_id);
        self
    }

    /// A child context: same tenant, principal, session, run, trace, budget and policy; a new span
    /// whose parent is this span; no job yet; a cancellation token cancelled with this one.
    pub fn child(&self) -> Self {
        Self {
            tenant: self.tenant.clone(),
            principal: self.principal.clone(),
            session: self.session.clone(),
            run_id: self.run_id,
            job_id: None,
            trace_id: self.trace_id.clone(),
            span_id: random_hex::<8>(),
            parent_span_id: Some(self.span_id.clone()),
            budget: self.budget.clone(),
            policy: self.policy.clone(),
            versions: self.versions.clone(),
            metadata: self.metadata.clone(),
            cancel: self.cancel.child(),
        }
    }
}

#[derive(Debug, Default)]
struct TokenInner {
    cancelled: AtomicBool,
    notify: Notify,
    children: Mutex<Vec<Weak<TokenInner>>>,
}

impl TokenInner {
    fn cancel(&self) {
        if self.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        self.notify.notify_waiters();
        let children = std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for child in children.iter().filter_map(Weak::upgrade) {
            child.cancel();
        }
    }
}

/// A cooperative cancellation flag. Clones share the flag; [`child`](Self::child) tokens are
/// cancelled when their parent is, never the other way round.
#[derive(Debug, Clone, Default)]
pub struct CancellationToken {
    inner: Arc<TokenInner>,
}

impl PartialEq for CancellationToken {
    // Tokens carry no data worth comparing; equality of contexts ignores them.
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl CancellationToken {
    /// A new, uncancelled token.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled whenever this one is.
    pub fn child(&self) -> Self {
        let child = Self::new();
        if self.is_cancelled() {
            child.cancel();
        } else {
            let mut children = self.inner.children.lock().unwrap_or_else(|e| e.into_inner());
            children.retain(|w| w.strong_count() > 0);
            children.push(Arc::downgrade(&child.inner));
            drop(children);
            // Close the race with a concurrent cancel() that drained the list before our push.
            if self.is_cancelled() {
                child.cancel();
            }
        }
        child
    }

    /// Cancel this token and all its children.
    pub fn cancel(&self) {
        self.inner.cancel();
    }

    /// Whether the token has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Resolves once the token is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            // Register before checking the flag so a cancel in between is not missed.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_round_trip_and_child() {
        let mut ctx = ExecutionContext::new("acme").with_principal("alice").with_session("s1");
        ctx.budget.max_cost = Some(Decimal::new(1234, 2));
        ctx.budget.max_turns = Some(8);
        ctx.policy = PolicyRef {
            name: "default".into(),
            version: Some("v3".into()),
            ..Default::default()
        };
        ctx.versions.plugins.insert("fs".into(), "abc".into());
        ctx.metadata.insert("k".into(), serde_json::json!({"x": 1}));
        let job = Uuid::now_v7();
        let ctx = ctx.with_job(job);
        let json = serde_json::to_string(&ctx).unwrap();
        let back: ExecutionContext = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ctx);
        assert!(json.contains("\"12.34\""), "cost serialized as an exact string: {json}");

        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_eq!(
            serde_json::from_str::<ExecutionContext>(&serde_json::to_string(&child).unwrap()).unwrap(),
            child
        );
        assert_eq!(child.run_id, ctx.run_id);
        assert_eq!(child.parent_span_id.as_deref(), Some(ctx.span_id.as_str()));
        assert_ne!(child.span_id, ctx.span_id);
        assert_eq!(child.job_id, None);
        assert_eq!(child.budget, ctx.budget);
    }

    #[test]
    fn unset_fields_are_left_out_and_read_back_unset() {
        let ctx = ExecutionContext::new("acme");
        let json = serde_json::to_value(&ctx).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["policy", "run_id", "span_id", "tenant", "trace_id"], "{json}");
        let back: ExecutionContext = serde_json::from_value(json).unwrap();
        assert_eq!(back, ctx);
        // A checkpoint written with every field (before they were left out) still reads.
        let old = serde_json::json!({
            "tenant": "acme", "principal": null, "session": null, "run_id": ctx.run_id, "job_id": null,
            "trace_id": ctx.trace_id, "span_id": ctx.span_id, "parent_span_id": null,
            "budget": {"max_tokens": null, "max_cost": null, "max_tool_calls": null, "max_turns": null, "max_runtime_ms": null},
            "policy": {"name": "", "version": null, "overrides": {}},
            "versions": {"keel": null, "model": null, "prompt": null, "plugins": {}},
            "metadata": {}
        });
        assert_eq!(serde_json::from_value::<ExecutionContext>(old).unwrap(), ctx);
    }

    #[tokio::test]
    async fn cancelling_parent_cancels_child_not_reverse() {
        let parent = ExecutionContext::new("t");
        let child = parent.child();
        let grandchild = child.child();
        grandchild.cancel.cancel();
        assert!(!parent.cancel.is_cancelled());
        assert!(!child.cancel.is_cancelled());
        parent.cancel.cancel();
        assert!(child.cancel.is_cancelled());
        child.cancel.cancelled().await;
    }
}
