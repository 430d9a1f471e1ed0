//! The store conformance suite (feature `conformance`). Every [`KernelStore`] implementation
//! must pass it: the in-memory store runs it in keel-kernel's tests, the SQLite store in
//! keel-store's, and a future PostgreSQL store will run the same functions.
//!
//! Usage: `keel_kernel::conformance::run_all(|| async { Arc::new(MyStore::new()) as Arc<dyn KernelStore> }).await;`
//! from a multi-threaded tokio test (the concurrency checks spawn tasks). Each check gets a
//! fresh store from the factory. Checks panic with a description on failure.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::json;
use uuid::Uuid;

use crate::action::{ActionState, ActionType, NewAction, Resolution, ToolCallRef, hash_token};
use crate::clock::{Clock, ManualClock};
use crate::error::KernelError;
use crate::event::{EventFilter, EventQuery, EventType};
use crate::job::{Job, JobError, JobFilter, JobState, NewJob};
use crate::ledger::{
    Budget, BudgetOutcome, BudgetWindow, ExceedStrategy, LedgerKind, LedgerQuery, NewLedgerEvent, ReservationState,
    ReserveRequest, SettleRequest, Usage, UsageQuery,
};
use crate::registry::{PluginRecord, PluginRegistry, PluginStamp};
use crate::services::{HoldRequest, Kernel, KernelConfig, SettleDetails};
use crate::store::{
    Batch, ClaimRequest, HoldWrite, JobWrite, KernelStore, LeaseClaim, LeaseGuard, NewJournalEntry, PolicyText,
    StoreError,
};

/// A start instant for the manual clock (mid-month, mid-day, so windows are unambiguous).
pub fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 15, 12, 0, 0)
        .single()
        .unwrap_or_else(Utc::now)
}

/// A kernel over `store` with a manual clock at [`epoch`].
pub fn kernel_with_clock(store: Arc<dyn KernelStore>) -> (Kernel, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(epoch()));
    (Kernel::with_clock(store, clock.clone(), KernelConfig::default()), clock)
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or_else(|e| panic!("bad decimal {s}: {e}"))
}

/// The ids of the jobs `f` lists, in the store's order.
async fn listed_ids(k: &Kernel, f: &JobFilter) -> Vec<Uuid> {
    k.jobs().list(f).await.expect("list").iter().map(|j| j.id).collect()
}

async fn running_job(k: &Kernel, tenant: &str) -> Uuid {
    let job = k.jobs().create(NewJob::new(tenant, "agent")).await.expect("create").job;
    k.jobs().start(job.id).await.expect("start");
    job.id
}

fn approval(job_id: Uuid, tool: &str, args: serde_json::Value, ttl: Duration) -> NewAction {
    NewAction {
        job_id,
        action_type: ActionType::Approval,
        title: format!("run {tool}?"),
        request: json!({}),
        call: Some(ToolCallRef {
            tool: tool.into(),
            arguments: args,
        }),
        ttl,
    }
}

/// Run every check in order, each on a fresh store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn KernelStore>>,
{
    job_lifecycle(make().await).await;
    idempotency(make().await).await;
    optimistic_concurrency(make().await).await;
    list_count_and_tenant_isolation(make().await).await;
    cancel_cascades(make().await).await;
    children_race_parent_cancel(make().await).await;
    deadline_sweep(make().await).await;
    approvals_and_tokens(make().await).await;
    action_expiry(make().await).await;
    wait_for_resolution(make().await).await;
    events(make().await).await;
    ledger_and_budgets(make().await).await;
    budget_windows_and_subjects(make().await).await;
    budget_counts_what_came_before_it(make().await).await;
    usage_past_what_a_counter_holds(make().await).await;
    reservation_expiry(make().await).await;
    concurrent_reservations(make().await).await;
    concurrent_idempotency(make().await).await;
    concurrent_token_resolution(make().await).await;
    concurrent_job_writers(make().await).await;
    journal_atomicity(make().await).await;
    lease_claiming(make().await).await;
    concurrent_resolves(make().await).await;
    settle_is_bounded_by_the_hold(make().await).await;
    create_leased(make().await).await;
    idempotency_request_hash(make().await).await;
    hold_extension(make().await).await;
    batch_holds_and_leases(make().await).await;
    policy_texts(make().await).await;
}

/// Expand to one `#[tokio::test]` per conformance check, so a failure names the check.
/// `$make` is an async function (or closure) `fn(&'static str) -> Arc<dyn KernelStore>` called
/// with the check's name, e.g. to name a database file. The caller needs `tokio` (macros,
/// multi-threaded runtime) as a dev-dependency.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            job_lifecycle, idempotency, optimistic_concurrency, list_count_and_tenant_isolation,
            cancel_cascades, children_race_parent_cancel, deadline_sweep, approvals_and_tokens, action_expiry, wait_for_resolution,
            events, ledger_and_budgets, budget_windows_and_subjects, budget_counts_what_came_before_it,
            usage_past_what_a_counter_holds, reservation_expiry,
            concurrent_reservations, concurrent_idempotency, concurrent_token_resolution,
            concurrent_job_writers, journal_atomicity, lease_claiming, concurrent_resolves,
            settle_is_bounded_by_the_hold, create_leased, idempotency_request_hash, hold_extension,
            batch_holds_and_leases, policy_texts);
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let store = ($make)(stringify!($name)).await;
                $crate::conformance::$name(store).await;
            }
        )*
    };
}

/// Create -> start -> progress -> wait -> resume -> complete, with round-trips, the transition
/// table and the event stream.
pub async fn job_lifecycle(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let mut new = NewJob::new("t1", "agent");
    new.principal = Some("alice".into());
    new.session = Some("s1".into());
    new.run_id = Some(Uuid::now_v7());
    new.input = json!({"prompt": "hi", "n": [1, 2.5, null]}).into();
    new.tags = vec!["a".into(), "b".into()];
    new.metadata = json!({"k": "v"}).into();
    new.deadline = Some(epoch() + Duration::hours(1));
    let created = k.jobs().create(new).await.expect("create");
    assert!(created.created);
    let job = created.job;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.version, 1);
    assert_eq!(
        k.jobs().get("t1", job.id).await.expect("get"),
        job,
        "job round-trips exactly"
    );

    let err = k
        .jobs()
        .complete(job.id, None)
        .await
        .expect_err("QUEUED -> SUCCEEDED is illegal");
    assert!(
        matches!(
            err,
            KernelError::IllegalTransition {
                from: JobState::Queued,
                to: JobState::Succeeded,
                ..
            }
        ),
        "{err}"
    );

    clock.advance(Duration::seconds(1));
    let started = k.jobs().start(job.id).await.expect("start");
    assert_eq!(started.state, JobState::Running);
    assert_eq!(started.started_at, Some(epoch() + Duration::seconds(1)));
    let p = k
        .jobs()
        .progress(job.id, 0.5, Some("half".into()))
        .await
        .expect("progress");
    assert_eq!((p.progress, p.progress_message.as_deref()), (0.5, Some("half")));
    let t = k.jobs().record_turn(job.id, 3).await.expect("turn");
    assert_eq!((t.turns, t.tool_calls), (1, 3));
    k.jobs().wait_for_action(job.id).await.expect("wait");
    k.jobs().resume(job.id).await.expect("resume");
    let done = k
        .jobs()
        .complete(job.id, Some("artifact://r1".into()))
        .await
        .expect("complete");
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.result_ref.as_deref(), Some("artifact://r1"));
    assert!(done.finished_at.is_some());
    assert_eq!(
        k.jobs().get("t1", job.id).await.expect("get"),
        done,
        "stored row equals returned row"
    );
    let err = k.jobs().start(job.id).await.expect_err("terminal");
    assert!(matches!(err, KernelError::IllegalTransition { .. }));
    let err = k.jobs().cancel(job.id, "late").await.expect_err("terminal");
    assert!(matches!(err, KernelError::IllegalTransition { .. }));

    let events = k
        .read_events(&EventQuery {
            filter: EventFilter::job(job.id),
            ..Default::default()
        })
        .await
        .expect("events");
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(
        types,
        [
            EventType::JobStatusChanged,
            EventType::JobStarted,
            EventType::Progress,
            EventType::JobStatusChanged,
            EventType::JobStatusChanged,
            EventType::JobCompleted
        ]
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "per-job sequence is 1.. without gaps");

    let failing = running_job(&k, "t1").await;
    let pending = k
        .actions()
        .create(approval(failing, "x/y", json!({}), Duration::minutes(5)))
        .await
        .expect("action");
    let failed = k
        .jobs()
        .fail(
            failing,
            JobError {
                code: "tool_failed".into(),
                message: "boom".into(),
            },
        )
        .await
        .expect("fail");
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.error.as_ref().map(|e| e.code.as_str()), Some("tool_failed"));
    assert_eq!(
        k.actions().get("t1", pending.action.id).await.expect("get").state,
        ActionState::Cancelled,
        "failing a job withdraws its pending actions"
    );

    // The execution context is checkpointed with the job and survives the store.
    let mut ctx = crate::context::ExecutionContext::new("t1").with_principal("alice");
    ctx.budget.max_cost = Some(dec("2.5"));
    let from_ctx = k
        .jobs()
        .create(NewJob::from_context(&ctx, "agent"))
        .await
        .expect("create");
    let stored = k.jobs().get("t1", from_ctx.job.id).await.expect("get");
    let restored = stored.context().expect("context checkpointed");
    assert_eq!(restored, ctx.clone().with_job(stored.id));
    assert_eq!(stored.run_id, Some(ctx.run_id));
}

/// The same idempotency key in the same tenant returns the first job; other tenants are separate.
pub async fn idempotency(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let mut new = NewJob::new("t1", "agent");
    new.idempotency_key = Some("key-1".into());
    let a = k.jobs().create(new.clone()).await.expect("first");
    let b = k.jobs().create(new.clone()).await.expect("second");
    assert!(a.created && !b.created);
    assert_eq!(a.job.id, b.job.id);
    new.tenant = "t2".into();
    let c = k.jobs().create(new).await.expect("other tenant");
    assert!(c.created);
    assert_ne!(c.job.id, a.job.id);
    assert_eq!(
        k.jobs()
            .by_idempotency_key("t1", "key-1")
            .await
            .expect("by key")
            .map(|j| j.id),
        Some(a.job.id)
    );
    assert_eq!(k.jobs().by_idempotency_key("t1", "nope").await.expect("by key"), None);
}

/// A write with a stale version is refused and applies nothing (not even its events).
pub async fn optimistic_concurrency(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store.clone());
    let id = running_job(&k, "t1").await;
    let job = k.jobs().get("t1", id).await.expect("get");
    let mut a = job.clone();
    a.version += 1;
    a.progress = 0.25;
    let mut b = job.clone();
    b.version += 1;
    b.progress = 0.75;
    let event = |p: f64| crate::event::NewEvent {
        job_id: id,
        tenant: "t1".into(),
        event_type: EventType::Progress,
        data: json!({ "progress": p }).into(),
        at: epoch(),
    };
    let first = Batch {
        jobs: vec![JobWrite {
            job: a,
            expected_version: Some(job.version),
        }],
        actions: vec![],
        events: vec![event(0.25)],
        ..Batch::default()
    };
    let second = Batch {
        jobs: vec![JobWrite {
            job: b,
            expected_version: Some(job.version),
        }],
        actions: vec![],
        events: vec![event(0.75)],
        ..Batch::default()
    };
    store.commit(first).await.expect("first writer wins");
    let err = store
        .commit(second)
        .await
        .expect_err("second writer must not overwrite");
    assert!(matches!(err, StoreError::Conflict { entity: "job", .. }), "{err}");
    let stored = k.jobs().get("t1", id).await.expect("get");
    assert_eq!(stored.progress, 0.25);
    assert_eq!(stored.version, job.version + 1);
    // What is fixed at insert stays as inserted, whatever an update carries.
    let mut rewrite = stored.clone();
    rewrite.version += 1;
    rewrite.tenant = "t2".into();
    rewrite.kind = "other".into();
    rewrite.principal = Some("mallory".into());
    rewrite.input = json!({ "rewritten": true }).into();
    rewrite.created_at = epoch() + chrono::Duration::days(1);
    rewrite.progress = 0.5;
    store
        .commit(Batch {
            jobs: vec![JobWrite {
                job: rewrite,
                expected_version: Some(stored.version),
            }],
            ..Batch::default()
        })
        .await
        .expect("update");
    let kept = k.jobs().get("t1", id).await.expect("still the tenant's job");
    assert_eq!(kept.progress, 0.5, "the update applied");
    assert_eq!(
        (&kept.tenant, &kept.kind, &kept.principal, &kept.input, kept.created_at),
        (&job.tenant, &job.kind, &job.principal, &job.input, job.created_at),
        "fixed at insert"
    );
    let stored = kept;
    let events = k
        .read_events(&EventQuery {
            filter: EventFilter::job(id),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(
        events.iter().filter(|e| e.event_type == EventType::Progress).count(),
        1,
        "the losing batch's event is not persisted"
    );
    // Inserting an existing id is a conflict too.
    let err = store
        .commit(Batch {
            jobs: vec![JobWrite {
                job: stored,
                expected_version: None,
            }],
            ..Batch::default()
        })
        .await;
    assert!(matches!(err, Err(StoreError::Conflict { .. })));
}

/// List and count with filters; tenants never see each other's jobs.
pub async fn list_count_and_tenant_isolation(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let mut ids = Vec::new();
    for i in 0..5 {
        clock.advance(Duration::seconds(1));
        let mut new = NewJob::new("t1", if i % 2 == 0 { "agent" } else { "tool" });
        new.principal = Some(if i < 3 { "alice".into() } else { "bob".into() });
        new.tags = vec![format!("n{i}")];
        ids.push(k.jobs().create(new).await.expect("create").job.id);
    }
    k.jobs().create(NewJob::new("t2", "agent")).await.expect("create t2");
    k.jobs().start(ids[0]).await.expect("start");
    let all = k.jobs().list(&JobFilter::tenant("t1")).await.expect("list");
    assert_eq!(all.len(), 5);
    assert_eq!(
        all.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids.iter().rev().copied().collect::<Vec<_>>(),
        "newest first"
    );
    assert_eq!(k.jobs().count(&JobFilter::tenant("t1")).await.expect("count"), 5);
    assert_eq!(k.jobs().count(&JobFilter::tenant("t2")).await.expect("count"), 1);
    let f = JobFilter {
        states: vec![JobState::Running],
        ..JobFilter::tenant("t1")
    };
    assert_eq!(listed_ids(&k, &f).await, [ids[0]]);
    let f = JobFilter {
        principal: Some("bob".into()),
        ..JobFilter::tenant("t1")
    };
    assert_eq!(k.jobs().count(&f).await.expect("count"), 2);
    let f = JobFilter {
        kind: Some("tool".into()),
        ..JobFilter::tenant("t1")
    };
    assert_eq!(k.jobs().count(&f).await.expect("count"), 2);
    let f = JobFilter {
        tag: Some("n3".into()),
        ..JobFilter::tenant("t1")
    };
    assert_eq!(listed_ids(&k, &f).await, [ids[3]]);
    let f = JobFilter {
        limit: Some(2),
        ..JobFilter::tenant("t1")
    };
    assert_eq!(k.jobs().list(&f).await.expect("list").len(), 2);
    assert_eq!(k.jobs().count(&f).await.expect("count"), 5, "count ignores limit");
    // Pages by seek: after the second newest job come the three older ones, newest first.
    let second = &all[1];
    let f = JobFilter {
        before: Some((second.created_at, second.id)),
        ..JobFilter::tenant("t1")
    };
    assert_eq!(
        listed_ids(&k, &f).await,
        ids[..3].iter().rev().copied().collect::<Vec<_>>(),
        "a page starts right after its cursor"
    );
    assert!(
        matches!(k.jobs().get("t2", ids[0]).await, Err(KernelError::JobNotFound(_))),
        "cross-tenant get is not found"
    );
}

/// Cancelling a parent cancels its whole subtree and their pending actions, in one go.
pub async fn cancel_cascades(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let parent = running_job(&k, "t1").await;
    let mut c = NewJob::new("t1", "child");
    c.parent_id = Some(parent);
    let child = k.jobs().create(c).await.expect("child").job.id;
    k.jobs().start(child).await.expect("start child");
    let mut g = NewJob::new("t1", "grandchild");
    g.parent_id = Some(child);
    let grandchild = k.jobs().create(g).await.expect("grandchild").job.id;
    let mut d = NewJob::new("t1", "done-child");
    d.parent_id = Some(parent);
    let done_child = k.jobs().create(d).await.expect("done child").job.id;
    k.jobs().start(done_child).await.expect("start");
    k.jobs().complete(done_child, None).await.expect("complete");
    let action = k
        .actions()
        .create(approval(child, "fs/write", json!({"p": 1}), Duration::minutes(5)))
        .await
        .expect("action");
    let token = k.jobs().cancellation_token(grandchild);

    let mut c = NewJob::new("t1", "bad-parent");
    c.parent_id = Some(parent);
    c.tenant = "t2".into();
    assert!(
        k.jobs().create(c).await.is_err(),
        "a parent in another tenant is refused"
    );

    let cancelled = k.jobs().cancel(parent, "user asked").await.expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);
    for id in [child, grandchild] {
        assert_eq!(k.jobs().get("t1", id).await.expect("get").state, JobState::Cancelled);
    }
    assert_eq!(
        k.jobs().get("t1", done_child).await.expect("get").state,
        JobState::Succeeded,
        "finished children stay finished"
    );
    assert_eq!(
        k.actions().get("t1", action.action.id).await.expect("get").state,
        ActionState::Cancelled
    );
    assert!(token.is_cancelled(), "in-process token fired");
    let children = JobFilter {
        parent_id: Some(parent),
        ..JobFilter::tenant("t1")
    };
    assert_eq!(k.jobs().count(&children).await.expect("count"), 2);
}

/// A finished parent gets no children, and children created while the parent is being cancelled
/// either fail or end up cancelled with it: never an orphan left QUEUED under a cancelled parent.
pub async fn children_race_parent_cancel(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let parent = running_job(&k, "t1").await;
    let creators: Vec<_> = (0..24)
        .map(|i| {
            let k = k.clone();
            tokio::spawn(async move {
                let mut child = NewJob::new("t1", "child");
                child.parent_id = Some(parent);
                child.idempotency_key = Some(format!("child-{i}"));
                k.jobs().create(child).await.map(|created| created.job.id)
            })
        })
        .collect();
    let canceller = {
        let k = k.clone();
        tokio::spawn(async move { k.jobs().cancel(parent, "racing children").await })
    };
    let mut created = Vec::new();
    for creator in creators {
        if let Ok(id) = creator.await.expect("join") {
            created.push(id);
        }
    }
    canceller.await.expect("join").expect("cancel wins eventually");
    for id in created {
        let state = k.jobs().get("t1", id).await.expect("get").state;
        assert_eq!(
            state,
            JobState::Cancelled,
            "child {id} of a cancelled parent must be cancelled"
        );
    }
    let mut late = NewJob::new("t1", "late-child");
    late.parent_id = Some(parent);
    assert!(
        k.jobs().create(late).await.is_err(),
        "a finished parent gets no children"
    );
}

/// The sweeper times out past-deadline jobs (not just on read).
pub async fn deadline_sweep(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let mut new = NewJob::new("t1", "agent");
    new.deadline = Some(epoch() + Duration::seconds(30));
    let late = k.jobs().create(new).await.expect("create").job.id;
    k.jobs().start(late).await.expect("start");
    let mut new = NewJob::new("t1", "agent");
    new.deadline = Some(epoch() + Duration::hours(1));
    let fine = k.jobs().create(new).await.expect("create").job.id;

    let report = k.recover_and_sweep(clock.now()).await.expect("sweep");
    assert_eq!(report.jobs_timed_out, 0);
    clock.advance(Duration::seconds(31));
    let mut sub = k.subscribe(EventFilter::job(late));
    let report = k.recover_and_sweep(clock.now()).await.expect("sweep");
    assert_eq!(report.jobs_timed_out, 1);
    let job = k.jobs().get("t1", late).await.expect("get");
    assert_eq!(job.state, JobState::TimedOut);
    assert_eq!(job.error.as_ref().map(|e| e.code.as_str()), Some("deadline_exceeded"));
    assert_eq!(k.jobs().get("t1", fine).await.expect("get").state, JobState::Queued);
    let ev = sub.recv().await.expect("live event");
    assert_eq!(
        (
            ev.event_type,
            ev.data.field("to").and_then(|v| v.as_str().map(str::to_owned))
        ),
        (EventType::JobStatusChanged, Some("TIMED_OUT".to_owned()))
    );
    assert_eq!(
        k.recover_and_sweep(clock.now()).await.expect("sweep").jobs_timed_out,
        0,
        "idempotent"
    );
}

/// Approvals: job waits, token is single-use and hashed, approval bound to the exact call.
pub async fn approvals_and_tokens(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store.clone());
    let job = running_job(&k, "t1").await;
    let args = json!({"path": "/tmp/x", "mode": "w"});
    let err = k
        .actions()
        .create(NewAction {
            call: None,
            ..approval(job, "fs/write", args.clone(), Duration::minutes(5))
        })
        .await
        .expect_err("approval without a call");
    assert!(matches!(err, KernelError::Invalid(_)));
    let created = k
        .actions()
        .create(approval(job, "fs/write", args.clone(), Duration::minutes(5)))
        .await
        .expect("create");
    let action = created.action.clone();
    assert_eq!(action.state, ActionState::Pending);
    assert_eq!(created.token.len(), 64);
    assert_eq!(action.token_hash, hash_token(&created.token));
    assert_ne!(action.token_hash, created.token, "token stored only as a hash");
    assert_eq!(
        k.jobs().get("t1", job).await.expect("get").state,
        JobState::WaitingAction,
        "same transaction"
    );
    assert_eq!(
        k.actions().list_pending("t1", Some(job)).await.expect("pending").len(),
        1
    );
    assert_eq!(k.actions().list_pending("t1", None).await.expect("pending").len(), 1);
    assert_eq!(k.actions().list_pending("t2", None).await.expect("pending").len(), 0);
    let stored = store.get_action(action.id).await.expect("get").expect("exists");
    assert_eq!(stored, action, "action round-trips exactly");

    // A second action on the same job: resolving the first must not resume the job yet.
    let second = k
        .actions()
        .create(NewAction {
            job_id: job,
            action_type: ActionType::Choose,
            title: "pick".into(),
            request: json!({"options": ["a", "b"]}),
            call: None,
            ttl: Duration::minutes(5),
        })
        .await
        .expect("second");

    assert!(matches!(
        k.actions()
            .resolve_by_token(&"0".repeat(64), Resolution::approve(true))
            .await,
        Err(KernelError::InvalidToken)
    ));
    let mut wrong = Resolution::approve(true);
    wrong.call_digest = Some(crate::canonical::call_digest(
        "fs/write",
        &json!({"path": "/etc/passwd"}),
    ));
    assert!(matches!(
        k.actions().resolve_by_token(&created.token, wrong).await,
        Err(KernelError::CallDigestMismatch(_))
    ));
    assert!(matches!(
        k.actions()
            .resolve_by_token(&created.token, Resolution::value(json!(1)))
            .await,
        Err(KernelError::Invalid(_))
    ));

    let mut ok = Resolution::approve(true);
    ok.resolved_by = Some("alice".into());
    ok.call_digest = action.call_digest.clone();
    let resolved = k.actions().resolve_by_token(&created.token, ok).await.expect("resolve");
    assert_eq!(resolved.state, ActionState::Resolved);
    assert_eq!(
        k.jobs().get("t1", job).await.expect("get").state,
        JobState::WaitingAction,
        "another action still pending"
    );
    let again = k
        .actions()
        .resolve_by_token(&created.token, Resolution::approve(true))
        .await;
    assert!(
        matches!(
            again,
            Err(KernelError::ActionNotPending {
                state: ActionState::Resolved,
                ..
            })
        ),
        "single use"
    );

    // Bound to the exact call: key order does not matter, anything else does.
    let reordered = json!({"mode": "w", "path": "/tmp/x"});
    assert!(resolved.authorizes("fs/write", &reordered));
    assert!(!resolved.authorizes("fs/write", &json!({"path": "/tmp/y", "mode": "w"})));
    assert!(!resolved.authorizes("fs/delete", &args));
    k.actions()
        .verify_approval("t1", action.id, "fs/write", &args)
        .await
        .expect("verify");
    assert!(matches!(
        k.actions().verify_approval("t1", action.id, "fs/delete", &args).await,
        Err(KernelError::CallDigestMismatch(_))
    ));

    k.actions()
        .resolve_by_token(&second.token, Resolution::value(json!("a")))
        .await
        .expect("resolve second");
    assert_eq!(
        k.jobs().get("t1", job).await.expect("get").state,
        JobState::Running,
        "last resolution resumes the job"
    );

    // A rejected approval does not authorize.
    let third = k
        .actions()
        .create(approval(job, "fs/write", args.clone(), Duration::minutes(5)))
        .await
        .expect("third");
    let rejected = k
        .actions()
        .resolve("t1", third.action.id, Resolution::approve(false))
        .await
        .expect("reject");
    assert!(!rejected.authorizes("fs/write", &args));
    assert!(matches!(
        k.actions()
            .resolve("t2", third.action.id, Resolution::approve(true))
            .await,
        Err(KernelError::ActionNotFound(_))
    ));

    // Cancelling an action resumes the job too.
    let fourth = k
        .actions()
        .create(approval(job, "fs/write", args, Duration::minutes(5)))
        .await
        .expect("fourth");
    k.actions().cancel("t1", fourth.action.id).await.expect("cancel");
    assert_eq!(k.jobs().get("t1", job).await.expect("get").state, JobState::Running);
    assert!(matches!(
        k.actions()
            .resolve_by_token(&fourth.token, Resolution::approve(true))
            .await,
        Err(KernelError::ActionNotPending { .. })
    ));
}

/// Expired tokens stop working and time their job out, by token use or by the sweeper.
pub async fn action_expiry(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let job = running_job(&k, "t1").await;
    let a = k
        .actions()
        .create(approval(job, "x/y", json!({}), Duration::seconds(60)))
        .await
        .expect("create");
    clock.advance(Duration::seconds(61));
    let err = k
        .actions()
        .resolve_by_token(&a.token, Resolution::approve(true))
        .await
        .expect_err("expired");
    assert!(matches!(err, KernelError::ActionExpired(_)), "{err}");
    assert_eq!(
        k.actions().get("t1", a.action.id).await.expect("get").state,
        ActionState::Expired
    );
    let j = k.jobs().get("t1", job).await.expect("get");
    assert_eq!(j.state, JobState::TimedOut);
    assert_eq!(j.error.map(|e| e.code), Some("action_expired".to_string()));

    let job2 = running_job(&k, "t1").await;
    let b = k
        .actions()
        .create(approval(job2, "x/y", json!({}), Duration::seconds(60)))
        .await
        .expect("create");
    assert_eq!(
        k.recover_and_sweep(clock.now()).await.expect("sweep").actions_expired,
        0
    );
    clock.advance(Duration::seconds(60));
    let report = k.recover_and_sweep(clock.now()).await.expect("sweep");
    assert_eq!(report.actions_expired, 1);
    assert_eq!(
        k.actions().get("t1", b.action.id).await.expect("get").state,
        ActionState::Expired
    );
    assert_eq!(k.jobs().get("t1", job2).await.expect("get").state, JobState::TimedOut);
    let events = k
        .read_events(&EventQuery {
            filter: EventFilter::job(job2).with_types([EventType::ActionExpired]),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(events.len(), 1);
    assert!(matches!(
        k.actions().resolve_by_token(&b.token, Resolution::approve(true)).await,
        Err(KernelError::ActionNotPending { .. })
    ));
}

/// A waiter wakes on resolution, including one attached by a fresh kernel (a restart).
pub async fn wait_for_resolution(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store.clone());
    let job = running_job(&k, "t1").await;
    let a = k
        .actions()
        .create(approval(job, "x/y", json!({}), Duration::hours(1)))
        .await
        .expect("create");
    // "Restart": a new kernel over the same store knows nothing in memory about the action.
    let (k2, _) = kernel_with_clock(store);
    let waiter = {
        let k2 = k2.clone();
        let id = a.action.id;
        tokio::spawn(async move { k2.actions().wait_for_resolution(id).await })
    };
    let mut sub = k2.subscribe(EventFilter::job(job).with_types([EventType::ActionResolved]));
    // Let the waiter attach; correctness does not depend on it (it re-reads the store).
    tokio::task::yield_now().await;
    k2.actions()
        .resolve_by_token(&a.token, Resolution::approve(true))
        .await
        .expect("resolve");
    let done = waiter.await.expect("join").expect("wait");
    assert_eq!(done.state, ActionState::Resolved);
    assert_eq!(sub.recv().await.expect("event").event_type, EventType::ActionResolved);
    // Already resolved: returns at once.
    assert_eq!(
        k.actions().wait_for_resolution(a.action.id).await.expect("wait").state,
        ActionState::Resolved
    );
}

/// Per-job sequences, resume from a sequence, type filters, live subscription filters.
pub async fn events(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store.clone());
    let mut all = k.subscribe(EventFilter::tenant("t1"));
    let mut tokens_only = k.subscribe(EventFilter::tenant("t1").with_types([EventType::ModelToken]));
    let a = k.jobs().create(NewJob::new("t1", "agent")).await.expect("a").job.id;
    let b = k.jobs().create(NewJob::new("t1", "agent")).await.expect("b").job.id;
    let other = k.jobs().create(NewJob::new("t2", "agent")).await.expect("t2").job.id;
    for i in 0..3 {
        k.jobs()
            .emit(a, EventType::ModelToken, json!({ "text": format!("a{i}") }))
            .await
            .expect("emit");
        k.jobs()
            .emit(b, EventType::ModelToken, json!({ "text": format!("b{i}") }))
            .await
            .expect("emit");
    }
    k.jobs()
        .emit(other, EventType::ModelToken, json!({}))
        .await
        .expect("emit");
    let read = |job: Uuid, after_seq: u64| EventQuery {
        filter: EventFilter::job(job),
        after_seq,
        ..Default::default()
    };
    let ea = k.read_events(&read(a, 0)).await.expect("read");
    assert_eq!(ea.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(ea.windows(2).all(|w| w[0].id < w[1].id));
    let resumed = k.read_events(&read(a, 2)).await.expect("read");
    assert_eq!(resumed.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(resumed[0].data.value()["text"], "a1");
    let eb = k.read_events(&read(b, 0)).await.expect("read");
    assert_eq!(
        eb.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "sequences are per job"
    );
    let q = EventQuery {
        filter: EventFilter::tenant("t1").with_types([EventType::ModelToken]),
        limit: Some(4),
        ..Default::default()
    };
    let page = k.read_events(&q).await.expect("read");
    assert_eq!(page.len(), 4);
    let q2 = EventQuery {
        after_id: page[3].id,
        ..q
    };
    assert_eq!(k.read_events(&q2).await.expect("read").len(), 2, "store-wide cursor");
    assert_eq!(
        k.read_events(&EventQuery {
            filter: EventFilter::tenant("t2"),
            ..Default::default()
        })
        .await
        .expect("read")
        .len(),
        2
    );

    // One batch's events, a run of one job longer than a store may write at once and another
    // job's in between: what the commit returns is what was stored, ids and sequences included.
    let at = clock.now();
    let new_event = |job_id: Uuid, tenant: &str, i: usize| crate::event::NewEvent {
        job_id,
        tenant: tenant.into(),
        event_type: EventType::Progress,
        data: json!({ "i": i }).into(),
        at,
    };
    let mut batch_events: Vec<_> = (0..11).map(|i| new_event(other, "t2", i)).collect();
    batch_events.insert(3, new_event(b, "t1", 99));
    let committed = store
        .commit(Batch {
            events: batch_events,
            ..Batch::default()
        })
        .await
        .expect("commit events");
    let stored = k
        .read_events(&EventQuery {
            filter: EventFilter::tenant("t2"),
            after_id: ea[3].id,
            ..Default::default()
        })
        .await
        .expect("read");
    let stored_b = k.read_events(&read(b, 4)).await.expect("read");
    let mut expected: Vec<_> = stored
        .iter()
        .chain(&stored_b)
        .filter(|e| e.event_type == EventType::Progress)
        .cloned()
        .collect();
    expected.sort_by_key(|e| e.id);
    assert_eq!(committed, expected, "the commit returns the stored events");
    assert_eq!(
        committed.iter().map(|e| (e.job_id == b, e.seq)).collect::<Vec<_>>(),
        [
            (false, 3),
            (false, 4),
            (false, 5),
            (true, 5),
            (false, 6),
            (false, 7),
            (false, 8),
            (false, 9),
            (false, 10),
            (false, 11),
            (false, 12),
            (false, 13)
        ],
        "each job's next sequence numbers, in the batch's order"
    );

    let first = all.recv().await.expect("live");
    assert_eq!(
        (first.job_id, first.event_type, first.seq),
        (a, EventType::JobStatusChanged, 1)
    );
    for i in 0..6 {
        let e = tokens_only.recv().await.expect("live");
        assert_eq!(e.event_type, EventType::ModelToken);
        assert_eq!(
            e.data.value()["text"],
            if i % 2 == 0 {
                format!("a{}", i / 2)
            } else {
                format!("b{}", i / 2)
            }
        );
    }
}

/// Reserve -> settle / release, exact decimal costs, warn / deny / degrade.
pub async fn ledger_and_budgets(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let mut budget = Budget::new("t1", "monthly", BudgetWindow::Monthly);
    budget.limits = crate::ledger::BudgetLimits {
        max_cost: Some(dec("1.00")),
        max_tokens: Some(1000),
        max_requests: None,
        max_tool_calls: Some(5),
    };
    k.ledger().put_budget(budget.clone()).await.expect("put");
    assert_eq!(
        k.ledger().budgets("t1").await.expect("list"),
        vec![budget.clone()],
        "budget round-trips"
    );
    assert!(k.ledger().budgets("t2").await.expect("list").is_empty());

    let hold = |cost: &str, tokens: u64| HoldRequest {
        tenant: "t1".into(),
        principal: Some("alice".into()),
        session: None,
        job_id: None,
        amount: Usage {
            tokens,
            cost: dec(cost),
            requests: 1,
            tool_calls: 0,
        },
        ttl: None,
    };
    let r1 = k.ledger().reserve(hold("0.3", 100)).await.expect("reserve");
    assert_eq!(r1.decision.outcome, BudgetOutcome::Allow);
    assert_eq!(r1.reservation.state, ReservationState::Held);
    let actual = Usage {
        tokens: 80,
        cost: dec("0.1"),
        requests: 1,
        tool_calls: 0,
    };
    let details = SettleDetails {
        duration_ms: Some(1200),
        model: Some("m".into()),
        ..Default::default()
    };
    let settled = k
        .ledger()
        .settle(r1.reservation.id, LedgerKind::ModelUsage, actual.clone(), details)
        .await
        .expect("settle");
    assert_eq!(settled.state, ReservationState::Settled);
    assert_eq!(settled.actual, Some(actual.clone()));
    assert!(matches!(
        k.ledger()
            .settle(
                r1.reservation.id,
                LedgerKind::ModelUsage,
                actual.clone(),
                SettleDetails::default()
            )
            .await,
        Err(KernelError::ReservationState { .. })
    ));
    let r2 = k.ledger().reserve(hold("0.2", 10)).await.expect("reserve");
    k.ledger()
        .settle(
            r2.reservation.id,
            LedgerKind::ToolUsage,
            Usage {
                tokens: 0,
                cost: dec("0.2"),
                requests: 0,
                tool_calls: 1,
            },
            SettleDetails::default(),
        )
        .await
        .expect("settle");
    let usage = k
        .ledger()
        .usage(&UsageQuery {
            tenant: "t1".into(),
            ..Default::default()
        })
        .await
        .expect("usage");
    assert_eq!(usage.cost, dec("0.3"), "0.1 + 0.2 is exactly 0.3");
    assert_eq!((usage.tokens, usage.requests, usage.tool_calls), (80, 1, 1));

    // 0.3 used; holding 0.6 reaches 0.9 >= 80% -> warn; then 0.2 more would be 1.1 -> deny.
    let r3 = k.ledger().reserve(hold("0.6", 0)).await.expect("warn still reserves");
    assert_eq!(r3.decision.outcome, BudgetOutcome::Warn);
    let err = k.ledger().reserve(hold("0.2", 0)).await.expect_err("deny");
    match err {
        KernelError::BudgetExceeded(d) => {
            assert_eq!(d.outcome, BudgetOutcome::Deny);
            assert!(
                d.findings
                    .iter()
                    .any(|f| f.metric == "cost" && f.exceeded && f.projected == dec("1.1"))
            );
        }
        e => panic!("expected BudgetExceeded, got {e}"),
    }
    // Releasing the hold frees the budget.
    let released = k
        .ledger()
        .release(r3.reservation.id, "call failed")
        .await
        .expect("release");
    assert_eq!(released.state, ReservationState::Released);
    assert!(matches!(
        k.ledger().release(r3.reservation.id, "again").await,
        Err(KernelError::ReservationState {
            state: ReservationState::Released,
            ..
        })
    ));
    k.ledger().reserve(hold("0.2", 0)).await.expect("fits again");
    assert!(matches!(
        k.ledger().release(Uuid::now_v7(), "x").await,
        Err(KernelError::ReservationNotFound(_))
    ));

    // Degrade strategy allows but says so.
    budget.strategy = ExceedStrategy::Degrade;
    k.ledger().put_budget(budget.clone()).await.expect("replace");
    assert_eq!(k.ledger().budgets("t1").await.expect("list").len(), 1, "put replaces");
    let report = k.ledger().budget_report("t1").await.expect("report");
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].used.cost, dec("0.3"), "settled usage in the window");
    let r = k.ledger().reserve(hold("5", 0)).await.expect("degrade allows");
    assert_eq!(r.decision.outcome, BudgetOutcome::Degrade);

    // Costs finer than the stored precision are refused, not rounded.
    assert!(matches!(
        k.ledger().reserve(hold("0.0000000001", 0)).await,
        Err(KernelError::Invalid(_))
    ));

    // Ledger entries: holds, settles, releases, usage, budget checks, all queryable.
    let entries = k
        .ledger()
        .entries(&LedgerQuery {
            tenant: "t1".into(),
            ..Default::default()
        })
        .await
        .expect("entries");
    let count = |kind: LedgerKind| entries.iter().filter(|e| e.entry.kind == kind).count();
    assert_eq!(count(LedgerKind::Hold), 5);
    assert_eq!(count(LedgerKind::Settle), 2);
    assert_eq!(count(LedgerKind::Release), 1);
    assert_eq!(count(LedgerKind::ModelUsage), 1);
    assert_eq!(count(LedgerKind::ToolUsage), 1);
    assert_eq!(count(LedgerKind::BudgetCheck), 3, "warn, deny and degrade are recorded");
    let model = entries
        .iter()
        .find(|e| e.entry.kind == LedgerKind::ModelUsage)
        .expect("model usage");
    assert_eq!(
        (model.entry.duration_ms, model.entry.model.as_deref()),
        (Some(1200), Some("m"))
    );
    assert_eq!(model.entry.usage, actual);
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id));

    let mut audit = NewLedgerEvent::new(LedgerKind::Audit, "t1", epoch());
    audit.data = json!({"note": "manual"}).into();
    let rec = k.ledger().record(audit.clone()).await.expect("record");
    assert_eq!(rec.entry, audit);
    assert!(k.ledger().delete_budget(budget.id).await.expect("delete"));
    assert!(!k.ledger().delete_budget(budget.id).await.expect("delete"));
}

/// Windows (daily, per-request, total) and subjects (principal, session).
pub async fn budget_windows_and_subjects(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let mut daily = Budget::new("t1", "alice-daily", BudgetWindow::Daily);
    daily.principal = Some("alice".into());
    daily.limits.max_requests = Some(2);
    k.ledger().put_budget(daily).await.expect("put");
    let mut per_request = Budget::new("t1", "per-request", BudgetWindow::PerRequest);
    per_request.limits.max_tokens = Some(500);
    k.ledger().put_budget(per_request).await.expect("put");
    let mut session = Budget::new("t1", "session", BudgetWindow::Total);
    session.session = Some("s9".into());
    session.limits.max_tool_calls = Some(1);
    k.ledger().put_budget(session).await.expect("put");

    let req = |principal: &str, session: Option<&str>, tokens: u64, tool_calls: u64| HoldRequest {
        tenant: "t1".into(),
        principal: Some(principal.into()),
        session: session.map(str::to_string),
        job_id: None,
        amount: Usage {
            tokens,
            cost: Decimal::ZERO,
            requests: 1,
            tool_calls,
        },
        ttl: None,
    };
    let usage = |tool_calls: u64| Usage {
        tokens: 1,
        cost: Decimal::ZERO,
        requests: 1,
        tool_calls,
    };
    for _ in 0..2 {
        let r = k.ledger().reserve(req("alice", None, 1, 0)).await.expect("reserve");
        k.ledger()
            .settle(
                r.reservation.id,
                LedgerKind::ModelUsage,
                usage(0),
                SettleDetails::default(),
            )
            .await
            .expect("settle");
    }
    assert!(
        matches!(
            k.ledger().reserve(req("alice", None, 1, 0)).await,
            Err(KernelError::BudgetExceeded(_))
        ),
        "alice's daily limit"
    );
    k.ledger()
        .reserve(req("bob", None, 1, 0))
        .await
        .expect("bob is not limited by alice's budget");
    assert!(
        matches!(
            k.ledger().reserve(req("bob", None, 501, 0)).await,
            Err(KernelError::BudgetExceeded(_))
        ),
        "per-request tokens"
    );
    clock.advance(Duration::days(1));
    k.ledger().reserve(req("alice", None, 1, 0)).await.expect("a new day");

    let r = k
        .ledger()
        .reserve(req("carol", Some("s9"), 1, 1))
        .await
        .expect("session tool call");
    k.ledger()
        .settle(
            r.reservation.id,
            LedgerKind::ToolUsage,
            usage(1),
            SettleDetails::default(),
        )
        .await
        .expect("settle");
    assert!(matches!(
        k.ledger().reserve(req("carol", Some("s9"), 1, 1)).await,
        Err(KernelError::BudgetExceeded(_))
    ));
    k.ledger()
        .reserve(req("carol", Some("s8"), 1, 1))
        .await
        .expect("other session");

    let q = UsageQuery {
        tenant: "t1".into(),
        principal: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(k.ledger().usage(&q).await.expect("usage").requests, 2);
    let q = UsageQuery {
        tenant: "t1".into(),
        from: Some(clock.now() - Duration::hours(1)),
        ..Default::default()
    };
    assert_eq!(k.ledger().usage(&q).await.expect("usage").requests, 1, "time window");
    let q = UsageQuery {
        tenant: "t1".into(),
        to: Some(epoch() + Duration::seconds(1)),
        ..Default::default()
    };
    assert_eq!(k.ledger().usage(&q).await.expect("usage").requests, 2);
}

/// A budget counts the usage already in the ledger when it is created, and recounts when its
/// window or subject changes (a store may keep running totals, but they must always say what the
/// ledger says); a daily window starts empty each UTC day and a monthly one each month.
pub async fn budget_counts_what_came_before_it(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let req = |principal: &str| HoldRequest {
        tenant: "t1".into(),
        principal: Some(principal.into()),
        session: None,
        job_id: None,
        amount: Usage {
            tool_calls: 1,
            ..Usage::zero()
        },
        ttl: None,
    };
    let call = |principal: &'static str| {
        let k = k.clone();
        async move {
            let held = k.ledger().reserve(req(principal)).await?;
            k.ledger()
                .settle(
                    held.reservation.id,
                    LedgerKind::ToolUsage,
                    Usage {
                        tool_calls: 1,
                        ..Usage::zero()
                    },
                    SettleDetails::default(),
                )
                .await
        }
    };
    let denied = |r: Result<_, KernelError>| matches!(r, Err(KernelError::BudgetExceeded(_)));
    // Three calls by alice and one by bob before any budget exists.
    for who in ["alice", "alice", "alice", "bob"] {
        call(who).await.expect("no budget yet");
    }
    let mut budget = Budget::new("t1", "alice, all time", BudgetWindow::Total);
    budget.principal = Some("alice".into());
    budget.limits.max_tool_calls = Some(4);
    budget.strategy = ExceedStrategy::Deny;
    k.ledger().put_budget(budget.clone()).await.expect("budget");
    call("alice").await.expect("the fourth call fits");
    assert!(
        denied(call("alice").await),
        "the fifth is over: the three before the budget count"
    );
    call("bob").await.expect("bob is not alice");

    // Replacing the limit alone keeps what was counted; widening the subject recounts.
    budget.limits.max_tool_calls = Some(5);
    k.ledger().put_budget(budget.clone()).await.expect("raise");
    call("alice").await.expect("the fifth fits the raised limit");
    assert!(denied(call("alice").await));
    budget.principal = None;
    budget.limits.max_tool_calls = Some(7);
    k.ledger().put_budget(budget.clone()).await.expect("widen");
    assert!(
        denied(call("bob").await),
        "5 by alice and 2 by bob: bob's calls count now"
    );

    // A daily window counts today's usage only.
    budget.window = BudgetWindow::Daily;
    budget.limits.max_tool_calls = Some(2);
    k.ledger().put_budget(budget.clone()).await.expect("daily");
    assert!(denied(call("bob").await), "today already has 7");
    clock.advance(Duration::days(1));
    call("bob").await.expect("a new day");
    call("alice").await.expect("the second today");
    assert!(denied(call("alice").await));

    // A monthly window spans the days of its month (the epoch is March 15th).
    budget.window = BudgetWindow::Monthly;
    budget.limits.max_tool_calls = Some(10);
    k.ledger().put_budget(budget.clone()).await.expect("monthly");
    call("bob").await.expect("the 10th this month");
    let status = k.ledger().budget_report("t1").await.expect("report");
    assert_eq!(status[0].used.tool_calls, 10, "the report counts what the check counts");
    assert!(denied(call("bob").await), "7 + 2 + 1 this month");
    clock.advance(Duration::days(20));
    call("bob").await.expect("April");
    let status = k.ledger().budget_report("t1").await.expect("report");
    assert_eq!(status[0].used.tool_calls, 1, "April's usage only");
}

/// Expired holds stop counting and the sweep releases them; a late settle still records usage.
pub async fn reservation_expiry(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let mut b = Budget::new("t1", "total", BudgetWindow::Total);
    b.limits.max_cost = Some(dec("1"));
    k.ledger().put_budget(b).await.expect("put");
    let hold = |ttl: i64| HoldRequest {
        tenant: "t1".into(),
        principal: None,
        session: None,
        job_id: None,
        amount: Usage::cost(dec("0.6")),
        ttl: Some(Duration::seconds(ttl)),
    };
    let crashed = k.ledger().reserve(hold(30)).await.expect("reserve");
    assert!(k.ledger().reserve(hold(30)).await.is_err(), "the live hold counts");
    clock.advance(Duration::seconds(30));
    let late = k
        .ledger()
        .reserve(hold(30))
        .await
        .expect("an expired hold no longer counts");
    let report = k.recover_and_sweep(clock.now()).await.expect("sweep");
    assert_eq!(report.reservations_released, 1);
    assert_eq!(
        k.ledger().reservation(crashed.reservation.id).await.expect("get").state,
        ReservationState::Released
    );
    assert_eq!(
        k.ledger().reservation(late.reservation.id).await.expect("get").state,
        ReservationState::Held
    );
    let s = k
        .ledger()
        .settle(
            crashed.reservation.id,
            LedgerKind::ModelUsage,
            Usage::cost(dec("0.1")),
            SettleDetails::default(),
        )
        .await;
    assert_eq!(
        s.expect("late settle records the usage").state,
        ReservationState::Settled
    );
    assert_eq!(
        k.ledger()
            .usage(&UsageQuery {
                tenant: "t1".into(),
                ..Default::default()
            })
            .await
            .expect("usage")
            .cost,
        dec("0.1")
    );
}

/// 64 concurrent reservations against one budget edge: total held never exceeds the budget.
pub async fn concurrent_reservations(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let mut b = Budget::new("t1", "edge", BudgetWindow::Total);
    b.limits.max_cost = Some(dec("10.00"));
    k.ledger().put_budget(b).await.expect("put");
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let k = k.clone();
            tokio::spawn(async move {
                let req = HoldRequest {
                    tenant: "t1".into(),
                    principal: None,
                    session: None,
                    job_id: None,
                    amount: Usage::cost(dec("0.25")),
                    ttl: None,
                };
                k.ledger().reserve(req).await
            })
        })
        .collect();
    let mut held = Decimal::ZERO;
    let mut granted = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(r) => {
                granted += 1;
                held += r.reservation.amount.cost;
            }
            Err(KernelError::BudgetExceeded(_)) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(held <= dec("10.00"), "overspent: {held}");
    assert_eq!(granted, 40, "exactly budget / amount reservations succeed");
    assert_eq!(held, dec("10.00"));
}

/// 32 concurrent creates with one idempotency key: one job.
pub async fn concurrent_idempotency(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let k = k.clone();
            tokio::spawn(async move {
                let mut new = NewJob::new("t1", "agent");
                new.idempotency_key = Some("same".into());
                k.jobs().create(new).await
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for t in tasks {
        let c = t.await.expect("join").expect("create");
        created += usize::from(c.created);
        ids.insert(c.job.id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(created, 1);
    assert_eq!(k.jobs().count(&JobFilter::tenant("t1")).await.expect("count"), 1);
}

/// 32 concurrent resolutions of one token: exactly one succeeds.
pub async fn concurrent_token_resolution(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let job = running_job(&k, "t1").await;
    let a = k
        .actions()
        .create(approval(job, "x/y", json!({}), Duration::hours(1)))
        .await
        .expect("create");
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let k = k.clone();
            let token = a.token.clone();
            tokio::spawn(async move {
                let mut r = Resolution::approve(true);
                r.resolved_by = Some(format!("user{i}"));
                k.actions().resolve_by_token(&token, r).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(_) => ok += 1,
            Err(KernelError::ActionNotPending {
                state: ActionState::Resolved,
                ..
            }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(k.jobs().get("t1", job).await.expect("get").state, JobState::Running);
    let resolved = k
        .read_events(&EventQuery {
            filter: EventFilter::job(job).with_types([EventType::ActionResolved]),
            ..Default::default()
        })
        .await
        .expect("events");
    assert_eq!(resolved.len(), 1, "one resolution event");
}

/// Concurrent writers to one job never lose an update (optimistic concurrency + retry).
pub async fn concurrent_job_writers(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let job = running_job(&k, "t1").await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let k = k.clone();
            tokio::spawn(async move { k.jobs().record_turn(job, 2).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("record turn");
    }
    let j = k.jobs().get("t1", job).await.expect("get");
    assert_eq!((j.turns, j.tool_calls), (16, 32));
    assert_eq!(j.version, 2 + 16);
}

fn journal_entry(job_id: Uuid, key: &str) -> NewJournalEntry {
    NewJournalEntry {
        job_id,
        key: key.into(),
        kind: "tool_result".into(),
        payload: json!({ "content": key }).into(),
        at: epoch(),
    }
}

/// A batch carrying a job write, a journal entry, a settlement and an event applies all or
/// nothing: a stale job version, a duplicate journal key or a wrong lease owner leaves the
/// journal, the reservation and the event log untouched.
pub async fn journal_atomicity(store: Arc<dyn KernelStore>) {
    let (k, _clock) = kernel_with_clock(store.clone());
    let id = running_job(&k, "t1").await;
    let held = k
        .ledger()
        .reserve(HoldRequest {
            job_id: Some(id),
            ..HoldRequest::from_context(
                &crate::context::ExecutionContext::new("t1"),
                Usage {
                    tool_calls: 1,
                    ..Usage::zero()
                },
            )
        })
        .await
        .expect("reserve");
    let rid = held.reservation.id;
    let job = k.jobs().get("t1", id).await.expect("get");
    let step = |expected: u64, key: &str| {
        let mut next = job.clone();
        next.version = expected + 1;
        next.tool_calls += 1;
        Batch {
            jobs: vec![JobWrite {
                job: next,
                expected_version: Some(expected),
            }],
            events: vec![crate::event::NewEvent {
                job_id: id,
                tenant: "t1".into(),
                event_type: EventType::ToolEnd,
                data: json!({ "key": key }).into(),
                at: epoch(),
            }],
            journal: vec![journal_entry(id, key)],
            settlements: vec![crate::ledger::SettleRequest {
                reservation_id: rid,
                kind: LedgerKind::ToolUsage,
                actual: Usage {
                    tool_calls: 1,
                    ..Usage::zero()
                },
                duration_ms: Some(5),
                model: None,
                tool: Some("fs/read".into()),
                data: json!(null).into(),
                now: epoch(),
            }],
            ..Batch::default()
        }
    };
    let tool_ends = || async {
        k.read_events(&EventQuery {
            filter: EventFilter::job(id).with_types([EventType::ToolEnd]),
            ..Default::default()
        })
        .await
        .expect("events")
        .len()
    };
    // Stale version: nothing applied.
    let err = store
        .commit(step(job.version - 1, "t1/c0/result"))
        .await
        .expect_err("stale");
    assert!(matches!(err, StoreError::Conflict { entity: "job", .. }), "{err}");
    assert!(store.read_journal(id).await.expect("journal").is_empty());
    assert_eq!(
        k.ledger().reservation(rid).await.expect("r").state,
        ReservationState::Held
    );
    assert_eq!(tool_ends().await, 0);
    // A lease guard naming another owner: nothing applied.
    let mut guarded = step(job.version, "t1/c0/result");
    guarded.leases.push(LeaseGuard {
        job_id: id,
        owner: "someone-else".into(),
        epoch: 1,
    });
    let err = store.commit(guarded).await.expect_err("not the lease owner");
    assert!(matches!(err, StoreError::Conflict { entity: "lease", .. }), "{err}");
    assert!(store.read_journal(id).await.expect("journal").is_empty());
    // Right version: everything applied together.
    store.commit(step(job.version, "t1/c0/result")).await.expect("commit");
    let journal = store.read_journal(id).await.expect("journal");
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].seq, 1);
    assert_eq!(journal[0].entry.key, "t1/c0/result");
    assert_eq!(journal[0].entry.payload, json!({ "content": "t1/c0/result" }));
    assert_eq!(
        k.ledger().reservation(rid).await.expect("r").state,
        ReservationState::Settled
    );
    assert_eq!(tool_ends().await, 1);
    let used = k
        .ledger()
        .usage(&UsageQuery {
            tenant: "t1".into(),
            job_id: Some(id),
            ..Default::default()
        })
        .await
        .expect("usage");
    assert_eq!(used.tool_calls, 1);
    // The same step again (even with a fresh version and a settled reservation): refused.
    let mut again = step(job.version + 1, "t1/c0/result");
    again.settlements.clear();
    let err = store.commit(again).await.expect_err("a step is journaled once");
    assert!(matches!(err, StoreError::Conflict { entity: "journal", .. }), "{err}");
    // A settled reservation cannot be settled again inside a batch either.
    let err = store
        .commit(step(job.version + 1, "t1/c1/result"))
        .await
        .expect_err("double settle");
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                entity: "reservation",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.read_journal(id).await.expect("journal").len(), 1);
    assert_eq!(tool_ends().await, 1);
    // Next step: seq 2.
    let mut next = step(job.version + 1, "t1/c1/result");
    next.settlements.clear();
    store.commit(next).await.expect("second step");
    let journal = store.read_journal(id).await.expect("journal");
    assert_eq!(journal.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
}

/// Leases: of two concurrent claimants exactly one wins a job; claiming bumps the version and
/// the lease epoch (fencing the previous owner, even under the same owner id); expiry is judged on
/// the store's own clock, never the claimant's; only the current owner+epoch renews (never
/// shortening the lease) or releases; an expired lease is claimable again; a guard on an ended job
/// fails; terminal and WAITING_ACTION jobs are never claimed. Uses real time (short leases).
pub async fn lease_claiming(store: Arc<dyn KernelStore>) {
    let (k, _clock) = kernel_with_clock(store.clone());
    let queued = k.jobs().create(NewJob::new("t1", "agent")).await.expect("create").job;
    let other_kind = k.jobs().create(NewJob::new("t1", "report")).await.expect("create").job;
    // The claimant's clock reads `epoch()` (months away from the store's): it must not matter.
    let claim = |owner: &str, at: DateTime<Utc>, ttl_ms: u64| ClaimRequest {
        owner: owner.into(),
        now: at,
        ttl_ms,
        kinds: vec!["agent".into()],
        job_id: None,
        limit: 10,
    };
    let guard = |owner: &str, epoch: u64| LeaseGuard {
        job_id: queued.id,
        owner: owner.into(),
        epoch,
    };
    let fenced = |g: LeaseGuard| Batch {
        journal: vec![journal_entry(g.job_id, &format!("x-{}-{}", g.owner, g.epoch))],
        leases: vec![g],
        ..Batch::default()
    };
    let before = Utc::now();
    let (a, b) = tokio::join!(
        store.claim_jobs(claim("a", epoch(), 30_000)),
        store.claim_jobs(claim("b", epoch(), 30_000))
    );
    let (a, b) = (a.expect("claim a"), b.expect("claim b"));
    assert_eq!(a.len() + b.len(), 1, "exactly one claimant wins: {a:?} {b:?}");
    let (winner, loser, claimed) = if a.is_empty() {
        ("b", "a", &b[0])
    } else {
        ("a", "b", &a[0])
    };
    assert_eq!(claimed.id, queued.id);
    assert_ne!(claimed.id, other_kind.id);
    assert_eq!(claimed.version, queued.version + 1, "claiming bumps the version");
    let stored = store.get_job(queued.id).await.expect("get").expect("job");
    assert_eq!(stored.version, claimed.version);
    let lease = store.get_lease(queued.id).await.expect("lease").expect("leased");
    assert_eq!(lease.owner, winner);
    let e1 = lease.epoch;
    assert!(e1 >= 1, "a claim sets an epoch: {lease:?}");
    assert!(
        lease.until >= before + Duration::seconds(29) && lease.until <= Utc::now() + Duration::seconds(31),
        "the lease runs 30 s from the store's now, not the claimant's: {lease:?}"
    );
    // Live lease: nobody else gets it, even a claimant whose clock runs an hour ahead.
    assert!(
        store
            .claim_jobs(claim(loser, Utc::now() + Duration::hours(1), 30_000))
            .await
            .expect("claim")
            .is_empty(),
        "a skewed clock took a live lease"
    );
    // Only the owner under its epoch renews; a renewal never shortens the lease.
    assert!(!store.renew_lease(&guard(loser, e1), 60_000).await.expect("renew"));
    assert!(!store.renew_lease(&guard(winner, e1 + 1), 60_000).await.expect("renew"));
    assert!(store.renew_lease(&guard(winner, e1), 60_000).await.expect("renew"));
    let renewed = store.get_lease(queued.id).await.expect("lease").expect("leased");
    assert!(renewed.until >= lease.until + Duration::seconds(29), "{renewed:?}");
    assert!(store.renew_lease(&guard(winner, e1), 1).await.expect("renew"));
    assert_eq!(
        store.get_lease(queued.id).await.expect("lease").expect("leased").until,
        renewed.until,
        "a shorter renewal keeps the longer lease"
    );
    store.commit(fenced(guard(winner, e1))).await.expect("the owner writes");
    // Released by its owner: claimable at once, under a new epoch, even by the same owner id;
    // the old epoch can no longer write, renew or release.
    assert!(!store.release_lease(&guard(loser, e1)).await.expect("release"));
    assert!(store.release_lease(&guard(winner, e1)).await.expect("release"));
    assert_eq!(store.get_lease(queued.id).await.expect("lease"), None);
    let mut one = claim(winner, epoch(), 200);
    one.job_id = Some(queued.id);
    assert_eq!(store.claim_jobs(one).await.expect("claim").len(), 1);
    let e2 = store.get_lease(queued.id).await.expect("lease").expect("leased").epoch;
    assert!(e2 > e1, "{e2} > {e1}");
    let err = store.commit(fenced(guard(winner, e1))).await.expect_err("stale epoch");
    assert!(matches!(err, StoreError::Conflict { entity: "lease", .. }), "{err}");
    assert!(!store.renew_lease(&guard(winner, e1), 200).await.expect("renew"));
    assert!(!store.release_lease(&guard(winner, e1)).await.expect("release"));
    // Expired (200 ms on the store's clock): the other claimant takes over and fences the owner.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let taken = store.claim_jobs(claim(loser, epoch(), 30_000)).await.expect("claim");
    assert_eq!(taken.len(), 1);
    let e3 = store.get_lease(queued.id).await.expect("lease").expect("leased").epoch;
    assert!(e3 > e2);
    assert!(!store.renew_lease(&guard(winner, e2), 30_000).await.expect("renew"));
    let err = store.commit(fenced(guard(winner, e2))).await.expect_err("fenced");
    assert!(matches!(err, StoreError::Conflict { entity: "lease", .. }), "{err}");
    store
        .commit(fenced(guard(loser, e3)))
        .await
        .expect("the new owner writes");
    // A job that ended is no one's to write to, whoever still holds its lease.
    k.jobs().cancel(queued.id, "test").await.expect("cancel");
    let err = store.commit(fenced(guard(loser, e3))).await.expect_err("ended");
    assert!(matches!(err, StoreError::Conflict { entity: "lease", .. }), "{err}");
    // WAITING_ACTION and terminal jobs are not claimable.
    let waiting = running_job(&k, "t1").await;
    k.actions()
        .create(approval(waiting, "fs/write", json!({}), Duration::hours(1)))
        .await
        .expect("action");
    let done = running_job(&k, "t1").await;
    k.jobs().complete(done, None).await.expect("complete");
    let fresh = running_job(&k, "t1").await;
    let later = store.claim_jobs(claim("d", epoch(), 30_000)).await.expect("claim");
    assert_eq!(later.iter().map(|j| j.id).collect::<Vec<_>>(), vec![fresh]);
}

/// Extending holds (the heartbeat keeps a running call's hold alive): only HELD reservations
/// move, and never earlier; an extended hold is not swept at its old expiry.
pub async fn hold_extension(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store.clone());
    let hold = |ttl: i64| HoldRequest {
        tenant: "t1".into(),
        principal: None,
        session: None,
        job_id: None,
        amount: Usage::cost(dec("0.1")),
        ttl: Some(Duration::seconds(ttl)),
    };
    let live = k.ledger().reserve(hold(30)).await.expect("reserve").reservation;
    let done = k.ledger().reserve(hold(30)).await.expect("reserve").reservation;
    k.ledger().release(done.id, "test").await.expect("release");
    let n = store
        .extend_holds(&[live.id, done.id, Uuid::now_v7()], clock.now() + Duration::seconds(90))
        .await
        .expect("extend");
    assert_eq!(n, 1, "only the HELD reservation is extended");
    assert_eq!(
        k.ledger().reservation(live.id).await.expect("get").expires_at,
        clock.now() + Duration::seconds(90)
    );
    store
        .extend_holds(&[live.id], clock.now() + Duration::seconds(10))
        .await
        .expect("extend");
    assert_eq!(
        k.ledger().reservation(live.id).await.expect("get").expires_at,
        clock.now() + Duration::seconds(90),
        "never shortened"
    );
    clock.advance(Duration::seconds(60));
    let report = k.recover_and_sweep(clock.now()).await.expect("sweep");
    assert_eq!(report.reservations_released, 0);
    assert_eq!(store.extend_holds(&[], clock.now()).await.expect("extend"), 0);
}

/// Two pending approvals of one job resolved at the same moment, many times over: whatever the
/// interleaving, the job ends RUNNING with nothing pending (the "others pending?" read is part of
/// the write: every resolve writes the job row, so two racing resolves conflict and re-check).
pub async fn concurrent_resolves(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    for round in 0..60 {
        let job = running_job(&k, "t1").await;
        let mut tokens = Vec::new();
        for tool in ["x/a", "x/b"] {
            let created = k
                .actions()
                .create(approval(job, tool, json!({ "round": round }), Duration::hours(1)))
                .await
                .expect("create");
            tokens.push(created.token);
        }
        let start = Arc::new(tokio::sync::Barrier::new(tokens.len()));
        let tasks: Vec<_> = tokens
            .into_iter()
            .map(|token| {
                let (k, start) = (k.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    k.actions().resolve_by_token(&token, Resolution::approve(true)).await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("join").expect("resolve");
        }
        let j = k.jobs().get("t1", job).await.expect("get");
        assert_eq!(j.state, JobState::Running, "round {round}: the job is stuck");
        let pending = k.actions().list_pending("t1", Some(job)).await.expect("pending");
        assert!(pending.is_empty(), "round {round}: {pending:?}");
    }
}

/// Usage beyond what a counter holds (a model reporting `u64::MAX` tokens, a sum of such reports)
/// is recorded as the most a counter holds, [`Usage::MAX_COUNT`]: never refused (the ledger
/// entry would be lost), never wrapped (a budget would be bypassed), and never left in a form
/// the store cannot read back (every later check of the tenant's budgets would fail).
pub async fn usage_past_what_a_counter_holds(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store.clone());
    let huge = Usage {
        tokens: u64::MAX,
        requests: u64::MAX,
        tool_calls: u64::MAX,
        cost: Usage::MAX_COST,
    };
    let hold = |amount: Usage| HoldRequest {
        tenant: "t1".into(),
        principal: None,
        session: None,
        job_id: None,
        amount,
        ttl: None,
    };
    let charge = |amount: Usage| {
        let k = k.clone();
        async move {
            let held = k.ledger().reserve(hold(amount.clone())).await?;
            k.ledger()
                .settle(
                    held.reservation.id,
                    LedgerKind::ModelUsage,
                    amount,
                    SettleDetails::default(),
                )
                .await
        }
    };
    let max = Usage {
        tokens: Usage::MAX_COUNT,
        requests: Usage::MAX_COUNT,
        tool_calls: Usage::MAX_COUNT,
        cost: Usage::MAX_COST,
    };
    // Before any budget: recorded, twice over what a counter holds.
    charge(huge.clone()).await.expect("a huge usage is recorded");
    charge(huge.clone()).await.expect("and another");
    let all = UsageQuery {
        tenant: "t1".into(),
        ..Default::default()
    };
    assert_eq!(
        k.ledger().usage(&all).await.expect("usage"),
        max,
        "the sum stops at the most a counter holds"
    );

    // A budget created over that ledger counts it, and refuses the next hold.
    let mut budget = Budget::new("t1", "all time", BudgetWindow::Total);
    budget.limits.max_tokens = Some(1_000);
    budget.strategy = ExceedStrategy::Deny;
    k.ledger()
        .put_budget(budget.clone())
        .await
        .expect("a budget over a huge ledger");
    let report = k.ledger().budget_report("t1").await.expect("report");
    assert_eq!(report[0].used, max);
    let small = Usage {
        tokens: 1,
        ..Usage::zero()
    };
    assert!(matches!(
        k.ledger().reserve(hold(small.clone())).await,
        Err(KernelError::BudgetExceeded(_))
    ));

    // Usage added to the running totals past the top, under a budget that lets it through.
    budget.strategy = ExceedStrategy::Warn;
    k.ledger().put_budget(budget.clone()).await.expect("warn only");
    charge(huge.clone()).await.expect("recorded past the top of the totals");
    charge(small.clone())
        .await
        .expect("a small call still checks and records");

    // A batch's hold and settlement (a direct call's commit) are kept the same way.
    let hold = HoldWrite {
        id: Uuid::now_v7(),
        request: ReserveRequest {
            tenant: "t1".into(),
            principal: None,
            session: None,
            job_id: None,
            amount: huge.clone(),
            now: clock.now(),
            expires_at: clock.now() + Duration::minutes(10),
        },
        check_budgets: true,
    };
    let settle = SettleRequest {
        reservation_id: hold.id,
        kind: LedgerKind::ToolUsage,
        actual: huge.clone(),
        duration_ms: None,
        model: None,
        tool: None,
        data: json!({}).into(),
        now: clock.now(),
    };
    let id = hold.id;
    store
        .commit(Batch {
            holds: vec![hold],
            settlements: vec![settle],
            ..Batch::default()
        })
        .await
        .expect("a batch with a huge hold and settlement");
    let r = store.get_reservation(id).await.expect("read").expect("the reservation");
    assert_eq!((r.amount.clone(), r.actual), (max.clone(), Some(max.clone())));

    let report = k.ledger().budget_report("t1").await.expect("report after more");
    assert_eq!(report[0].used, max);
    assert_eq!(k.ledger().usage(&all).await.expect("usage"), max);
}

/// Settlement is bounded by the hold: what the hold covered is the usage entry, the excess an
/// `overage` entry (both count); a hold that lapsed covers nothing, so a late settle is all overage.
pub async fn settle_is_bounded_by_the_hold(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store);
    let hold = |amount: Usage| HoldRequest {
        tenant: "t1".into(),
        principal: Some("p".into()),
        session: None,
        job_id: None,
        amount,
        ttl: Some(Duration::seconds(60)),
    };
    let entries_of = |k: Kernel, id: Uuid| async move {
        let all = k
            .ledger()
            .entries(&LedgerQuery {
                tenant: "t1".into(),
                ..Default::default()
            })
            .await
            .expect("entries");
        all.into_iter()
            .filter(|e| e.entry.reservation_id == Some(id))
            .map(|e| (e.entry.kind, e.entry.usage))
            .collect::<Vec<_>>()
    };
    let held = Usage {
        tokens: 100,
        cost: dec("0.5"),
        requests: 1,
        tool_calls: 0,
    };
    let r = k
        .ledger()
        .reserve(hold(held.clone()))
        .await
        .expect("reserve")
        .reservation;
    let actual = Usage {
        tokens: 180,
        cost: dec("0.9"),
        requests: 1,
        tool_calls: 0,
    };
    let settled = k
        .ledger()
        .settle(r.id, LedgerKind::ModelUsage, actual.clone(), SettleDetails::default())
        .await
        .expect("settle");
    assert_eq!(settled.state, ReservationState::Settled);
    assert_eq!(settled.actual, Some(actual));
    let entries = entries_of(k.clone(), r.id).await;
    let of = |kind: LedgerKind| entries.iter().find(|(k, _)| *k == kind).map(|(_, u)| u.clone());
    assert_eq!(of(LedgerKind::ModelUsage), Some(held), "{entries:?}");
    let over = Usage {
        tokens: 80,
        cost: dec("0.4"),
        requests: 0,
        tool_calls: 0,
    };
    assert_eq!(of(LedgerKind::Overage), Some(over), "{entries:?}");
    let total = k
        .ledger()
        .usage(&UsageQuery {
            tenant: "t1".into(),
            ..Default::default()
        })
        .await
        .expect("usage");
    assert_eq!(
        (total.tokens, total.cost),
        (180, dec("0.9")),
        "the ledger holds what was spent"
    );

    // Within the hold: one usage entry, no overage.
    let r = k
        .ledger()
        .reserve(hold(Usage::cost(dec("0.5"))))
        .await
        .expect("reserve")
        .reservation;
    k.ledger()
        .settle(
            r.id,
            LedgerKind::ModelUsage,
            Usage::cost(dec("0.2")),
            SettleDetails::default(),
        )
        .await
        .expect("settle");
    let entries = entries_of(k.clone(), r.id).await;
    assert!(!entries.iter().any(|(k, _)| *k == LedgerKind::Overage), "{entries:?}");

    // A lapsed hold (released by the sweep) covers nothing.
    let one_call = Usage {
        tool_calls: 1,
        ..Usage::zero()
    };
    let r = k
        .ledger()
        .reserve(hold(one_call.clone()))
        .await
        .expect("reserve")
        .reservation;
    clock.advance(Duration::hours(1));
    k.recover_and_sweep(clock.now()).await.expect("sweep");
    k.ledger()
        .settle(r.id, LedgerKind::ToolUsage, one_call.clone(), SettleDetails::default())
        .await
        .expect("a late settle still records what was spent");
    let entries = entries_of(k.clone(), r.id).await;
    let of = |kind: LedgerKind| entries.iter().find(|(k, _)| *k == kind).map(|(_, u)| u.clone());
    assert_eq!(of(LedgerKind::ToolUsage), Some(Usage::zero()), "{entries:?}");
    assert_eq!(of(LedgerKind::Overage), Some(one_call), "{entries:?}");
}

/// A job created together with its lease (one transaction) is never claimable by another owner
/// until that lease lapses; a lease claim on a job someone else holds fails the whole batch.
pub async fn create_leased(store: Arc<dyn KernelStore>) {
    let (k, _clock) = kernel_with_clock(store.clone());
    let created = k
        .jobs()
        .create_leased(
            NewJob::new("t1", "agent"),
            Some(("host-a".into(), Duration::milliseconds(200))),
        )
        .await
        .expect("create");
    assert!(created.created);
    let id = created.job.id;
    let lease = store.get_lease(id).await.expect("lease").expect("leased at creation");
    assert_eq!(lease.owner, "host-a");
    assert!(lease.epoch >= 1, "the creating claim sets an epoch: {lease:?}");
    // The claimant's clock (hours ahead) does not matter: expiry is on the store's clock.
    let claim = |owner: &str| ClaimRequest {
        owner: owner.into(),
        now: Utc::now() + Duration::hours(1),
        ttl_ms: 30_000,
        kinds: vec!["agent".into()],
        job_id: None,
        limit: 10,
    };
    assert!(store.claim_jobs(claim("poller")).await.expect("claim").is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let claimed = store.claim_jobs(claim("poller")).await.expect("claim");
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![id],
        "claimable once it lapsed"
    );
    let taken = store.get_lease(id).await.expect("lease").expect("lease");
    assert!(taken.epoch > lease.epoch, "{taken:?} after {lease:?}");
    let refused = store
        .commit(Batch {
            claims: vec![crate::store::LeaseClaim {
                job_id: id,
                owner: "host-b".into(),
                ttl_ms: 30_000,
            }],
            ..Batch::default()
        })
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { entity: "lease", .. })),
        "{refused:?}"
    );
    assert_eq!(
        store.get_lease(id).await.expect("lease").expect("lease").owner,
        "poller"
    );
}

/// An idempotency key is bound to the hash of its first request, stored with the job: the same
/// request gets the first job, a different one (input or principal) an error naming it.
pub async fn idempotency_request_hash(store: Arc<dyn KernelStore>) {
    let (k, _) = kernel_with_clock(store);
    let mut a = NewJob::new("t1", "agent");
    a.idempotency_key = Some("k".into());
    a.principal = Some("alice".into());
    a.input = json!({ "prompt": "a" }).into();
    let first = k.jobs().create(a.clone()).await.expect("create").job;
    assert!(first.request_hash.is_some());
    let stored = k.jobs().get("t1", first.id).await.expect("get");
    assert_eq!(stored.request_hash, first.request_hash, "the hash is stored");
    let again = k.jobs().create(a.clone()).await.expect("same request");
    assert!(!again.created);
    assert_eq!(again.job.id, first.id);
    let mut other_input = a.clone();
    other_input.input = json!({ "prompt": "b" }).into();
    let mut other_principal = a.clone();
    other_principal.principal = Some("mallory".into());
    for other in [other_input, other_principal] {
        match k.jobs().create(other).await {
            Err(e @ KernelError::IdempotencyKeyReused { .. }) => {
                assert!(e.to_string().contains("different request"), "{e}");
                assert!(e.to_string().contains(&first.id.to_string()), "{e}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(k.jobs().count(&JobFilter::tenant("t1")).await.expect("count"), 1);
}

/// The plugin registry: upsert keeps the install time, list is by name, grants replace, a missing
/// plugin is `NotFound`, remove reports whether it existed, and a component is in use while any
/// record references it. Not part of [`run_all`] (a registry is not a [`KernelStore`]): a backend
/// calls it with its [`PluginRegistry`].
pub async fn plugin_registry(registry: Arc<dyn PluginRegistry>) {
    let record = |name: &str, sha: &str| PluginRecord {
        name: name.into(),
        version: "1.0.0".into(),
        description: "d".into(),
        sha256: sha.repeat(32),
        info: json!({"name": name, "tools": [{"name": "t"}]}),
        imports: json!(["wasi:cli/environment@0.2.6"]),
        grants: json!({}),
        limits: json!({"memory_mb": 64}),
        installed_at: String::new(),
        updated_at: String::new(),
    };
    assert!(registry.list_plugins().await.expect("list").is_empty());
    registry.upsert_plugin(&record("b", "ab")).await.expect("upsert b");
    registry.upsert_plugin(&record("a", "ab")).await.expect("upsert a");
    let names: Vec<_> = registry
        .list_plugins()
        .await
        .expect("list")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["a", "b"], "listed by name");

    let a = registry.get_plugin("a").await.expect("get").expect("a is installed");
    assert_eq!(a.info, record("a", "ab").info, "JSON columns round-trip");
    assert_eq!(a.limits, json!({"memory_mb": 64}));
    assert!(
        !a.installed_at.is_empty() && !a.updated_at.is_empty(),
        "the registry stamps times"
    );

    // Re-installing replaces the record but keeps the original install time.
    let mut v2 = record("a", "cd");
    v2.version = "2.0.0".into();
    registry.upsert_plugin(&v2).await.expect("upsert a v2");
    let a2 = registry.get_plugin("a").await.expect("get").expect("a");
    assert_eq!(
        (a2.version.as_str(), a2.sha256.as_str()),
        ("2.0.0", "cd".repeat(32).as_str())
    );
    assert_eq!(a2.installed_at, a.installed_at, "install time kept");
    let stamp = |name: &'static str| {
        let registry = registry.clone();
        async move { registry.plugin_stamp(name).await.expect("stamp") }
    };
    let stamp_v2 = stamp("a").await.expect("a has a stamp");
    assert_eq!(stamp_v2.sha256, "cd".repeat(32), "the stamp names the component");
    assert_ne!(
        stamp_v2.sha256,
        PluginStamp::of(&a).sha256,
        "a new component is a new stamp"
    );
    assert!(
        stamp("zzz").await.is_none(),
        "no stamp for a plugin that is not installed"
    );

    registry
        .set_plugin_grants("a", &json!({"env": ["HOME"]}))
        .await
        .expect("grant");
    let a3 = registry.get_plugin("a").await.expect("get").expect("a");
    assert_eq!(a3.grants, json!({"env": ["HOME"]}));
    assert_eq!(a3.version, "2.0.0", "granting changes nothing else");
    let stamp_granted = stamp("a").await.expect("a");
    assert_ne!(stamp_granted, stamp_v2, "a grant changes the stamp");
    registry.set_plugin_grants("a", &json!({})).await.expect("revoke");
    let stamp_revoked = stamp("a").await.expect("a");
    assert_ne!(stamp_revoked, stamp_granted, "a revoke changes the stamp");
    assert_eq!(
        stamp("a").await,
        Some(stamp_revoked),
        "an unchanged record keeps its stamp"
    );
    registry
        .set_plugin_grants("a", &json!({"env": ["HOME"]}))
        .await
        .expect("grant again");
    match registry.set_plugin_grants("zzz", &json!({})).await {
        Err(e @ StoreError::NotFound { entity: "plugin", .. }) => {
            assert_eq!(e.to_string(), "plugin `zzz` not found");
        }
        other => panic!("expected NotFound for a missing plugin, got {other:?}"),
    }

    assert!(
        registry.component_in_use(&"ab".repeat(32)).await.expect("in use"),
        "b uses ab"
    );
    assert!(
        registry.component_in_use(&"cd".repeat(32)).await.expect("in use"),
        "a uses cd"
    );
    assert!(registry.remove_plugin("b").await.expect("remove"));
    assert!(
        !registry.remove_plugin("b").await.expect("remove again"),
        "already gone"
    );
    assert!(registry.get_plugin("b").await.expect("get").is_none());
    assert!(
        !registry.component_in_use(&"ab".repeat(32)).await.expect("in use"),
        "no record uses ab"
    );
}

/// The governed call path's two commits: "before the side effect" (a job inserted RUNNING with its
/// lease, a budget hold, a `started` journal entry, an event) and "after" (the job's last write,
/// the hold settled, a result entry, an event, the lease released) each apply all or nothing. A
/// job claimed by the batch that inserts it gets epoch 1; a hold a deny budget refuses fails the
/// whole batch with `Conflict { entity: "budget" }` (no job, no entry, no event); a stale lease
/// epoch fails the "after" batch; a hold and its settlement may share one batch; an unchecked
/// hold is recorded whatever the budgets say.
pub async fn batch_holds_and_leases(store: Arc<dyn KernelStore>) {
    let (k, clock) = kernel_with_clock(store.clone());
    let mut budget = Budget::new("t1", "two calls", BudgetWindow::Total);
    budget.limits.max_tool_calls = Some(2);
    budget.strategy = ExceedStrategy::Deny;
    k.ledger().put_budget(budget).await.expect("budget");
    let one_call = Usage {
        tool_calls: 1,
        ..Usage::zero()
    };
    let now = clock.now();
    let hold = |job_id: Uuid, check_budgets: bool| HoldWrite {
        id: Uuid::now_v7(),
        request: ReserveRequest {
            tenant: "t1".into(),
            principal: None,
            session: None,
            job_id: Some(job_id),
            amount: one_call.clone(),
            now,
            expires_at: now + Duration::minutes(10),
        },
        check_budgets,
    };
    let before = |hold: HoldWrite| {
        let mut job = Job::queued(NewJob::new("t1", "agent"), None, now);
        job.id = hold.request.job_id.expect("job id");
        job.state = JobState::Running;
        job.started_at = Some(now);
        let id = job.id;
        Batch {
            jobs: vec![JobWrite {
                job,
                expected_version: None,
            }],
            claims: vec![LeaseClaim {
                job_id: id,
                owner: "host-a".into(),
                ttl_ms: 60_000,
            }],
            journal: vec![journal_entry(id, "t1/c0/started/0")],
            events: vec![crate::event::NewEvent {
                job_id: id,
                tenant: "t1".into(),
                event_type: EventType::ToolStart,
                data: json!({}).into(),
                at: now,
            }],
            holds: vec![hold],
            ..Batch::default()
        }
    };
    let settle = |rid: Uuid| SettleRequest {
        reservation_id: rid,
        kind: LedgerKind::ToolUsage,
        actual: one_call.clone(),
        duration_ms: Some(1),
        model: None,
        tool: Some("p/t".into()),
        data: json!({ "receipt": { "wall_us": 7 } }).into(),
        now,
    };
    let after = |job: &Job, rid: Uuid, epoch: u64| {
        let mut next = job.clone();
        next.version += 1;
        next.state = JobState::Succeeded;
        next.finished_at = Some(now);
        let guard = LeaseGuard {
            job_id: job.id,
            owner: "host-a".into(),
            epoch,
        };
        Batch {
            jobs: vec![JobWrite {
                job: next,
                expected_version: Some(job.version),
            }],
            journal: vec![journal_entry(job.id, "t1/c0/result")],
            settlements: vec![settle(rid)],
            events: vec![crate::event::NewEvent {
                job_id: job.id,
                tenant: "t1".into(),
                event_type: EventType::ToolEnd,
                data: json!({}).into(),
                at: now,
            }],
            leases: vec![guard.clone()],
            lease_releases: vec![guard],
            ..Batch::default()
        }
    };
    let tool_calls_used = || async {
        k.ledger()
            .usage(&UsageQuery {
                tenant: "t1".into(),
                ..Default::default()
            })
            .await
            .expect("usage")
            .tool_calls
    };

    // "Before": everything at once, claimed under epoch 1, the hold live.
    let first = hold(Uuid::now_v7(), true);
    let (job1, rid1) = (first.request.job_id.expect("job"), first.id);
    let events = store.commit(before(first)).await.expect("before");
    assert_eq!(events.len(), 1);
    let lease = store.get_lease(job1).await.expect("lease").expect("leased");
    assert_eq!((lease.owner.as_str(), lease.epoch), ("host-a", 1), "{lease:?}");
    let r = k
        .ledger()
        .reservation(rid1)
        .await
        .expect("the hold has the caller's id");
    assert_eq!((r.state, r.job_id), (ReservationState::Held, Some(job1)));
    assert_eq!(store.read_journal(job1).await.expect("journal").len(), 1);

    // A stale epoch fails "after" as a whole.
    let job = store.get_job(job1).await.expect("get").expect("job");
    let err = store.commit(after(&job, rid1, 0)).await.expect_err("stale epoch");
    assert!(matches!(err, StoreError::Conflict { entity: "lease", .. }), "{err}");
    assert_eq!(
        store.get_job(job1).await.expect("get").expect("job").state,
        JobState::Running
    );
    assert_eq!(
        k.ledger().reservation(rid1).await.expect("r").state,
        ReservationState::Held
    );
    assert_eq!(store.read_journal(job1).await.expect("journal").len(), 1);
    assert!(store.get_lease(job1).await.expect("lease").is_some());

    // The right epoch: settled, journaled, ended and unleased together.
    store.commit(after(&job, rid1, 1)).await.expect("after");
    assert_eq!(
        store.get_job(job1).await.expect("get").expect("job").state,
        JobState::Succeeded
    );
    let r = k.ledger().reservation(rid1).await.expect("r");
    assert_eq!(r.state, ReservationState::Settled);
    assert_eq!(store.read_journal(job1).await.expect("journal").len(), 2);
    assert_eq!(
        store.get_lease(job1).await.expect("lease"),
        None,
        "released with the last write"
    );
    assert_eq!(tool_calls_used().await, 1);
    let usage_entries = k
        .ledger()
        .entries(&LedgerQuery {
            tenant: "t1".into(),
            kinds: vec![LedgerKind::ToolUsage],
            ..Default::default()
        })
        .await
        .expect("entries");
    assert_eq!(usage_entries.len(), 1);
    assert_eq!(
        usage_entries[0].entry.data.value()["receipt"]["wall_us"],
        7,
        "the receipt is in the entry"
    );

    // Second call: allowed (1 used + 1 held = 2); a third hold while it is live is refused and
    // the whole "before" batch with it.
    let second = hold(Uuid::now_v7(), true);
    let (job2, rid2) = (second.request.job_id.expect("job"), second.id);
    store.commit(before(second)).await.expect("second before");
    let third = hold(Uuid::now_v7(), true);
    let (job3, rid3) = (third.request.job_id.expect("job"), third.id);
    let err = store.commit(before(third)).await.expect_err("over budget");
    assert!(matches!(err, StoreError::Conflict { entity: "budget", .. }), "{err}");
    assert!(store.get_job(job3).await.expect("get").is_none(), "no job");
    assert!(store.get_reservation(rid3).await.expect("get").is_none(), "no hold");
    assert!(store.read_journal(job3).await.expect("journal").is_empty());
    assert!(store.get_lease(job3).await.expect("lease").is_none());
    let refused_entries = k
        .ledger()
        .entries(&LedgerQuery {
            tenant: "t1".into(),
            job_id: Some(job3),
            ..Default::default()
        })
        .await
        .expect("entries");
    assert!(
        refused_entries.is_empty(),
        "nothing of the refused batch: {refused_entries:?}"
    );

    // A hold and its settlement in one batch (an idempotent call that commits once), unchecked:
    // recorded although the budget is used up.
    let job = store.get_job(job2).await.expect("get").expect("job");
    store.commit(after(&job, rid2, 1)).await.expect("second after");
    let once = hold(Uuid::now_v7(), false);
    let (job4, rid4) = (once.request.job_id.expect("job"), once.id);
    let mut batch = before(once);
    batch.claims.clear();
    batch.jobs[0].job.state = JobState::Succeeded;
    batch.settlements.push(settle(rid4));
    store.commit(batch).await.expect("hold and settle at once");
    let r4 = k.ledger().reservation(rid4).await.expect("r");
    assert_eq!(
        (r4.state, r4.actual.map(|u| u.tool_calls), r4.closed_at.is_some()),
        (ReservationState::Settled, Some(1), true),
        "settled with its actual usage, as if held and then settled"
    );
    let kinds: Vec<_> = k
        .ledger()
        .entries(&LedgerQuery {
            tenant: "t1".into(),
            job_id: Some(job4),
            ..Default::default()
        })
        .await
        .expect("entries")
        .into_iter()
        .map(|e| (e.entry.kind, e.entry.reservation_id))
        .collect();
    assert_eq!(
        kinds,
        [
            (LedgerKind::Hold, Some(rid4)),
            (LedgerKind::ToolUsage, Some(rid4)),
            (LedgerKind::Settle, Some(rid4))
        ],
        "the ledger reads as a hold, then its settlement"
    );
    assert_eq!(
        store.get_job(job4).await.expect("get").expect("job").state,
        JobState::Succeeded
    );
    assert_eq!(tool_calls_used().await, 3);
    // Checked, the same batch is refused by the budget.
    let checked = hold(Uuid::now_v7(), true);
    let rid5 = checked.id;
    let mut batch = before(checked);
    batch.claims.clear();
    batch.settlements.push(settle(rid5));
    let err = store.commit(batch).await.expect_err("checked");
    assert!(matches!(err, StoreError::Conflict { entity: "budget", .. }), "{err}");
    assert!(store.get_reservation(rid5).await.expect("get").is_none());
    assert_eq!(tool_calls_used().await, 3);
}

/// Policy texts are stored by the batch that creates the job naming them, once per sha256,
/// only if the batch applies; any text can be read back by its sha256.
pub async fn policy_texts(store: Arc<dyn KernelStore>) {
    let (k, _clock) = kernel_with_clock(store.clone());
    let text = PolicyText::new("default = \"deny\"\n# rules\n".repeat(40));
    let other = PolicyText::new("default = \"allow\"\n".into());
    assert_eq!(store.policy_text(text.sha256()).await.expect("read"), None);

    // Stored by the job's creation, in its transaction.
    let mut new = NewJob::new("t1", "agent");
    new.policy_text = Some(text.clone());
    let first = k.jobs().create(new).await.expect("create").job;
    assert_eq!(
        store.policy_text(text.sha256()).await.expect("read").as_deref(),
        Some(text.text())
    );
    // The same text again (another job, or in the same batch twice): still the same text.
    let job = Job::queued(NewJob::new("t1", "agent"), None, epoch());
    store
        .commit(Batch {
            jobs: vec![JobWrite {
                job,
                expected_version: None,
            }],
            policy_texts: vec![text.clone(), text.clone(), other.clone()],
            ..Batch::default()
        })
        .await
        .expect("a stored text is stored again without error");
    assert_eq!(
        store.policy_text(text.sha256()).await.expect("read").as_deref(),
        Some(text.text())
    );
    assert_eq!(
        store.policy_text(other.sha256()).await.expect("read").as_deref(),
        Some(other.text())
    );

    // A batch that is refused stores nothing, its texts included.
    let refused = PolicyText::new("default = \"allow\"\n# refused\n".into());
    let err = store
        .commit(Batch {
            jobs: vec![JobWrite {
                job: first,
                expected_version: None,
            }],
            policy_texts: vec![refused.clone()],
            ..Batch::default()
        })
        .await
        .expect_err("inserting a job twice is refused");
    assert!(matches!(err, StoreError::Conflict { entity: "job", .. }), "{err}");
    assert_eq!(store.policy_text(refused.sha256()).await.expect("read"), None);
    assert_eq!(store.policy_text(&"0".repeat(64)).await.expect("read"), None);
}
