//! `tools/call`: one governed call (`AgentHost::start_call`: schema, policy, approval, budget
//! hold, sandboxed call, receipt, events, journal), followed to its end, with the approvals it
//! waits for answered by the MCP client (elicitation) or by someone else (`keel actions approve`).
//!
//! Every outcome is a `CallToolResult`: the tool's output as `structuredContent` (and as text),
//! or `isError: true` with `{ "error": { "kind", "message", ... }, "job_id" }` where `kind` is the
//! tool's WIT error kind (`denied`, `invalid_input`, `timed_out`, ...) or the kernel's refusal
//! (`policy_denied`, `approval_denied`, `budget_exceeded`, ...), or `approval_pending` when the
//! wait for an approval ran out (the job goes on and finishes when approved).

// MCP logging (`notifications/message`) is deprecated by the 2026-07-28 revision, which this server
// does not negotiate; it is how a client without elicitation learns how to approve a call.
#![allow(deprecated)]

use std::collections::HashSet;

use futures::StreamExt as _;
use keel_app::call::{CallOutcome, CallRequest};
use keel_app::keel_kernel::action::{Action, Resolution};
use keel_app::keel_kernel::event::EventType;
use keel_app::{AppError, ErrorKind};
use rmcp::model::{
    CallToolResult, ContentBlock, ElicitRequestParams, ElicitResult, ElicitationAction, ElicitationSchema,
    LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam,
};
use rmcp::service::{RequestContext, ServiceError};
use rmcp::{Peer, RoleServer};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{CallIdentity, Shared};

/// The default scope: `keel actions approve ID` needs `--scope S` for any other.
const DEFAULT_SCOPE: &str = "default";

/// Call `tool` (`plugin/tool`) for `identity` and wait for its outcome.
pub(crate) async fn governed(
    shared: &Shared,
    identity: &CallIdentity,
    tool: &str,
    arguments: Value,
    ctx: &RequestContext<RoleServer>,
) -> CallToolResult {
    let mut request = CallRequest::new(identity.scope.clone(), tool, arguments);
    request.principal = identity.principal.clone();
    request.session = identity.session.clone();
    let handle = match shared.host.start_call(&request).await {
        Ok(handle) => handle,
        Err(e) => return refused(&e, None),
    };
    let job_id = handle.job_id();
    if handle.is_direct() {
        // Allowed at once and running (no approval to follow, no event to read) until it ends or
        // the client cancels it: `notifications/cancelled`, or the session ends, as a stdio
        // client that exits ends it (nobody is left to read the result).
        let ended = tokio::select! {
            ended = handle.result() => ended,
            _ = ctx.ct.cancelled() => {
                let _ = handle.cancel(CLIENT_CANCELLED).await;
                handle.result().await
            }
        };
        return result_of(&handle, ended);
    }
    let elicits = ctx
        .peer
        .supported_elicitation_modes()
        .contains(&rmcp::service::ElicitationMode::Form);
    let progress = ctx.meta.get_progress_token();
    let mut events = handle.events();
    let mut seen: HashSet<Uuid> = HashSet::new();
    // Approvals to announce and wait for (elicitation unsupported, dismissed or failed).
    let (fallback_tx, mut fallback_rx) = mpsc::unbounded_channel::<Action>();
    let mut asking: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut waiting: Option<(tokio::time::Instant, Action)> = None;
    loop {
        let deadline = waiting.as_ref().map(|(at, _)| *at);
        tokio::select! {
            event = events.next() => match event {
                // The stream ends after the job's terminal event.
                None => break,
                Some(e) if e.event_type == EventType::ActionRequired => {
                    let pending = handle.pending_actions().await.unwrap_or_default();
                    for action in pending.into_iter().filter(|a| seen.insert(a.id)) {
                        if elicits {
                            asking.push(tokio::spawn(ask(
                                ctx.peer.clone(),
                                handle.clone(),
                                action,
                                fallback_tx.clone(),
                            )));
                        } else {
                            let _ = fallback_tx.send(action);
                        }
                    }
                }
                Some(_) => {}
            },
            Some(action) = fallback_rx.recv() => {
                announce(&ctx.peer, progress.clone(), &identity.scope, &action).await;
                if waiting.is_none() {
                    waiting = Some((tokio::time::Instant::now() + shared.approval_wait, action));
                }
            }
            _ = sleep_until(deadline) => {
                let (_, action) = waiting.take().expect("a deadline implies a wait");
                // Someone may have answered at the last moment: the job's state decides.
                if let Ok(job) = handle.job().await && job.state.is_terminal() {
                    continue;
                }
                asking.iter().for_each(|t| t.abort());
                return pending_result(&identity.scope, &action, job_id);
            }
            _ = ctx.ct.cancelled() => {
                // The client gave up on the call (notifications/cancelled): so does Keel.
                let _ = handle.cancel(CLIENT_CANCELLED).await;
                asking.iter().for_each(|t| t.abort());
                return error_result(json!({"kind": "cancelled", "message": CLIENT_CANCELLED}), Some(job_id));
            }
        }
    }
    asking.iter().for_each(|t| t.abort());
    finished(&handle).await
}

/// Why a call is cancelled when its MCP client cancels it.
const CLIENT_CANCELLED: &str = "the MCP client cancelled the call";

/// The result of the call of `handle`, once its job has ended.
async fn finished(handle: &keel_app::keel_kernel::ExecutionHandle) -> CallToolResult {
    result_of(handle, handle.result().await)
}

/// The `CallToolResult` of the call of `handle` that ended as `ended`.
fn result_of(
    handle: &keel_app::keel_kernel::ExecutionHandle,
    ended: Result<keel_app::keel_kernel::ExecutionResult, keel_app::keel_kernel::agent::AgentError>,
) -> CallToolResult {
    match ended {
        Ok(result) => outcome_result(CallOutcome::from_result(result)),
        Err(e) => refused(&keel_app::runtime::agent_error(e), Some(handle.job_id())),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The answers an approval elicitation offers.
const APPROVE: &str = "approve";
const APPROVE_SESSION: &str = "approve_for_session";
const DENY: &str = "deny";

/// Ask the client's user to approve `action` (`elicitation/create`) and resolve it with the
/// answer. A dismissed or failed elicitation leaves the action pending and hands it to the
/// announce-and-wait path.
async fn ask(
    peer: Peer<RoleServer>,
    handle: keel_app::keel_kernel::ExecutionHandle,
    action: Action,
    fallback: mpsc::UnboundedSender<Action>,
) {
    let Some(params) = approval_request(&action) else {
        let _ = fallback.send(action);
        return;
    };
    let answer: Result<_, ServiceError> = peer.create_elicitation(params).await;
    let resolution = match answer {
        Ok(result) => resolution_of(&result, &action, "mcp elicitation"),
        Err(e) => {
            tracing::debug!(error = %e, "elicitation failed");
            None
        }
    };
    let Some(resolution) = resolution else {
        // Dismissed, failed, or an answer this version does not know: ask another way.
        let _ = fallback.send(action);
        return;
    };
    if let Err(e) = handle.resolve_action(action.id, resolution).await {
        // Answered elsewhere first, or expired: the job's events tell which.
        tracing::debug!(error = %e, "approval not resolved by elicitation");
    }
}

/// The elicitation that asks the client's user to approve `action` (`None` only if the form
/// were invalid, which a unit test rules out).
pub(crate) fn approval_request(action: &Action) -> Option<ElicitRequestParams> {
    let tool = action.request["tool"].as_str().unwrap_or("?");
    let arguments = serde_json::to_string_pretty(&action.request["arguments"]).unwrap_or_default();
    let message = format!(
        "Keel: approve the call of `{tool}` with these arguments?\n{arguments}\n(action {}, job {})",
        action.id, action.job_id
    );
    Some(ElicitRequestParams::FormElicitationParams {
        meta: None,
        message,
        requested_schema: approval_schema()?,
    })
}

/// The resolution of `action` a client's answer to [`approval_request`] gives: approve (once or
/// for the session) or deny; `None` when dismissed or not understood (the action stays pending).
pub(crate) fn resolution_of(answer: &ElicitResult, action: &Action, by: &str) -> Option<Resolution> {
    let decision = match answer.action {
        ElicitationAction::Accept => answer.content.as_ref().and_then(|c| c["decision"].as_str()),
        ElicitationAction::Decline => Some(DENY),
        _ => None,
    };
    let resolution = match decision? {
        APPROVE => Resolution::approve(true),
        APPROVE_SESSION => Resolution {
            value: json!("session"),
            ..Resolution::approve(true)
        },
        DENY => Resolution::approve(false),
        _ => return None,
    };
    Some(Resolution {
        resolved_by: Some(by.into()),
        // The exact call the user saw: the kernel refuses the answer for any other.
        call_digest: action.call_digest.clone(),
        ..resolution
    })
}

/// The form an approval elicitation shows: one choice.
fn approval_schema() -> Option<ElicitationSchema> {
    let schema = json!({
        "type": "object",
        "properties": {
            "decision": {
                "type": "string",
                "title": "Decision",
                "description": "approve this call, approve it for the rest of this session, or deny it",
                "enum": [APPROVE, APPROVE_SESSION, DENY],
            }
        },
        "required": ["decision"],
    });
    ElicitationSchema::from_json_schema(schema.as_object().cloned().unwrap_or_default()).ok()
}

/// How to approve `action` from outside the MCP client.
pub(crate) fn how(scope: &str, action: &Action) -> String {
    if scope == DEFAULT_SCOPE {
        format!("keel actions approve {}", action.id)
    } else {
        format!("keel actions approve {} --scope {scope}", action.id)
    }
}

/// Tell the client (a log message, and progress if it asked for it) that the call waits for an
/// approval and how to give it.
async fn announce(peer: &Peer<RoleServer>, progress: Option<rmcp::model::ProgressToken>, scope: &str, action: &Action) {
    let tool = action.request["tool"].as_str().unwrap_or("?");
    let how = how(scope, action);
    let text = format!(
        "approval required for `{tool}` (action {}, job {}): approve with `{how}` (or deny with `keel actions deny {}`); the call waits",
        action.id, action.job_id, action.id
    );
    let log = LoggingMessageNotificationParam::new(
        LoggingLevel::Warning,
        json!({
            "message": text,
            "action_id": action.id,
            "job_id": action.job_id,
            "tool": tool,
            "how": how,
        }),
    )
    .with_logger("keel");
    let _ = peer.notify_logging_message(log).await;
    if let Some(token) = progress {
        let mut note = ProgressNotificationParam::new(token, 0.0);
        note.message = Some(text);
        let _ = peer.notify_progress(note).await;
    }
}

/// The wait for an approval ran out: say so, and how to approve (the job finishes when approved).
fn pending_result(scope: &str, action: &Action, job_id: Uuid) -> CallToolResult {
    let how = how(scope, action);
    error_result(
        json!({
            "kind": "approval_pending",
            "message": format!(
                "the call waits for an approval (action {}); approve with `{how}`: the job then finishes on its own",
                action.id
            ),
            "action_id": action.id,
            "job_id": job_id,
            "how": how,
        }),
        Some(job_id),
    )
}

/// The result of a finished call.
pub fn outcome_result(outcome: CallOutcome) -> CallToolResult {
    let job_id = outcome.job_id;
    if outcome.succeeded()
        && let Some(output) = outcome.tool_result.as_ref().and_then(|r| r.output.clone())
    {
        let text = serde_json::to_string(&output).unwrap_or_default();
        let structured = match output {
            Value::Object(_) => output,
            other => json!({ "result": other }),
        };
        let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
        result.structured_content = Some(structured);
        return result;
    }
    // The tool's own error (its WIT kind and details), else the kernel's refusal.
    let error = match outcome.tool_result.as_ref().and_then(|r| r.error.as_ref()) {
        Some(e) => {
            let mut value = serde_json::to_value(e).unwrap_or_else(|_| json!({}));
            if value.get("message").is_none() {
                value["message"] = json!(e.to_string());
            }
            value
        }
        None => match &outcome.error {
            Some(e) => json!({ "kind": e.code, "message": e.message }),
            None => json!({ "kind": "failed", "message": format!("the call ended {}", outcome.status) }),
        },
    };
    error_result(error, Some(job_id))
}

/// A call refused before (or outside) its job.
pub(crate) fn refused(e: &AppError, job_id: Option<Uuid>) -> CallToolResult {
    let kind = match e.kind {
        ErrorKind::User => "invalid_input",
        ErrorKind::Plugin => "failed",
        ErrorKind::Internal => "internal",
        ErrorKind::NotFound => "not_found",
        ErrorKind::Forbidden => "forbidden",
    };
    error_result(json!({ "kind": kind, "message": e.message }), job_id)
}

/// `isError: true` with `{error, job_id}` as structured content and one line of text.
fn error_result(error: Value, job_id: Option<Uuid>) -> CallToolResult {
    let text = format!(
        "{}: {}",
        error["kind"].as_str().unwrap_or("error"),
        error["message"].as_str().unwrap_or("")
    );
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = Some(json!({ "error": error, "job_id": job_id }));
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_app::keel_kernel::job::{JobError, JobState};

    #[test]
    fn the_approval_form_is_a_valid_elicitation_schema() {
        let schema = serde_json::to_value(approval_schema().expect("valid")).unwrap();
        assert_eq!(
            schema["properties"]["decision"]["enum"],
            json!([APPROVE, APPROVE_SESSION, DENY])
        );
    }

    #[test]
    fn a_refusal_is_an_error_result_with_its_kind_and_job() {
        let job_id = Uuid::now_v7();
        let result = outcome_result(CallOutcome {
            job_id,
            status: JobState::Failed,
            tool_result: None,
            error: Some(JobError {
                code: "policy_denied".into(),
                message: "denied by policy rule `x`".into(),
            }),
        });
        assert_eq!(result.is_error, Some(true));
        let structured = result.structured_content.unwrap();
        assert_eq!(structured["error"]["kind"], "policy_denied");
        assert_eq!(structured["job_id"], json!(job_id));
    }
}
