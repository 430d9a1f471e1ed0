//! Actions: rows, inserts and compare-and-set updates, and the action queries.

use chrono::{DateTime, Utc};
use keel_kernel::action::{Action, ActionFilter, ActionState, ActionType, Resolution};
use keel_kernel::store::{StoreError, StoreResult};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::SqliteKernelStore;
use super::rows::{
    SqliteQuery, be, from_json, from_micros, get, i64_of, job_ref_error, micros, missing_or_conflict, opt_from_micros,
    parse, push_in, push_limit, to_json, u64_of, uuid,
};

pub(super) fn action_from_row(r: &SqliteRow) -> StoreResult<Action> {
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

pub(super) fn bind_action<'q>(q: SqliteQuery<'q>, a: &Action) -> StoreResult<SqliteQuery<'q>> {
    Ok(q.bind(a.id.to_string())
        .bind(a.job_id.to_string())
        .bind(a.tenant.clone())
        .bind(a.action_type.as_str())
        .bind(a.state.as_str())
        .bind(i64_of(a.version)?)
        .bind(a.title.clone())
        .bind(to_json(&a.request)?)
        .bind(a.call_digest.clone())
        .bind(a.token_hash.clone())
        .bind(a.resolution.as_ref().map(to_json).transpose()?)
        .bind(micros(a.created_at))
        .bind(micros(a.expires_at))
        .bind(a.resolved_at.map(micros)))
}

pub(super) async fn insert_action(conn: &mut SqliteConnection, a: &Action) -> StoreResult<()> {
    let sql = "INSERT INTO actions (id, job_id, tenant, action_type, state, version, title, request_json, \
         call_digest, token_hash, resolution_json, created_at, expires_at, resolved_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    bind_action(sqlx::query(sql), a)?
        .execute(&mut *conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict {
                entity: "action",
                id: a.id.to_string(),
            },
            _ => job_ref_error(e, a.job_id),
        })?;
    Ok(())
}

pub(super) async fn update_action(conn: &mut SqliteConnection, a: &Action, expected: u64) -> StoreResult<()> {
    let sql = "UPDATE actions SET id = ?1, job_id = ?2, tenant = ?3, action_type = ?4, state = ?5, version = ?6, \
         title = ?7, request_json = ?8, call_digest = ?9, token_hash = ?10, resolution_json = ?11, \
         created_at = ?12, expires_at = ?13, resolved_at = ?14 WHERE id = ?1 AND version = ?15";
    let res = bind_action(sqlx::query(sql), a)?
        .bind(i64_of(expected)?)
        .execute(&mut *conn)
        .await
        .map_err(be)?;
    if res.rows_affected() == 0 {
        return Err(missing_or_conflict(conn, "actions", "action", a.id).await);
    }
    Ok(())
}

impl SqliteKernelStore {
    pub(super) async fn fetch_actions(&self, qb: &mut QueryBuilder<Sqlite>) -> StoreResult<Vec<Action>> {
        let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
        rows.iter().map(action_from_row).collect()
    }

    /// [`KernelStore::get_action`].
    pub(super) async fn sql_get_action(&self, id: Uuid) -> StoreResult<Option<Action>> {
        let row = sqlx::query("SELECT * FROM actions WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(be)?;
        row.as_ref().map(action_from_row).transpose()
    }

    /// [`KernelStore::get_action_by_token_hash`].
    pub(super) async fn sql_get_action_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<Action>> {
        let row = sqlx::query("SELECT * FROM actions WHERE token_hash = ?")
            .bind(token_hash.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(be)?;
        row.as_ref().map(action_from_row).transpose()
    }

    /// [`KernelStore::list_actions`].
    pub(super) async fn sql_list_actions(&self, filter: &ActionFilter) -> StoreResult<Vec<Action>> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM actions WHERE tenant = ");
        qb.push_bind(filter.tenant.clone());
        if let Some(j) = filter.job_id {
            qb.push(" AND job_id = ").push_bind(j.to_string());
        }
        push_in(&mut qb, "state", filter.states.iter().map(|v| v.as_str().to_string()));
        qb.push(" ORDER BY created_at, id");
        push_limit(&mut qb, filter.limit);
        self.fetch_actions(&mut qb).await
    }

    /// [`KernelStore::expired_actions`].
    pub(super) async fn sql_expired_actions(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Action>> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM actions WHERE state = 'PENDING' AND expires_at <= ");
        qb.push_bind(micros(now)).push(" ORDER BY expires_at, id");
        push_limit(&mut qb, Some(limit));
        self.fetch_actions(&mut qb).await
    }
}
