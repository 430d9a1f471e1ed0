//! The `/v1` routes. Each handler is registered with `routes!`, which also puts its
//! `#[utoipa::path]` into the OpenAPI document served at `/v1/openapi.json`: the spec and the
//! router are built from the same list, and a test checks every spec path answers.

mod actions;
mod jobs;
mod misc;
mod plugins;
mod schemas;

use std::sync::OnceLock;

use axum::extract::Extension;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use keel_app::{Caller, Role};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

#[derive(OpenApi)]
#[openapi(info(
    title = "Keel HTTP API",
    description = "Jobs, event streams, approvals, plugins, usage, budgets and governed tool calls of one Keel home. Every request needs `Authorization: Bearer KEY` (`keel keys create`); a key sees only its own scope. Errors are `{\"error\": {\"code\", \"message\"}}`."
))]
struct ApiDoc;

static SPEC: OnceLock<serde_json::Value> = OnceLock::new();

/// Every `/v1` route (with its OpenAPI entry), to be put behind authentication.
pub(crate) fn api_router() -> Router<AppState> {
    let (router, spec) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openapi_json))
        .routes(routes!(misc::open_session, misc::close_session))
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(jobs::job_events))
        .routes(routes!(misc::scope_events))
        .routes(routes!(actions::list_actions))
        .routes(routes!(actions::get_action))
        .routes(routes!(actions::approve_action))
        .routes(routes!(actions::deny_action))
        .routes(routes!(actions::resolve_by_token))
        .routes(routes!(plugins::list_plugins, plugins::install_plugin))
        .routes(routes!(plugins::show_plugin, plugins::remove_plugin))
        .routes(routes!(plugins::grant_plugin))
        .routes(routes!(plugins::revoke_plugin))
        .routes(routes!(misc::usage))
        .routes(routes!(misc::list_budgets, misc::set_budget))
        .routes(routes!(misc::delete_budget))
        .routes(routes!(misc::policy_eval))
        .routes(routes!(misc::call_tool))
        .split_for_parts();
    let mut spec = spec;
    schemas::add_error_responses(&mut spec);
    let _ = SPEC.set(serde_json::to_value(&spec).expect("the OpenAPI document serializes"));
    router
}

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document (JSON)", body = schemas::OpenApiDocument)))]
async fn openapi_json() -> Json<serde_json::Value> {
    Json(SPEC.get().cloned().unwrap_or_default())
}

/// Any path nothing serves: the API's own 404 code, so a client (and the spec test) can tell a
/// missing route from a missing resource.
pub(crate) async fn no_route(uri: Uri) -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", format!("no route {}", uri.path())).into_response()
}

/// Refuse with 403 unless `caller` has `role` (in its own scope: resources of other scopes are
/// 404 before a role is ever checked).
pub(crate) fn need(caller: &Caller, role: Role) -> ApiResult<()> {
    if caller.role.allows(role) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this key's role ({}) cannot do this; it needs {}",
            role_name(caller.role),
            role_name(role)
        )))
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Read => "read",
        Role::Write => "write",
        Role::Admin => "admin",
    }
}

/// The authenticated caller (inserted by the auth middleware).
pub(crate) type Who = Extension<Caller>;

/// Parse an id from a path; a malformed one is "not found" like any unknown one.
pub(crate) fn parse_uuid(what: &str, s: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::parse_str(s).map_err(|_| ApiError::not_found(format!("{what} {s}")))
}
