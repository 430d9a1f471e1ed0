//! Opening the SQLite database: WAL, busy timeout, foreign keys, embedded migrations.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::kernel_store::conn::Connections;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Errors from the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or queried.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored JSON column did not decode.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The row that was asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The kernel store's connections could not be opened.
    #[error("database error: {0}")]
    Kernel(String),
}

/// Embedded SQLite migrations (`migrations/sqlite`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Make the database file owner-only (0600), creating it empty if missing, and tighten its `-wal`
/// and `-shm` files if they exist. SQLite would create the file `0644 & !umask` and creates the
/// WAL and shared-memory files with the database file's mode, so creating it first decides all three.
fn owner_only(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            match std::fs::metadata(&file) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// How hard a commit is pushed to disk: SQLite's `synchronous` setting under WAL (`[store]
/// durability` in `config.toml`).
///
/// - [`Full`](Self::Full) (the default): the WAL is fsynced at every commit, so a commit that
///   returned survives a power loss or an OS crash as well as a process crash. One fsync per
///   commit (~0.3 ms on a fast SSD, several ms on a loaded or networked disk).
/// - [`Normal`](Self::Normal): the WAL is written at every commit but fsynced only at
///   checkpoints. A commit that returned survives the process dying (`kill -9`, a panic, an
///   abort: the data is in the OS's page cache and the WAL is replayed at the next open); a
///   power loss or OS crash can lose the last commits (never corrupt the database). No fsync per
///   commit: a commit costs tens of microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous = NORMAL`: survives a process crash, not a power loss.
    Normal,
    /// `synchronous = FULL`: survives a power loss too.
    #[default]
    Full,
}

impl Durability {
    fn synchronous(self) -> SqliteSynchronous {
        match self {
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Full => SqliteSynchronous::Full,
        }
    }

    /// The `PRAGMA synchronous` value.
    pub(crate) fn pragma(self) -> &'static str {
        match self {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        }
    }
}

/// A handle on Keel's SQLite database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: SqlitePool,
    /// The kernel store's own connections (see [`crate::kernel_store`]).
    kernel: Arc<Connections>,
    /// The private directory of an [`in_memory`](Self::in_memory) database, removed with the
    /// last handle.
    _scratch: Option<Arc<tempfile::TempDir>>,
}

impl Database {
    /// Open (creating if needed) the database file at `path` and run migrations, with the
    /// default [`Durability`] (full).
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::default()).await
    }

    /// [`open`](Self::open) with an explicit [`Durability`] for every commit made through this
    /// handle (the setting is per connection: another process on the same file keeps its own).
    pub async fn open_with(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        }
        owner_only(path).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        let pool = Self::connect(options, durability).await?;
        let kernel = Connections::open(path, durability).map_err(|e| StoreError::Kernel(e.to_string()))?;
        Ok(Self {
            pool,
            kernel,
            _scratch: None,
        })
    }

    /// Open a private, throwaway database (tests): a file in a new temporary directory, removed
    /// when the last handle is dropped. (A file, not `:memory:`, because the kernel store's
    /// connections must reach the same database as the pool's.)
    pub async fn in_memory() -> Result<Self, StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        let mut db = Self::open_with(&dir.path().join("keel.db"), Durability::Normal).await?;
        db._scratch = Some(Arc::new(dir));
        Ok(db)
    }

    fn tune(options: SqliteConnectOptions, durability: Durability) -> SqliteConnectOptions {
        options
            // A new database gets 2 KiB pages (an existing one keeps its own: a WAL database's
            // page size is fixed). Every b-tree a commit touches is at least one page written to
            // the WAL, and a governed call's commits touch ~15 each: with 2 KiB pages a call
            // writes 85 KB instead of 143 KB and costs ~11% less CPU (`synchronous = NORMAL`,
            // 5,000 calls); 1 KiB pages cost more CPU (deeper trees, more frames).
            .page_size(2048)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(durability.synchronous())
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
    }

    async fn connect(options: SqliteConnectOptions, durability: Durability) -> Result<SqlitePool, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // An in-process SQLite connection does not go stale: pinging it before every
            // transaction would only add a round trip to the database thread.
            .test_before_acquire(false)
            .connect_with(Self::tune(options, durability))
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(pool)
    }

    /// The kernel store's connections.
    pub(crate) fn kernel_connections(&self) -> Arc<Connections> {
        self.kernel.clone()
    }

    /// The underlying pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}
