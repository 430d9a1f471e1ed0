//! MCP tasks (the `io.modelcontextprotocol/tasks` extension, SEP-2663, as rmcp 3.11 implements
//! it): a client that declares the extension gets a task for a call that does not finish within
//! `[mcp] task_after_ms` or that waits for an approval, and follows it with `tasks/get`,
//! answers its approval with `tasks/update`, and stops it with `tasks/cancel`.
//!
//! A task is the call's Keel job: its id is the job id and every `tasks/get` reads the job as
//! stored, so the task's status is the job's, never a copy that could drift:
//!
//! | job | task |
//! |---|---|
//! | QUEUED, RUNNING | `working` |
//! | WAITING_ACTION | `input_required`, one elicitation per pending approval (key: the action id), when the client supports form elicitation; else `working` with a status message saying how to approve |
//! | SUCCEEDED, FAILED, TIMED_OUT | `completed` with the `CallToolResult` (a failure is an `isError` result with its kind, as without tasks: MCP's `failed` is for protocol errors) |
//! | CANCELLED | `cancelled` |
//!
//! Tasks are visible only in the scope that created them (another scope's task is "unknown", like
//! a missing one). The server remembers a task for [`TASK_TTL`] after it was created (`ttlMs`);
//! its job stays in the store after that (`keel jobs show ID`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use keel_app::call::{CallOutcome, CallRequest};
use keel_app::keel_kernel::ExecutionHandle;
use keel_app::keel_kernel::event::EventType;
use keel_app::keel_kernel::job::JobState;
use rmcp::ErrorData;
use rmcp::model::{
    CallToolResponse, CallToolResult, CreateTaskResult, DetailedTask, ElicitRequest, ElicitResult, GetTaskResult,
    InputRequest, InputResponses, JsonObject, Task, TaskPayload, TaskStatus,
};
use uuid::Uuid;

use crate::call::{approval_request, how, outcome_result, refused, resolution_of};
use crate::{CallIdentity, Shared};

/// How long a task is kept after its creation (once it has ended): `ttlMs`.
pub const TASK_TTL: Duration = Duration::from_secs(3600);

/// The polling interval suggested to clients: `pollIntervalMs`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The tasks of one server (every session shares them: a task outlives the request, and an HTTP
/// client may poll it on another connection).
#[derive(Default)]
pub(crate) struct Tasks {
    entries: Mutex<HashMap<Uuid, Entry>>,
}

struct Entry {
    handle: ExecutionHandle,
    /// The scope of the caller that created the task: the only one that may see it.
    scope: String,
    /// Whether the creating client takes approvals as elicitation input requests.
    elicits: bool,
    created: Instant,
}

impl Tasks {
    fn insert(&self, handle: ExecutionHandle, scope: &str, elicits: bool) {
        let mut entries = self.entries.lock().expect("tasks lock");
        // Forget tasks past their TTL (clients were told `ttlMs`): bounds the memory of a
        // long-running server. Their jobs stay in the store (`keel jobs show`). Cheap: a scan on
        // each new task, none per call without tasks.
        entries.retain(|_, e| e.created.elapsed() < TASK_TTL);
        entries.insert(
            handle.job_id(),
            Entry {
                handle,
                scope: scope.to_string(),
                elicits,
                created: Instant::now(),
            },
        );
    }

    /// The task `task_id` of `scope`: "unknown task" for a malformed id, a forgotten task and
    /// another scope's task alike.
    fn get(&self, scope: &str, task_id: &str) -> Result<(ExecutionHandle, bool), ErrorData> {
        let unknown = || ErrorData::invalid_params(format!("unknown task: {task_id}"), None);
        let id = Uuid::parse_str(task_id).map_err(|_| unknown())?;
        let entries = self.entries.lock().expect("tasks lock");
        match entries.get(&id) {
            Some(e) if e.scope == scope => Ok((e.handle.clone(), e.elicits)),
            _ => Err(unknown()),
        }
    }
}

/// `tools/call` from a client that declared the tasks extension: the call's result when it
/// ends within `task_after` without waiting for an approval, else a task for its job.
pub(crate) async fn call(
    shared: &Shared,
    identity: &CallIdentity,
    tool: &str,
    arguments: serde_json::Value,
    elicits: bool,
) -> CallToolResponse {
    let mut request = CallRequest::new(identity.scope.clone(), tool, arguments);
    request.principal = identity.principal.clone();
    request.session = identity.session.clone();
    let handle = match shared.host.start_call(&request).await {
        Ok(handle) => handle,
        Err(e) => return refused(&e, None).into(),
    };
    let ended = if handle.is_direct() {
        // Allowed at once: it ends, or becomes a task once it runs past `task_after`.
        tokio::time::timeout(shared.task_after, handle.result()).await.is_ok()
    } else {
        let mut events = handle.events();
        tokio::time::timeout(shared.task_after, async {
            while let Some(event) = events.next().await {
                if event.event_type == EventType::ActionRequired {
                    return false;
                }
            }
            // The stream ends after the job's terminal event.
            true
        })
        .await
        .unwrap_or(false)
    };
    if ended {
        return finished(&handle).await.into();
    }
    shared.tasks.insert(handle.clone(), &identity.scope, elicits);
    match detailed(&handle, &identity.scope, elicits).await {
        Ok(detailed) => CallToolResponse::Task(CreateTaskResult::new(detailed.task)),
        Err(e) => refused(&keel_app::AppError::internal(e.message), Some(handle.job_id())).into(),
    }
}

/// The result of a call whose job has ended.
async fn finished(handle: &ExecutionHandle) -> CallToolResult {
    match handle.snapshot().await {
        Ok(result) => outcome_result(CallOutcome::from_result(result)),
        Err(e) => refused(&keel_app::runtime::agent_error(e), Some(handle.job_id())),
    }
}

/// `tasks/get`.
pub(crate) async fn get(shared: &Shared, identity: &CallIdentity, task_id: &str) -> Result<GetTaskResult, ErrorData> {
    let (handle, elicits) = shared.tasks.get(&identity.scope, task_id)?;
    Ok(GetTaskResult::new(detailed(&handle, &identity.scope, elicits).await?))
}

/// `tasks/update`: the client's answers to approval elicitations, keyed by action id. Keys that
/// are not a pending approval of this task's job (answered elsewhere meanwhile, or unknown) are
/// ignored, as the extension says; an answer that is neither approve nor deny leaves the
/// approval pending.
pub(crate) async fn update(
    shared: &Shared,
    identity: &CallIdentity,
    task_id: &str,
    responses: InputResponses,
) -> Result<(), ErrorData> {
    let (handle, _) = shared.tasks.get(&identity.scope, task_id)?;
    let pending = handle
        .pending_actions()
        .await
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    for (key, value) in responses {
        let Some(action) = pending.iter().find(|a| a.id.to_string() == key) else {
            continue;
        };
        let answer: ElicitResult = serde_json::from_value(value).map_err(|e| {
            ErrorData::invalid_params(
                format!("input response `{key}` is not an elicitation result: {e}"),
                None,
            )
        })?;
        let Some(resolution) = resolution_of(&answer, action, "mcp task") else {
            continue;
        };
        if let Err(e) = handle.resolve_action(action.id, resolution).await {
            // Answered elsewhere first, or expired: the job's state tells which.
            tracing::debug!(error = %e, "approval not resolved by tasks/update");
        }
    }
    Ok(())
}

/// `tasks/cancel`: cancels the job (and its pending approvals). A task that has ended cannot be
/// cancelled.
pub(crate) async fn cancel(shared: &Shared, identity: &CallIdentity, task_id: &str) -> Result<(), ErrorData> {
    let (handle, _) = shared.tasks.get(&identity.scope, task_id)?;
    let job = handle
        .job()
        .await
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    if job.state.is_terminal() {
        return Err(ErrorData::invalid_params(
            format!("task {task_id} has already ended ({})", job.state),
            None,
        ));
    }
    handle
        .cancel("the MCP client cancelled the task")
        .await
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    Ok(())
}

/// The task of `handle`'s job as it stands now.
async fn detailed(handle: &ExecutionHandle, scope: &str, elicits: bool) -> Result<DetailedTask, ErrorData> {
    let internal = |e: keel_app::keel_kernel::agent::AgentError| ErrorData::internal_error(e.to_string(), None);
    let job = handle.job().await.map_err(internal)?;
    let mut message = None;
    let payload = match job.state {
        JobState::Queued | JobState::Running => TaskPayload::Working,
        JobState::WaitingAction => {
            let pending = handle.pending_actions().await.map_err(internal)?;
            let mut input_requests = BTreeMap::new();
            if elicits {
                for action in &pending {
                    if let Some(params) = approval_request(action) {
                        input_requests.insert(
                            action.id.to_string(),
                            InputRequest::Elicitation(ElicitRequest::new(params)),
                        );
                    }
                }
            }
            if let Some(action) = pending.first() {
                message = Some(format!(
                    "waiting for approval of action {}: answer the input request, or `{}`",
                    action.id,
                    how(scope, action)
                ));
            }
            if input_requests.is_empty() {
                TaskPayload::Working
            } else {
                TaskPayload::InputRequired { input_requests }
            }
        }
        JobState::Cancelled => TaskPayload::Cancelled,
        JobState::Succeeded | JobState::Failed | JobState::TimedOut => {
            let result = finished(handle).await;
            let result: JsonObject = match serde_json::to_value(&result) {
                Ok(serde_json::Value::Object(object)) => object,
                _ => return Err(ErrorData::internal_error("a tool result did not serialize", None)),
            };
            TaskPayload::Completed { result }
        }
    };
    let mut task = Task::new(
        job.id.to_string(),
        TaskStatus::Working,
        job.created_at.to_rfc3339(),
        job.updated_at.to_rfc3339(),
    )
    .with_ttl_ms(TASK_TTL.as_millis() as u64)
    .with_poll_interval_ms(POLL_INTERVAL.as_millis() as u64);
    if let Some(message) = message {
        task = task.with_status_message(message);
    }
    Ok(DetailedTask::new(task, payload))
}
