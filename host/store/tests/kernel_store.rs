//! The kernel store conformance suite and SQLite-specific checks, on real database files.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::Duration;
use keel_kernel::action::{ActionState, ActionType, NewAction, Resolution, ToolCallRef};
use keel_kernel::clock::{Clock, SystemClock};
use keel_kernel::conformance::{self, kernel_with_clock};
use keel_kernel::job::{JobState, NewJob};
use keel_kernel::ledger::{LedgerKind, NewLedgerEvent, Usage, UsageQuery};
use keel_kernel::store::KernelStore;
use keel_kernel::{Kernel, KernelConfig};
use keel_store::{Database, SqliteKernelStore};
use rust_decimal::Decimal;
use serde_json::json;

/// A fresh database file per check, under cargo's per-target scratch dir (kept for inspection,
/// recreated on the next run).
async fn sqlite_store(check: &'static str) -> Arc<dyn KernelStore> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("keel-store-conformance");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(format!("{check}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let db = Database::open(&path).await.expect("open");
    Arc::new(SqliteKernelStore::new(&db))
}

mod conformance_suite {
    use super::sqlite_store;
    keel_kernel::conformance_tests!(sqlite_store);
}

/// The whole suite in sequence on temp-file databases (as a downstream backend would run it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_passes_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = AtomicUsize::new(0);
    conformance::run_all(|| {
        let path = dir.path().join(format!("keel-{}.db", n.fetch_add(1, Ordering::SeqCst)));
        async move {
            let db = Database::open(&path).await.expect("open");
            Arc::new(SqliteKernelStore::new(&db)) as Arc<dyn KernelStore>
        }
    })
    .await;
}

/// Two independent pools on one file behave like two processes: the constraints and
/// `BEGIN IMMEDIATE` serialize them, not in-process locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pools_on_one_file_cannot_overspend_or_double_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let a = Database::open(&path).await.expect("open a");
    let b = Database::open(&path).await.expect("open b");
    let (ka, _) = kernel_with_clock(Arc::new(a.kernel_store()));
    let (kb, _) = kernel_with_clock(Arc::new(b.kernel_store()));

    let mut budget = keel_kernel::ledger::Budget::new("t", "edge", keel_kernel::ledger::BudgetWindow::Total);
    budget.limits.max_cost = Some(Decimal::new(500, 2));
    ka.ledger().put_budget(budget).await.expect("put");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let k = if i % 2 == 0 { ka.clone() } else { kb.clone() };
        tasks.push(tokio::spawn(async move {
            let req = keel_kernel::services::HoldRequest {
                tenant: "t".into(),
                principal: None,
                session: None,
                job_id: None,
                amount: Usage::cost(Decimal::new(50, 2)),
                ttl: None,
            };
            k.ledger().reserve(req).await.is_ok()
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += usize::from(t.await.expect("join"));
    }
    assert_eq!(granted, 10, "5.00 / 0.50");

    let job = ka
        .jobs()
        .create(NewJob::new("t", "agent"))
        .await
        .expect("create")
        .job
        .id;
    ka.jobs().start(job).await.expect("start");
    let action = ka
        .actions()
        .create(NewAction {
            job_id: job,
            action_type: ActionType::Confirm,
            title: "ok?".into(),
            request: json!({}),
            call: None,
            ttl: Duration::hours(1),
        })
        .await
        .expect("action");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let k = if i % 2 == 0 { ka.clone() } else { kb.clone() };
        let token = action.token.clone();
        tasks.push(tokio::spawn(async move {
            k.actions()
                .resolve_by_token(&token, Resolution::approve(true))
                .await
                .is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.expect("join"));
    }
    assert_eq!(ok, 1);
}

/// A job waiting for approval survives closing and reopening the database; a waiter attached
/// after the reopen is woken by the resolution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_job_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let args = json!({"path": "/tmp/out.txt"});
    let (job, token, action_id) = {
        let db = Database::open(&path).await.expect("open");
        let (k, _) = kernel_with_clock(Arc::new(db.kernel_store()));
        let job = k.jobs().create(NewJob::new("t", "agent")).await.expect("create").job.id;
        k.jobs().start(job).await.expect("start");
        let created = k
            .actions()
            .create(NewAction {
                job_id: job,
                action_type: ActionType::Approval,
                title: "write?".into(),
                request: json!({}),
                call: Some(ToolCallRef {
                    tool: "fs/write".into(),
                    arguments: args.clone(),
                }),
                ttl: Duration::hours(1),
            })
            .await
            .expect("action");
        db.pool().close().await;
        (job, created.token, created.action.id)
    };
    let db = Database::open(&path).await.expect("reopen");
    let (k, _) = kernel_with_clock(Arc::new(db.kernel_store()));
    assert_eq!(
        k.jobs().get("t", job).await.expect("get").state,
        JobState::WaitingAction
    );
    assert_eq!(
        k.actions().list_pending("t", Some(job)).await.expect("pending").len(),
        1
    );
    let waiter = {
        let k = k.clone();
        tokio::spawn(async move { k.actions().wait_for_resolution(action_id).await })
    };
    k.actions()
        .resolve_by_token(&token, Resolution::approve(true))
        .await
        .expect("resolve");
    let action = waiter.await.expect("join").expect("wait");
    assert_eq!(action.state, ActionState::Resolved);
    assert!(action.authorizes("fs/write", &args));
    assert_eq!(k.jobs().get("t", job).await.expect("get").state, JobState::Running);
}

/// Costs are stored as exact integers, the token never hits the disk, the ledger is append-only.
#[tokio::test]
async fn storage_representation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::open(&dir.path().join("keel.db")).await.expect("open");
    let (k, clock) = kernel_with_clock(Arc::new(db.kernel_store()));
    let mut e = NewLedgerEvent::new(LedgerKind::ModelUsage, "t", clock.now());
    e.usage.cost = "0.123456789".parse().expect("decimal");
    k.ledger().record(e.clone()).await.expect("record");
    k.ledger().record(e).await.expect("record");
    let (typ, nanos): (String, i64) =
        sqlx::query_as("SELECT typeof(cost_nanos), cost_nanos FROM ledger_events LIMIT 1")
            .fetch_one(db.pool())
            .await
            .expect("row");
    assert_eq!((typ.as_str(), nanos), ("integer", 123_456_789));
    let usage = k
        .ledger()
        .usage(&UsageQuery {
            tenant: "t".into(),
            ..Default::default()
        })
        .await
        .expect("usage");
    assert_eq!(usage.cost.to_string(), "0.246913578");

    let err = sqlx::query("UPDATE ledger_events SET cost_nanos = 0")
        .execute(db.pool())
        .await;
    assert!(err.is_err(), "ledger rows cannot be updated");
    let err = sqlx::query("DELETE FROM ledger_events").execute(db.pool()).await;
    assert!(err.is_err(), "ledger rows cannot be deleted");

    let job = k.jobs().create(NewJob::new("t", "agent")).await.expect("create").job.id;
    k.jobs().start(job).await.expect("start");
    let created = k
        .actions()
        .create(NewAction {
            job_id: job,
            action_type: ActionType::Input,
            title: "name?".into(),
            request: json!({}),
            call: None,
            ttl: Duration::minutes(1),
        })
        .await
        .expect("action");
    let dump: Vec<(String,)> = sqlx::query_as("SELECT token_hash FROM actions")
        .fetch_all(db.pool())
        .await
        .expect("rows");
    assert_eq!(dump.len(), 1);
    assert_ne!(dump[0].0, created.token);
    let hits: (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM actions WHERE instr(request_json || title || token_hash, ?) > 0")
            .bind(created.token.clone())
            .fetch_one(db.pool())
            .await
            .expect("count");
    assert_eq!(hits.0, 0, "the token is stored nowhere");
}

/// With `action_recheck_ms`, a waiter in one "process" sees a resolution committed by another
/// process (a second pool on the same file, with its own event bus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_sees_resolution_from_another_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let a = Database::open(&path).await.expect("open a");
    let b = Database::open(&path).await.expect("open b");
    let config = KernelConfig {
        action_recheck_ms: Some(10),
        ..KernelConfig::default()
    };
    let ka = Kernel::with_clock(Arc::new(a.kernel_store()), Arc::new(SystemClock), config);
    let kb = Kernel::new(Arc::new(b.kernel_store()));
    let job = ka
        .jobs()
        .create(NewJob::new("t", "agent"))
        .await
        .expect("create")
        .job
        .id;
    ka.jobs().start(job).await.expect("start");
    let created = ka
        .actions()
        .create(NewAction {
            job_id: job,
            action_type: ActionType::Confirm,
            title: "ok?".into(),
            request: json!({}),
            call: None,
            ttl: Duration::hours(1),
        })
        .await
        .expect("action");
    let waiter = {
        let ka = ka.clone();
        let id = created.action.id;
        tokio::spawn(async move { ka.actions().wait_for_resolution(id).await })
    };
    kb.actions()
        .resolve_by_token(&created.token, Resolution::approve(true))
        .await
        .expect("resolve in the other process");
    let action = waiter.await.expect("join").expect("wait");
    assert_eq!(action.state, ActionState::Resolved);
}
