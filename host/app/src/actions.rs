//! Human-in-the-loop actions: list, show, approve/deny (also for the rest of the session), and
//! resolve by resume token.
//!
//! Approve/deny by id is for a trusted, authenticated caller of the action's scope; a resume
//! token is the capability of a remote approver. Another scope's action is reported exactly like
//! one that does not exist, and so is another scope's token.

use keel_kernel::Kernel;
use keel_kernel::action::{Action, ActionFilter, ActionState, Resolution, hash_token};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::caller::{Caller, Role};
use crate::error::AppError;

/// Which actions to list (oldest first).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActionQuery {
    /// Only the actions of this job (which must be the caller's).
    pub job_id: Option<Uuid>,
    /// Only actions in these states (any if empty).
    pub states: Vec<ActionState>,
    /// At most this many.
    pub limit: Option<u32>,
}

impl ActionQuery {
    /// The pending actions (of one job, or all of the scope's).
    pub fn pending(job_id: Option<Uuid>) -> Self {
        Self {
            job_id,
            states: vec![ActionState::Pending],
            limit: None,
        }
    }
}

/// A decision on an approval or confirmation, by action id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Approve (true) or deny (false).
    pub approved: bool,
    /// Also approve the same call for the rest of the job's session (approvals only).
    #[serde(default)]
    pub for_session: bool,
    /// An answer to record with the decision.
    #[serde(default)]
    pub value: Value,
    /// Who decides (recorded with the resolution; default: the caller's principal).
    #[serde(default)]
    pub by: Option<String>,
}

/// An answer presented with a resume token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenAnswer {
    /// Approve or deny (confirmations and approvals need one).
    pub approved: Option<bool>,
    /// The answer (the chosen option, the input, ...).
    pub value: Value,
    /// Who is answering.
    pub by: Option<String>,
}

/// The caller's actions matching `query`.
pub async fn list_actions(kernel: &Kernel, caller: &Caller, query: &ActionQuery) -> Result<Vec<Action>, AppError> {
    caller.require(Role::Read)?;
    if let Some(id) = query.job_id {
        kernel.jobs().get(&caller.scope, id).await?;
    }
    Ok(kernel
        .actions()
        .list(&ActionFilter {
            tenant: caller.scope.clone(),
            job_id: query.job_id,
            states: query.states.clone(),
            limit: query.limit,
        })
        .await?)
}

/// One of the caller's actions.
pub async fn get_action(kernel: &Kernel, caller: &Caller, id: Uuid) -> Result<Action, AppError> {
    caller.require(Role::Read)?;
    Ok(kernel.actions().get(&caller.scope, id).await?)
}

/// Approve or deny one of the caller's pending actions by id.
pub async fn decide(kernel: &Kernel, caller: &Caller, id: Uuid, decision: Decision) -> Result<Action, AppError> {
    caller.require(Role::Write)?;
    if decision.for_session && !decision.approved {
        return Err(AppError::user("only an approval can be given for the session"));
    }
    let resolution = Resolution {
        approved: Some(decision.approved),
        // The agent loop reads `"session"` as "approve this call for the rest of the session".
        value: if decision.for_session {
            Value::String("session".into())
        } else {
            decision.value
        },
        resolved_by: decision.by.or_else(|| caller.principal.clone()),
        call_digest: None,
    };
    Ok(kernel.actions().resolve(&caller.scope, id, resolution).await?)
}

/// Resolve the action `token` belongs to. With `caller`, only an action of the caller's scope
/// (another scope's token is refused like an unknown one); without, the token alone is the
/// authority (the local CLI, where whoever holds the token may answer).
pub async fn resolve_by_token(
    kernel: &Kernel,
    caller: Option<&Caller>,
    token: &str,
    answer: TokenAnswer,
) -> Result<Action, AppError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(AppError::user("the resume token is empty"));
    }
    if let Some(caller) = caller {
        caller.require(Role::Write)?;
        // The scope of an action never changes, so checking it before resolving is enough.
        let action = kernel.store().get_action_by_token_hash(&hash_token(token)).await?;
        if action.is_none_or(|a| a.tenant != caller.scope) {
            return Err(keel_kernel::KernelError::InvalidToken.into());
        }
    }
    let resolution = Resolution {
        approved: answer.approved,
        value: answer.value,
        resolved_by: answer.by.or_else(|| caller.and_then(|c| c.principal.clone())),
        call_digest: None,
    };
    Ok(kernel.actions().resolve_by_token(token, resolution).await?)
}
