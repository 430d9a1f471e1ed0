//! The plugin registry table: [`PluginRegistry`] on SQLite. Which plugins are installed, what they
//! offer, what they were granted.
//!
//! Values that belong to keel-sandbox (the `describe` result, grants, limits) are stored as JSON so
//! that this crate does not depend on the sandbox.

use chrono::Utc;
use futures::future::BoxFuture;
use keel_kernel::registry::{PluginRegistry, plugin_not_found};
use keel_kernel::store::{StoreError, StoreResult};
use serde_json::Value;

use crate::Database;
use crate::kernel_store::be;

/// The record type, defined with the trait in the kernel; re-exported at its old path.
pub use keel_kernel::registry::PluginRecord;

type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

fn decode(row: Row) -> StoreResult<PluginRecord> {
    let (name, version, description, sha256, info, imports, grants, limits, installed_at, updated_at) = row;
    let parse = |column: &str, text: &str| {
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("plugin `{name}` column {column}: {e}")))
    };
    Ok(PluginRecord {
        info: parse("info_json", &info)?,
        imports: parse("imports_json", &imports)?,
        grants: parse("grants_json", &grants)?,
        limits: parse("limits_json", &limits)?,
        name,
        version,
        description,
        sha256,
        installed_at,
        updated_at,
    })
}

/// `SELECT <all columns> FROM plugins <tail>` as a static string (sqlx only takes audited SQL).
macro_rules! select_plugins {
    ($tail:literal) => {
        concat!(
            "SELECT name, version, description, sha256, info_json, imports_json, grants_json, ",
            "limits_json, installed_at, updated_at FROM plugins ",
            $tail
        )
    };
}

impl PluginRegistry for Database {
    fn upsert_plugin<'a>(&'a self, record: &'a PluginRecord) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let now = Utc::now().to_rfc3339();
            sqlx::query(
                "INSERT INTO plugins (name, version, description, sha256, info_json, imports_json, grants_json, \
             limits_json, installed_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT(name) DO UPDATE SET version = excluded.version, description = excluded.description, \
             sha256 = excluded.sha256, info_json = excluded.info_json, imports_json = excluded.imports_json, \
             grants_json = excluded.grants_json, limits_json = excluded.limits_json, updated_at = excluded.updated_at",
            )
            .bind(&record.name)
            .bind(&record.version)
            .bind(&record.description)
            .bind(&record.sha256)
            .bind(record.info.to_string())
            .bind(record.imports.to_string())
            .bind(record.grants.to_string())
            .bind(record.limits.to_string())
            .bind(&now)
            .bind(&now)
            .execute(self.pool())
            .await
            .map_err(be)?;
            Ok(())
        })
    }

    fn get_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<PluginRecord>>> {
        Box::pin(async move {
            let row: Option<Row> = sqlx::query_as(select_plugins!("WHERE name = ?"))
                .bind(name)
                .fetch_optional(self.pool())
                .await
                .map_err(be)?;
            row.map(decode).transpose()
        })
    }

    fn list_plugins(&self) -> BoxFuture<'_, StoreResult<Vec<PluginRecord>>> {
        Box::pin(async move {
            let rows: Vec<Row> = sqlx::query_as(select_plugins!("ORDER BY name"))
                .fetch_all(self.pool())
                .await
                .map_err(be)?;
            rows.into_iter().map(decode).collect()
        })
    }

    fn set_plugin_grants<'a>(&'a self, name: &'a str, grants: &'a Value) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let done = sqlx::query("UPDATE plugins SET grants_json = ?, updated_at = ? WHERE name = ?")
                .bind(grants.to_string())
                .bind(Utc::now().to_rfc3339())
                .bind(name)
                .execute(self.pool())
                .await
                .map_err(be)?;
            if done.rows_affected() == 0 {
                return Err(plugin_not_found(name));
            }
            Ok(())
        })
    }

    fn remove_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM plugins WHERE name = ?")
                .bind(name)
                .execute(self.pool())
                .await
                .map_err(be)?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn component_in_use<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM plugins WHERE sha256 = ?")
                .bind(sha256)
                .fetch_one(self.pool())
                .await
                .map_err(be)?;
            Ok(count > 0)
        })
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
