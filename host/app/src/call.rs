//! The governed tool call: `keel call`, MCP `tools/call` and the HTTP API call a tool through
//! here, and so through the kernel's one governed path ([`keel_kernel::AgentRuntime::call_tool`]):
//! schema check, policy, approval, budget hold, sandboxed call, settlement with a receipt, events
//! and journal. No front end reaches the sandbox any other way.

use keel_kernel::context::{BudgetSpec, CancellationToken, ExecutionContext};
use keel_kernel::job::{JobError, JobState};
use keel_kernel::journal::ToolResult;
use keel_kernel::{ExecutionHandle, ExecutionResult};
use serde::Serialize;
use uuid::Uuid;

use crate::error::AppError;
use crate::runtime::{AgentHost, agent_error};

/// One tool call asked for by a front end.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// `plugin/tool`.
    pub tool: String,
    /// The arguments object.
    pub arguments: serde_json::Value,
    /// Scope (tenant) charged and checked.
    pub scope: String,
    /// On whose behalf.
    pub principal: Option<String>,
    /// Session (the key of "approve for this session").
    pub session: Option<String>,
    /// Calling again with the same key in the scope returns the first call's job.
    pub idempotency_key: Option<String>,
    /// Limits of this call (cost, tool calls, runtime).
    pub budget: BudgetSpec,
    /// Cancelling it cancels the call (e.g. `keel call` interrupted by Ctrl-C): a running call's
    /// guest stops and its job ends CANCELLED, the attempt charged. [`AgentHost::call`] watches
    /// it throughout; with [`AgentHost::start_call`] it stops a call allowed at once (a front end
    /// following a call that waits for an approval cancels that one with its handle).
    pub cancel: CancellationToken,
}

impl CallRequest {
    /// A call of `tool` with `arguments` in `scope`, everything else default.
    pub fn new(scope: impl Into<String>, tool: impl Into<String>, arguments: serde_json::Value) -> Self {
        Self {
            tool: tool.into(),
            arguments,
            scope: scope.into(),
            principal: None,
            session: None,
            idempotency_key: None,
            budget: BudgetSpec::default(),
            cancel: CancellationToken::new(),
        }
    }
}

/// What a governed call came to.
#[derive(Debug, Clone, Serialize)]
pub struct CallOutcome {
    /// The call's job (its events, journal and ledger entries are under this id).
    pub job_id: Uuid,
    /// SUCCEEDED when the tool ran and returned output; FAILED when it was refused or failed.
    pub status: JobState,
    /// The tool's outcome (output or error, receipt, logs), when the call got that far.
    pub tool_result: Option<ToolResult>,
    /// Why the call did not succeed (`policy_denied`, `approval_denied`, `invalid_input`,
    /// `budget_exceeded`, a tool error kind such as `denied` or `timed_out`, ...).
    pub error: Option<JobError>,
}

impl CallOutcome {
    /// The outcome recorded in a call job's result.
    pub fn from_result(result: ExecutionResult) -> Self {
        Self {
            job_id: result.job_id,
            status: result.status,
            tool_result: result.tool_result,
            error: result.error,
        }
    }

    /// True when the tool ran and returned output.
    pub fn succeeded(&self) -> bool {
        self.status == JobState::Succeeded
    }
}

/// Why a call is cancelled when its [`CallRequest::cancel`] is (the kernel's words for it).
pub use keel_kernel::agent::CALLER_CANCELLED;

impl AgentHost {
    /// Refuse, before any job exists, a call of a plugin or tool that is not installed (one
    /// sentence naming the tools the plugin has) or of a plugin that cannot be loaded.
    pub async fn check_tool(&self, tool: &str) -> Result<(), AppError> {
        let Some((plugin, name)) = tool.split_once('/') else {
            return Err(AppError::user(format!("`{tool}` is not `plugin/tool`")));
        };
        let record = self.app.record(plugin).await?;
        // Loads and verifies the component against its record: a plugin that cannot be loaded
        // is refused here with its reason, before a job exists.
        let (prepared, _, _) = self.app.load(&record).await?;
        let info = &prepared.info;
        if info.tool(name).is_none() {
            let tools: Vec<&str> = info.tools.iter().map(|t| t.name.as_str()).collect();
            return Err(AppError::user(format!(
                "plugin `{plugin}` has no tool `{name}` (tools: {})",
                tools.join(", ")
            )));
        }
        Ok(())
    }

    /// Start a governed call of `request.tool` under this host's policy; the front end follows
    /// the returned job (its events, approvals), reads [`CallOutcome`] from its result and may
    /// cancel it. A call allowed at once is returned as soon as it has started (its handle
    /// [`is_direct`](ExecutionHandle::is_direct)), so that a long one can be followed or
    /// cancelled while it runs.
    pub async fn start_call(&self, request: &CallRequest) -> Result<ExecutionHandle, AppError> {
        let mut ctx = ExecutionContext::new(request.scope.clone());
        ctx.principal = request.principal.clone();
        ctx.session = request.session.clone();
        ctx.budget = request.budget.clone();
        ctx.policy = self.policy.clone();
        ctx.cancel = request.cancel.clone();
        let rt = self.rt.clone();
        let (tool, arguments, key) = (
            request.tool.clone(),
            request.arguments.clone(),
            request.idempotency_key.clone(),
        );
        // On a task of its own, so that a front end that stops waiting (an HTTP client that hangs
        // up drops its handler) does not stop the call midway: a call made in one commit, after
        // it ran, would leave no job and no charge, and one made in two would hold its job until
        // its lease lapsed (a server exiting waits for it: `finish_calls`). One registry read for
        // the call's lookups (`ToolHost::tool`, then `call_tool`).
        let in_flight = self.in_flight.clone().read_owned().await;
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let call = tokio::spawn(crate::tools::one_call(async move {
            let ended = rt
                .call_tool_reporting(&ctx, &tool, arguments, key, Some(started_tx))
                .await;
            drop(in_flight);
            ended
        }));
        // The handle of a call that has started on that task; else (sent to a runner, or refused)
        // what the task returned.
        if let Ok(handle) = started.await {
            return Ok(handle);
        }
        match call.await {
            Ok(ended) => ended.map_err(agent_error),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(AppError::internal(format!("the call's task was stopped: {e}"))),
        }
    }

    /// Call and wait for the outcome (approvals are answered by someone else meanwhile: another
    /// process, the web page, an MCP client).
    pub async fn call(&self, request: &CallRequest) -> Result<CallOutcome, AppError> {
        let handle = self.start_call(request).await?;
        let result = tokio::select! {
            result = handle.result() => result,
            () = request.cancel.cancelled() => {
                // A call allowed at once has stopped already (its context is `request.cancel`);
                // one that waits for an approval is cancelled here.
                if !handle.is_direct() {
                    let _ = handle.cancel(CALLER_CANCELLED).await;
                }
                handle.result().await
            }
        };
        Ok(CallOutcome::from_result(result.map_err(agent_error)?))
    }
}
