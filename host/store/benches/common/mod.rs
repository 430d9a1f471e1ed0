//! What the store benches share: the bare one-row commit every durable path is compared with.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

/// A plain SQLite connection on the bench's database file, with the store's pragmas: the floor.
pub struct BareCommit {
    conn: Connection,
    /// The tables each commit inserts one row into.
    inserts: Vec<String>,
}

impl BareCommit {
    /// Open `path` (already created by `Database::open_with`) with `synchronous` = `FULL` or
    /// `NORMAL`, as the store's connections do, and create the table it writes to.
    pub fn open(path: &Path, synchronous: &str) -> Self {
        Self::open_wide(path, synchronous, 1)
    }

    /// [`open`](Self::open) for commits of one row into each of `tables` tables: as many b-trees
    /// (so as many WAL pages) as a commit of the store writes, with none of its work.
    pub fn open_wide(path: &Path, synchronous: &str, tables: usize) -> Self {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        conn.pragma_update(None, "synchronous", synchronous).unwrap();
        let names: Vec<String> = (0..tables)
            .map(|i| {
                if i == 0 {
                    "bench_commit".into()
                } else {
                    format!("bench_commit_{i}")
                }
            })
            .collect();
        for name in &names {
            conn.execute(
                &format!("CREATE TABLE IF NOT EXISTS {name} (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"),
                [],
            )
            .unwrap();
        }
        let inserts = names
            .iter()
            .map(|name| format!("INSERT INTO {name} (body) VALUES (?)"))
            .collect();
        Self { conn, inserts }
    }

    /// One row (into each table) committed the cheapest way SQLite allows, on the calling thread:
    /// `BEGIN IMMEDIATE`, one prepared `INSERT` per table, `COMMIT`.
    pub fn commit(&mut self) {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        for insert in &self.inserts {
            tx.prepare_cached(insert).unwrap().execute(["x"]).unwrap();
        }
        tx.commit().unwrap();
    }
}
