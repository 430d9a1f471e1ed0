//! Policy texts, stored once under their sha256 (see [`keel_kernel::store::PolicyText`]).

use keel_kernel::store::{PolicyText, StoreResult};
use rusqlite::Connection;
use rusqlite::types::Value;

use super::rows::{be, fetch_optional, get};

/// Store `text` unless a text of its sha256 already is (then nothing is written: the row, keyed
/// by its content's digest, can only hold the same text).
pub(super) fn insert_policy_text(conn: &Connection, text: &PolicyText) -> StoreResult<()> {
    const SQL: &str = "INSERT INTO policy_texts (sha256, text) VALUES (?1, ?2) ON CONFLICT (sha256) DO NOTHING";
    conn.prepare_cached(SQL)
        .and_then(|mut stmt| stmt.execute((text.sha256(), text.text())))
        .map_err(be)?;
    Ok(())
}

/// [`KernelStore::policy_text`](keel_kernel::store::KernelStore::policy_text).
pub(super) fn policy_text(conn: &Connection, sha256: &str) -> StoreResult<Option<String>> {
    fetch_optional(
        conn,
        "SELECT text FROM policy_texts WHERE sha256 = ?",
        &[Value::Text(sha256.to_owned())],
        |r| get(r, "text"),
    )
}
