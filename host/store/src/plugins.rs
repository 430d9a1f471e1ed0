//! The plugin registry table: [`PluginRegistry`] on SQLite. Which plugins are installed, what they
//! offer, what they were granted.
//!
//! Values that belong to keel-sandbox (the `describe` result, grants, limits) are stored as JSON so
//! that this crate does not depend on the sandbox.

use chrono::Utc;
use futures::future::BoxFuture;
use keel_kernel::registry::{PluginRegistry, PluginStamp, plugin_not_found};
use keel_kernel::store::{StoreError, StoreResult};
use rusqlite::{Connection, OptionalExtension as _};
use serde_json::Value;

use crate::Database;
use crate::kernel_store::be;

/// The record type, defined with the trait in the kernel; re-exported at its old path.
pub use keel_kernel::registry::PluginRecord;

/// `SELECT <all columns> FROM plugins <tail>`.
macro_rules! select_plugins {
    ($tail:literal) => {
        concat!(
            "SELECT name, version, description, sha256, info_json, imports_json, grants_json, ",
            "limits_json, installed_at, updated_at FROM plugins ",
            $tail
        )
    };
}

fn decode(row: &rusqlite::Row<'_>) -> StoreResult<PluginRecord> {
    let col = |i: usize| row.get::<_, String>(i).map_err(be);
    let name = col(0)?;
    let parse = |i: usize, column: &str| -> StoreResult<Value> {
        serde_json::from_str(&col(i)?).map_err(|e| StoreError::Corrupt(format!("plugin `{name}` column {column}: {e}")))
    };
    Ok(PluginRecord {
        info: parse(4, "info_json")?,
        imports: parse(5, "imports_json")?,
        grants: parse(6, "grants_json")?,
        limits: parse(7, "limits_json")?,
        version: col(1)?,
        description: col(2)?,
        sha256: col(3)?,
        installed_at: col(8)?,
        updated_at: col(9)?,
        name,
    })
}

fn query(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> StoreResult<Vec<PluginRecord>> {
    let mut stmt = conn.prepare_cached(sql).map_err(be)?;
    let mut rows = stmt.query(params).map_err(be)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(be)? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// On the kernel store's connections (one transaction per write, as a closure on the calling
/// thread): listing the plugins is on every tool call's path.
impl PluginRegistry for Database {
    fn upsert_plugin<'a>(&'a self, record: &'a PluginRecord) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move { self.kernel_connections().write(|c| upsert_in(c, record)).await })
    }

    fn get_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<PluginRecord>>> {
        Box::pin(async move {
            self.kernel_connections()
                .read(|c| Ok(query(c, select_plugins!("WHERE name = ?"), [name])?.pop()))
        })
    }

    fn list_plugins(&self) -> BoxFuture<'_, StoreResult<Vec<PluginRecord>>> {
        Box::pin(async move {
            self.kernel_connections()
                .read(|c| query(c, select_plugins!("ORDER BY name"), []))
        })
    }

    fn plugin_stamp<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<PluginStamp>>> {
        Box::pin(async move {
            // Read at every tool call: on the writer's warm cache when it is free. The owner
            // comes with it, so a call checks who may make it without another read.
            self.kernel_connections().read_point(|c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT p.sha256, p.updated_at, p.grants_json, p.limits_json, o.scope \
                         FROM plugins p LEFT JOIN plugin_owners o ON o.name = p.name WHERE p.name = ?",
                    )
                    .map_err(be)?;
                let mut rows = stmt.query([name]).map_err(be)?;
                let Some(row) = rows.next().map_err(be)? else {
                    return Ok(None);
                };
                let col = |i: usize| row.get::<_, String>(i).map_err(be);
                Ok(Some(PluginStamp {
                    sha256: col(0)?,
                    updated_at: col(1)?,
                    grants: col(2)?,
                    limits: col(3)?,
                    owner: row.get::<_, Option<String>>(4).map_err(be)?,
                }))
            })
        })
    }

    fn set_plugin_grants<'a>(&'a self, name: &'a str, grants: &'a Value) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            self.kernel_connections()
                .write(|c| {
                    let done = c
                        .prepare_cached("UPDATE plugins SET grants_json = ?, updated_at = ? WHERE name = ?")
                        .and_then(|mut s| {
                            s.execute(rusqlite::params![grants.to_string(), Utc::now().to_rfc3339(), name])
                        })
                        .map_err(be)?;
                    if done == 0 {
                        return Err(plugin_not_found(name));
                    }
                    Ok(())
                })
                .await
        })
    }

    fn remove_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            self.kernel_connections()
                .write(|c| {
                    let done = c
                        .prepare_cached("DELETE FROM plugins WHERE name = ?")
                        .and_then(|mut s| s.execute([name]))
                        .map_err(be)?;
                    Ok(done > 0)
                })
                .await
        })
    }

    fn component_in_use<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            self.kernel_connections().read(|c| {
                c.prepare_cached("SELECT COUNT(*) FROM plugins WHERE sha256 = ?")
                    .and_then(|mut s| s.query_row([sha256], |r| r.get::<_, i64>(0)))
                    .map(|n| n > 0)
                    .map_err(be)
            })
        })
    }
}

/// Insert or replace `record` (keeping its install time) on `c`, inside the caller's transaction.
fn upsert_in(c: &Connection, record: &PluginRecord) -> StoreResult<()> {
    let now = Utc::now().to_rfc3339();
    c.prepare_cached(
        "INSERT INTO plugins (name, version, description, sha256, info_json, imports_json, \
                     grants_json, limits_json, installed_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                     ON CONFLICT(name) DO UPDATE SET version = excluded.version, \
                     description = excluded.description, sha256 = excluded.sha256, info_json = excluded.info_json, \
                     imports_json = excluded.imports_json, grants_json = excluded.grants_json, \
                     limits_json = excluded.limits_json, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| {
        s.execute(rusqlite::params![
            record.name,
            record.version,
            record.description,
            record.sha256,
            record.info.to_string(),
            record.imports.to_string(),
            record.grants.to_string(),
            record.limits.to_string(),
            now,
            now,
        ])
    })
    .map_err(be)?;
    Ok(())
}

impl Database {
    /// Write `record` (and, with `owner`, its owning scope) only if plugin `record.name` is still
    /// as the writer read it: last changed at `expected` (its `updated_at`), or, with `None`, not
    /// installed at all. `false`, and nothing written, when another change came in between: a
    /// read-modify-write (grant, revoke, limits, a replacing install) then starts again from the
    /// current record instead of overwriting the other change. The record and its owner are
    /// written in one transaction, so no reader sees an API-installed plugin without its owner
    /// (visible to every scope).
    pub async fn replace_plugin_if(
        &self,
        record: &PluginRecord,
        owner: Option<&str>,
        expected: Option<&str>,
    ) -> StoreResult<bool> {
        self.kernel_connections()
            .write(|c| {
                let current: Option<String> = c
                    .prepare_cached("SELECT updated_at FROM plugins WHERE name = ?")
                    .and_then(|mut s| s.query_row([&record.name], |r| r.get(0)).optional())
                    .map_err(be)?;
                if current.as_deref() != expected {
                    return Ok(false);
                }
                upsert_in(c, record)?;
                if let Some(scope) = owner {
                    c.prepare_cached(
                        "INSERT INTO plugin_owners (name, scope) VALUES (?, ?) \
                         ON CONFLICT(name) DO UPDATE SET scope = excluded.scope",
                    )
                    .and_then(|mut s| s.execute(rusqlite::params![record.name, scope]))
                    .map_err(be)?;
                }
                Ok(true)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn sqlite_registry_passes_conformance() {
        let db = Database::in_memory().await.unwrap();
        keel_kernel::conformance::plugin_registry(Arc::new(db)).await;
    }

    #[tokio::test]
    async fn a_corrupt_json_column_is_reported_not_guessed() {
        let db = Database::in_memory().await.unwrap();
        sqlx::query(
            "INSERT INTO plugins (name, version, description, sha256, info_json, imports_json, grants_json, \
             limits_json, installed_at, updated_at) VALUES ('p', '1', '', 'ab', '{', '[]', '{}', '{}', '', '')",
        )
        .execute(db.pool())
        .await
        .unwrap();
        match db.get_plugin("p").await {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("info_json"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
