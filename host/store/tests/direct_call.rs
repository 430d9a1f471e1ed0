//! The governed direct call (`AgentRuntime::call_tool`) on a SQLite file: how many write
//! transactions one call costs, that the merged commits write what the runner writes, and that a
//! call whose host dies between its two commits is resumed like any interrupted call (never
//! re-run without a human's yes).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use keel_kernel::action::{Action, ActionFilter};
use keel_kernel::agent::testing::{FakeTools, ScriptedModel, scripted_runtime};
use keel_kernel::context::{ExecutionContext, PolicyRef};
use keel_kernel::event::{EventFilter, EventQuery, RuntimeEvent};
use keel_kernel::job::{Job, JobFilter, JobState};
use keel_kernel::ledger::{
    Budget, BudgetWindow, ExceedStrategy, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent, Reservation,
    ReservationState, ReserveOutcome, ReserveRequest, SettleRequest, Usage, UsageQuery,
};
use keel_kernel::policy::{Policy, SessionApprovals, text_digest};
use keel_kernel::store::{
    Batch, BudgetEvaluator, ClaimRequest, JournalEntry, KernelStore, Lease, LeaseGuard, StoreResult,
};
use keel_kernel::tool::{ToolCallContext, ToolDescriptor, ToolError, ToolHost, ToolOutcome};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionResult, Kernel};
use keel_store::{Database, SqliteKernelStore};
use serde_json::json;
use uuid::Uuid;

/// The SQLite store, counting its write transactions (every method that writes is one).
#[derive(Debug)]
struct Counting {
    inner: SqliteKernelStore,
    writes: AtomicUsize,
}

impl Counting {
    fn write(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}

impl KernelStore for Counting {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>> {
        self.write();
        self.inner.commit(batch)
    }
    fn get_job(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Job>>> {
        self.inner.get_job(id)
    }
    fn get_job_by_key<'a>(&'a self, tenant: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Job>>> {
        self.inner.get_job_by_key(tenant, key)
    }
    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<Job>>> {
        self.inner.list_jobs(filter)
    }
    fn count_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<u64>> {
        self.inner.count_jobs(filter)
    }
    fn overdue_jobs(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.inner.overdue_jobs(now, limit)
    }
    fn get_action(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Action>>> {
        self.inner.get_action(id)
    }
    fn get_action_by_token_hash<'a>(&'a self, token_hash: &'a str) -> BoxFuture<'a, StoreResult<Option<Action>>> {
        self.inner.get_action_by_token_hash(token_hash)
    }
    fn list_actions<'a>(&'a self, filter: &'a ActionFilter) -> BoxFuture<'a, StoreResult<Vec<Action>>> {
        self.inner.list_actions(filter)
    }
    fn expired_actions(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Action>>> {
        self.inner.expired_actions(now, limit)
    }
    fn read_events<'a>(&'a self, query: &'a EventQuery) -> BoxFuture<'a, StoreResult<Vec<RuntimeEvent>>> {
        self.inner.read_events(query)
    }
    fn append_ledger(&self, entry: NewLedgerEvent) -> BoxFuture<'_, StoreResult<LedgerEvent>> {
        self.write();
        self.inner.append_ledger(entry)
    }
    fn list_ledger<'a>(&'a self, query: &'a LedgerQuery) -> BoxFuture<'a, StoreResult<Vec<LedgerEvent>>> {
        self.inner.list_ledger(query)
    }
    fn usage<'a>(&'a self, query: &'a UsageQuery) -> BoxFuture<'a, StoreResult<Usage>> {
        self.inner.usage(query)
    }
    fn put_budget(&self, budget: Budget) -> BoxFuture<'_, StoreResult<()>> {
        self.write();
        self.inner.put_budget(budget)
    }
    fn list_budgets<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, StoreResult<Vec<Budget>>> {
        self.inner.list_budgets(tenant)
    }
    fn delete_budget(&self, id: Uuid) -> BoxFuture<'_, StoreResult<bool>> {
        self.write();
        self.inner.delete_budget(id)
    }
    fn reserve(
        &self,
        request: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> BoxFuture<'_, StoreResult<ReserveOutcome>> {
        self.write();
        self.inner.reserve(request, evaluate)
    }
    fn get_reservation(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>> {
        self.inner.get_reservation(id)
    }
    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>> {
        self.write();
        self.inner.settle(request)
    }
    fn release(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>> {
        self.write();
        self.inner.release(id, now, reason)
    }
    fn release_expired(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>> {
        self.write();
        self.inner.release_expired(now, limit)
    }
    fn extend_holds<'a>(&'a self, ids: &'a [Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>> {
        self.write();
        self.inner.extend_holds(ids, until)
    }
    fn read_journal(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>> {
        self.inner.read_journal(job_id)
    }
    fn claim_jobs(&self, request: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.write();
        self.inner.claim_jobs(request)
    }
    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>> {
        self.write();
        self.inner.renew_lease(guard, ttl_ms)
    }
    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>> {
        self.write();
        self.inner.release_lease(guard)
    }
    fn get_lease(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>> {
        self.inner.get_lease(job_id)
    }

    fn policy_text<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<Option<String>>> {
        self.inner.policy_text(sha256)
    }
}

fn runtime(kernel: Kernel, tools: &FakeTools, config: AgentConfig) -> AgentRuntime {
    scripted_runtime(kernel, vec![], tools, config)
}

fn tools() -> FakeTools {
    let tools = FakeTools::new();
    tools.add_echo("p/once", true);
    tools.add_echo("p/twice", false);
    tools.add_echo("p/pure", false);
    tools.set_effect_free("p/pure", true);
    tools
}

/// A kernel on a fresh SQLite file (kept while the directory lives), counting its writes.
async fn counting_kernel() -> (tempfile::TempDir, Arc<Counting>, Kernel) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::open(&dir.path().join("k.db")).await.expect("open");
    let store = Arc::new(Counting {
        inner: db.kernel_store(),
        writes: AtomicUsize::new(0),
    });
    let kernel = Kernel::new(store.clone());
    (dir, store, kernel)
}

/// One call to its end, and the writes it cost.
async fn counted_call(rt: &AgentRuntime, store: &Counting, tool: &str, key: Option<&str>) -> (ExecutionResult, usize) {
    let before = store.writes.load(Ordering::SeqCst);
    let h = rt
        .call_tool(
            &ExecutionContext::new("t"),
            tool,
            json!({ "n": 1 }),
            key.map(String::from),
        )
        .await
        .expect("call");
    let r = h.result().await.expect("result");
    // The runner releases its lease after the job ended: let its last write land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (r, store.writes.load(Ordering::SeqCst) - before)
}

async fn event_types(kernel: &Kernel, job: Uuid) -> Vec<String> {
    kernel
        .read_events(&EventQuery {
            filter: EventFilter::job(job),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.event_type.as_str().to_string())
        .collect()
}

async fn journal_keys(kernel: &Kernel, job: Uuid) -> Vec<(String, String)> {
    kernel
        .store()
        .read_journal(job)
        .await
        .expect("journal")
        .into_iter()
        .map(|e| (e.entry.key, e.entry.kind))
        .collect()
}

/// The `tool_usage` ledger entries of `job`.
async fn tool_usage(kernel: &Kernel, job: Uuid) -> Vec<LedgerEvent> {
    kernel
        .ledger()
        .entries(&LedgerQuery {
            tenant: "t".into(),
            job_id: Some(job),
            kinds: vec![LedgerKind::ToolUsage],
            ..Default::default()
        })
        .await
        .expect("ledger")
}

async fn ledger_kinds(kernel: &Kernel, job: Uuid) -> Vec<LedgerKind> {
    kernel
        .ledger()
        .entries(&LedgerQuery {
            tenant: "t".into(),
            job_id: Some(job),
            ..Default::default()
        })
        .await
        .expect("ledger")
        .into_iter()
        .map(|e| e.entry.kind)
        .collect()
}

/// Calls under a policy too long to repeat in every job row: each job names it by sha256, its
/// text is stored once, and a call the runner takes (here: one with an idempotency key) reads
/// it back and applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_under_a_long_policy_store_its_text_once() {
    let (dir, _store, kernel) = counting_kernel().await;
    let tools = tools();
    tools.add_echo("p/denied", true);
    let rt = runtime(kernel.clone(), &tools, AgentConfig::default());
    let text = format!(
        "default = \"allow\"\n{}[[tool]]\nname = \"no\"\ntools = [\"p/denied\"]\ndecision = \"deny\"\n",
        "# a real policy is kilobytes of rules and comments\n".repeat(20)
    );
    let sha = text_digest(&text);
    let mut ctx = ExecutionContext::new("t");
    ctx.policy = PolicyRef {
        name: "long.toml".into(),
        version: Some(sha.clone()),
        source: Some(text.clone()),
        ..PolicyRef::default()
    };
    for (tool, key) in [
        ("p/once", None),
        ("p/twice", None),
        ("p/pure", None),
        ("p/once", Some("k1")),
    ] {
        let h = rt
            .call_tool(&ctx, tool, json!({ "n": 1 }), key.map(String::from))
            .await
            .expect("call");
        let r = h.result().await.expect("result");
        assert_eq!(r.status, JobState::Succeeded, "{tool}: {r:?}");
    }
    let h = rt
        .call_tool(&ctx, "p/denied", json!({ "n": 1 }), Some("k2".into()))
        .await
        .expect("call");
    let r = h.result().await.expect("result");
    assert_eq!(tools.count("p/denied"), 0, "the stored policy denies p/denied: {r:?}");

    let jobs = kernel.jobs().list(&JobFilter::tenant("t")).await.expect("jobs");
    assert_eq!(jobs.len(), 5);
    for job in &jobs {
        let policy = &job.input.value()["policy"];
        assert!(policy.get("source").is_none(), "{policy}");
        assert_eq!(policy["version"], sha.as_str());
    }
    let db = rusqlite::Connection::open(dir.path().join("k.db")).expect("open");
    let stored: Vec<(String, String)> = db
        .prepare("SELECT sha256, text FROM policy_texts")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(stored, vec![(sha, text)]);

    // A stored text changed behind Keel's back is not what the job names: refused, not applied.
    let tampered = db
        .execute(
            "UPDATE policy_texts SET text = replace(text, 'decision = \"deny\"', 'decision = \"allow\"')",
            [],
        )
        .expect("tamper");
    assert_eq!(tampered, 1);
    let h = rt
        .call_tool(&ctx, "p/denied", json!({ "n": 1 }), Some("k3".into()))
        .await
        .expect("call");
    let r = h.result().await.expect("result");
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "policy_unavailable");
    assert_eq!(tools.count("p/denied"), 0);
}

/// Issue 9.11: a non-idempotent call costs two write transactions (the durable "started" commit
/// before the side effect, the result after), an idempotent one a single one, and so does a
/// non-idempotent one that is effect-free (its grants allow no effect). The runner path
/// (taken here with an idempotency key) writes the same rows in more transactions; its count is
/// printed (`--nocapture`) for the record. Either way the job, journal, events and ledger agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_commits_twice_and_a_rerun_safe_one_once() {
    let (_dir, store, kernel) = counting_kernel().await;
    let tools = tools();
    let rt = runtime(kernel.clone(), &tools, AgentConfig::default());

    let (twice, writes) = counted_call(&rt, &store, "p/twice", None).await;
    assert_eq!(twice.status, JobState::Succeeded, "{twice:?}");
    assert_eq!(writes, 2, "non-idempotent: started + result");
    let (once, writes) = counted_call(&rt, &store, "p/once", None).await;
    assert_eq!(once.status, JobState::Succeeded, "{once:?}");
    assert_eq!(writes, 1, "idempotent: one commit after the call");
    let (pure, writes) = counted_call(&rt, &store, "p/pure", None).await;
    assert_eq!(pure.status, JobState::Succeeded, "{pure:?}");
    assert_eq!(
        writes, 1,
        "effect-free (its grants allow no effect): one commit after the call"
    );
    let relied: Vec<bool> = tools.contexts().iter().map(|c| c.effect_free).collect();
    assert_eq!(
        relied,
        [false, false, true],
        "only the effect-free call relies on it (the host refuses it if its grants changed)"
    );
    let (runner, runner_writes) = counted_call(&rt, &store, "p/twice", Some("k1")).await;
    assert_eq!(runner.status, JobState::Succeeded, "{runner:?}");
    println!("write transactions per governed call: runner path {runner_writes}, direct 2, idempotent direct 1");
    assert!(runner_writes > 2, "the runner path: {runner_writes}");
    assert_eq!(tools.count("p/twice"), 2);
    assert_eq!(tools.count("p/once"), 1);
    assert_eq!(tools.count("p/pure"), 1);

    // The same records whichever path wrote them.
    let output = json!({ "echo": { "n": 1 } });
    for r in [&twice, &once, &pure, &runner] {
        let stored = rt
            .attach("t", r.job_id)
            .await
            .expect("attach")
            .snapshot()
            .await
            .expect("snapshot");
        assert_eq!(&stored, r, "the handle's result is the stored one");
        let tool = r.tool_result.as_ref().expect("tool result");
        assert_eq!(tool.output.as_ref(), Some(&output));
        assert!(tool.receipt.is_some(), "a receipt");
        assert_eq!(r.usage.tool_calls, 1);
        let job = kernel.jobs().get("t", r.job_id).await.expect("job");
        assert_eq!((job.state, job.tool_calls), (JobState::Succeeded, 1));
        assert_eq!(
            kernel.store().get_lease(r.job_id).await.expect("lease"),
            None,
            "lease released"
        );
    }
    for job in [twice.job_id, once.job_id, pure.job_id] {
        assert_eq!(
            event_types(&kernel, job).await,
            event_types(&kernel, runner.job_id).await
        );
        assert_eq!(
            journal_keys(&kernel, job).await,
            journal_keys(&kernel, runner.job_id).await
        );
        assert_eq!(
            ledger_kinds(&kernel, job).await,
            ledger_kinds(&kernel, runner.job_id).await
        );
    }
    let usage = tool_usage(&kernel, twice.job_id).await;
    assert_eq!(usage.len(), 1);
    assert!(
        usage[0].entry.data.value()["receipt"]["wall_us"].is_u64(),
        "{:?}",
        usage[0].entry.data
    );
    let hold = kernel
        .ledger()
        .reservation(usage[0].entry.reservation_id.expect("reservation"))
        .await
        .expect("hold");
    assert_eq!(hold.state, ReservationState::Settled);
}

/// A direct call stopped while it runs — by its caller's context, or by its handle — ends its
/// job CANCELLED with the attempt charged and its hold settled, in the same number of commits as a
/// call that ends (two, or one for an effect-free tool, whose job is stored only then: its handle
/// reports it RUNNING meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_stopped_while_it_runs_ends_cancelled_and_charged() {
    let (_dir, store, kernel) = counting_kernel().await;
    let tools = FakeTools::new();
    let hang = |_| std::future::pending::<Result<serde_json::Value, ToolError>>();
    tools.add("p/hang", json!({"type": "object"}), false, hang);
    tools.add("p/hang_pure", json!({"type": "object"}), false, hang);
    tools.set_effect_free("p/hang_pure", true);
    let rt = runtime(kernel.clone(), &tools, AgentConfig::default());
    for (tool, commits) in [("p/hang", 2), ("p/hang_pure", 1)] {
        for by_handle in [false, true] {
            let what = format!(
                "{tool}, stopped by its {}",
                if by_handle { "handle" } else { "context" }
            );
            let before = store.writes.load(Ordering::SeqCst);
            let ctx = ExecutionContext::new("t");
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let call = {
                let (rt, ctx) = (rt.clone(), ctx.clone());
                tokio::spawn(async move {
                    rt.call_tool_reporting(&ctx, tool, json!({}), None, Some(started_tx))
                        .await
                })
            };
            let handle = started.await.expect("started");
            assert!(handle.is_direct() && !handle.is_finished(), "{what}");
            let job = handle.job().await.expect("job");
            assert_eq!(job.state, JobState::Running, "{what}");
            let stored = kernel.store().get_job(handle.job_id()).await.expect("get");
            assert_eq!(stored.is_some(), commits == 2, "{what}: stored before it ends");
            tokio::time::sleep(Duration::from_millis(50)).await;
            if by_handle {
                let job = handle.cancel("stopped by the test").await.expect("cancel");
                assert_eq!(job.state, JobState::Cancelled, "{what}");
            } else {
                ctx.cancel.cancel();
            }
            call.await.expect("the call's task").expect("the call");
            let r = handle.result().await.expect("result");
            assert_eq!(r.status, JobState::Cancelled, "{what}: {r:?}");
            let error = r.error.expect("error");
            assert_eq!(error.code, "cancelled", "{what}");
            if by_handle {
                assert_eq!(error.message, "stopped by the test", "{what}");
            }
            assert_eq!(store.writes.load(Ordering::SeqCst) - before, commits, "{what}: commits");
            let usage = tool_usage(&kernel, r.job_id).await;
            assert_eq!(usage.len(), 1, "{what}: the attempt is charged");
            assert_eq!(usage[0].entry.usage.tool_calls, 1, "{what}");
            let hold = kernel
                .ledger()
                .reservation(usage[0].entry.reservation_id.expect("reservation"))
                .await
                .expect("hold");
            assert_eq!(hold.state, ReservationState::Settled, "{what}");
            let events = event_types(&kernel, r.job_id).await;
            assert_eq!(
                events,
                ["job.status_changed", "job.started", "tool.start", "job.cancelled"],
                "{what}"
            );
        }
    }
    assert_eq!(tools.count("p/hang") + tools.count("p/hang_pure"), 4);
}

/// A call made in one commit (an effect-free tool, no budget) that is still running after
/// `store_running_call_after_ms` has its start committed then: other processes see its job
/// RUNNING (and `keel jobs cancel` can end it); it ends like a two-commit call, with the same
/// records. A short call keeps its single commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_one_commit_call_is_stored_while_it_runs() {
    let (_dir, store, kernel) = counting_kernel().await;
    let tools = tools();
    tools.add("p/slow_pure", json!({"type": "object"}), false, |args| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok(json!({ "echo": args }))
    });
    tools.set_effect_free("p/slow_pure", true);
    let config = AgentConfig {
        store_running_call_after_ms: 200,
        ..AgentConfig::default()
    };
    let rt = runtime(kernel.clone(), &tools, config);

    let (short, writes) = counted_call(&rt, &store, "p/pure", None).await;
    assert_eq!(
        (short.status, writes),
        (JobState::Succeeded, 1),
        "a short call: one commit"
    );

    let before = store.writes.load(Ordering::SeqCst);
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let call = {
        let rt = rt.clone();
        tokio::spawn(async move {
            rt.call_tool_reporting(
                &ExecutionContext::new("t"),
                "p/slow_pure",
                json!({ "n": 1 }),
                None,
                Some(started_tx),
            )
            .await
        })
    };
    let handle = started.await.expect("started");
    let job_id = handle.job_id();
    assert_eq!(
        kernel.store().get_job(job_id).await.expect("get"),
        None,
        "not stored at first"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stored = kernel
        .store()
        .get_job(job_id)
        .await
        .expect("get")
        .expect("stored while it runs");
    assert_eq!(stored.state, JobState::Running);
    assert!(
        kernel.store().get_lease(job_id).await.expect("lease").is_some(),
        "leased to this host"
    );
    call.await.expect("task").expect("call");
    let long = handle.result().await.expect("result");
    assert_eq!(long.status, JobState::Succeeded, "{long:?}");
    assert_eq!(
        store.writes.load(Ordering::SeqCst) - before,
        2,
        "stored late: two commits"
    );
    assert_eq!(
        event_types(&kernel, job_id).await,
        event_types(&kernel, short.job_id).await
    );
    assert_eq!(
        journal_keys(&kernel, job_id).await,
        journal_keys(&kernel, short.job_id).await
    );
    assert_eq!(
        ledger_kinds(&kernel, job_id).await,
        ledger_kinds(&kernel, short.job_id).await
    );
    assert_eq!(
        kernel.store().get_lease(job_id).await.expect("lease"),
        None,
        "lease released"
    );
}

/// A direct call whose job another process cancels (`keel jobs cancel`, the HTTP API) stops within
/// `poll_ms`, not at its deadline: one- and two-commit calls alike (the former once it is stored,
/// after `store_running_call_after_ms`). The attempt is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_whose_job_another_process_cancels_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("k.db");
    let config = AgentConfig {
        poll_ms: 50,
        store_running_call_after_ms: 100,
        ..AgentConfig::default()
    };
    let tools = FakeTools::new();
    let hang = |_| std::future::pending::<Result<serde_json::Value, ToolError>>();
    tools.add("p/hang", json!({"type": "object"}), false, hang);
    tools.add("p/hang_pure", json!({"type": "object"}), false, hang);
    tools.set_effect_free("p/hang_pure", true);
    let here = Kernel::new(Arc::new(Database::open(&path).await.expect("open").kernel_store()));
    let rt = runtime(here.clone(), &tools, config);
    // Another process on the same database: it sees the job and cancels it.
    let elsewhere = Kernel::new(Arc::new(Database::open(&path).await.expect("open").kernel_store()));
    for tool in ["p/hang", "p/hang_pure"] {
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let call = {
            let rt = rt.clone();
            tokio::spawn(async move {
                rt.call_tool_reporting(&ExecutionContext::new("t"), tool, json!({}), None, Some(started_tx))
                    .await
            })
        };
        let handle = started.await.expect("started");
        let job_id = handle.job_id();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while elsewhere.store().get_job(job_id).await.expect("get").is_none() {
            assert!(std::time::Instant::now() < until, "{tool}: never stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        elsewhere
            .jobs()
            .cancel(job_id, "cancelled elsewhere")
            .await
            .expect("cancel");
        let stopped = tokio::time::timeout(Duration::from_secs(5), call).await;
        stopped
            .unwrap_or_else(|_| panic!("{tool}: the call ran on after its job was cancelled"))
            .expect("task")
            .expect("call");
        let r = handle.result().await.expect("result");
        assert_eq!(r.status, JobState::Cancelled, "{tool}: {r:?}");
        assert_eq!(tool_usage(&here, job_id).await.len(), 1, "{tool}: charged once");
    }
}

/// A tool host whose plugin is granted an effect (a writable directory, a network host) between
/// the kernel's lookup of the tool and the call.
struct GrantedMidCall(FakeTools);

impl ToolHost for GrantedMidCall {
    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<ToolDescriptor>, ToolError>> {
        self.0.list_tools()
    }
    fn tool<'a>(&'a self, tool: &'a str, scope: &'a str) -> BoxFuture<'a, Result<Option<ToolDescriptor>, ToolError>> {
        let described = self.0.tool(tool, scope);
        self.0.set_effect_free(tool, false);
        described
    }
    fn call_tool<'a>(
        &'a self,
        ctx: &'a ToolCallContext,
        tool: &'a str,
        arguments: &'a serde_json::Value,
    ) -> BoxFuture<'a, ToolOutcome> {
        self.0.call_tool(ctx, tool, arguments)
    }
}

/// A call made in one commit because the tool was effect-free, whose grants change before it
/// runs: the host refuses it (it would run with effects and nothing on disk), and the refusal is
/// recorded like any failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_free_call_whose_grants_change_before_it_runs_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::open(&dir.path().join("k.db")).await.expect("open");
    let kernel = Kernel::new(Arc::new(db.kernel_store()));
    let tools = tools();
    let rt = AgentRuntime::new(
        kernel.clone(),
        Arc::new(ScriptedModel::new(vec![])),
        Arc::new(GrantedMidCall(tools.clone())),
        Arc::new(Policy::allow_all()),
        Arc::new(SessionApprovals::new()),
        AgentConfig::default(),
    );
    let r = rt
        .call_tool(&ExecutionContext::new("t"), "p/pure", json!({}), None)
        .await
        .expect("call")
        .result()
        .await
        .expect("result");
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    let error = r.error.expect("error");
    assert!(error.message.contains("grants changed"), "{error:?}");
    assert!(tools.contexts()[0].effect_free);
    assert!(ledger_kinds(&kernel, r.job_id).await.contains(&LedgerKind::ToolUsage));
}

/// A budget that refuses the call: nothing runs, and the refusal is recorded (a `budget_check`
/// entry, the job FAILED `budget_exceeded`) as on the runner path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_a_budget_refuses_never_runs_and_is_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::open(&dir.path().join("k.db")).await.expect("open");
    let kernel = Kernel::new(Arc::new(db.kernel_store()));
    let mut budget = Budget::new("t", "one call", BudgetWindow::Total);
    budget.limits.max_tool_calls = Some(1);
    budget.strategy = ExceedStrategy::Deny;
    kernel.ledger().put_budget(budget).await.expect("budget");
    let tools = tools();
    let rt = runtime(kernel.clone(), &tools, AgentConfig::default());
    let call = |tool: &'static str| {
        let rt = rt.clone();
        async move {
            rt.call_tool(&ExecutionContext::new("t"), tool, json!({}), None)
                .await
                .expect("call")
                .result()
                .await
                .expect("result")
        }
    };
    // Idempotent, but a budget applies: the hold is checked before the call.
    assert_eq!(call("p/once").await.status, JobState::Succeeded);
    let refused = call("p/once").await;
    assert_eq!(refused.status, JobState::Failed);
    assert_eq!(refused.error.as_ref().map(|e| e.code.as_str()), Some("budget_exceeded"));
    assert_eq!(tools.count("p/once"), 1, "the refused call never ran");
    assert!(
        ledger_kinds(&kernel, refused.job_id)
            .await
            .contains(&LedgerKind::BudgetCheck)
    );
    let refused = call("p/twice").await;
    assert_eq!(refused.status, JobState::Failed);
    assert_eq!(tools.count("p/twice"), 0);
}

/// The host dies between the two commits of a non-idempotent call: the job stays RUNNING with its
/// `started` entry, its lease lapses after the call's deadline, and another host resumes it by
/// asking a human before re-running it; the interrupted attempt is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_host_dies_mid_call_is_not_rerun_without_approval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("k.db");
    let config = AgentConfig {
        lease_ttl_ms: 300,
        tool_timeout_ms: 500,
        poll_ms: 20,
        ..AgentConfig::default()
    };
    let stuck = FakeTools::new();
    stuck.add("p/charge", json!({ "type": "object" }), false, |_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(json!("never"))
    });
    let first = Kernel::new(Arc::new(Database::open(&path).await.expect("open").kernel_store()));
    let dying = runtime(first.clone(), &stuck, config.clone());
    let call = tokio::spawn(async move {
        dying
            .call_tool(&ExecutionContext::new("t"), "p/charge", json!({}), None)
            .await
    });
    while stuck.count("p/charge") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    call.abort();
    let jobs = first.jobs().list(&JobFilter::tenant("t")).await.expect("jobs");
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.state, JobState::Running, "started durably before the side effect");

    let second_tools = FakeTools::new();
    second_tools.add_echo("p/charge", false);
    let second = Kernel::new(Arc::new(Database::open(&path).await.expect("open").kernel_store()));
    let rt = runtime(second.clone(), &second_tools, config);
    let stop = keel_kernel::context::CancellationToken::new();
    let worker = rt.spawn_worker(stop.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let j = second.jobs().get("t", job.id).await.expect("job");
        if j.state == JobState::WaitingAction {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never asked: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = worker.await;
    rt.abort_all();
    assert_eq!(second_tools.count("p/charge"), 0, "not re-run without a yes");
    let charged = tool_usage(&second, job.id).await;
    assert_eq!(charged.len(), 1, "the interrupted attempt is charged once");
}
