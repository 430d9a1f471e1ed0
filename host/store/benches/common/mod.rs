//! What the store benches share: the bare one-row commit every durable path is compared with.

#![allow(dead_code)] // Each bench that includes this module uses a part of it.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

/// A plain SQLite connection on the bench's database file, with the store's pragmas: the floor.
pub struct BareCommit {
    conn: Connection,
    /// The tables each commit inserts one row into.
    inserts: Vec<String>,
    /// What each row holds.
    body: String,
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
        Self {
            conn,
            inserts,
            body: "x".into(),
        }
    }

    /// [`open`](Self::open) for commits of one row of `bytes` bytes, into a table of its own.
    pub fn open_sized(path: &Path, synchronous: &str, table: &str, bytes: usize) -> Self {
        let mut this = Self::open_wide(path, synchronous, 0);
        this.conn
            .execute(
                &format!("CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"),
                [],
            )
            .unwrap();
        this.inserts = vec![format!("INSERT INTO {table} (body) VALUES (?)")];
        this.body = "x".repeat(bytes.max(1));
        this
    }

    /// [`open_wide`](Self::open_wide) for commits of `rows` rows of `bytes` bytes into each of
    /// `tables` tables (of their own).
    pub fn open_batch(path: &Path, synchronous: &str, tables: usize, rows: usize, bytes: usize) -> Self {
        let mut this = Self::open_wide(path, synchronous, 0);
        this.inserts.clear();
        for i in 0..tables {
            let table = format!("bench_batch_{i}");
            this.conn
                .execute(
                    &format!("CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"),
                    [],
                )
                .unwrap();
            for _ in 0..rows {
                this.inserts.push(format!("INSERT INTO {table} (body) VALUES (?)"));
            }
        }
        this.body = "x".repeat(bytes.max(1));
        this
    }

    /// The bytes of the rows (every column, as text) that the kernel store keeps for job `id`:
    /// the job, its events, journal, ledger entries and reservations.
    pub fn job_bytes(&self, id: &str) -> usize {
        let mut total = 0;
        for (table, key) in [
            ("jobs", "id"),
            ("events", "job_id"),
            ("journal", "job_id"),
            ("ledger_events", "job_id"),
            ("reservations", "job_id"),
        ] {
            let columns: Vec<String> = self
                .conn
                .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let sum = columns
                .iter()
                .map(|c| format!("COALESCE(length(CAST({c} AS BLOB)), 0)"))
                .collect::<Vec<_>>()
                .join(" + ");
            let bytes: i64 = self
                .conn
                .query_row(
                    &format!("SELECT COALESCE(SUM({sum}), 0) FROM {table} WHERE {key} = ?"),
                    [id],
                    |r| r.get(0),
                )
                .unwrap();
            total += usize::try_from(bytes).unwrap();
        }
        total
    }

    /// The id of the job created last.
    pub fn last_job(&self) -> String {
        self.conn
            .query_row(
                "SELECT id FROM jobs ORDER BY created_at DESC, id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// One row (into each table) committed the cheapest way SQLite allows, on the calling thread:
    /// `BEGIN IMMEDIATE`, one prepared `INSERT` per table, `COMMIT`.
    pub fn commit(&mut self) {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        for insert in &self.inserts {
            tx.prepare_cached(insert).unwrap().execute([&self.body]).unwrap();
        }
        tx.commit().unwrap();
    }
}
