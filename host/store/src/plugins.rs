//! The plugin registry table: which plugins are installed, what they offer, what they were granted.
//!
//! Values that belong to keel-sandbox (the `describe` result, grants, limits) are stored as JSON so
//! that this crate does not depend on the sandbox.

use chrono::Utc;
use serde_json::Value;

use crate::{Database, StoreError};

/// One installed plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRecord {
    /// Plugin name (unique).
    pub name: String,
    /// Plugin version as described by the plugin.
    pub version: String,
    /// Plugin description.
    pub description: String,
    /// sha256 of the component bytes (hex).
    pub sha256: String,
    /// The `describe` result.
    pub info: Value,
    /// The WASI / host interfaces the component imports.
    pub imports: Value,
    /// Capabilities granted by the user.
    pub grants: Value,
    /// Per-plugin limits overriding the global defaults.
    pub limits: Value,
    /// RFC 3339 time of first install.
    pub installed_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

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

fn decode(row: Row) -> Result<PluginRecord, StoreError> {
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

impl Database {
    /// Insert or replace the plugin named `record.name`, keeping its original install time.
    pub async fn upsert_plugin(&self, record: &PluginRecord) -> Result<(), StoreError> {
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
        .await?;
        Ok(())
    }

    /// The plugin named `name`, if installed.
    pub async fn get_plugin(&self, name: &str) -> Result<Option<PluginRecord>, StoreError> {
        let row: Option<Row> = sqlx::query_as(select_plugins!("WHERE name = ?"))
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        row.map(decode).transpose()
    }

    /// All installed plugins, by name.
    pub async fn list_plugins(&self) -> Result<Vec<PluginRecord>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(select_plugins!("ORDER BY name"))
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(decode).collect()
    }

    /// Replace the grants of plugin `name`.
    pub async fn set_plugin_grants(&self, name: &str, grants: &Value) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE plugins SET grants_json = ?, updated_at = ? WHERE name = ?")
            .bind(grants.to_string())
            .bind(Utc::now().to_rfc3339())
            .bind(name)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("plugin `{name}`")));
        }
        Ok(())
    }

    /// Remove plugin `name`; returns whether it existed.
    pub async fn remove_plugin(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM plugins WHERE name = ?")
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Whether any installed plugin still references the component `sha256`.
    pub async fn component_in_use(&self, sha256: &str) -> Result<bool, StoreError> {
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM plugins WHERE sha256 = ?")
            .bind(sha256)
            .fetch_one(self.pool())
            .await?;
        Ok(count > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(name: &str) -> PluginRecord {
        PluginRecord {
            name: name.into(),
            version: "1.0.0".into(),
            description: "d".into(),
            sha256: "ab".repeat(32),
            info: json!({"name": name}),
            imports: json!(["wasi:cli/environment@0.2.6"]),
            grants: json!({}),
            limits: json!({}),
            installed_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[tokio::test]
    async fn upsert_get_list_grant_remove() {
        let db = Database::in_memory().await.unwrap();
        db.upsert_plugin(&record("b")).await.unwrap();
        db.upsert_plugin(&record("a")).await.unwrap();
        let names: Vec<_> = db.list_plugins().await.unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["a", "b"]);

        db.set_plugin_grants("a", &json!({"env": ["HOME"]})).await.unwrap();
        let a = db.get_plugin("a").await.unwrap().unwrap();
        assert_eq!(a.grants, json!({"env": ["HOME"]}));
        assert!(db.component_in_use(&"ab".repeat(32)).await.unwrap());

        assert!(matches!(
            db.set_plugin_grants("zzz", &json!({})).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(db.remove_plugin("a").await.unwrap());
        assert!(!db.remove_plugin("a").await.unwrap());
        assert!(db.get_plugin("a").await.unwrap().is_none());
    }
}
