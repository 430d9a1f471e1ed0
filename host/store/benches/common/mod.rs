//! What the store benches share: the bare one-row commit every durable path is compared with.

#![allow(dead_code)] // Each bench that includes this module uses a part of it.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

/// A plain SQLite connection on the bench's database file, with the store's pragmas: the floor.
pub struct BareCommit {
    conn: Connection,
    /// The `INSERT`s each commit runs, one per row.
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
        let names = (0..tables).map(|i| {
            if i == 0 {
                "bench_commit".into()
            } else {
                format!("bench_commit_{i}")
            }
        });
        Self::open_tables(path, synchronous, names, 1, 1)
    }

    /// [`open`](Self::open) for commits of one row of `bytes` bytes, into `table`.
    pub fn open_sized(path: &Path, synchronous: &str, table: &str, bytes: usize) -> Self {
        Self::open_tables(path, synchronous, [table.to_owned()], 1, bytes)
    }

    /// [`open`](Self::open) for commits of `rows` rows of `bytes` bytes into each of `tables`
    /// tables (of their own).
    pub fn open_batch(path: &Path, synchronous: &str, tables: usize, rows: usize, bytes: usize) -> Self {
        let names = (0..tables).map(|i| format!("bench_batch_{i}"));
        Self::open_tables(path, synchronous, names, rows, bytes)
    }

    /// Commits of `rows` rows of `bytes` bytes into each of the tables `names` (created if
    /// missing), on a connection with the store's pragmas.
    fn open_tables(
        path: &Path,
        synchronous: &str,
        names: impl IntoIterator<Item = String>,
        rows: usize,
        bytes: usize,
    ) -> Self {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        conn.pragma_update(None, "synchronous", synchronous).unwrap();
        let mut inserts = Vec::new();
        for name in names {
            conn.execute(
                &format!("CREATE TABLE IF NOT EXISTS {name} (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"),
                [],
            )
            .unwrap();
            inserts.extend(std::iter::repeat_n(
                format!("INSERT INTO {name} (body) VALUES (?)"),
                rows,
            ));
        }
        Self {
            conn,
            inserts,
            body: "x".repeat(bytes.max(1)),
        }
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
