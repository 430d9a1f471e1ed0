//! A database written by the previous schema keeps everything through the `fewer_btrees`
//! migration (tables rebuilt without AUTOINCREMENT, the journal and reservations clustered on
//! their keys, the jobs listing index ascending), and what the store guarantees on top of the
//! schema still holds after it: ids keep increasing, the ledger stays append-only, an expired
//! hold is still found by the sweep, jobs still list newest first. The `budget_totals` migration
//! counts the usage already in the ledger into the running totals budget checks now read.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use keel_kernel::agent::testing::{FakeTools, scripted_runtime};
use keel_kernel::context::ExecutionContext;
use keel_kernel::event::{EventFilter, EventQuery};
use keel_kernel::job::{JobFilter, JobState};
use keel_kernel::ledger::LedgerQuery;
use keel_kernel::store::KernelStore;
use keel_kernel::{AgentConfig, AgentRuntime, Kernel};
use keel_store::sqlite::MIGRATOR;
use keel_store::{Database, Durability};
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

/// The `fewer_btrees` migration.
const VERSION: i64 = 20261202040000;

/// The `budget_totals` migration.
const BUDGET_TOTALS: i64 = 20261202100000;

/// Create `path` with every migration before `version`, and record `version` as applied
/// (with its real checksum) so that the current store opens it without that migration: the
/// current store code then writes real rows into the previous schema.
async fn previous_schema(path: &Path, version: i64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut found = false;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite")).expect("migrations") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let this: i64 = name.split('_').next().and_then(|v| v.parse().ok()).expect("version");
        if this < version {
            std::fs::copy(entry.path(), dir.path().join(&name)).expect("copy");
        }
        found |= this == version;
    }
    assert!(found, "the migration under test exists");
    let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
    let pool = SqlitePoolOptions::new().connect_with(options).await.expect("pool");
    sqlx::migrate::Migrator::new(dir.path())
        .await
        .expect("previous migrations")
        .run(&pool)
        .await
        .expect("run");
    let migration = MIGRATOR.iter().find(|m| m.version == version).expect("embedded");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (?, ?, TRUE, ?, 0)",
    )
    .bind(version)
    .bind(migration.description.as_ref())
    .bind(migration.checksum.as_ref())
    .execute(&pool)
    .await
    .expect("mark applied");
    pool.close().await;
}

fn runtime(db: &Database) -> AgentRuntime {
    let tools = FakeTools::new();
    tools.add_echo("p/echo", false);
    let kernel = Kernel::new(Arc::new(db.kernel_store()));
    scripted_runtime(kernel, vec![], &tools, AgentConfig::default())
}

async fn governed_call(rt: &AgentRuntime) -> uuid::Uuid {
    let h = rt
        .call_tool(&ExecutionContext::new("t"), "p/echo", json!({ "n": 1 }), None)
        .await
        .expect("call");
    let r = h.result().await.expect("result");
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    r.job_id
}

fn tenant_events() -> EventQuery {
    EventQuery {
        filter: EventFilter {
            tenant: Some("t".into()),
            ..EventFilter::default()
        },
        ..EventQuery::default()
    }
}

fn ledger() -> LedgerQuery {
    LedgerQuery {
        tenant: "t".into(),
        ..LedgerQuery::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fewer_btrees_migration_keeps_every_row_and_guarantee() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    previous_schema(&path, VERSION).await;

    // Rows written by the store into the previous schema, plus a hold that has expired.
    let (jobs, events, journals, ledger_rows) = {
        let db = Database::open_with(&path, Durability::Normal)
            .await
            .expect("open previous");
        let rt = runtime(&db);
        let first = governed_call(&rt).await;
        let second = governed_call(&rt).await;
        let store = db.kernel_store();
        let jobs = store.list_jobs(&JobFilter::tenant("t")).await.expect("jobs");
        let events = store.read_events(&tenant_events()).await.expect("events");
        let journals = (
            store.read_journal(first).await.expect("journal"),
            store.read_journal(second).await.expect("journal"),
        );
        let ledger_rows = store.list_ledger(&ledger()).await.expect("ledger");
        (jobs, events, journals, ledger_rows)
    };
    assert_eq!(jobs.len(), 2);
    assert!(events.len() >= 4 && !journals.0.is_empty() && !ledger_rows.is_empty());
    let expired = uuid::Uuid::now_v7();
    let conn = rusqlite::Connection::open(&path).expect("raw");
    conn.execute(
        "INSERT INTO reservations (id, tenant, tokens, cost_nanos, requests, tool_calls, state, created_at, expires_at) \
         VALUES (?, 't', 0, 0, 0, 1, 'HELD', 1, 2)",
        [expired.to_string()],
    )
    .expect("a held reservation");
    conn.execute("DELETE FROM _sqlx_migrations WHERE version = ?", [VERSION])
        .expect("unmark");
    drop(conn);

    // The migration runs at this open.
    let db = Database::open_with(&path, Durability::Normal).await.expect("migrate");
    let store = db.kernel_store();
    assert_eq!(store.list_jobs(&JobFilter::tenant("t")).await.expect("jobs"), jobs);
    assert_eq!(store.read_events(&tenant_events()).await.expect("events"), events);
    assert_eq!(store.read_journal(jobs[1].id).await.expect("journal"), journals.0);
    assert_eq!(store.read_journal(jobs[0].id).await.expect("journal"), journals.1);
    assert_eq!(store.list_ledger(&ledger()).await.expect("ledger"), ledger_rows);

    // New rows continue after the old ones; the listing is still newest first.
    let rt = runtime(&db);
    let third = governed_call(&rt).await;
    let after = store.read_events(&tenant_events()).await.expect("events");
    assert_eq!(after[..events.len()], events[..]);
    let old_max = events.iter().map(|e| e.id).max().expect("events");
    assert!(
        after[events.len()..]
            .iter()
            .all(|e| e.id > old_max && e.job_id == third)
    );
    let listed = store.list_jobs(&JobFilter::tenant("t")).await.expect("jobs");
    assert_eq!(
        listed.iter().map(|j| j.id).collect::<Vec<_>>(),
        [third, jobs[0].id, jobs[1].id]
    );
    let old_ledger_max = ledger_rows.iter().map(|l| l.id).max().expect("ledger");
    let ledger_after = store.list_ledger(&ledger()).await.expect("ledger");
    assert!(ledger_after[ledger_rows.len()..].iter().all(|l| l.id > old_ledger_max));
    assert!(ledger_after.len() > ledger_rows.len());

    // The sweep still finds the expired hold; the ledger is still append-only.
    let released = store.release_expired(Utc::now(), 10).await.expect("sweep");
    assert_eq!(released.iter().map(|r| r.id).collect::<Vec<_>>(), [expired]);
    let conn = rusqlite::Connection::open(&path).expect("raw");
    let update = conn.execute("UPDATE ledger_events SET tokens = 1", []);
    assert!(
        update.is_err_and(|e| e.to_string().contains("append-only")),
        "the ledger refuses updates"
    );
    let delete = conn.execute("DELETE FROM ledger_events", []);
    assert!(delete.is_err_and(|e| e.to_string().contains("append-only")));
}

/// Insert a ledger row the way the previous schema's store did (no running totals).
fn usage_row(
    conn: &rusqlite::Connection,
    kind: &str,
    tenant: &str,
    principal: &str,
    session: Option<&str>,
    at: chrono::DateTime<Utc>,
) {
    conn.execute(
        "INSERT INTO ledger_events (kind, tenant, principal, session, tokens, cost_nanos, requests, tool_calls, data_json, at) \
         VALUES (?, ?, ?, ?, 0, 0, 0, 1, 'null', ?)",
        rusqlite::params![kind, tenant, principal, session, at.timestamp_micros()],
    )
    .expect("ledger row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_totals_migration_counts_the_usage_already_recorded() {
    use chrono::Duration;
    use keel_kernel::KernelError;
    use keel_kernel::ledger::{Budget, BudgetWindow, Usage};
    use keel_kernel::services::HoldRequest;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    previous_schema(&path, BUDGET_TOTALS).await;
    let now = keel_kernel::conformance::epoch(); // 2026-03-15 12:00 UTC
    let budget = |name: &str, window: BudgetWindow, principal: Option<&str>, session: Option<&str>| {
        let mut b = Budget::new("t", name, window);
        b.principal = principal.map(str::to_owned);
        b.session = session.map(str::to_owned);
        b.limits.max_tool_calls = Some(2);
        b
    };
    let budgets = [
        budget("alice, all time", BudgetWindow::Total, Some("alice"), None),
        budget("s1, today", BudgetWindow::Daily, None, Some("s1")),
        budget("dave, this month", BudgetWindow::Monthly, Some("dave"), None),
    ];
    {
        let conn = rusqlite::Connection::open(&path).expect("raw");
        for b in &budgets {
            conn.execute(
                "INSERT INTO budgets (id, tenant, budget_json) VALUES (?, 't', ?)",
                [b.id.to_string(), serde_json::to_string(b).expect("json")],
            )
            .expect("budget");
        }
        // alice: two calls ever (one last month); a hold and another tenant's usage never count.
        usage_row(&conn, "tool_usage", "t", "alice", None, now - Duration::days(2));
        usage_row(&conn, "tool_usage", "t", "alice", None, now - Duration::days(30));
        usage_row(&conn, "hold", "t", "bob", None, now - Duration::hours(1));
        usage_row(&conn, "tool_usage", "t2", "bob", None, now - Duration::hours(1));
        // s1: one call today, one yesterday; dave: one this month, one last month.
        usage_row(&conn, "tool_usage", "t", "carol", Some("s1"), now - Duration::hours(1));
        usage_row(&conn, "tool_usage", "t", "carol", Some("s1"), now - Duration::days(1));
        usage_row(&conn, "model_usage", "t", "dave", None, now - Duration::days(10));
        usage_row(&conn, "overage", "t", "dave", None, now - Duration::days(16));
        conn.execute("DELETE FROM _sqlx_migrations WHERE version = ?", [BUDGET_TOTALS])
            .expect("unmark");
    }

    // The migration runs at this open.
    let db = Database::open_with(&path, Durability::Normal).await.expect("migrate");
    let (k, _clock) = keel_kernel::conformance::kernel_with_clock(Arc::new(db.kernel_store()));
    let hold = |principal: &str, session: Option<&str>| HoldRequest {
        tenant: "t".into(),
        principal: Some(principal.into()),
        session: session.map(str::to_owned),
        job_id: None,
        amount: Usage {
            tool_calls: 1,
            ..Usage::zero()
        },
        ttl: None,
    };
    let denied = |r: Result<_, KernelError>| matches!(r, Err(KernelError::BudgetExceeded(_)));
    assert!(
        denied(k.ledger().reserve(hold("alice", None)).await),
        "alice's two calls count"
    );
    k.ledger().reserve(hold("bob", None)).await.expect("bob has no budget");
    k.ledger()
        .reserve(hold("carol", Some("s1")))
        .await
        .expect("one call in s1 today");
    assert!(
        denied(k.ledger().reserve(hold("carol", Some("s1"))).await),
        "with the live hold, two"
    );
    k.ledger()
        .reserve(hold("dave", None))
        .await
        .expect("one call this month");
    assert!(denied(k.ledger().reserve(hold("dave", None)).await));
}

/// A new database gets 2 KiB pages; one created with 4 KiB pages (every database before them)
/// keeps its page size — a WAL database cannot change it — and still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_databases_get_small_pages_and_old_ones_keep_theirs() {
    let page_size = |path: &Path| -> i64 {
        rusqlite::Connection::open(path)
            .expect("raw")
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page_size")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let new = dir.path().join("new.db");
    drop(Database::open(&new).await.expect("create"));
    assert_eq!(page_size(&new), 2048);

    let old = dir.path().join("old.db");
    previous_schema(&old, BUDGET_TOTALS).await;
    rusqlite::Connection::open(&old)
        .expect("raw")
        .execute("DELETE FROM _sqlx_migrations WHERE version = ?", [BUDGET_TOTALS])
        .expect("unmark");
    assert_eq!(
        page_size(&old),
        4096,
        "sqlx's default when the previous schema was made"
    );
    let db = Database::open_with(&old, Durability::Normal).await.expect("open old");
    assert_eq!(page_size(&old), 4096);
    governed_call(&runtime(&db)).await;
}
