//! `/v1/plugins`: the plugins a scope can see; install by upload, network grants, removal.
//!
//! Tenancy (see `keel_app::keys`): a plugin installed here is owned by the installing scope and
//! invisible to others (404); a plugin installed from the CLI is home-wide, visible to every scope
//! and changed only by an admin of the `default` scope. Over the API only network grants can be
//! given: a directory or an environment variable of the server's machine is the operator's to
//! grant (`keel plugins grant`), not a tenant's.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_app::install::InstallRequest;
use keel_app::keys::{self, PluginOwner};
use keel_app::{Caller, Role};
use keel_kernel::registry::{PluginRecord, PluginRegistry as _};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::schemas::{Plugin, PluginInstalled, PluginList, PluginRemoved};
use super::{Who, need};
use crate::AppState;
use crate::error::{ApiError, ApiResult};

fn owner_json(owner: &PluginOwner) -> Value {
    match owner {
        PluginOwner::Home => json!({ "kind": "home" }),
        PluginOwner::Scope(scope) => json!({ "kind": "scope", "scope": scope }),
    }
}

fn record_json(record: &PluginRecord, owner: &PluginOwner) -> Value {
    json!({
        "name": record.name,
        "version": record.version,
        "description": record.description,
        "sha256": record.sha256,
        "tools": record.info["tools"],
        "grants": record.grants,
        "limit_overrides": record.limits,
        "owner": owner_json(owner),
        "installed_at": record.installed_at,
        "updated_at": record.updated_at,
    })
}

/// The record and owner of plugin `name` if `caller` may see it; 404 otherwise (missing and
/// invisible look the same).
pub(crate) async fn visible(state: &AppState, caller: &Caller, name: &str) -> ApiResult<(PluginRecord, PluginOwner)> {
    let db = &state.host.app.db;
    let record = db
        .get_plugin(name)
        .await
        .map_err(keel_app::AppError::from)?
        .ok_or_else(|| ApiError::not_found(format!("plugin {name}")))?;
    let owner = keys::plugin_owner(db, name).await?;
    if !keys::may_see(caller, &owner) {
        return Err(ApiError::not_found(format!("plugin {name}")));
    }
    Ok((record, owner))
}

/// A plugin `caller` may change (admin of its owner), else 404 (invisible) or 403.
async fn changeable(state: &AppState, caller: &Caller, name: &str) -> ApiResult<(PluginRecord, PluginOwner)> {
    let (record, owner) = visible(state, caller, name).await?;
    if !keys::may_change(caller, &owner) {
        return Err(ApiError::forbidden(match owner {
            PluginOwner::Home => "home-wide plugins are changed by an admin of the `default` scope",
            PluginOwner::Scope(_) => "changing a plugin needs the admin role",
        }));
    }
    Ok((record, owner))
}

/// The plugins this scope can see.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins",
    responses((status = 200, description = "`{plugins: [...]}`", body = PluginList)))]
pub(crate) async fn list_plugins(State(state): State<AppState>, who: Who) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let mut out = Vec::new();
    for name in keys::visible_plugins(&state.host.app.db, &who).await? {
        // Removed in between: skip.
        if let Ok((record, owner)) = visible(&state, &who, &name).await {
            out.push(record_json(&record, &owner));
        }
    }
    Ok(Json(json!({ "plugins": out })))
}

/// One plugin.
#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    responses((status = 200, description = "The plugin: tools, grants, owner", body = Plugin), (status = 404, description = "No such plugin visible to this scope")))]
pub(crate) async fn show_plugin(
    State(state): State<AppState>,
    who: Who,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Read)?;
    let (record, owner) = visible(&state, &who, &name).await?;
    Ok(Json(record_json(&record, &owner)))
}

/// Options of an upload.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InstallOptions {
    /// Name for a component without a name section.
    label: Option<String>,
    /// Replace a plugin of the same name this key may change.
    #[serde(default)]
    replace: bool,
    /// Hosts to allow outbound HTTP to, comma-separated (`api.example.com`, `*.example.com:443`).
    net: Option<String>,
}

/// Validate a network grant pattern: `host`, `*.host`, optionally `:port`.
fn check_host_pattern(pattern: &str) -> ApiResult<String> {
    let p = pattern.trim().to_ascii_lowercase();
    let (host, port) = p
        .rsplit_once(':')
        .map_or((p.as_str(), None), |(h, port)| (h, Some(port)));
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok_name = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    let ok_port = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok_name && ok_port {
        Ok(p)
    } else {
        Err(ApiError::invalid(format!(
            "network grant {pattern:?} is not `host`, `*.host` or either with `:port`"
        )))
    }
}

fn net_list(net: Option<&str>) -> ApiResult<Vec<String>> {
    net.into_iter()
        .flat_map(|n| n.split(','))
        .filter(|s| !s.trim().is_empty())
        .map(check_host_pattern)
        .collect()
}

/// Install a component (the request body, `application/wasm`) owned by this scope.
#[utoipa::path(post, path = "/v1/plugins", tag = "plugins", params(InstallOptions),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The component"),
    responses((status = 201, description = "Installed: `{plugin, notes}`", body = PluginInstalled),
        (status = 409, description = "`plugin_exists` (pass replace=true) or `name_unavailable` (another scope's name)"),
        (status = 403, description = "Not an admin, or a home-wide plugin and not the default scope")))]
pub(crate) async fn install_plugin(
    State(state): State<AppState>,
    who: Who,
    Query(opts): Query<InstallOptions>,
    body: Bytes,
) -> ApiResult<Response> {
    need(&who, Role::Admin)?;
    if body.is_empty() {
        return Err(ApiError::invalid("the request body must be the component's bytes"));
    }
    let net = net_list(opts.net.as_deref())?;
    let label = opts.label.unwrap_or_else(|| "plugin".into());
    let app = &state.host.app;
    let _one_at_a_time = state.plugin_lock.lock().await;
    // The name the component gives itself decides ownership, before anything is stored.
    let prepared = app
        .sandbox
        .prepare_as(&body, &label)
        .await
        .map_err(keel_app::AppError::from)?;
    let name = prepared.info.name.clone();
    let existing = app.db.get_plugin(&name).await.map_err(keel_app::AppError::from)?;
    let owner = match existing {
        None => None,
        Some(_) => {
            let owner = keys::plugin_owner(&app.db, &name).await?;
            if !keys::may_see(&who, &owner) {
                // The namespace is one per home: this much (the name is taken) is all another
                // scope learns.
                return Err(ApiError::conflict(
                    "name_unavailable",
                    format!("the plugin name {name} is not available; rename the component"),
                ));
            }
            if !keys::may_change(&who, &owner) {
                return Err(ApiError::forbidden(
                    "home-wide plugins are changed by an admin of the `default` scope",
                ));
            }
            if !opts.replace {
                return Err(ApiError::conflict(
                    "plugin_exists",
                    format!("plugin {name} is installed; pass replace=true to replace it"),
                ));
            }
            Some(owner)
        }
    };
    let installed = app
        .install(
            InstallRequest {
                bytes: &body,
                label: &label,
                replace: true,
                keep_grants: false,
                limits: json!({}),
                // A new plugin is the uploader's from the moment it exists.
                owner: owner.is_none().then_some(who.scope.as_str()),
            },
            |_, _| Ok(()),
            |_, grants| {
                grants.net.extend(net);
                Ok(())
            },
        )
        .await?;
    let owner = owner.unwrap_or_else(|| PluginOwner::Scope(who.scope.clone()));
    Ok((
        StatusCode::CREATED,
        Json(json!({ "plugin": record_json(&installed.record, &owner), "notes": installed.notes })),
    )
        .into_response())
}

/// Network grants to add or take away.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetGrants {
    /// Host patterns (`host`, `*.host`, optionally `:port`).
    #[serde(default)]
    net: Vec<String>,
    /// Revoke only: take every grant away.
    #[serde(default)]
    all: bool,
}

/// The plugin as it is stored now, after a grant change.
async fn reread(state: &AppState, name: &str, owner: &PluginOwner) -> ApiResult<Json<Value>> {
    let record = state.host.app.record(name).await?;
    Ok(Json(record_json(&record, owner)))
}

/// Allow a plugin outbound HTTP to more hosts.
#[utoipa::path(post, path = "/v1/plugins/{name}/grant", tag = "plugins", request_body = NetGrants,
    params(("name" = String, Path, description = "Plugin name")),
    responses((status = 200, description = "The plugin with its grants", body = Plugin), (status = 404, description = "No such plugin visible to this scope")))]
pub(crate) async fn grant_plugin(
    State(state): State<AppState>,
    who: Who,
    Path(name): Path<String>,
    Json(body): Json<NetGrants>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Admin)?;
    let (record, owner) = changeable(&state, &who, &name).await?;
    if body.net.is_empty() || body.all {
        return Err(ApiError::invalid("name the hosts to grant in `net`"));
    }
    let net = body
        .net
        .iter()
        .map(|host| check_host_pattern(host))
        .collect::<ApiResult<Vec<_>>>()?;
    let request = keel_app::plugins::GrantRequest {
        net,
        ..Default::default()
    };
    state.host.app.grant(&who, &record.name, &request).await?;
    reread(&state, &record.name, &owner).await
}

/// Take network grants (or, with `all`, every grant) away from a plugin.
#[utoipa::path(post, path = "/v1/plugins/{name}/revoke", tag = "plugins", request_body = NetGrants,
    params(("name" = String, Path, description = "Plugin name")),
    responses((status = 200, description = "The plugin with its grants", body = Plugin), (status = 404, description = "No such plugin visible to this scope")))]
pub(crate) async fn revoke_plugin(
    State(state): State<AppState>,
    who: Who,
    Path(name): Path<String>,
    Json(body): Json<NetGrants>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Admin)?;
    let (record, owner) = changeable(&state, &who, &name).await?;
    let request = keel_app::plugins::RevokeRequest {
        net: body.net.iter().map(|h| h.trim().to_string()).collect(),
        all: body.all,
        ..Default::default()
    };
    state.host.app.revoke(&who, &record.name, &request).await?;
    reread(&state, &record.name, &owner).await
}

/// Remove a plugin.
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "Plugin name")),
    responses((status = 200, description = "`{removed: name}`", body = PluginRemoved), (status = 404, description = "No such plugin visible to this scope")))]
pub(crate) async fn remove_plugin(
    State(state): State<AppState>,
    who: Who,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    need(&who, Role::Admin)?;
    let _one_at_a_time = state.plugin_lock.lock().await;
    changeable(&state, &who, &name).await?;
    state.host.app.remove_plugin(&who, &name).await?;
    Ok(Json(json!({ "removed": name })))
}
