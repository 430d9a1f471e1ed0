//! `/v1/jobs`: create (idempotent), get, list (filters, cursor), cancel, and the job's SSE stream.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_app::Role;
use keel_kernel::job::{Job, JobState};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::schemas::{JobCreated, JobPage, JobWithResult, RuntimeEvent};
use super::{Who, need, parse_uuid};
use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// A new agent job.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// What to ask the agent.
    prompt: String,
    /// `provider:model` (providers come from `[models]` in the home's config.toml).
    model: String,
    /// Tools the model may use: a plugin name (all its tools), `plugin/tool`, `plugin/glob`, or
    /// `*` (every plugin this key's scope can see).
    #[serde(default)]
    tools: Vec<String>,
    /// Maximum model turns.
    max_turns: Option<u32>,
    /// Wall-clock limit of the whole job, in milliseconds.
    timeout_ms: Option<u64>,
    /// Maximum model cost (decimal string, ledger currency).
    #[schema(value_type = Option<String>)]
    max_cost: Option<Decimal>,
    /// Maximum tool calls.
    max_tool_calls: Option<u64>,
    /// Model to switch to when a `degrade` budget is exceeded.
    degrade_model: Option<String>,
    /// Session ("approve for this session" is remembered per session); default: one per job.
    session: Option<String>,
    /// A second create with the same key in this scope returns the first job (200, not 201).
    /// The `Idempotency-Key` header does the same.
    idempotency_key: Option<String>,
    /// Free-form metadata recorded with the job.
    #[serde(default)]
    #[schema(value_type = Object)]
    metadata: BTreeMap<String, Value>,
}

/// A job as the API shows it: the kernel's job, without the policy text recorded in its input.
pub(crate) fn job_view(job: &Job) -> Value {
    let mut value = serde_json::to_value(job).unwrap_or(Value::Null);
    if let Some(policy) = value.pointer_mut("/input/policy").and_then(Value::as_object_mut) {
        policy.remove("source");
    }
    value
}

/// Check the requested tool patterns against the plugins `caller` may see and expand `*`: a job
/// can never reach another scope's plugin, whatever glob it asks for.
async fn confine_tools(state: &AppState, caller: &keel_app::Caller, tools: &[String]) -> ApiResult<Vec<String>> {
    let visible = keel_app::keys::visible_plugins(&state.host.app.db, caller).await?;
    let mut out = Vec::new();
    for pattern in keel_app::runtime::tool_patterns(tools) {
        let (plugin, tool) = pattern.split_once('/').unwrap_or((pattern.as_str(), "*"));
        if plugin == "*" {
            out.extend(visible.iter().map(|p| format!("{p}/{tool}")));
        } else if plugin.contains(['*', '?', '[', '{']) {
            return Err(ApiError::invalid(format!(
                "tool pattern {pattern:?}: name the plugin (or use `*` for every visible plugin)"
            )));
        } else if visible.iter().any(|p| p == plugin) {
            out.push(pattern.clone());
        } else {
            return Err(ApiError::not_found(format!("plugin {plugin}")));
        }
    }
    Ok(out)
}

/// Create an agent job; it starts at once on this server's worker.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = CreateJob,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same as `idempotency_key`")),
    responses(
        (status = 201, description = "Created: `{job, created: true}`", body = JobCreated),
        (status = 200, description = "A job with this idempotency key existed: `{job, created: false}`", body = JobCreated),
        (status = 409, description = "The idempotency key was used for a different request"),
    ))]
pub(crate) async fn create_job(
    State(state): State<AppState>,
    who: Who,
    headers: HeaderMap,
    Json(body): Json<CreateJob>,
) -> ApiResult<Response> {
    need(&who, Role::Write)?;
    let host = &state.host;
    if body.prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt is empty"));
    }
    let header_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::invalid("Idempotency-Key is not text"))
        })
        .transpose()?;
    let key = match (header_key, body.idempotency_key) {
        (Some(h), Some(b)) if h != b => {
            return Err(ApiError::invalid(
                "the Idempotency-Key header and idempotency_key differ",
            ));
        }
        (h, b) => h.or(b),
    };
    let tools = confine_tools(&state, &who, &body.tools).await?;
    let run = keel_app::jobs::RunRequest {
        prompt: body.prompt,
        tools,
        model: body.model,
        max_turns: body.max_turns,
        timeout: body.timeout_ms.map(Duration::from_millis),
        max_cost: body.max_cost,
        max_tool_calls: body.max_tool_calls,
        degrade_model: body.degrade_model,
        idempotency_key: key,
        session: Some(
            body.session
                .unwrap_or_else(|| format!("api-{}", Uuid::now_v7().simple())),
        ),
    };
    let mut request = host.run_request(&who, &run)?;
    request.metadata = body.metadata;
    // Queued, then claimed here at once: the same job `keel run --detach` makes.
    let created = host.submit(&request).await?;
    let job = keel_app::jobs::get_job(&host.kernel, &who, created.job_id).await?;
    let status = if created.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "job": job_view(&job), "created": created.created })),
    )
        .into_response())
}

/// Filters and page of `GET /v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListJobs {
    /// Only jobs in these states, comma-separated (`queued,running,waiting_action,...`).
    state: Option<String>,
    /// Only jobs of this principal.
    principal: Option<String>,
    /// Only jobs of this session.
    session: Option<String>,
    /// Page size (1–500, default 50).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// List the scope's jobs, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListJobs),
    responses((status = 200, description = "`{jobs: [...], next_cursor}`; `next_cursor` is null on the last page", body = JobPage)))]
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    who: Who,
    Query(q): Query<ListJobs>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let mut states = Vec::new();
    for s in q
        .state
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
    {
        let upper = s.trim().to_ascii_uppercase().replace('-', "_");
        states.push(
            upper
                .parse::<JobState>()
                .map_err(|_| ApiError::invalid(format!("unknown job state {s:?}")))?,
        );
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 500"));
    }
    let query = keel_app::jobs::JobQuery {
        states,
        principal: q.principal,
        session: q.session,
        kind: None,
        limit: Some(limit),
        cursor: q.cursor,
    };
    let page = keel_app::jobs::list_jobs(&state.host.kernel, &who, &query).await?;
    Ok(Json(json!({
        "jobs": page.jobs.iter().map(job_view).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    })))
}

/// A job of the scope, with its result once it ended.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "`{job, result}` (`result` once the job ended)", body = JobWithResult), (status = 404, description = "No such job in this scope")))]
pub(crate) async fn get_job(State(state): State<AppState>, who: Who, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let id = parse_uuid("job", &id)?;
    let job = keel_app::jobs::get_job(&state.host.kernel, &who, id).await?;
    let result = match state.host.job_result(&who, id).await? {
        Some(result) => serde_json::to_value(result).unwrap_or(Value::Null),
        None => Value::Null,
    };
    Ok(Json(json!({ "job": job_view(&job), "result": result })))
}

/// Why a job is cancelled.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    /// Recorded on the job and in its events.
    reason: Option<String>,
}

/// Cancel a job, its unfinished children and their pending actions.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", request_body = Option<CancelJob>,
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The cancelled job", body = super::schemas::Job), (status = 404, description = "No such job in this scope"),
        (status = 409, description = "The job already ended")))]
pub(crate) async fn cancel_job(
    State(state): State<AppState>,
    who: Who,
    Path(id): Path<String>,
    body: Option<Json<CancelJob>>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Write)?;
    let id = parse_uuid("job", &id)?;
    let job = keel_app::jobs::get_job(&state.host.kernel, &who, id).await?;
    if job.state.is_terminal() {
        return Err(ApiError::conflict(
            "job_finished",
            format!("job {id} already finished ({})", job.state),
        ));
    }
    let reason = body
        .and_then(|b| b.0.reason)
        .unwrap_or_else(|| "cancelled through the API".into());
    let job = keel_app::jobs::cancel_job(&state.host.kernel, &who, id, &reason).await?;
    Ok(Json(job_view(&job)))
}

/// Where to start a job's event stream.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsFrom {
    /// Start after this sequence number (like `Last-Event-ID`; the header wins).
    after: Option<u64>,
}

/// The job's events as Server-Sent Events: every stored event after `Last-Event-ID` (or
/// `?after=`), then live ones, each exactly once, `id:` = the event's sequence number. The
/// stream ends after the event that ends the job.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "Job id"), EventsFrom,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this sequence number")),
    responses((status = 200, description = "text/event-stream of `RuntimeEvent` JSON, `event:` = its type", content_type = "text/event-stream", body = RuntimeEvent),
        (status = 404, description = "No such job in this scope")))]
pub(crate) async fn job_events(
    State(state): State<AppState>,
    who: Who,
    Path(id): Path<String>,
    Query(from): Query<EventsFrom>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    need(&who, Role::Read)?;
    let id = parse_uuid("job", &id)?;
    keel_app::jobs::get_job(&state.host.kernel, &who, id).await?;
    let after = crate::sse::last_event_id(&headers)?.or(from.after).unwrap_or(0);
    Ok(crate::sse::job_stream(state.clone(), who.0.clone(), id, after).into_response())
}
