//! `/v1/actions`: human-in-the-loop actions of the scope: list, get, approve, deny, approve for
//! the session, resolve by resume token.

use axum::Json;
use axum::extract::{Path, Query, State};
use keel_app::Role;
use keel_kernel::action::{Action, ActionState};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::schemas::ActionList;
use super::{Who, need, parse_uuid};
use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// Filters of `GET /v1/actions`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListActions {
    /// `pending` (default), `resolved`, `expired`, `cancelled` or `all`.
    state: Option<String>,
    /// Only the actions of this job.
    job: Option<String>,
}

/// An action as the API shows it (the kernel's, minus the stored hash of its resume token).
pub(crate) fn action_view(action: &Action) -> Value {
    let mut value = serde_json::to_value(action).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.remove("token_hash");
    }
    value
}

/// The scope's actions (pending ones by default), oldest first.
#[utoipa::path(get, path = "/v1/actions", tag = "actions", params(ListActions),
    responses((status = 200, description = "`{actions: [...]}`", body = ActionList)))]
pub(crate) async fn list_actions(
    State(state): State<AppState>,
    who: Who,
    Query(q): Query<ListActions>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let states = match q.state.as_deref().map(str::trim) {
        None | Some("") | Some("pending") => vec![ActionState::Pending],
        Some("all") => vec![],
        Some(s) => vec![
            s.to_ascii_uppercase()
                .parse::<ActionState>()
                .map_err(|_| ApiError::invalid(format!("unknown action state {s:?}")))?,
        ],
    };
    let job_id = q.job.as_deref().map(|j| parse_uuid("job", j)).transpose()?;
    let query = keel_app::actions::ActionQuery {
        job_id,
        states,
        limit: None,
    };
    let actions = keel_app::actions::list_actions(&state.host.kernel, &who, &query).await?;
    Ok(Json(
        json!({ "actions": actions.iter().map(action_view).collect::<Vec<_>>() }),
    ))
}

/// One action of the scope.
#[utoipa::path(get, path = "/v1/actions/{id}", tag = "actions",
    params(("id" = String, Path, description = "Action id")),
    responses((status = 200, description = "The action", body = super::schemas::Action), (status = 404, description = "No such action in this scope")))]
pub(crate) async fn get_action(
    State(state): State<AppState>,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let id = parse_uuid("action", &id)?;
    let action = keel_app::actions::get_action(&state.host.kernel, &who, id).await?;
    Ok(Json(action_view(&action)))
}

/// An answer to an action.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decide {
    /// Approve this exact call for the rest of the job's session too ("approve for the session").
    #[serde(default)]
    for_session: bool,
    /// An answer to record with the decision (the chosen option, the input, ...).
    #[schema(value_type = Object)]
    value: Option<Value>,
}

async fn decide(state: &AppState, who: &Who, id: &str, approved: bool, body: Decide) -> ApiResult<Json<Value>> {
    need(who, Role::Write)?;
    let id = parse_uuid("action", id)?;
    if body.for_session && !approved {
        return Err(ApiError::invalid("for_session applies to approvals only"));
    }
    let decision = keel_app::actions::Decision {
        approved,
        for_session: body.for_session,
        value: body.value.unwrap_or(Value::Null),
        by: None,
    };
    let action = keel_app::actions::decide(&state.host.kernel, who, id, decision).await?;
    Ok(Json(action_view(&action)))
}

/// Approve a pending action (with `for_session`, also for the rest of the session).
#[utoipa::path(post, path = "/v1/actions/{id}/approve", tag = "actions", request_body = Option<Decide>,
    params(("id" = String, Path, description = "Action id")),
    responses((status = 200, description = "The resolved action", body = super::schemas::Action), (status = 404, description = "No such action in this scope"),
        (status = 409, description = "Not pending any more (`action_not_pending`, `action_expired`)")))]
pub(crate) async fn approve_action(
    State(state): State<AppState>,
    who: Who,
    Path(id): Path<String>,
    body: Option<Json<Decide>>,
) -> ApiResult<Json<Value>> {
    decide(&state, &who, &id, true, body.map(|b| b.0).unwrap_or_default()).await
}

/// Deny a pending action.
#[utoipa::path(post, path = "/v1/actions/{id}/deny", tag = "actions", request_body = Option<Decide>,
    params(("id" = String, Path, description = "Action id")),
    responses((status = 200, description = "The resolved action", body = super::schemas::Action), (status = 404, description = "No such action in this scope"),
        (status = 409, description = "Not pending any more")))]
pub(crate) async fn deny_action(
    State(state): State<AppState>,
    who: Who,
    Path(id): Path<String>,
    body: Option<Json<Decide>>,
) -> ApiResult<Json<Value>> {
    decide(&state, &who, &id, false, body.map(|b| b.0).unwrap_or_default()).await
}

/// A resume token and the answer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveToken {
    /// The one-time resume token (in the body, never in the URL: URLs end up in logs).
    token: String,
    /// Approve (`true`) or deny (`false`); approvals and confirmations need it.
    approved: Option<bool>,
    /// The answer (the chosen option, the input, ...).
    #[schema(value_type = Object)]
    value: Option<Value>,
}

/// Resolve the action a resume token belongs to, within the caller's scope: a token of another
/// scope's action is "not found" like a wrong one.
#[utoipa::path(post, path = "/v1/actions/resolve", tag = "actions", request_body = ResolveToken,
    responses((status = 200, description = "The resolved action", body = super::schemas::Action), (status = 404, description = "No pending action of this scope has that token"),
        (status = 409, description = "Already resolved or expired")))]
pub(crate) async fn resolve_by_token(
    State(state): State<AppState>,
    who: Who,
    Json(body): Json<ResolveToken>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Write)?;
    if body.token.trim().is_empty() {
        return Err(ApiError::invalid("the token is empty"));
    }
    let answer = keel_app::actions::TokenAnswer {
        approved: body.approved,
        value: body.value.unwrap_or(Value::Null),
        by: None,
    };
    // Scoped: a token of another scope's action is "not found" like a wrong one.
    let action = keel_app::actions::resolve_by_token(&state.host.kernel, Some(&who), &body.token, answer).await?;
    Ok(Json(action_view(&action)))
}
