//! Actions: rows, inserts and compare-and-set updates, and the action queries.

use chrono::{DateTime, Utc};
use keel_kernel::action::{Action, ActionFilter, ActionState, ActionType, Resolution};
use keel_kernel::store::StoreResult;
use rusqlite::types::Value;
use rusqlite::{Connection, Row};
use uuid::Uuid;

use super::rows::{
    Query, be, conflict_or, execute, fetch_optional, from_json, from_micros, get, i64_of, int, job_ref_error, micros,
    missing_or_conflict, opt_from_micros, parse, text, to_json, u64_of, uuid,
};

pub(super) fn action_from_row(r: &Row<'_>) -> StoreResult<Action> {
    let resolution: Option<String> = get(r, "resolution_json")?;
    Ok(Action {
        id: uuid(&get::<String>(r, "id")?)?,
        job_id: uuid(&get::<String>(r, "job_id")?)?,
        tenant: get(r, "tenant")?,
        action_type: parse::<ActionType>(&get::<String>(r, "action_type")?)?,
        state: parse::<ActionState>(&get::<String>(r, "state")?)?,
        version: u64_of(get(r, "version")?)?,
        title: get(r, "title")?,
        request: from_json(&get::<String>(r, "request_json")?)?,
        call_digest: get(r, "call_digest")?,
        token_hash: get(r, "token_hash")?,
        resolution: resolution.as_deref().map(from_json::<Resolution>).transpose()?,
        created_at: from_micros(get(r, "created_at")?)?,
        expires_at: from_micros(get(r, "expires_at")?)?,
        resolved_at: opt_from_micros(get(r, "resolved_at")?)?,
    })
}

/// The action's column values, in the order the INSERT and UPDATE below name them.
fn action_values(a: &Action) -> StoreResult<Vec<Value>> {
    Ok(vec![
        Value::Text(a.id.to_string()),
        Value::Text(a.job_id.to_string()),
        Value::Text(a.tenant.clone()),
        Value::Text(a.action_type.as_str().to_owned()),
        Value::Text(a.state.as_str().to_owned()),
        Value::Integer(i64_of(a.version)?),
        Value::Text(a.title.clone()),
        Value::Text(to_json(&a.request)?),
        text(a.call_digest.as_deref()),
        Value::Text(a.token_hash.clone()),
        text(a.resolution.as_ref().map(to_json).transpose()?.as_deref()),
        Value::Integer(micros(a.created_at)),
        Value::Integer(micros(a.expires_at)),
        int(a.resolved_at.map(micros)),
    ])
}

pub(super) fn insert_action(conn: &Connection, a: &Action) -> StoreResult<()> {
    const SQL: &str = "INSERT INTO actions (id, job_id, tenant, action_type, state, version, title, request_json, \
         call_digest, token_hash, resolution_json, created_at, expires_at, resolved_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    execute(conn, SQL, &action_values(a)?)
        .map_err(|e| conflict_or(e, "action", a.id, |e| job_ref_error(e, a.job_id)))?;
    Ok(())
}

pub(super) fn update_action(conn: &Connection, a: &Action, expected: u64) -> StoreResult<()> {
    const SQL: &str = "UPDATE actions SET id = ?1, job_id = ?2, tenant = ?3, action_type = ?4, state = ?5, \
         version = ?6, title = ?7, request_json = ?8, call_digest = ?9, token_hash = ?10, resolution_json = ?11, \
         created_at = ?12, expires_at = ?13, resolved_at = ?14 WHERE id = ?1 AND version = ?15";
    let mut args = action_values(a)?;
    args.push(Value::Integer(i64_of(expected)?));
    if execute(conn, SQL, &args).map_err(be)? == 0 {
        return Err(missing_or_conflict(conn, "actions", "action", a.id));
    }
    Ok(())
}

/// [`KernelStore::get_action`](keel_kernel::store::KernelStore::get_action).
pub(super) fn get_action(conn: &Connection, id: Uuid) -> StoreResult<Option<Action>> {
    fetch_optional(
        conn,
        "SELECT * FROM actions WHERE id = ?",
        &[Value::Text(id.to_string())],
        action_from_row,
    )
}

/// [`KernelStore::get_action_by_token_hash`](keel_kernel::store::KernelStore::get_action_by_token_hash).
pub(super) fn get_action_by_token_hash(conn: &Connection, token_hash: &str) -> StoreResult<Option<Action>> {
    fetch_optional(
        conn,
        "SELECT * FROM actions WHERE token_hash = ?",
        &[Value::Text(token_hash.to_owned())],
        action_from_row,
    )
}

/// [`KernelStore::list_actions`](keel_kernel::store::KernelStore::list_actions).
pub(super) fn list_actions(conn: &Connection, filter: &ActionFilter) -> StoreResult<Vec<Action>> {
    let mut q = Query::new("SELECT * FROM actions WHERE tenant = ");
    q.bind(filter.tenant.clone());
    if let Some(j) = filter.job_id {
        q.push(" AND job_id = ").bind(j.to_string());
    }
    q.push_in("state", filter.states.iter().map(|v| v.as_str().to_string()));
    q.push(" ORDER BY created_at, id");
    q.push_limit(filter.limit);
    q.fetch(conn, action_from_row)
}

/// [`KernelStore::expired_actions`](keel_kernel::store::KernelStore::expired_actions).
pub(super) fn expired_actions(conn: &Connection, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Action>> {
    let mut q = Query::new("SELECT * FROM actions WHERE state = 'PENDING' AND expires_at <= ");
    q.bind(micros(now)).push(" ORDER BY expires_at, id");
    q.push_limit(Some(limit));
    q.fetch(conn, action_from_row)
}
