//! Secrets of a Keel home kept in its database, away from the files they protect.

use crate::{Database, StoreError};

/// The name of the key that seals precompiled artifacts in `cache/`.
const ARTIFACT_KEY: &str = "artifact-hmac";

impl Database {
    /// The key that seals this home's precompiled artifacts: the one stored, or `candidate` (fresh
    /// random bytes from the caller) stored now if there is none yet. A stored value of another
    /// length is an error, not replaced: a database that says something else is not guessed at.
    pub async fn artifact_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
        // Read first: every process start reads it, and only the first one needs a write.
        if let Some(key) = self.stored_artifact_key().await? {
            return Ok(key);
        }
        sqlx::query("INSERT INTO host_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(ARTIFACT_KEY)
            .bind(&candidate[..])
            .execute(self.pool())
            .await?;
        // Another process may have stored its own first: that one is the key.
        self.stored_artifact_key()
            .await?
            .ok_or_else(|| StoreError::Kernel("the artifact key was not stored".into()))
    }

    async fn stored_artifact_key(&self) -> Result<Option<[u8; 32]>, StoreError> {
        let value: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM host_secrets WHERE name = ?")
            .bind(ARTIFACT_KEY)
            .fetch_optional(self.pool())
            .await?;
        value
            .map(|bytes| {
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                    StoreError::Kernel(format!("the stored artifact key is {} bytes, not 32", bytes.len()))
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use crate::Database;

    #[tokio::test]
    async fn the_first_key_stored_is_the_key_for_good() {
        let db = Database::in_memory().await.unwrap();
        let first = db.artifact_key([1; 32]).await.unwrap();
        assert_eq!(first, [1; 32]);
        assert_eq!(
            db.artifact_key([2; 32]).await.unwrap(),
            [1; 32],
            "a later candidate is ignored"
        );
    }
}
