//! Opening the durable kernel over `$KEEL_HOME/keel.db`, and the argument parsing and error
//! mapping shared by `keel jobs`, `actions`, `ledger` and `budgets`.
//!
//! Kernel commands never touch the sandbox: compiling the wasm engine would cost far more than
//! the command itself, so this opens only the database.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use keel_kernel::Kernel;
use keel_store::Database;
use uuid::Uuid;

use crate::error::AppError;

/// The default scope (tenant) of every kernel command, as in `keel policy eval`.
pub const DEFAULT_SCOPE: &str = "default";

/// Open (creating if needed) the Keel home's database and the kernel over it.
pub async fn open_kernel(home: &Path) -> Result<Kernel, AppError> {
    let db = open_db(home).await?;
    Ok(Kernel::new(Arc::new(db.kernel_store())))
}

/// Open (creating if needed) `home/keel.db` without the sandbox, with the home's `[store]`
/// settings (a kernel command commits as durably as `keel run` does).
pub async fn open_db(home: &Path) -> Result<Database, AppError> {
    crate::home::prepare_home(home)?;
    let config = crate::home::KeelConfig::load(home)?;
    Ok(Database::open_with(&home.join("keel.db"), config.store.durability).await?)
}

/// Parse a job or action id.
pub fn parse_id(what: &str, s: &str) -> Result<Uuid, AppError> {
    Uuid::parse_str(s.trim()).map_err(|_| AppError::user(format!("{s:?} is not a valid {what} id")))
}

/// Which end of a day a bare date stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayEdge {
    /// `2026-11-21` = 2026-11-21T00:00:00Z (for `--since`).
    Start,
    /// `2026-11-21` = 2026-11-22T00:00:00Z, exclusive (for `--until`: the whole day is included).
    End,
}

/// Parse an RFC 3339 instant, or a UTC day `YYYY-MM-DD`.
pub fn parse_time(flag: &str, s: &str, edge: DayEdge) -> Result<DateTime<Utc>, AppError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| {
        AppError::user(format!(
            "{flag} {s:?} is neither an RFC 3339 time (2026-11-21T09:00:00Z) nor a day (2026-11-21)"
        ))
    })?;
    let day = match edge {
        DayEdge::Start => day,
        DayEdge::End => day
            .succ_opt()
            .ok_or_else(|| AppError::user(format!("{flag} {s:?} is out of range")))?,
    };
    Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
}

/// Format an optional instant for humans.
pub fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kernel_commands_read_the_store_section() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("config.toml"), "[store]\ndurability = \"sometimes\"\n").unwrap();
        let err = open_db(home.path())
            .await
            .expect_err("an invalid durability must not be ignored");
        assert!(err.message.contains("durability"), "{}", err.message);
        std::fs::write(home.path().join("config.toml"), "[store]\ndurability = \"normal\"\n").unwrap();
        open_db(home.path()).await.expect("a valid [store] section opens");
    }

    #[test]
    fn days_and_instants() {
        let since = parse_time("--since", "2026-11-21", DayEdge::Start).unwrap();
        let until = parse_time("--until", "2026-11-21", DayEdge::End).unwrap();
        assert_eq!(since.to_rfc3339(), "2026-11-21T00:00:00+00:00");
        assert_eq!(until.to_rfc3339(), "2026-11-22T00:00:00+00:00");
        let t = parse_time("--since", "2026-11-21T09:30:00+01:00", DayEdge::Start).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-21T08:30:00+00:00");
        assert!(parse_time("--since", "yesterday", DayEdge::Start).is_err());
        assert!(parse_id("job", "nope").is_err());
    }
}
