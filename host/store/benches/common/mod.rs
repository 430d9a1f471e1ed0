//! What the store benches share: the bare one-row commit every durable path is compared with.

use sqlx::SqlitePool;

/// Create the table [`bare_commit`] writes to.
pub async fn create_bare_commit_table(pool: &SqlitePool) {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_commit (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
}

/// One row committed the way a kernel write commits: `BEGIN IMMEDIATE` on a pooled connection,
/// one `INSERT`, `COMMIT`.
pub async fn bare_commit(pool: &SqlitePool) {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query("INSERT INTO bench_commit (body) VALUES (?)")
        .bind("x")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}
