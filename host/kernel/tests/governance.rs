//! Governance of the agent loop (issue 8): the job's own policy applies on any host, a job is
//! created already claimed, every re-run of an interrupted call needs its own approval and a fresh
//! budget hold, settlement is bounded by the hold, and an idempotency key is bound to its request.
#![cfg(feature = "conformance")]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use keel_kernel::action::Resolution;
use keel_kernel::action::{Action, ActionFilter};
use keel_kernel::agent::AgentError;
use keel_kernel::agent::testing::{FakeTools, ScriptedModel, calls};
use keel_kernel::agent::{INLINE_POLICY_TEXT_MAX, new_job};
use keel_kernel::clock::{Clock, ManualClock};
use keel_kernel::context::PolicyRef;
use keel_kernel::event::EventType;
use keel_kernel::event::{EventQuery, RuntimeEvent};
use keel_kernel::job::JobState;
use keel_kernel::job::{Job, JobFilter};
use keel_kernel::ledger::{Budget, BudgetWindow, ExceedStrategy, LedgerKind, LedgerQuery, UsageQuery};
use keel_kernel::ledger::{
    LedgerEvent, NewLedgerEvent, Reservation, ReserveOutcome, ReserveRequest, SettleRequest, Usage,
};
use keel_kernel::memory::MemoryStore;
use keel_kernel::model::{Message, ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse};
use keel_kernel::policy::{Policy, SessionApprovals, text_digest};
use keel_kernel::store::{
    Batch, BudgetEvaluator, ClaimRequest, JournalEntry, KernelStore, Lease, LeaseGuard, StoreResult,
};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionHandle, ExecutionRequest, Kernel, KernelConfig};
use rust_decimal::Decimal;
use serde_json::json;
use sha2::{Digest, Sha256};

fn config() -> AgentConfig {
    AgentConfig {
        poll_ms: 20,
        lease_ttl_ms: 3_000,
        ..AgentConfig::default()
    }
}

fn host(kernel: Kernel, model: Arc<dyn ModelProvider>, tools: &FakeTools, policy: Policy) -> AgentRuntime {
    AgentRuntime::new(
        kernel,
        model,
        Arc::new(tools.clone()),
        Arc::new(policy),
        Arc::new(SessionApprovals::new()),
        config(),
    )
}

/// A host over a fresh in-memory store, with `model`, `tools` and the allow-all policy.
fn in_memory(model: Arc<dyn ModelProvider>, tools: &FakeTools) -> AgentRuntime {
    host(
        Kernel::new(Arc::new(MemoryStore::new())),
        model,
        tools,
        Policy::allow_all(),
    )
}

fn request(prompt: &str) -> ExecutionRequest {
    let mut r = ExecutionRequest::new("acme", "test-model", prompt).with_tools(["*"]);
    r.principal = Some("alice".into());
    r.session = Some("s1".into());
    r
}

async fn result(h: &ExecutionHandle) -> keel_kernel::ExecutionResult {
    tokio::time::timeout(Duration::from_secs(10), h.result())
        .await
        .expect("the job ends in time")
        .expect("result")
}

async fn wait_tool_start(h: &ExecutionHandle, n: usize) {
    let mut events = h.events();
    let mut seen = 0;
    let wait = async {
        while let Some(e) = events.next().await {
            if e.event_type == EventType::ToolStart {
                seen += 1;
                if seen == n {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the tool call starts");
}

async fn wait_pending(h: &ExecutionHandle) -> keel_kernel::action::Action {
    for _ in 0..500 {
        if let Some(a) = h.pending_actions().await.expect("pending").into_iter().next() {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no pending action");
}

const DENY_WRITES: &str = r#"
default = "allow"

[[tool]]
name = "no-writes"
tools = ["fs/write"]
decision = "deny"
reason = "this job may not write"
"#;

/// A host whose own policy allows everything runs a job under the policy recorded with the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_runs_under_its_own_recorded_policy_on_any_host() {
    let tools = FakeTools::new();
    tools.add_echo("fs/write", false);
    // Three jobs reach the model (the one with a bad hash does not): a write, then "done", each.
    let model = Arc::new(ScriptedModel::new(
        (0..3)
            .flat_map(|_| {
                [
                    calls(0, &[("fs__write", json!({"path": "x"}))]),
                    Message::assistant("done", vec![]),
                ]
            })
            .collect(),
    ));
    let rt = in_memory(model.clone(), &tools);
    let mut req = request("write");
    req.policy = PolicyRef {
        name: "strict.toml".into(),
        version: Some(hex::encode(Sha256::digest(DENY_WRITES.as_bytes()))),
        source: Some(DENY_WRITES.into()),
        ..PolicyRef::default()
    };
    let r = result(&rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(tools.count("fs/write"), 0, "the job's policy denies fs/write");

    // A recorded policy whose text does not match its hash is refused, not applied.
    let mut req = request("write");
    req.policy = PolicyRef {
        name: "strict.toml".into(),
        version: Some("0".repeat(64)),
        source: Some(DENY_WRITES.into()),
        ..PolicyRef::default()
    };
    let r = result(&rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "policy_unavailable");
    assert_eq!(tools.count("fs/write"), 0);

    // The runtime keeps the last recorded policy it parsed; a job recording another text gets
    // its own rules, and the first text still denies afterwards.
    let allow_writes = "default = \"allow\"\n";
    let recorded = |text: &str| PolicyRef {
        name: "recorded.toml".into(),
        version: Some(hex::encode(Sha256::digest(text.as_bytes()))),
        source: Some(text.into()),
        ..PolicyRef::default()
    };
    let mut req = request("write");
    req.policy = recorded(allow_writes);
    let r = result(&rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(tools.count("fs/write"), 1, "this job's policy allows fs/write");
    let mut req = request("write");
    req.policy = recorded(DENY_WRITES);
    let r = result(&rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(tools.count("fs/write"), 1, "denied again under the first job's text");
}

/// A policy text longer than `INLINE_POLICY_TEXT_MAX` is stored once, apart from the job, whose
/// input names it by sha256; the host that runs the job reads it back and applies it, and an
/// idempotency key still matches the request it was first used with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_policy_is_stored_apart_and_applied_by_the_host_that_runs_the_job() {
    let text = format!(
        "{DENY_WRITES}{}",
        "# a real policy is kilobytes of rules and comments\n".repeat(16)
    );
    assert!(text.len() > INLINE_POLICY_TEXT_MAX);
    let sha = text_digest(&text);
    let store = Arc::new(MemoryStore::new());
    let kernel = Kernel::new(store.clone());
    let long = PolicyRef {
        name: "long.toml".into(),
        version: Some(sha.clone()),
        source: Some(text.clone()),
        ..PolicyRef::default()
    };
    let mut req = request("write");
    req.policy = long.clone();

    // Queued by one front end, not run there.
    let queued = kernel
        .jobs()
        .create(new_job(&req, Utc::now()).expect("job"))
        .await
        .expect("create")
        .job;
    let input = queued.input.value();
    assert!(input["policy"].get("source").is_none(), "{input}");
    assert_eq!(input["policy"]["version"], sha.as_str());
    assert_eq!(store.policy_text(&sha).await.expect("read"), Some(text.clone()));

    // Another host, whose own policy allows everything, runs it under the stored rules.
    let tools = FakeTools::new();
    tools.add_echo("fs/write", false);
    let model = Arc::new(ScriptedModel::new(vec![
        calls(0, &[("fs__write", json!({"path": "x"}))]),
        Message::assistant("done", vec![]),
    ]));
    let rt = host(kernel.clone(), model, &tools, Policy::allow_all());
    assert_eq!(rt.resume_orphans(Utc::now()).await.expect("claim"), vec![queued.id]);
    let r = result(&rt.attach("acme", queued.id).await.expect("attach")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(tools.count("fs/write"), 0, "the stored policy denies fs/write");

    // A text that is not what its recorded sha256 names is refused before anything is stored.
    let mut forged = request("write");
    forged.policy = PolicyRef {
        version: Some(text_digest("default = \"allow\"\n")),
        ..long.clone()
    };
    assert!(matches!(new_job(&forged, Utc::now()), Err(AgentError::Invalid(_))));

    // A key used by a Keel that kept the text in the job's input matches the same request.
    let mut keyed = request("write");
    keyed.policy = long;
    keyed.idempotency_key = Some("k1".into());
    let mut earlier = new_job(&keyed, Utc::now()).expect("job");
    earlier.policy_text = None;
    earlier.input = keel_kernel::json::JsonText::of(&keyed).expect("input");
    let mut fingerprint = earlier.input.value();
    for noise in ["session", "idempotency_key", "metadata"] {
        fingerprint.as_object_mut().expect("object").remove(noise);
    }
    earlier.request_fingerprint = Some(fingerprint);
    let first = kernel.jobs().create(earlier).await.expect("create").job;
    let again = kernel
        .jobs()
        .create(new_job(&keyed, Utc::now()).expect("job"))
        .await
        .expect("the same request with the same key");
    assert!(!again.created);
    assert_eq!(again.job.id, first.id);
}

/// Wait (at most 10 s) until `tool` of `tools` has been called `n` times.
async fn wait_count(tools: &FakeTools, tool: &str, n: usize) {
    for _ in 0..2000 {
        if tools.count(tool) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{tool} was not called {n} times");
}

/// Kill the host during a non-idempotent call, approve the re-run, kill it again during the
/// re-run: the third host asks again (a "yes" covers one attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_rerun_of_an_interrupted_call_needs_its_own_approval() {
    // Leases expire on the store's clock: the test moves it past each dead host's lease.
    let store_clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::with_clock(store_clock.clone()));
    let script = vec![
        calls(0, &[("net__post", json!({"body": "pay"}))]),
        Message::assistant("posted", vec![]),
    ];
    let model = Arc::new(ScriptedModel::new(script));
    let hanging = || {
        let t = FakeTools::new();
        t.add("net/post", json!({}), false, |_| async {
            futures::future::pending::<()>().await;
            Ok(json!(null))
        });
        t
    };
    // Host A starts the POST and dies.
    let tools_a = hanging();
    let a = host(Kernel::new(store.clone()), model.clone(), &tools_a, Policy::allow_all());
    let h = a.execute(request("post")).await.expect("execute");
    wait_tool_start(&h, 1).await;
    wait_count(&tools_a, "net/post", 1).await;
    a.abort_all();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Host B asks, gets a yes, re-runs, and dies during the re-run.
    let tools_b = hanging();
    let b = host(Kernel::new(store.clone()), model.clone(), &tools_b, Policy::allow_all());
    store_clock.advance(chrono::Duration::hours(1));
    assert_eq!(
        b.resume_orphans(chrono::Utc::now()).await.expect("claim"),
        vec![h.job_id()]
    );
    let hb = b.attach("acme", h.job_id()).await.expect("attach");
    let question = wait_pending(&hb).await;
    assert!(question.title.contains("re-run"), "{}", question.title);
    hb.resolve_action(question.id, Resolution::approve(true))
        .await
        .expect("approve");
    wait_tool_start(&hb, 2).await;
    // The event is journaled before the lease is extended and the call made: wait for the call.
    wait_count(&tools_b, "net/post", 1).await;
    b.abort_all();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(tools_b.count("net/post"), 1);

    // Host C must ask again before a third POST.
    let tools_c = FakeTools::new();
    tools_c.add("net/post", json!({}), false, |_| async { Ok(json!("ok")) });
    let c = host(Kernel::new(store.clone()), model, &tools_c, Policy::allow_all());
    store_clock.advance(chrono::Duration::hours(1));
    assert_eq!(
        c.resume_orphans(chrono::Utc::now()).await.expect("claim"),
        vec![h.job_id()]
    );
    let hc = c.attach("acme", h.job_id()).await.expect("attach");
    let mut second = None;
    for _ in 0..300 {
        if let Some(a) = hc.pending_actions().await.expect("pending").into_iter().next() {
            second = Some(a);
            break;
        }
        if tools_c.count("net/post") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tools_c.count("net/post"), 0, "the second re-run ran without a question");
    let second = second.expect("a second re-run question");
    assert_ne!(second.id, question.id);
    hc.resolve_action(second.id, Resolution::approve(true))
        .await
        .expect("approve");
    let r = result(&hc).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(tools_c.count("net/post"), 1);
}

/// An interrupted call whose hold lapsed is re-run only under a fresh hold: with a deny budget
/// of one tool call, the interrupted attempt used it, so the re-run is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rerun_needs_a_fresh_budget_hold() {
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::with_clock(clock.clone()));
    let kernel = || Kernel::with_clock(store.clone(), clock.clone(), KernelConfig::default());
    let model = Arc::new(ScriptedModel::new(vec![
        calls(0, &[("fs__read", json!({}))]),
        Message::assistant("read", vec![]),
    ]));
    let mut budget = Budget::new("acme", "one tool call", BudgetWindow::Total);
    budget.limits.max_tool_calls = Some(1);
    budget.strategy = ExceedStrategy::Deny;
    kernel().ledger().put_budget(budget).await.expect("budget");

    let tools_a = FakeTools::new();
    tools_a.add("fs/read", json!({}), true, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
    let a = host(kernel(), model.clone(), &tools_a, Policy::allow_all());
    let h = a.execute(request("read")).await.expect("execute");
    wait_tool_start(&h, 1).await;
    // The call is running (its lease was extended for it before it started): now A dies.
    wait_count(&tools_a, "fs/read", 1).await;
    a.abort_all();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The hold lapses and the sweeper releases it.
    clock.advance(chrono::Duration::hours(1));
    let swept = kernel().recover_and_sweep(clock.now()).await.expect("sweep");
    assert_eq!(swept.reservations_released, 1);

    let tools_b = FakeTools::new();
    tools_b.add_echo("fs/read", true);
    let b = host(kernel(), model, &tools_b, Policy::allow_all());
    assert_eq!(b.resume_orphans(clock.now()).await.expect("claim"), vec![h.job_id()]);
    let r = result(&b.attach("acme", h.job_id()).await.expect("attach")).await;
    assert_eq!(tools_b.count("fs/read"), 0, "the re-run ran past the budget");
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "budget_exceeded");
    let usage = b
        .kernel()
        .ledger()
        .usage(&UsageQuery {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("usage");
    assert_eq!(usage.tool_calls, 1, "the interrupted attempt is charged, nothing more");
}

/// A provider that reports `cost` for every call, whatever the request (more than any hold).
struct Overcharging {
    inner: ScriptedModel,
    cost: Decimal,
}

impl ModelProvider for Overcharging {
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move {
            let mut r = self.inner.complete(request, on_delta).await?;
            r.usage.cost = self.cost;
            Ok(r)
        })
    }

    fn price(&self, model: &str) -> Option<ModelPrice> {
        self.inner.price(model)
    }
}

/// A model call that reports more than its hold is charged up to the hold, the excess is an
/// overage entry, and the job stops once a deny budget is crossed (the tool is never called).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_beyond_the_hold_is_recorded_as_overage_and_stops_the_job() {
    let dec = |s: &str| Decimal::from_str(s).expect("decimal");
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    let model = Arc::new(Overcharging {
        // Worst case of a call: 1000 output tokens at 100 per million = 0.1.
        inner: ScriptedModel::new(vec![
            calls(0, &[("fs__read", json!({}))]),
            Message::assistant("never", vec![]),
        ])
        .with_price(Decimal::ZERO, Decimal::from(100)),
        cost: dec("0.90"),
    });
    let rt = in_memory(model, &tools);
    let mut budget = Budget::new("acme", "half a dollar", BudgetWindow::Total);
    budget.limits.max_cost = Some(dec("0.50"));
    budget.strategy = ExceedStrategy::Deny;
    rt.kernel().ledger().put_budget(budget).await.expect("budget");
    let mut req = request("read");
    req.max_tokens = Some(1000);
    let h = rt.execute(req).await.expect("execute");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "budget_exceeded");
    assert_eq!(tools.count("fs/read"), 0, "no call after the budget was crossed");
    let entries = rt
        .kernel()
        .ledger()
        .entries(&LedgerQuery {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("ledger");
    let cost_of = |kind: LedgerKind| -> Decimal {
        entries
            .iter()
            .filter(|e| e.entry.kind == kind)
            .map(|e| e.entry.usage.cost)
            .sum()
    };
    assert!(cost_of(LedgerKind::ModelUsage) <= dec("0.1"), "{entries:#?}");
    assert_eq!(
        cost_of(LedgerKind::ModelUsage) + cost_of(LedgerKind::Overage),
        dec("0.90")
    );
}

/// A job's cost limit holds when the requested model has no price but its calls are charged
/// anyway (an alias the provider prices by the model the server reports): once the recorded
/// cost reaches the limit, no further model call is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_cost_limit_holds_when_the_requested_model_has_no_price() {
    let dec = |s: &str| Decimal::from_str(s).expect("decimal");
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    let model = Arc::new(Overcharging {
        // No price for "test-model": nothing can be held in advance.
        inner: ScriptedModel::new(vec![
            calls(0, &[("fs__read", json!({}))]),
            calls(1, &[("fs__read", json!({}))]),
            calls(2, &[("fs__read", json!({}))]),
            Message::assistant("done", vec![]),
        ]),
        cost: dec("0.90"),
    });
    let rt = in_memory(model, &tools);
    let mut req = request("read");
    req.budget.max_cost = Some(dec("0.50"));
    let r = result(&rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "budget_exceeded");
    assert_eq!(
        tools.count("fs/read"),
        1,
        "model calls went on past the job's cost limit"
    );
}

/// A provider whose server reports no usage at all (zero tokens, zero cost).
struct NoUsage(ScriptedModel);

impl ModelProvider for NoUsage {
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move {
            let mut r = self.0.complete(request, on_delta).await?;
            r.usage = Default::default();
            Ok(r)
        })
    }

    fn price(&self, model: &str) -> Option<ModelPrice> {
        self.0.price(model)
    }
}

/// A response that reports no usage is charged an estimate (what was sent and what came back),
/// not nothing: otherwise any number of calls would pass a job's token and cost limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_without_usage_is_charged_an_estimate() {
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    let turns: Vec<Message> = (0..20).map(|i| calls(i, &[("fs__read", json!({}))])).collect();
    let model = Arc::new(NoUsage(
        ScriptedModel::new(turns).with_price(Decimal::from(1000), Decimal::from(1000)),
    ));
    let rt = in_memory(model, &tools);
    let mut req = request("read");
    req.budget.max_tokens = Some(400);
    let r = result(&rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.as_ref().expect("error").code, "budget_exceeded");
    assert!(r.usage.input_tokens > 0 && r.usage.cost > Decimal::ZERO, "{r:?}");
    assert!(tools.count("fs/read") < 20, "the token limit never tripped");
}

/// A provider whose stream breaks after some text: the model ran (and its provider bills it).
struct BreaksMidStream;

impl ModelProvider for BreaksMidStream {
    fn complete<'a>(
        &'a self,
        _request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move {
            on_delta(ModelDelta::Token("x".repeat(4000)));
            Err(ModelError::Unavailable {
                message: "stream interrupted".into(),
            })
        })
    }

    fn price(&self, _model: &str) -> Option<ModelPrice> {
        Some(ModelPrice {
            input_per_mtok: Decimal::from(1000),
            output_per_mtok: Decimal::from(1000),
        })
    }
}

/// A model call that fails after the request was made is recorded as a request, with what the
/// model generated (an estimate from the streamed text), not released as if never made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_call_that_fails_mid_stream_is_recorded() {
    let tools = FakeTools::new();
    let rt = in_memory(Arc::new(BreaksMidStream), &tools);
    let r = result(&rt.execute(request("hi")).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "model_error");
    let usage = job_usage(&rt, r.job_id).await;
    assert_eq!(usage.requests, 1, "{usage:?}");
    assert!(usage.tokens >= 1000 && usage.cost > Decimal::ZERO, "{usage:?}");
}

/// What job `job_id` of tenant `acme` was charged.
async fn job_usage(rt: &AgentRuntime, job_id: uuid::Uuid) -> keel_kernel::ledger::Usage {
    rt.kernel()
        .ledger()
        .usage(&UsageQuery {
            tenant: "acme".into(),
            job_id: Some(job_id),
            ..Default::default()
        })
        .await
        .expect("usage")
}

/// Wait until the job's model has streamed something.
async fn wait_model_token(h: &ExecutionHandle) {
    let mut events = h.events();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            if e.event_type == EventType::ModelToken {
                return;
            }
        }
    })
    .await
    .expect("the model streams");
}

/// A model that streams an answer and never finishes it.
struct StreamsForEver;

impl ModelProvider for StreamsForEver {
    fn complete<'a>(
        &'a self,
        _request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move {
            on_delta(ModelDelta::Token("x".repeat(4000)));
            std::future::pending().await
        })
    }

    fn price(&self, model: &str) -> Option<ModelPrice> {
        BreaksMidStream.price(model)
    }
}

/// A model call stopped by a cancel or by the job's deadline was made (its provider bills what
/// it generated): it is recorded as a request with estimates, never released as if not made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_call_stopped_by_a_cancel_or_the_deadline_is_recorded() {
    for stop in ["cancel", "deadline"] {
        let tools = FakeTools::new();
        let rt = in_memory(Arc::new(StreamsForEver), &tools);
        let mut req = request("hi");
        if stop == "deadline" {
            req.budget.max_runtime_ms = Some(500);
        }
        let h = rt.execute(req).await.expect("execute");
        wait_model_token(&h).await;
        if stop == "cancel" {
            h.cancel("stop").await.expect("cancel");
        }
        let r = result(&h).await;
        assert!(
            matches!(r.status, JobState::Cancelled | JobState::TimedOut),
            "{stop}: {r:?}"
        );
        // The hold is settled as the loop stops.
        let usage = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let usage = job_usage(&rt, r.job_id).await;
                if usage.requests > 0 {
                    return usage;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{stop}: the stopped model call is recorded"));
        assert_eq!(usage.requests, 1, "{stop}: {usage:?}");
        assert!(usage.tokens >= 1000 && usage.cost > Decimal::ZERO, "{stop}: {usage:?}");
    }
}

/// A host that dies while its model answers: the next host charges that request (its provider
/// bills it) before asking again, and says so with an event. Nothing journaled the attempt, so
/// its hold lapsed unused and the request was never in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_call_cut_off_by_its_hosts_death_is_charged_on_resume() {
    let store_clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::with_clock(store_clock.clone()));
    let tools = FakeTools::new();
    let a = host(
        Kernel::new(store.clone()),
        Arc::new(StreamsForEver),
        &tools,
        Policy::allow_all(),
    );
    let h = a.execute(request("hi")).await.expect("execute");
    wait_model_token(&h).await;
    a.abort_all();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let model = Arc::new(ScriptedModel::new(vec![Message::assistant("hello", vec![])]));
    let b = host(Kernel::new(store.clone()), model, &tools, Policy::allow_all());
    store_clock.advance(chrono::Duration::hours(1));
    assert_eq!(
        b.resume_orphans(chrono::Utc::now()).await.expect("claim"),
        vec![h.job_id()]
    );
    let hb = b.attach("acme", h.job_id()).await.expect("attach");
    let r = result(&hb).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    let usage = job_usage(&b, r.job_id).await;
    assert_eq!(usage.requests, 2, "the cut-off request and the answered one: {usage:?}");
    let query = keel_kernel::event::EventQuery {
        filter: keel_kernel::event::EventFilter::job(r.job_id),
        ..Default::default()
    };
    let said = b
        .kernel()
        .read_events(&query)
        .await
        .expect("events")
        .into_iter()
        .any(|e| e.event_type == EventType::Progress && e.data.value()["interrupted"] == true);
    assert!(said, "an event says the model call was interrupted");
}

/// The same idempotency key with a different request is an error; with the same request it
/// attaches to the first job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_is_bound_to_its_request() {
    let tools = FakeTools::new();
    let model = Arc::new(ScriptedModel::new(vec![Message::assistant("hi", vec![])]));
    let rt = in_memory(model, &tools);
    let mut first = request("hello");
    first.idempotency_key = Some("k1".into());
    let h1 = rt.execute(first.clone()).await.expect("execute");
    result(&h1).await;

    let mut other_prompt = first.clone();
    other_prompt.prompt = Some("transfer everything".into());
    let mut other_principal = first.clone();
    other_principal.principal = Some("mallory".into());
    for other in [other_prompt, other_principal] {
        match rt.execute(other).await {
            Err(e) => assert!(e.to_string().contains("different request"), "{e}"),
            Ok(h) => panic!("attached to job {} of another request", h.job_id()),
        }
    }
    // Same request (a retry from a new session of the same client): the first job.
    let mut again = first.clone();
    again.session = Some("s2".into());
    assert_eq!(rt.execute(again).await.expect("execute").job_id(), h1.job_id());
}

/// A worker with `max_concurrent_jobs` claims no more orphans than it has room for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_runs_at_most_its_max_concurrent_jobs() {
    let store: Arc<dyn KernelStore> = Arc::new(MemoryStore::new());
    let kernel = Kernel::new(store.clone());
    for i in 0..3 {
        let new = keel_kernel::agent::new_job(&request(&format!("job {i}")), kernel.clock().now()).expect("job");
        kernel.jobs().create(new).await.expect("queue");
    }
    let model = Arc::new(ScriptedModel::new(vec![]).with_delay(Duration::from_secs(30)));
    let rt = host(kernel, model, &FakeTools::new(), Policy::allow_all());
    rt.set_max_concurrent_jobs(1);
    let now = rt.kernel().clock().now();
    assert_eq!(rt.resume_orphans(now).await.expect("claim").len(), 1);
    assert!(rt.resume_orphans(now).await.expect("claim").is_empty(), "no room left");
    rt.set_max_concurrent_jobs(2);
    assert_eq!(rt.resume_orphans(now).await.expect("claim").len(), 1);
    rt.abort_all();
}

/// A store whose every job insert is followed at once by a worker's poll for unleased jobs (what
/// a `keel worker` polling at that moment does), so the gap between "create" and "claim" is hit
/// every time instead of by luck.
#[derive(Debug)]
struct PolledRightAfterInsert {
    inner: Arc<dyn KernelStore>,
    stolen: std::sync::Mutex<Vec<uuid::Uuid>>,
}

impl KernelStore for PolledRightAfterInsert {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>> {
        Box::pin(async move {
            let inserted: Vec<_> = batch
                .jobs
                .iter()
                .filter(|w| w.expected_version.is_none())
                .map(|w| w.job.id)
                .collect();
            let events = self.inner.commit(batch).await?;
            for id in inserted {
                let now = chrono::Utc::now();
                let claimed = self
                    .inner
                    .claim_jobs(ClaimRequest {
                        owner: "poller".into(),
                        now,
                        ttl_ms: 3_600_000,
                        kinds: vec!["agent".into()],
                        job_id: Some(id),
                        limit: 1,
                    })
                    .await?;
                let mut stolen = self.stolen.lock().unwrap_or_else(|e| e.into_inner());
                stolen.extend(claimed.into_iter().map(|j| j.id));
            }
            Ok(events)
        })
    }
    fn get_job(&self, id: uuid::Uuid) -> BoxFuture<'_, StoreResult<Option<Job>>> {
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
    fn get_action(&self, id: uuid::Uuid) -> BoxFuture<'_, StoreResult<Option<Action>>> {
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
    fn delete_budget(&self, id: uuid::Uuid) -> BoxFuture<'_, StoreResult<bool>> {
        self.inner.delete_budget(id)
    }
    fn reserve(
        &self,
        request: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> BoxFuture<'_, StoreResult<ReserveOutcome>> {
        self.inner.reserve(request, evaluate)
    }
    fn get_reservation(&self, id: uuid::Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>> {
        self.inner.get_reservation(id)
    }
    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>> {
        self.inner.settle(request)
    }
    fn release(&self, id: uuid::Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>> {
        self.inner.release(id, now, reason)
    }
    fn release_expired(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>> {
        self.inner.release_expired(now, limit)
    }
    fn read_journal(&self, job_id: uuid::Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>> {
        self.inner.read_journal(job_id)
    }
    fn claim_jobs(&self, request: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.inner.claim_jobs(request)
    }
    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>> {
        self.inner.renew_lease(guard, ttl_ms)
    }
    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>> {
        self.inner.release_lease(guard)
    }
    fn extend_holds<'a>(&'a self, ids: &'a [uuid::Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>> {
        self.inner.extend_holds(ids, until)
    }
    fn get_lease(&self, job_id: uuid::Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>> {
        self.inner.get_lease(job_id)
    }

    fn policy_text<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<Option<String>>> {
        self.inner.policy_text(sha256)
    }
}

/// `execute` creates its job already leased: a worker polling right after the insert never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_polling_right_after_the_insert_never_claims_an_executed_job() {
    let store = Arc::new(PolledRightAfterInsert {
        inner: Arc::new(MemoryStore::new()),
        stolen: std::sync::Mutex::new(Vec::new()),
    });
    let model = Arc::new(ScriptedModel::new(vec![Message::assistant("hi", vec![])]));
    let rt = host(
        Kernel::new(store.clone()),
        model,
        &FakeTools::new(),
        Policy::allow_all(),
    );
    let h = rt.execute(request("hello")).await.expect("execute");
    let stolen = store.stolen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        stolen.is_empty(),
        "a polling worker claimed the job between create and claim"
    );
    assert_eq!(result(&h).await.status, JobState::Succeeded);
}
