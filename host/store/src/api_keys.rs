//! API keys of the HTTP server and the scope that owns an API-installed plugin.
//!
//! Rows only: generating keys, hashing and constant-time verification live in `keel-app`
//! (`keys.rs`), which is the only caller.

use chrono::Utc;

use crate::{Database, StoreError};

/// One stored API key (never the secret: only its sha256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRow {
    /// Public key id (the prefix of the key text).
    pub id: String,
    /// Hex sha256 of the key's secret part.
    pub secret_sha256: String,
    /// Name for humans.
    pub name: String,
    /// The tenant scope the key is confined to.
    pub scope: String,
    /// `read`, `write` or `admin`.
    pub role: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, when revoked.
    pub revoked_at: Option<String>,
}

type Row = (String, String, String, String, String, String, Option<String>);

fn decode(row: Row) -> ApiKeyRow {
    let (id, secret_sha256, name, scope, role, created_at, revoked_at) = row;
    ApiKeyRow {
        id,
        secret_sha256,
        name,
        scope,
        role,
        created_at,
        revoked_at,
    }
}

impl Database {
    /// Store a new key (`created_at` and `revoked_at` are set here).
    pub async fn insert_api_key(&self, key: &ApiKeyRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, secret_sha256, name, scope, role, created_at, revoked_at) \
             VALUES (?, ?, ?, ?, ?, ?, NULL)",
        )
        .bind(&key.id)
        .bind(&key.secret_sha256)
        .bind(&key.name)
        .bind(&key.scope)
        .bind(&key.role)
        .bind(Utc::now().to_rfc3339())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The key with public id `id`, revoked or not.
    ///
    /// Read at every authenticated HTTP request, so on the kernel store's connections (a point
    /// read on the calling thread) rather than sqlx's, whose every statement is a round trip to
    /// its connection's thread (two wake-ups, tens of µs on a 2-core VM).
    pub async fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        use rusqlite::OptionalExtension as _;
        let row = self.kernel_connections().read_point(|c| {
            c.prepare_cached(
                "SELECT id, secret_sha256, name, scope, role, created_at, revoked_at FROM api_keys WHERE id = ?",
            )
            .and_then(|mut stmt| {
                stmt.query_row([id], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })
                .optional()
            })
            .map_err(crate::kernel_store::be)
        });
        let row: Option<Row> = row.map_err(|e| StoreError::Kernel(e.to_string()))?;
        Ok(row.map(decode))
    }

    /// Every key, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRow>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, secret_sha256, name, scope, role, created_at, revoked_at FROM api_keys \
             ORDER BY created_at, id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(decode).collect())
    }

    /// Revoke key `id`; false when there is no such key or it was revoked already.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(Utc::now().to_rfc3339())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The scope owning plugin `name`, or `None` for a home-wide plugin.
    pub async fn plugin_owner(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT scope FROM plugin_owners WHERE name = ?")
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// Every owned plugin as `(name, scope)`.
    pub async fn plugin_owners(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as("SELECT name, scope FROM plugin_owners ORDER BY name")
            .fetch_all(self.pool())
            .await?)
    }

    /// Record `scope` as the owner of the installed plugin `name`.
    pub async fn set_plugin_owner(&self, name: &str, scope: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO plugin_owners (name, scope) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET scope = excluded.scope",
        )
        .bind(name)
        .bind(scope)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_stored_listed_and_revoked_once() {
        let db = Database::in_memory().await.unwrap();
        let key = ApiKeyRow {
            id: "k1".into(),
            secret_sha256: "00".into(),
            name: "ci".into(),
            scope: "acme".into(),
            role: "write".into(),
            created_at: String::new(),
            revoked_at: None,
        };
        db.insert_api_key(&key).await.unwrap();
        assert!(db.insert_api_key(&key).await.is_err(), "ids are unique");
        let got = db.get_api_key("k1").await.unwrap().unwrap();
        assert_eq!((got.scope.as_str(), got.role.as_str()), ("acme", "write"));
        assert!(got.revoked_at.is_none());
        assert!(db.revoke_api_key("k1").await.unwrap());
        assert!(!db.revoke_api_key("k1").await.unwrap(), "second revoke is a no-op");
        assert!(db.get_api_key("k1").await.unwrap().unwrap().revoked_at.is_some());
        assert_eq!(db.list_api_keys().await.unwrap().len(), 1);
        assert!(db.get_api_key("nope").await.unwrap().is_none());
    }
}
