//! The kernel store's own SQLite connections, used inline on the calling thread.
//!
//! Why not sqlx here: sqlx runs each SQLite connection on a worker thread, and every statement is
//! a round trip to it (two thread wake-ups, 50–100 µs on a loaded 2-core machine), so the dozen
//! statements of one governed call cost more than its commits. Here a whole transaction is one
//! closure run on the caller's thread, as embedded SQLite is meant to be used: a statement costs
//! microseconds and a commit costs what SQLite costs (a few page writes, plus an fsync with
//! `synchronous = FULL`).
//!
//! The calling task does block its thread for that long, on purpose: `block_in_place` would hand
//! the worker's core to another thread at every commit, and a task still inside it when the
//! runtime shuts down runs on after the timers stopped (it panics at its next sleep). What can
//! take long is waiting for another connection's write lock, so that never blocks: the writer's
//! busy timeout is zero and a busy `BEGIN IMMEDIATE` is retried after an async sleep.
//!
//! One writer connection (SQLite admits one writer at a time anyway) and a few read-only
//! connections (WAL lets them read while the writer writes).
//!
//! WAL checkpoints run on a background thread of their own: by default SQLite checkpoints inside
//! the commit that crosses 1000 WAL pages, and with the ~20 pages a governed call's commit
//! writes that meant copying pages back into the database file (and fsyncing it) on every 25th
//! call's path. The writer keeps a much higher threshold only as a backstop.
//!
//! Every connection opens the file through the `keel-wal` VFS (`wal_vfs.rs`): the default one,
//! except that a commit's WAL frames reach the file in two writes instead of two per page.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

use keel_kernel::store::{StoreError, StoreResult};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use super::rows::{be, is_busy};
use super::wal_vfs;
use crate::sqlite::Durability;

/// How many read-only connections each database keeps.
const READERS: usize = 4;

/// Prepared statements kept per connection: every statement the store runs, with room to spare.
const STATEMENT_CACHE: usize = 96;

/// How often the background thread checkpoints the WAL while it stays small.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// How often, at most, it checkpoints a WAL that keeps growing.
const CHECKPOINT_EVERY_BUSY: Duration = Duration::from_millis(10);

/// WAL frames found by a checkpoint past which the next one comes sooner: a quarter of the inline
/// threshold.
const BUSY_WAL_FRAMES: i64 = INLINE_CHECKPOINT_PAGES / 4;

/// WAL pages past which the writer checkpoints inline after all (the background thread is behind).
const INLINE_CHECKPOINT_PAGES: i64 = 16_384;

/// How long a write waits for another connection's (or process's) write lock before it fails
/// with `StoreError::Busy` (which the kernel may retry).
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long a read may wait on a lock (WAL readers only wait while a WAL index is rebuilt).
const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// The writer and the readers of one database file.
#[derive(Debug)]
pub(crate) struct Connections {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl Connections {
    /// Open the connections on `path`, a database that exists and is migrated (WAL mode is a
    /// property of the file, set when it was created), and start their checkpointer, which stops
    /// soon after the last handle is dropped.
    pub(crate) fn open(path: &Path, durability: Durability) -> std::io::Result<Arc<Self>> {
        let sqlite = |e: rusqlite::Error| std::io::Error::other(e.to_string());
        let writer = open_one(path, durability, false).map_err(sqlite)?;
        writer
            .pragma_update(None, "wal_autocheckpoint", INLINE_CHECKPOINT_PAGES)
            .map_err(sqlite)?;
        let readers = (0..READERS)
            .map(|_| open_one(path, durability, true).map(Mutex::new))
            .collect::<rusqlite::Result<_>>()
            .map_err(sqlite)?;
        let checkpointer = open_one(path, durability, false).map_err(sqlite)?;
        let this = Arc::new(Self {
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
        });
        let alive = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("keel-checkpoint".into())
            .spawn(move || checkpoint_while(&alive, &checkpointer))?;
        Ok(this)
    }

    /// Run `f` in one `BEGIN IMMEDIATE` transaction and commit it; an error from `f` rolls the
    /// whole transaction back. While another connection holds the write lock this waits
    /// asynchronously (up to [`WRITE_LOCK_WAIT`]), never blocking the thread.
    pub(crate) async fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let deadline = Instant::now() + WRITE_LOCK_WAIT;
        let mut pause = Duration::from_micros(250);
        let mut f = Some(f);
        loop {
            {
                let mut conn = lock(&self.writer);
                match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
                    Ok(tx) => {
                        let f = f.take().expect("called once: the loop returns after it");
                        let out = f(&tx)?;
                        tx.commit().map_err(be)?;
                        return Ok(out);
                    }
                    Err(e) if is_busy(&e) && Instant::now() < deadline => {}
                    Err(e) => return Err(be(e)),
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Run `f`, a short read (a row or two by key), on the writer connection if no write holds
    /// it, else like [`read`](Self::read). A reader connection empties its page cache whenever
    /// another connection committed, and reads each page back with a system call, so on a host
    /// that commits at every call a point read on a reader costs a few of them; the writer's cache
    /// survives its own commits. `f` may run twice: on a reader again if the writer could not
    /// read at once (it never waits for a lock).
    pub(crate) fn read_point<T>(&self, f: impl Fn(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        if let Ok(conn) = self.writer.try_lock() {
            match f(&conn) {
                Err(StoreError::Busy(_)) => {}
                done => return done,
            }
        }
        self.read(f)
    }

    /// Run `f` on a read-only connection (each statement sees a consistent snapshot).
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let n = self.readers.len();
        // A free reader if there is one; else wait for the next in turn.
        let conn = (0..n)
            .find_map(|i| match self.readers[(start + i) % n].try_lock() {
                Ok(conn) => Some(conn),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            })
            .unwrap_or_else(|| lock(&self.readers[start % n]));
        f(&conn)
    }
}

/// Checkpoint the WAL in the background while the connections are in use. PASSIVE: it copies
/// what it can without waiting for, or blocking, readers and the writer.
///
/// Every [`CHECKPOINT_EVERY`] while the WAL stays small, sooner (down to [`CHECKPOINT_EVERY_BUSY`])
/// while commits keep it growing: at a steady ~70 frames a millisecond (a governed call every
/// ~120 µs) the WAL reached the writer's inline threshold between two passes 200 ms apart, and
/// then commits checkpointed inline until the next pass (15% of a call's time, measured).
fn checkpoint_while(alive: &Weak<Connections>, conn: &Connection) {
    let mut every = CHECKPOINT_EVERY;
    let mut frames_before = 0;
    loop {
        std::thread::sleep(every);
        if alive.strong_count() == 0 {
            return;
        }
        // The second column is the number of frames in the WAL.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
            Ok(frames) => {
                every = checkpoint_pace(every, frames_before, frames);
                frames_before = frames;
            }
            Err(e) => tracing::debug!(error = %e, "background WAL checkpoint failed; the next one retries"),
        }
    }
}

/// The wait before the next checkpoint, after one that found `frames` in the WAL where the one
/// before found `frames_before`. Commits that appended nothing meanwhile: the slow pace at once
/// (a WAL left large by a burst starts over only at the next commit, and an idle host must not
/// wake every few milliseconds). Else twice as soon while the WAL is large or grew fast, twice as
/// late once it grows slowly.
fn checkpoint_pace(every: Duration, frames_before: i64, frames: i64) -> Duration {
    // A WAL that started over since (fewer frames than before) grew by all it holds.
    let grew = if frames >= frames_before {
        frames - frames_before
    } else {
        frames
    };
    if grew == 0 {
        CHECKPOINT_EVERY
    } else if frames > BUSY_WAL_FRAMES || grew > BUSY_WAL_FRAMES / 4 {
        (every / 2).max(CHECKPOINT_EVERY_BUSY)
    } else if grew < BUSY_WAL_FRAMES / 16 {
        (every * 2).min(CHECKPOINT_EVERY)
    } else {
        every
    }
}

fn open_one(path: &Path, durability: Durability, read_only: bool) -> rusqlite::Result<Connection> {
    // Each connection is used by one thread at a time (behind its mutex): no SQLite mutex needed.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let vfs = wal_vfs::register()
        .map_err(|e| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR), Some(e)))?;
    let conn = Connection::open_with_flags_and_vfs(path, flags, vfs)?;
    // The writer never waits inside SQLite (see `write`).
    conn.busy_timeout(if read_only { READ_BUSY_TIMEOUT } else { Duration::ZERO })?;
    if read_only {
        // Opened read-write (a WAL reader updates the shared-memory index) but refusing writes.
        conn.pragma_update(None, "query_only", true)?;
    }
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "synchronous", durability.pragma())?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    super::ledger::register_functions(&conn)?;
    Ok(conn)
}

/// A connection's lock. A panic inside a closure rolled its transaction back (rusqlite's
/// `Transaction` rolls back on drop), so a poisoned connection is still sound.
fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checkpoints come sooner while the WAL grows, and back to the slow pace as soon as nothing
    /// is committed, even if a burst left the WAL large.
    #[test]
    fn checkpoints_follow_the_wal_s_growth_and_idle_slowly() {
        let busy = BUSY_WAL_FRAMES;
        let mut every = CHECKPOINT_EVERY;
        let mut before = 0;
        for frames in [busy, 2 * busy, 3 * busy, 4 * busy, 5 * busy, 6 * busy, 7 * busy] {
            every = checkpoint_pace(every, before, frames);
            before = frames;
        }
        assert_eq!(
            every, CHECKPOINT_EVERY_BUSY,
            "a fast-growing WAL is checkpointed at the fastest pace"
        );
        assert_eq!(
            checkpoint_pace(every, before, before),
            CHECKPOINT_EVERY,
            "an idle host goes back to the slow pace, however large the WAL"
        );
        assert_eq!(
            checkpoint_pace(CHECKPOINT_EVERY, 5 * busy, busy),
            CHECKPOINT_EVERY / 2,
            "a WAL that started over grew by all it holds"
        );
        let slow = checkpoint_pace(CHECKPOINT_EVERY_BUSY, 10, 20);
        assert_eq!(
            slow,
            CHECKPOINT_EVERY_BUSY * 2,
            "a slowly growing small WAL: the pace eases off"
        );
    }

    fn count(c: &Connection) -> StoreResult<i64> {
        c.query_row("SELECT count(*) FROM budgets", [], |r| r.get(0))
            .map_err(super::super::rows::be)
    }

    /// A point read sees every committed write and never the rows of a write still in flight
    /// (it would, on the writer's own connection): during a write it reads on a reader.
    #[tokio::test]
    async fn a_point_read_sees_commits_and_never_a_write_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::Database::open(&dir.path().join("keel.db")).await.expect("open");
        let conns = db.kernel_connections();
        assert_eq!(conns.read_point(count).expect("read"), 0);
        let during = conns
            .write(|tx| {
                tx.execute(
                    "INSERT INTO budgets (id, tenant, budget_json) VALUES ('b', 't', '{}')",
                    [],
                )
                .map_err(super::super::rows::be)?;
                conns.read_point(count)
            })
            .await
            .expect("write");
        assert_eq!(during, 0, "the uncommitted row is not read");
        assert_eq!(conns.read_point(count).expect("read"), 1, "the committed one is");
    }
}
