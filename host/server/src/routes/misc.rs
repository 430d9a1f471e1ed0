//! The rest of `/v1`: browser sessions, the scope's event stream, usage, budgets, policy dry-run
//! and governed tool calls.

use std::str::FromStr;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use keel_app::Role;
use keel_app::call::{CallOutcome, CallRequest};
use keel_kernel::event::EventType;
use keel_kernel::ledger::{BudgetLimits, BudgetWindow, ExceedStrategy};
use keel_kernel::policy::PolicyRequest;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::schemas::{Budget, BudgetList, CallPending, PolicyDecision, RuntimeEvent, Usage};
use super::{Who, need, parse_uuid};
use crate::AppState;
use crate::auth::{KeyId, SESSION_COOKIE, Via, cookie};
use crate::error::{ApiError, ApiResult};

/// Trade the API key (in `Authorization`) for a browser session cookie: `HttpOnly`,
/// `SameSite=Strict`, path `/`. The approvals page does this once; `EventSource` cannot send headers.
#[utoipa::path(post, path = "/v1/session", tag = "session",
    responses((status = 204, description = "Set-Cookie: the session"), (status = 400, description = "Not authenticated with a key")))]
pub(crate) async fn open_session(
    State(state): State<AppState>,
    Extension(key): Extension<KeyId>,
    Extension(via): Extension<Via>,
) -> ApiResult<Response> {
    if via != Via::Bearer {
        return Err(ApiError::invalid(
            "open a session with the API key (Authorization: Bearer)",
        ));
    }
    let ttl = state.config.session_ttl;
    let token = state.auth.open_session(&key.0, ttl);
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        ttl.as_secs()
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|_| ApiError::internal("bad cookie"))?,
    );
    Ok(response)
}

/// End the browser session.
#[utoipa::path(delete, path = "/v1/session", tag = "session",
    responses((status = 204, description = "The cookie is cleared")))]
pub(crate) async fn close_session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        state.auth.close_session(token);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("keel_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    response
}

/// Which of the scope's events.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScopeEvents {
    /// Only these types, comma-separated (`action.required,action.resolved`).
    types: Option<String>,
    /// Start after this event id (like `Last-Event-ID`; the header wins).
    after: Option<i64>,
}

/// Every event of the scope as Server-Sent Events, `id:` = the store's event id (resume with
/// `Last-Event-ID`). The approvals page follows `action.*` events with it.
#[utoipa::path(get, path = "/v1/events", tag = "jobs", params(ScopeEvents,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "text/event-stream of `RuntimeEvent` JSON", content_type = "text/event-stream", body = RuntimeEvent)))]
pub(crate) async fn scope_events(
    State(state): State<AppState>,
    who: Who,
    Query(q): Query<ScopeEvents>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    need(&who, Role::Read)?;
    let mut types = Vec::new();
    for t in q
        .types
        .iter()
        .flat_map(|t| t.split(','))
        .filter(|t| !t.trim().is_empty())
    {
        types.push(EventType::from_str(t.trim()).map_err(|_| ApiError::invalid(format!("unknown event type {t:?}")))?);
    }
    let after = match crate::sse::last_event_id(&headers)? {
        Some(id) => i64::try_from(id).map_err(|_| ApiError::invalid("Last-Event-ID is out of range"))?,
        None => q.after.unwrap_or(0),
    };
    Ok(crate::sse::scope_stream(state.clone(), who.0.clone(), types, after).into_response())
}

/// Which usage.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Only this principal.
    principal: Option<String>,
    /// Only this session.
    session: Option<String>,
    /// Only this job.
    job: Option<String>,
    /// From (RFC 3339, inclusive).
    from: Option<DateTime<Utc>>,
    /// To (RFC 3339, exclusive).
    to: Option<DateTime<Utc>>,
}

/// The scope's usage from the ledger: tokens, cost, model requests, tool calls.
#[utoipa::path(get, path = "/v1/usage", tag = "ledger", params(UsageParams),
    responses((status = 200, description = "`{tokens, cost, requests, tool_calls}`", body = Usage)))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    who: Who,
    Query(q): Query<UsageParams>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let job_id = q.job.as_deref().map(|j| parse_uuid("job", j)).transpose()?;
    if let Some(id) = job_id {
        // Another scope's job is "not found", not zero usage.
        keel_app::jobs::get_job(&state.host.kernel, &who, id).await?;
    }
    let request = keel_app::ledger::UsageRequest {
        principal: q.principal,
        session: q.session,
        job_id,
        since: q.from,
        until: q.to,
        entries: false,
    };
    let usage = keel_app::ledger::usage(&state.host.kernel, &who, &request).await?.usage;
    Ok(Json(serde_json::to_value(usage).unwrap_or_default()))
}

/// The scope's budgets with their usage in the current window.
#[utoipa::path(get, path = "/v1/budgets", tag = "ledger",
    responses((status = 200, description = "`{budgets: [...]}` (each with its current usage)", body = BudgetList)))]
pub(crate) async fn list_budgets(State(state): State<AppState>, who: Who) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let report = keel_app::ledger::budget_report(&state.host.kernel, &who).await?;
    Ok(Json(json!({ "budgets": report })))
}

/// A budget to set.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    /// `request`, `daily`, `monthly` or `total`.
    window: String,
    /// Only this principal's usage counts (and only its requests are checked).
    principal: Option<String>,
    /// Only this session's usage counts.
    session: Option<String>,
    /// Name for humans.
    name: Option<String>,
    /// `{max_tokens, max_cost, max_requests, max_tool_calls}`, each optional.
    #[schema(value_type = Object)]
    limits: BudgetLimits,
    /// Warn at this fraction of a limit (default 0.8).
    #[schema(value_type = Option<String>)]
    warn_ratio: Option<Decimal>,
    /// `warn`, `deny` (default) or `degrade`.
    strategy: Option<String>,
}

/// Create a budget, or replace the scope's budget with the same subject and window.
#[utoipa::path(put, path = "/v1/budgets", tag = "ledger", request_body = SetBudget,
    responses((status = 200, description = "The budget", body = Budget)))]
pub(crate) async fn set_budget(
    State(state): State<AppState>,
    who: Who,
    Json(body): Json<SetBudget>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Admin)?;
    let window = match body.window.trim().to_ascii_lowercase().as_str() {
        "request" | "per_request" => BudgetWindow::PerRequest,
        other => other
            .parse::<BudgetWindow>()
            .map_err(|_| ApiError::invalid(format!("unknown window {other:?} (request, daily, monthly, total)")))?,
    };
    let on_exceed = match body.strategy {
        Some(s) => s
            .trim()
            .to_ascii_lowercase()
            .parse::<ExceedStrategy>()
            .map_err(|_| ApiError::invalid(format!("unknown strategy {s:?} (warn, deny, degrade)")))?,
        None => ExceedStrategy::Deny,
    };
    let request = keel_app::ledger::BudgetRequest {
        principal: body.principal,
        session: body.session,
        window,
        limits: body.limits,
        warn_at: body.warn_ratio.unwrap_or(Decimal::new(8, 1)),
        on_exceed,
        name: body.name,
    };
    let budget = keel_app::ledger::set_budget(&state.host.kernel, &who, request).await?;
    Ok(Json(serde_json::to_value(budget).unwrap_or_default()))
}

/// Delete a budget of the scope.
#[utoipa::path(delete, path = "/v1/budgets/{id}", tag = "ledger",
    params(("id" = String, Path, description = "Budget id")),
    responses((status = 200, description = "The deleted budget", body = Budget), (status = 404, description = "No such budget in this scope")))]
pub(crate) async fn delete_budget(
    State(state): State<AppState>,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Admin)?;
    let id = parse_uuid("budget", &id)?;
    let budget = keel_app::ledger::delete_budget(&state.host.kernel, &who, id).await?;
    Ok(Json(serde_json::to_value(budget).unwrap_or_default()))
}

/// A tool call to decide without running it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyEval {
    /// `plugin/tool`.
    tool: String,
    /// The call's arguments.
    #[serde(default)]
    #[schema(value_type = Object)]
    arguments: Value,
    /// Session id (for session-scoped rules, and calls this key approved for the session).
    session: Option<String>,
    /// Tool calls already made in this turn.
    #[serde(default)]
    tool_calls_this_turn: u32,
    /// 1-based turn number.
    turn: Option<u32>,
}

/// Dry-run the server's policy for a tool call by this scope: the decision and the rules that
/// made it, without running anything. Calls approved "for the session" by this key in `session`
/// are allowed, as they would be.
#[utoipa::path(post, path = "/v1/policy/eval", tag = "policy", request_body = PolicyEval,
    responses((status = 200, description = "`{outcome, reason, applied_rules, violated_rules}`", body = PolicyDecision),
        (status = 404, description = "No such plugin visible to this scope")))]
pub(crate) async fn policy_eval(
    State(state): State<AppState>,
    who: Who,
    Json(body): Json<PolicyEval>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let Some((plugin, _)) = body.tool.split_once('/') else {
        return Err(ApiError::invalid(format!("`{}` is not `plugin/tool`", body.tool)));
    };
    super::plugins::visible(&state, &who, plugin).await?;
    let principal = who.principal.clone().unwrap_or_default();
    let stands_for = body
        .tool
        .split_once('/')
        .and_then(|(plugin, name)| keel_app::tools::alias_target(plugin, name))
        .map(|(plugin, name)| format!("{plugin}/{name}"));
    let decision = state.policy.evaluate_tool_with(
        &PolicyRequest::Tool {
            tool: &body.tool,
            arguments: &body.arguments,
            scope: &who.scope,
            principal: &principal,
            session: body.session.as_deref(),
            tool_calls_this_turn: body.tool_calls_this_turn,
            turn: body.turn.unwrap_or(1),
        },
        stands_for.as_deref(),
        // What this key approved for the session is what its calls in that session get.
        state.host.rt.session_approvals(),
    );
    Ok(Json(serde_json::to_value(decision).unwrap_or_default()))
}

/// A governed tool call.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallTool {
    /// The arguments object.
    #[serde(default)]
    #[schema(value_type = Object)]
    arguments: Value,
    /// Session ("approve for this session" is remembered per session).
    session: Option<String>,
    /// A second call with the same key in this scope returns the first call's job.
    idempotency_key: Option<String>,
}

fn outcome_json(outcome: &CallOutcome) -> Value {
    serde_json::to_value(outcome).unwrap_or_default()
}

/// Call `plugin/tool` through the governed path (schema, policy, approval, budget, sandbox,
/// ledger, events). Waits for the outcome; a call still waiting (e.g. for an approval) after the
/// server's wait answers 202 with its job, to follow with `/v1/jobs/{id}`.
#[utoipa::path(post, path = "/v1/tools/{plugin}/{tool}/call", tag = "tools", request_body = Option<CallTool>,
    params(("plugin" = String, Path, description = "Plugin name"), ("tool" = String, Path, description = "Tool name")),
    responses((status = 200, description = "The outcome: `{job_id, status, tool_result, error}` (a refused or failed call is `FAILED` with its error code)", body = super::schemas::CallOutcome),
        (status = 202, description = "Still running (waiting for an approval): `{job_id, status}`", body = CallPending),
        (status = 404, description = "No such plugin visible to this scope")))]
pub(crate) async fn call_tool(
    State(state): State<AppState>,
    who: Who,
    Path((plugin, tool)): Path<(String, String)>,
    body: Option<Json<CallTool>>,
) -> ApiResult<Response> {
    need(&who, Role::Write)?;
    let body = body.map(|b| b.0).unwrap_or_default();
    super::plugins::visible(&state, &who, &plugin).await?;
    let name = format!("{plugin}/{tool}");
    let host = &state.host;
    host.check_tool(&name).await?;
    let arguments = if body.arguments.is_null() {
        json!({})
    } else {
        body.arguments
    };
    let mut request = CallRequest::new(who.scope.clone(), name, arguments);
    request.principal = who.principal.clone();
    request.session = body.session;
    request.idempotency_key = body.idempotency_key;
    let handle = host.start_call(&request).await?;
    let job_id = handle.job_id();
    match tokio::time::timeout(state.config.call_wait, handle.result()).await {
        Ok(result) => Ok(Json(outcome_json(&CallOutcome::from_result(result?))).into_response()),
        Err(_) => {
            // The handle's view: a direct call made in one commit is stored only when it ends.
            let job = handle.job().await.map_err(keel_app::runtime::agent_error)?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "job_id": job_id, "status": job.state })),
            )
                .into_response())
        }
    }
}
