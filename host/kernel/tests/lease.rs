//! Leases, host liveness and store failures in the agent loop (memory store, several "hosts"
//! sharing it): a long call keeps its lease, a skewed clock cannot take a live job, a cancel from
//! another process frees the job's holds, a host that lost its lease writes nothing more (but its
//! model usage is charged), and a busy store during a step neither loses usage nor hangs the job.
#![cfg(feature = "conformance")]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use keel_kernel::action::{Action, ActionFilter};
use keel_kernel::agent::testing::{FakeTools, ScriptedModel, calls};
use keel_kernel::clock::{Clock, ManualClock, SystemClock};
use keel_kernel::event::{EventFilter, EventQuery, EventType, RuntimeEvent};
use keel_kernel::job::{Job, JobFilter, JobState};
use keel_kernel::ledger::{
    Budget, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent, Reservation, ReservationState, ReserveOutcome,
    ReserveRequest, SettleRequest, Usage, UsageQuery,
};
use keel_kernel::memory::MemoryStore;
use keel_kernel::model::{
    FinishReason, Message, ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse, TokenUsage,
};
use keel_kernel::policy::{Policy, SessionApprovals};
use keel_kernel::store::{
    Batch, BudgetEvaluator, ClaimRequest, JournalEntry, KernelStore, Lease, LeaseGuard, StoreError, StoreResult,
};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionHandle, ExecutionRequest, Kernel, KernelConfig};
use rust_decimal::Decimal;
use serde_json::json;
use uuid::Uuid;

/// A store shared by several hosts, seen by one host through faults: its lease renewals can be
/// cut (its heartbeat cannot reach the store), and its commits can fail as "busy" (another
/// process holds the lock).
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn KernelStore>,
    partitioned: AtomicBool,
    /// With `partitioned`: commits and lease releases are cut too (not only renewals).
    cut_writes: AtomicBool,
    /// Commits carrying a journal entry whose key ends with `busy_suffix` fail this many times.
    busy_commits: AtomicU32,
    busy_suffix: Mutex<String>,
}

impl Faulty {
    fn new(inner: Arc<dyn KernelStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            partitioned: AtomicBool::new(false),
            cut_writes: AtomicBool::new(false),
            busy_commits: AtomicU32::new(0),
            busy_suffix: Mutex::new(String::new()),
        })
    }

    fn fail_commits(&self, suffix: &str, n: u32) {
        *self.busy_suffix.lock().unwrap() = suffix.into();
        self.busy_commits.store(n, Ordering::SeqCst);
    }

    fn cut(&self) -> StoreResult<()> {
        if self.partitioned.load(Ordering::SeqCst) {
            Err(StoreError::Backend("connection refused (partitioned)".into()))
        } else {
            Ok(())
        }
    }
}

fn busy() -> StoreError {
    StoreError::Busy("database is locked".into())
}

impl KernelStore for Faulty {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>> {
        let suffix = self.busy_suffix.lock().unwrap().clone();
        let hit = !suffix.is_empty() && batch.journal.iter().any(|j| j.key.ends_with(&suffix));
        if hit
            && self
                .busy_commits
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Box::pin(async { Err(busy()) });
        }
        if self.cut_writes.load(Ordering::SeqCst)
            && let Err(e) = self.cut()
        {
            return Box::pin(async { Err(e) });
        }
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
        self.inner.append_ledger(entry)
    }
    fn list_ledger<'a>(&'a self, query: &'a LedgerQuery) -> BoxFuture<'a, StoreResult<Vec<LedgerEvent>>> {
        self.inner.list_ledger(query)
    }
    fn usage<'a>(&'a self, query: &'a UsageQuery) -> BoxFuture<'a, StoreResult<Usage>> {
        self.inner.usage(query)
    }
    fn put_budget(&self, budget: Budget) -> BoxFuture<'_, StoreResult<()>> {
        self.inner.put_budget(budget)
    }
    fn list_budgets<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, StoreResult<Vec<Budget>>> {
        self.inner.list_budgets(tenant)
    }
    fn delete_budget(&self, id: Uuid) -> BoxFuture<'_, StoreResult<bool>> {
        self.inner.delete_budget(id)
    }
    fn reserve(
        &self,
        request: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> BoxFuture<'_, StoreResult<ReserveOutcome>> {
        self.inner.reserve(request, evaluate)
    }
    fn get_reservation(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>> {
        self.inner.get_reservation(id)
    }
    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>> {
        self.inner.settle(request)
    }
    fn release(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>> {
        self.inner.release(id, now, reason)
    }
    fn release_expired(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>> {
        self.inner.release_expired(now, limit)
    }
    fn extend_holds<'a>(&'a self, ids: &'a [Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>> {
        self.inner.extend_holds(ids, until)
    }
    fn read_journal(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>> {
        self.inner.read_journal(job_id)
    }
    fn claim_jobs(&self, request: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.inner.claim_jobs(request)
    }
    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>> {
        if let Err(e) = self.cut() {
            return Box::pin(async { Err(e) });
        }
        self.inner.renew_lease(guard, ttl_ms)
    }
    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>> {
        if self.cut_writes.load(Ordering::SeqCst)
            && let Err(e) = self.cut()
        {
            return Box::pin(async { Err(e) });
        }
        self.inner.release_lease(guard)
    }
    fn get_lease(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>> {
        self.inner.get_lease(job_id)
    }

    fn policy_text<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<Option<String>>> {
        self.inner.policy_text(sha256)
    }
}

const TTL_MS: u64 = 300;

fn config() -> AgentConfig {
    AgentConfig {
        lease_ttl_ms: TTL_MS,
        poll_ms: 20,
        tool_timeout_ms: 1_000,
        ..AgentConfig::default()
    }
}

fn host(kernel: Kernel, model: Arc<dyn ModelProvider>, tools: &FakeTools) -> AgentRuntime {
    AgentRuntime::new(
        kernel,
        model,
        Arc::new(tools.clone()),
        Arc::new(Policy::allow_all()),
        Arc::new(SessionApprovals::new()),
        config(),
    )
}

fn scripted(script: Vec<Message>) -> Arc<ScriptedModel> {
    Arc::new(ScriptedModel::new(script).with_price(Decimal::from(1), Decimal::from(2)))
}

fn request() -> ExecutionRequest {
    ExecutionRequest::new("acme", "test-model", "go").with_tools(["*"])
}

async fn finish(h: &ExecutionHandle) -> keel_kernel::ExecutionResult {
    tokio::time::timeout(Duration::from_secs(10), h.result())
        .await
        .expect("the job ends in time")
        .expect("result")
}

async fn wait_event(h: &ExecutionHandle, t: EventType) {
    let mut events = h.events();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            if e.event_type == t {
                return;
            }
        }
        panic!("the stream ended before {t:?}");
    })
    .await
    .expect("event in time");
}

async fn ledger(k: &Kernel, job: Uuid) -> Vec<LedgerEvent> {
    k.ledger()
        .entries(&LedgerQuery {
            tenant: "acme".into(),
            job_id: Some(job),
            ..Default::default()
        })
        .await
        .expect("ledger")
}

/// Claim orphans on `h` until one is free: a lease extended for a tool call covers the call's
/// deadline (`tool_timeout_ms`), the kernel's 2 s wait for the tool host's report, and a margin.
async fn claim_when_free(h: &AgentRuntime) -> Vec<Uuid> {
    let until = std::time::Instant::now() + Duration::from_millis(config().tool_timeout_ms + 4_000);
    loop {
        let got = h.resume_orphans(h.kernel().clock().now()).await.expect("claim");
        if !got.is_empty() || std::time::Instant::now() > until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reservations of `job` still HELD.
async fn held(k: &Kernel, job: Uuid) -> Vec<Uuid> {
    let mut out = vec![];
    for e in ledger(k, job).await {
        if e.entry.kind == LedgerKind::Hold
            && let Some(id) = e.entry.reservation_id
            && k.ledger().reservation(id).await.expect("reservation").state == ReservationState::Held
        {
            out.push(id);
        }
    }
    out
}

fn count(entries: &[LedgerEvent], kind: LedgerKind) -> usize {
    entries.iter().filter(|e| e.entry.kind == kind).count()
}

/// Item 1: a tool call that blocks its thread (a CPU-bound guest inside one poll) for three
/// lease lifetimes keeps its lease; a second host polling for orphans never takes the job, and
/// the call runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_longer_than_the_lease_keeps_it_and_runs_once() {
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let script = vec![
        calls(0, &[("net__post", json!({}))]),
        Message::assistant("posted", vec![]),
    ];
    let tools_a = FakeTools::new();
    tools_a.add("net/post", json!({}), true, |_| async {
        // Blocks the worker thread, as a guest computing inside one poll does.
        std::thread::sleep(Duration::from_millis(TTL_MS * 3));
        Ok(json!("ok"))
    });
    let a = host(Kernel::new(store.clone()), scripted(script.clone()), &tools_a);
    let tools_b = FakeTools::new();
    tools_b.add("net/post", json!({}), true, |_| async { Ok(json!("again")) });
    let b = host(Kernel::new(store.clone()), scripted(script), &tools_b);
    let h = a.execute(request()).await.expect("execute");
    wait_event(&h, EventType::ToolStart).await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(TTL_MS * 3 + 200) {
        let taken = b.resume_orphans(b.kernel().clock().now()).await.expect("claim");
        assert!(taken.is_empty(), "a live host's job was taken");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = finish(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!((tools_a.count("net/post"), tools_b.count("net/post")), (1, 0));
}

/// Item 1: leases are judged on the store's clock, so a host whose clock runs an hour ahead
/// cannot take a job whose owner is alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_with_a_skewed_clock_cannot_take_a_live_lease() {
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let script = vec![
        calls(0, &[("net__post", json!({}))]),
        Message::assistant("posted", vec![]),
    ];
    let tools = FakeTools::new();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    tools.add("net/post", json!({}), false, move |_| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok(json!("ok"))
        }
    });
    let a = host(Kernel::new(store.clone()), scripted(script.clone()), &tools);
    let h = a.execute(request()).await.expect("execute");
    wait_event(&h, EventType::ToolStart).await;
    let ahead = Arc::new(ManualClock::new(Utc::now() + chrono::Duration::hours(1)));
    let b = host(
        Kernel::with_clock(store.clone(), ahead.clone(), KernelConfig::default()),
        scripted(script),
        &FakeTools::new(),
    );
    assert!(b.resume_orphans(ahead.now()).await.expect("claim").is_empty());
    assert_eq!(
        store.get_lease(h.job_id()).await.expect("lease").map(|l| l.owner),
        Some(a.owner().to_string())
    );
    gate.notify_one();
    let r = finish(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(tools.count("net/post"), 1);
}

/// Item 1: a commit fenced by an older lease epoch is refused even when the owner name matches
/// (the same worker id re-claimed the job, e.g. after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_with_a_stale_lease_epoch_is_refused() {
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let k = Kernel::new(store.clone());
    let job = k
        .jobs()
        .create(keel_kernel::job::NewJob::new("acme", "agent"))
        .await
        .expect("create")
        .job;
    let claim = || ClaimRequest {
        owner: "w1".into(),
        now: Utc::now(),
        ttl_ms: 60_000,
        kinds: vec!["agent".into()],
        job_id: Some(job.id),
        limit: 1,
    };
    assert_eq!(store.claim_jobs(claim()).await.expect("claim").len(), 1);
    let first = store.get_lease(job.id).await.expect("lease").expect("leased");
    let old = LeaseGuard {
        job_id: job.id,
        owner: "w1".into(),
        epoch: first.epoch,
    };
    assert!(store.release_lease(&old).await.expect("release"));
    assert_eq!(store.claim_jobs(claim()).await.expect("claim").len(), 1);
    let second = store.get_lease(job.id).await.expect("lease").expect("leased");
    assert!(second.epoch > first.epoch, "{first:?} {second:?}");
    let err = k
        .jobs()
        .emit(job.id, EventType::Progress, json!({}))
        .await
        .map(|_| ())
        .and(Ok::<(), keel_kernel::error::KernelError>(()));
    assert!(err.is_ok());
    let err = store
        .commit(Batch {
            events: vec![keel_kernel::event::NewEvent {
                job_id: job.id,
                tenant: "acme".into(),
                event_type: EventType::Progress,
                data: json!({}).into(),
                at: Utc::now(),
            }],
            leases: vec![old.clone()],
            ..Batch::default()
        })
        .await
        .expect_err("stale epoch");
    assert!(matches!(err, StoreError::Conflict { entity: "lease", .. }), "{err}");
    assert!(
        !store.renew_lease(&old, 60_000).await.expect("renew"),
        "a stale epoch cannot renew"
    );
}

/// Item 1: the call context's `call_id` is a stable idempotency key: the same for a re-run of the
/// same logical call by another host, and unique to the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_call_id_is_the_same_when_an_interrupted_call_is_re_run() {
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let script = vec![calls(0, &[("net__get", json!({}))]), Message::assistant("done", vec![])];
    let tools_a = FakeTools::new();
    tools_a.add("net/get", json!({}), true, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
    let a = host(Kernel::new(store.clone()), scripted(script.clone()), &tools_a);
    let h = a.execute(request()).await.expect("execute");
    wait_event(&h, EventType::ToolStart).await;
    while tools_a.count("net/get") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.abort_all();
    let tools_b = FakeTools::new();
    tools_b.add("net/get", json!({}), true, |_| async { Ok(json!("page")) });
    let b = host(Kernel::new(store.clone()), scripted(script), &tools_b);
    assert_eq!(claim_when_free(&b).await, vec![h.job_id()]);
    let r = finish(&b.attach("acme", h.job_id()).await.expect("attach")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    let (ids_a, ids_b) = (tools_a.call_ids(), tools_b.call_ids());
    assert_eq!(ids_a.len(), 1);
    assert_eq!(ids_a, ids_b, "a re-run carries the same key");
    assert!(ids_a[0].contains(&h.job_id().to_string()), "{ids_a:?}");
}

/// A host cut off from the store during a tool call loses the job once the lease (extended to
/// cover the call) lapses; the new owner re-runs the idempotent call and finishes; the old host's
/// loop stops, having written nothing; one charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_host_loses_the_job_and_the_new_owner_finishes() {
    let shared: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let faulty = Faulty::new(shared.clone());
    let script = vec![
        calls(0, &[("net__fetch", json!({}))]),
        Message::assistant("fetched", vec![]),
    ];
    let tools_a = FakeTools::new();
    tools_a.add("net/fetch", json!({}), true, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
    let a = host(Kernel::new(faulty.clone()), scripted(script.clone()), &tools_a);
    let h = a.execute(request()).await.expect("execute");
    wait_event(&h, EventType::ToolStart).await;
    while tools_a.count("net/fetch") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    faulty.cut_writes.store(true, Ordering::SeqCst);
    faulty.partitioned.store(true, Ordering::SeqCst);
    let tools_b = FakeTools::new();
    tools_b.add("net/fetch", json!({}), true, |_| async { Ok(json!("page")) });
    let b = host(Kernel::new(shared.clone()), scripted(script), &tools_b);
    assert_eq!(claim_when_free(&b).await, vec![h.job_id()]);
    let r = finish(&b.attach("acme", h.job_id()).await.expect("attach")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!((tools_a.count("net/fetch"), tools_b.count("net/fetch")), (1, 1));
    faulty.partitioned.store(false, Ordering::SeqCst);
    for _ in 0..100 {
        if a.running_jobs().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.running_jobs().is_empty(), "host A's loop stopped");
    let usage = b
        .kernel()
        .ledger()
        .usage(&UsageQuery {
            tenant: "acme".into(),
            job_id: Some(h.job_id()),
            ..Default::default()
        })
        .await
        .expect("usage");
    // One charge per attempt: A's call may have run before the partition.
    assert_eq!(usage.tool_calls, 2, "one charge per attempt");
}

/// Item 7: a cancel from another process (another kernel on the same store) ends the loop and
/// releases the job's holds at once, not when they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_from_another_process_releases_the_jobs_holds() {
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let tools = FakeTools::new();
    tools.add("net/post", json!({}), false, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
    let a = host(
        Kernel::new(store.clone()),
        scripted(vec![calls(0, &[("net__post", json!({}))])]),
        &tools,
    );
    let h = a.execute(request()).await.expect("execute");
    wait_event(&h, EventType::ToolStart).await;
    assert_eq!(held(a.kernel(), h.job_id()).await.len(), 1, "the call holds its budget");
    // `keel jobs cancel` in another process.
    let other = Kernel::new(store.clone());
    other.jobs().cancel(h.job_id(), "operator").await.expect("cancel");
    let mut left = held(&other, h.job_id()).await;
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = held(&other, h.job_id()).await;
    }
    assert!(left.is_empty(), "holds still held after the cancel: {left:?}");
    assert!(a.running_jobs().is_empty(), "the loop stopped");
}

/// A model that streams one token, waits for `gate`, streams another and answers.
#[derive(Debug)]
struct SlowStream {
    gate: Arc<tokio::sync::Notify>,
    entered: Arc<tokio::sync::Notify>,
}

impl ModelProvider for SlowStream {
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move {
            on_delta(ModelDelta::Token("late ".into()));
            self.entered.notify_one();
            self.gate.notified().await;
            on_delta(ModelDelta::Token("answer".into()));
            Ok(ModelResponse {
                finish_reason: FinishReason::Stop,
                message: Message::assistant("late answer", vec![]),
                usage: TokenUsage {
                    input_tokens: 100,
                    output_tokens: 7,
                    cost: Decimal::new(3, 2),
                },
                model: request.model.clone(),
            })
        })
    }

    fn price(&self, _model: &str) -> Option<ModelPrice> {
        Some(ModelPrice {
            input_per_mtok: Decimal::from(1),
            output_per_mtok: Decimal::from(2),
        })
    }
}

/// Item 8: a host whose heartbeat cannot reach the store loses its lease mid model call and
/// another host takes the job; when the old host's model call then completes, its stream writes no
/// event (fenced like a step), it stops, and the model call it completed is charged in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_that_lost_its_lease_writes_no_events_and_its_model_call_is_charged() {
    let shared: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let faulty = Faulty::new(shared.clone());
    let gate = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(tokio::sync::Notify::new());
    let slow = Arc::new(SlowStream {
        gate: gate.clone(),
        entered: entered.clone(),
    });
    let a = host(Kernel::new(faulty.clone()), slow, &FakeTools::new());
    let h = a.execute(request()).await.expect("execute");
    entered.notified().await;
    faulty.partitioned.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(TTL_MS * 2)).await;
    let b_model =
        Arc::new(ScriptedModel::new(vec![Message::assistant("done", vec![])]).with_delay(Duration::from_millis(500)));
    let b = host(Kernel::new(shared.clone()), b_model, &FakeTools::new());
    assert_eq!(
        b.resume_orphans(b.kernel().clock().now()).await.expect("claim"),
        vec![h.job_id()]
    );
    // A's model call completes while B runs the job.
    gate.notify_one();
    for _ in 0..100 {
        if a.running_jobs().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.running_jobs().is_empty(), "host A's loop stopped");
    let r = finish(&b.attach("acme", h.job_id()).await.expect("attach")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(r.content.as_deref(), Some("done"));
    let events = b
        .kernel()
        .read_events(&EventQuery {
            filter: EventFilter::job(h.job_id()),
            ..Default::default()
        })
        .await
        .expect("events");
    let stale: Vec<_> = events
        .iter()
        .filter(|e| e.data.to_string().contains("answer"))
        .map(|e| (e.event_type, e.data.clone()))
        .collect();
    assert!(stale.is_empty(), "the old host wrote after losing the job: {stale:?}");
    let entries = ledger(b.kernel(), h.job_id()).await;
    assert_eq!(
        count(&entries, LedgerKind::ModelUsage),
        2,
        "both completed model calls are charged: {entries:#?}"
    );
    assert!(held(b.kernel(), h.job_id()).await.is_empty(), "nothing left held");
}

/// Item 6: the database is busy when a completed model call is journaled: the commit is retried,
/// the job finishes on this host, and the model is called once per turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_store_at_a_step_commit_is_retried() {
    let faulty = Faulty::new(Arc::new(MemoryStore::new()));
    let model = scripted(vec![Message::assistant("done", vec![])]);
    let a = host(Kernel::new(faulty.clone()), model.clone(), &FakeTools::new());
    faulty.fail_commits("t1/model", 2);
    let h = a.execute(request()).await.expect("execute");
    let r = finish(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(model.calls(), 1);
    let entries = ledger(a.kernel(), h.job_id()).await;
    assert_eq!(count(&entries, LedgerKind::ModelUsage), 1);
}

/// Item 6: when the step cannot be journaled at all, the completed model call is still charged
/// (not released as unused), and the job is resumed from its journal (the model is asked again,
/// and that call is charged too).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_cannot_be_journaled_still_charges_the_completed_model_call() {
    let faulty = Faulty::new(Arc::new(MemoryStore::new()));
    let model = scripted(vec![Message::assistant("done", vec![])]);
    let a = host(Kernel::new(faulty.clone()), model.clone(), &FakeTools::new());
    faulty.fail_commits("t1/model", 1_000);
    let h = a.execute(request()).await.expect("execute");
    let job_id = h.job_id();
    for _ in 0..200 {
        if count(&ledger(a.kernel(), job_id).await, LedgerKind::ModelUsage) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let entries = ledger(a.kernel(), job_id).await;
    assert_eq!(
        count(&entries, LedgerKind::ModelUsage),
        1,
        "the completed call is charged: {entries:#?}"
    );
    assert_eq!(count(&entries, LedgerKind::Release), 0, "not released as unused");
    // The store heals; the job is resumed (here by a worker pass) and finishes.
    faulty.fail_commits("", 0);
    for _ in 0..100 {
        if a.running_jobs().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(TTL_MS + 50)).await;
    a.resume_orphans(a.kernel().clock().now()).await.expect("resume");
    let r = finish(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    let entries = ledger(a.kernel(), job_id).await;
    assert_eq!(count(&entries, LedgerKind::ModelUsage) as usize, model.calls());
}

/// Also (issue "holds expiring during calls longer than their TTL"): the heartbeat keeps a running
/// call's hold alive, so the sweeper does not release it mid-call (its budget stays reserved).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_longer_than_its_holds_ttl_keeps_its_hold() {
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let kernel = Kernel::with_clock(
        store,
        Arc::new(SystemClock),
        KernelConfig {
            hold_ttl_secs: 1,
            ..KernelConfig::default()
        },
    );
    let tools = FakeTools::new();
    tools.add("net/post", json!({}), false, |_| async {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        Ok(json!("ok"))
    });
    let a = AgentRuntime::new(
        kernel.clone(),
        scripted(vec![
            calls(0, &[("net__post", json!({}))]),
            Message::assistant("done", vec![]),
        ]),
        Arc::new(tools.clone()),
        Arc::new(Policy::allow_all()),
        Arc::new(SessionApprovals::new()),
        AgentConfig {
            tool_timeout_ms: 5_000,
            ..config()
        },
    );
    let h = a.execute(request()).await.expect("execute");
    wait_event(&h, EventType::ToolStart).await;
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    kernel.recover_and_sweep(kernel.clock().now()).await.expect("sweep");
    assert_eq!(
        held(&kernel, h.job_id()).await.len(),
        1,
        "the running call's hold was released"
    );
    let r = finish(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    let entries = ledger(&kernel, h.job_id()).await;
    assert_eq!(count(&entries, LedgerKind::Release), 0, "{entries:#?}");
}
