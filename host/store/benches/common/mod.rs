//! What the store benches share: the bare one-row commit every durable path is compared with.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

/// A plain SQLite connection on the bench's database file, with the store's pragmas: the floor.
pub struct BareCommit {
    conn: Connection,
}

impl BareCommit {
    /// Open `path` (already created by `Database::open_with`) with `synchronous` = `FULL` or
    /// `NORMAL`, as the store's connections do, and create the table it writes to.
    pub fn open(path: &Path, synchronous: &str) -> Self {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        conn.pragma_update(None, "synchronous", synchronous).unwrap();
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_commit (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
            [],
        )
        .unwrap();
        Self { conn }
    }

    /// One row committed the cheapest way SQLite allows, on the calling thread: `BEGIN
    /// IMMEDIATE`, one prepared `INSERT`, `COMMIT`.
    pub fn commit(&mut self) {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        tx.prepare_cached("INSERT INTO bench_commit (body) VALUES (?)")
            .unwrap()
            .execute(["x"])
            .unwrap();
        tx.commit().unwrap();
    }
}
