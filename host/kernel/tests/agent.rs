//! The agent loop on the in-memory store: turns, tools, policy, approvals, budgets, cancel,
//! deadlines, schema validation, concurrency.
#![cfg(feature = "conformance")]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_kernel::action::Resolution;
use keel_kernel::agent::testing::{FakeTools, ScriptedModel, calls};
use keel_kernel::clock::{Clock, ManualClock};
use keel_kernel::event::EventType;
use keel_kernel::job::JobState;
use keel_kernel::ledger::{Budget, BudgetWindow, ExceedStrategy, LedgerKind, LedgerQuery, UsageQuery};
use keel_kernel::memory::MemoryStore;
use keel_kernel::model::{Message, Role};
use keel_kernel::policy::{Policy, SessionApprovalStore, SessionApprovals, SessionKey};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionHandle, ExecutionRequest, Kernel, KernelConfig};
use rust_decimal::Decimal;
use serde_json::json;

const ASK_WRITES: &str = r#"
default = "allow"

[[tool]]
name = "ask-before-writing"
tools = ["fs/write"]
decision = "require_approval"
reason = "writes need a human"

[[tool]]
name = "no-shell"
tools = ["sh/*"]
decision = "deny"
reason = "no shell access"
"#;

struct Setup {
    rt: AgentRuntime,
    model: Arc<ScriptedModel>,
    tools: FakeTools,
    approvals: Arc<SessionApprovals>,
}

fn config() -> AgentConfig {
    AgentConfig {
        poll_ms: 20,
        ..AgentConfig::default()
    }
}

fn setup_with(kernel: Kernel, script: Vec<Message>, tools: FakeTools, policy: &str) -> Setup {
    let model = Arc::new(ScriptedModel::new(script).with_price(Decimal::from(1), Decimal::from(2)));
    let approvals = Arc::new(SessionApprovals::new());
    let policy = Arc::new(Policy::from_toml_str(policy, "test.toml").expect("policy"));
    let rt = AgentRuntime::new(
        kernel,
        model.clone(),
        Arc::new(tools.clone()),
        policy,
        approvals.clone(),
        config(),
    );
    Setup {
        rt,
        model,
        tools,
        approvals,
    }
}

fn setup(script: Vec<Message>, tools: FakeTools, policy: &str) -> Setup {
    setup_with(Kernel::new(Arc::new(MemoryStore::new())), script, tools, policy)
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

/// Tool messages the model saw in its last request.
fn tool_messages(model: &ScriptedModel) -> Vec<String> {
    model
        .last_request()
        .expect("a request")
        .messages
        .iter()
        .filter(|m| m.role == Role::Tool)
        .map(|m| m.content.clone())
        .collect()
}

/// Every action of `h`'s job, in any state.
async fn actions_of(s: &Setup, h: &ExecutionHandle) -> Vec<keel_kernel::action::Action> {
    s.rt.kernel()
        .actions()
        .list(&keel_kernel::action::ActionFilter {
            tenant: "acme".into(),
            job_id: Some(h.job_id()),
            ..Default::default()
        })
        .await
        .expect("actions")
}

/// Approve `action` "for this session".
async fn approve_for_session(h: &ExecutionHandle, action: uuid::Uuid) {
    let mut res = Resolution::approve(true);
    res.value = json!("session");
    h.resolve_action(action, res).await.expect("resolve");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_turn_job_with_two_tools() {
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    tools.add(
        "math/add",
        json!({"type": "object", "required": ["a", "b"]}),
        true,
        |args| async move { Ok(json!(args["a"].as_i64().unwrap_or(0) + args["b"].as_i64().unwrap_or(0))) },
    );
    let s = setup(
        vec![
            calls(0, &[("fs__read", json!({"path": "/tmp/x"}))]),
            calls(1, &[("math__add", json!({"a": 2, "b": 3}))]),
            Message::assistant("the answer is 5", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let h = s.rt.execute(request("add things")).await.expect("execute");
    let events = h.events();
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(r.content.as_deref(), Some("the answer is 5"));
    assert_eq!(r.turns, 3);
    assert_eq!(r.usage.model_calls, 3);
    assert_eq!(r.usage.tool_calls, 2);
    assert!(r.usage.cost > Decimal::ZERO);
    assert_eq!((s.tools.count("fs/read"), s.tools.count("math/add")), (1, 1));
    assert_eq!(s.model.calls(), 3);
    // The model saw the tools under provider-safe names and the results as tool messages.
    let last = s.model.last_request().expect("request");
    let mut names: Vec<_> = last.tools.iter().map(|t| t.name.clone()).collect();
    names.sort();
    assert_eq!(names, vec!["fs__read", "math__add"]);
    assert_eq!(
        tool_messages(&s.model),
        vec![r#"{"echo":{"path":"/tmp/x"}}"#.to_string(), "5".into()]
    );
    // Events: ordered, complete, ending with the final result.
    let events: Vec<_> = tokio::time::timeout(Duration::from_secs(5), events.collect::<Vec<_>>())
        .await
        .expect("stream ends");
    let types: Vec<_> = events.iter().map(|e| e.event_type).collect();
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1), "no gaps");
    for t in [
        EventType::JobStarted,
        EventType::ModelToken,
        EventType::ModelDone,
        EventType::ToolStart,
        EventType::ToolEnd,
        EventType::JobCompleted,
        EventType::FinalResult,
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    assert_eq!(types.last(), Some(&EventType::FinalResult));
    // Ledger: 3 model usages, 2 tool usages, all holds settled.
    let ledger =
        s.rt.kernel()
            .ledger()
            .entries(&LedgerQuery {
                tenant: "acme".into(),
                job_id: Some(h.job_id()),
                ..Default::default()
            })
            .await
            .expect("ledger");
    let count = |k: LedgerKind| ledger.iter().filter(|e| e.entry.kind == k).count();
    assert_eq!(count(LedgerKind::ModelUsage), 3);
    assert_eq!(count(LedgerKind::ToolUsage), 2);
    assert_eq!(count(LedgerKind::Hold), 5);
    assert_eq!(count(LedgerKind::Settle), 5);
    let usage =
        s.rt.kernel()
            .ledger()
            .usage(&UsageQuery {
                tenant: "acme".into(),
                job_id: Some(h.job_id()),
                ..Default::default()
            })
            .await
            .expect("usage");
    assert_eq!(usage.cost, r.usage.cost);
    assert_eq!(usage.tool_calls, 2);
    // The journal has every step.
    let journal = s.rt.kernel().store().read_journal(h.job_id()).await.expect("journal");
    let keys: Vec<_> = journal.iter().map(|e| e.entry.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "tools",
            "t1/model/started0",
            "t1/model",
            "t1/c0/started",
            "t1/c0/result",
            "t2/model/started0",
            "t2/model",
            "t2/c0/started",
            "t2/c0/result",
            "t3/model/started0",
            "t3/model",
            "final"
        ]
    );
    // Idempotency key: executing again attaches to the same job.
    let mut again = request("add things");
    again.idempotency_key = Some("k1".into());
    let h1 = s.rt.execute(again.clone()).await.expect("execute");
    let h2 = s.rt.execute(again).await.expect("execute again");
    assert_eq!(h1.job_id(), h2.job_id());
    assert_eq!(result(&h2).await.status, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn denied_tool_is_not_called_and_the_model_is_told_why() {
    let tools = FakeTools::new();
    tools.add_echo("sh/exec", false);
    let s = setup(
        vec![
            calls(0, &[("sh__exec", json!({"cmd": "rm -rf /"}))]),
            Message::assistant("ok, I won't", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let h = s.rt.execute(request("clean up")).await.expect("execute");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded);
    assert_eq!(s.tools.count("sh/exec"), 0);
    let told = tool_messages(&s.model);
    assert_eq!(told.len(), 1);
    assert!(
        told[0].contains("denied by policy") && told[0].contains("no shell access"),
        "{told:?}"
    );
    assert_eq!(r.usage.tool_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_tool_input_goes_back_to_the_model() {
    let tools = FakeTools::new();
    tools.add(
        "fs/read",
        json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
        true,
        |_| async { Ok(json!("contents")) },
    );
    let s = setup(
        vec![
            calls(0, &[("fs__read", json!({"path": 42}))]),
            calls(1, &[("fs__read", json!({"path": "/a"}))]),
            Message::assistant("read it", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let h = s.rt.execute(request("read")).await.expect("execute");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded);
    assert_eq!(s.tools.count("fs/read"), 1, "only the valid call ran");
    let told = tool_messages(&s.model);
    assert!(
        told[0].contains("invalid input") && told[0].contains("/path: 42 is not of type \"string\""),
        "{told:?}"
    );
    assert_eq!(told[1], "contents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_tool_goes_back_to_the_model() {
    let s = setup(
        vec![calls(0, &[("nope__x", json!({}))]), Message::assistant("sorry", vec![])],
        FakeTools::new(),
        ASK_WRITES,
    );
    let r = result(&s.rt.execute(request("x")).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Succeeded);
    assert!(tool_messages(&s.model)[0].contains("no tool named `nope__x`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_approved_runs_the_exact_call_and_session_approval_sticks() {
    let tools = FakeTools::new();
    tools.add_echo("fs/write", false);
    let args = json!({"path": "/tmp/a", "data": "hi"});
    let s = setup(
        vec![
            calls(0, &[("fs__write", args.clone())]),
            calls(1, &[("fs__write", args.clone())]),
            Message::assistant("written twice", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let h = s.rt.execute(request("write")).await.expect("execute");
    let action = wait_pending(&h).await;
    assert_eq!(h.job().await.expect("job").state, JobState::WaitingAction);
    assert_eq!(action.request["tool"], "fs/write");
    assert_eq!(action.request["arguments"], args);
    assert_eq!(s.tools.count("fs/write"), 0, "nothing runs before the approval");
    approve_for_session(&h, action.id).await;
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(s.tools.count("fs/write"), 2);
    assert!(
        s.approvals
            .is_call_approved(SessionKey::new("acme", "alice", "s1"), "fs/write", &args)
    );
    let all = actions_of(&s, &h).await;
    assert_eq!(all.len(), 1, "the second identical call was approved for the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_issued_resume_token_resolves_the_approval_once() {
    let tools = FakeTools::new();
    tools.add_echo("fs/write", false);
    let args = json!({"path": "/tmp/t", "data": "by token"});
    let s = setup(
        vec![
            calls(0, &[("fs__write", args.clone())]),
            Message::assistant("done", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let mut tokens = s.rt.issued_tokens();
    let h = s.rt.execute(request("write")).await.expect("execute");
    let issued = tokio::time::timeout(Duration::from_secs(10), tokens.recv())
        .await
        .expect("a token is issued for the approval")
        .expect("channel open");
    assert_eq!(issued.job_id, h.job_id());
    assert!(
        !format!("{issued:?}").contains(&issued.token),
        "Debug never shows the token"
    );
    let actions = s.rt.kernel().actions();
    actions
        .resolve_by_token(&issued.token, Resolution::approve(true))
        .await
        .expect("the token resolves");
    assert!(
        actions
            .resolve_by_token(&issued.token, Resolution::approve(true))
            .await
            .is_err(),
        "single use"
    );
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(s.tools.count("fs/write"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_denied_tells_the_model() {
    let tools = FakeTools::new();
    tools.add_echo("fs/write", false);
    let s = setup(
        vec![
            calls(0, &[("fs__write", json!({"path": "/etc/x"}))]),
            Message::assistant("ok", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let h = s.rt.execute(request("write")).await.expect("execute");
    let action = wait_pending(&h).await;
    h.resolve_action(action.id, Resolution::approve(false))
        .await
        .expect("resolve");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded);
    assert_eq!(s.tools.count("fs/write"), 0);
    assert!(tool_messages(&s.model)[0].contains("denied by a human"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_expired_times_the_job_out() {
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let kernel = Kernel::with_clock(Arc::new(MemoryStore::new()), clock.clone(), KernelConfig::default());
    let tools = FakeTools::new();
    tools.add_echo("fs/write", false);
    let s = setup_with(kernel, vec![calls(0, &[("fs__write", json!({}))])], tools, ASK_WRITES);
    let h = s.rt.execute(request("write")).await.expect("execute");
    wait_pending(&h).await;
    clock.advance(chrono::Duration::hours(25));
    s.rt.kernel().recover_and_sweep(clock.now()).await.expect("sweep");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::TimedOut);
    assert_eq!(r.error.expect("error").code, "action_expired");
    assert_eq!(s.tools.count("fs/write"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budget_exhaustion_mid_job_fails_it() {
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    let s = setup(
        vec![
            calls(0, &[("fs__read", json!({"n": 1}))]),
            calls(1, &[("fs__read", json!({"n": 2}))]),
            Message::assistant("never", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let mut budget = Budget::new("acme", "one tool call", BudgetWindow::Total);
    budget.limits.max_tool_calls = Some(1);
    budget.strategy = ExceedStrategy::Deny;
    s.rt.kernel().ledger().put_budget(budget).await.expect("budget");
    let r = result(&s.rt.execute(request("read")).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Failed);
    assert_eq!(r.error.as_ref().expect("error").code, "budget_exceeded");
    assert_eq!(s.tools.count("fs/read"), 1);
    assert_eq!(r.usage.tool_calls, 1);

    // A per-job cost limit: the first call's worst case fits, the second turn's does not.
    let s = setup(
        vec![
            calls(0, &[("fs__read", json!({}))]),
            Message::assistant("never", vec![]),
        ],
        FakeTools::new(),
        ASK_WRITES,
    );
    let mut req = request("read");
    req.budget.max_cost = Some(Decimal::from_str("0.00003").expect("dec"));
    req.max_tokens = Some(5);
    let r = result(&s.rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "budget_exceeded");
    assert!(
        r.usage.cost <= Decimal::from_str("0.00003").expect("dec"),
        "{}",
        r.usage.cost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_turns_fails_the_job() {
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    let script = (0..10).map(|t| calls(t, &[("fs__read", json!({"t": t}))])).collect();
    let s = setup(script, tools, ASK_WRITES);
    let mut req = request("loop");
    req.max_turns = Some(3);
    let r = result(&s.rt.execute(req).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Failed);
    assert_eq!(r.error.expect("error").code, "max_turns");
    assert_eq!(s.model.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_mid_job_stops_the_loop_promptly() {
    let tools = FakeTools::new();
    tools.add("slow/wait", json!({}), true, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
    let s = setup(vec![calls(0, &[("slow__wait", json!({}))])], tools, ASK_WRITES);
    let h = s.rt.execute(request("wait")).await.expect("execute");
    let mut events = h.events();
    while let Some(e) = events.next().await {
        if e.event_type == EventType::ToolStart {
            break;
        }
    }
    let started = std::time::Instant::now();
    h.cancel("user pressed ctrl-c").await.expect("cancel");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The loop is gone, and the call it stopped (started, so it may have had effects) is charged.
    for _ in 0..100 {
        if s.rt.running_jobs().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(s.rt.running_jobs().is_empty());
    let ledger =
        s.rt.kernel()
            .ledger()
            .entries(&LedgerQuery {
                tenant: "acme".into(),
                job_id: Some(h.job_id()),
                kinds: vec![LedgerKind::Release, LedgerKind::ToolUsage],
                ..Default::default()
            })
            .await
            .expect("ledger");
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].entry.kind, LedgerKind::ToolUsage);
    assert_eq!(ledger[0].entry.usage.tool_calls, 1);
    assert_eq!(ledger[0].entry.data.field("interrupted"), Some(json!(true)));
}

/// A tool call the job's deadline or a cancel stops has started (its effects may have happened):
/// it counts against the budgets, so stopping jobs mid-call cannot run more calls than allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tool_call_stopped_by_the_deadline_or_a_cancel_is_charged() {
    for stop in ["deadline", "cancel"] {
        let tools = FakeTools::new();
        tools.add("slow/wait", json!({}), false, |_| async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            Ok(json!(null))
        });
        let s = setup(vec![calls(0, &[("slow__wait", json!({}))])], tools, ASK_WRITES);
        let mut budget = Budget::new("acme", "one tool call", BudgetWindow::Total);
        budget.limits.max_tool_calls = Some(1);
        budget.strategy = ExceedStrategy::Deny;
        s.rt.kernel().ledger().put_budget(budget).await.expect("budget");

        let mut req = request("wait");
        if stop == "deadline" {
            // Long enough for the call to be running when it strikes, on a loaded machine too.
            req.timeout = Some(Duration::from_millis(1000));
        }
        let h = s.rt.execute(req).await.expect("execute");
        if stop == "cancel" {
            // Cancel once the tool runs (its `tool.start` event comes just before it does).
            for _ in 0..500 {
                if s.tools.count("slow/wait") == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            h.cancel("stop").await.expect("cancel");
        }
        let r = result(&h).await;
        let expected = if stop == "deadline" {
            JobState::TimedOut
        } else {
            JobState::Cancelled
        };
        assert_eq!(r.status, expected, "{stop}");
        assert_eq!(s.tools.count("slow/wait"), 1, "{stop}");
        for _ in 0..100 {
            if s.rt.running_jobs().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let usage =
            s.rt.kernel()
                .ledger()
                .usage(&UsageQuery {
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .await
                .expect("usage");
        assert_eq!(usage.tool_calls, 1, "{stop}: the stopped call is charged");

        // The budget is used up: the next job's call never starts.
        let r = result(&s.rt.execute(request("again")).await.expect("execute")).await;
        assert_eq!(r.status, JobState::Failed, "{stop}: {r:?}");
        assert_eq!(r.error.expect("error").code, "budget_exceeded", "{stop}");
        assert_eq!(s.tools.count("slow/wait"), 1, "{stop}: no second execution");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadline_times_the_job_out() {
    let tools = FakeTools::new();
    tools.add("slow/wait", json!({}), true, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
    let s = setup(vec![calls(0, &[("slow__wait", json!({}))])], tools, ASK_WRITES);
    let mut req = request("wait");
    req.timeout = Some(Duration::from_millis(300));
    let h = s.rt.execute(req).await.expect("execute");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::TimedOut);
    assert_eq!(r.error.expect("error").code, "deadline_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_calls_of_one_turn_run_concurrently() {
    let tools = FakeTools::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    for name in ["p/a", "p/b", "p/c"] {
        let b = barrier.clone();
        tools.add(name, json!({}), true, move |_| {
            let b = b.clone();
            async move {
                // Completes only if all three calls are in flight at once.
                b.wait().await;
                Ok(json!("ok"))
            }
        });
    }
    let s = setup(
        vec![
            calls(0, &[("p__a", json!({})), ("p__b", json!({})), ("p__c", json!({}))]),
            Message::assistant("all three", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let r = result(&s.rt.execute(request("fan out")).await.expect("execute")).await;
    assert_eq!(r.status, JobState::Succeeded);
    assert_eq!(r.usage.tool_calls, 3);
    assert_eq!(tool_messages(&s.model), vec!["ok", "ok", "ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_cancel_stops_the_loop() {
    let tools = FakeTools::new();
    tools.add("slow/wait", json!({}), true, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
    let s = setup(vec![calls(0, &[("slow__wait", json!({}))])], tools, ASK_WRITES);
    let h = s.rt.execute(request("wait")).await.expect("execute");
    let mut events = h.events();
    while let Some(e) = events.next().await {
        if e.event_type == EventType::ToolStart {
            break;
        }
    }
    s.rt.kernel()
        .jobs()
        .cancel(h.job_id(), "operator")
        .await
        .expect("cancel");
    assert_eq!(result(&h).await.status, JobState::Cancelled);
    // The stream ends after the terminal event.
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(5), events.collect::<Vec<_>>())
        .await
        .expect("stream ends");
    assert_eq!(rest.last().map(|e| e.event_type), Some(EventType::JobCancelled));
}

const ASK_FOR_MODEL: &str = r#"
default = "allow"

[[model]]
name = "ask-before-test-model"
models = ["test-*"]
decision = "require_approval"
reason = "this model is expensive"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_calls_can_require_approval_and_a_session_approval_covers_later_turns() {
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    let s = setup(
        vec![
            calls(0, &[("fs__read", json!({"path": "/a"}))]),
            Message::assistant("done", vec![]),
        ],
        tools,
        ASK_FOR_MODEL,
    );
    let h = s.rt.execute(request("read")).await.expect("execute");
    let action = wait_pending(&h).await;
    assert_eq!(action.request["tool"], "model:test-model");
    assert_eq!(s.model.calls(), 0, "the model is not called before the approval");
    approve_for_session(&h, action.id).await;
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(s.model.calls(), 2);
    let all = actions_of(&s, &h).await;
    assert_eq!(all.len(), 1, "the session approval covered the second turn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declined_model_call_fails_the_job_without_calling_the_model() {
    let s = setup(
        vec![Message::assistant("never", vec![])],
        FakeTools::new(),
        ASK_FOR_MODEL,
    );
    let h = s.rt.execute(request("hi")).await.expect("execute");
    let action = wait_pending(&h).await;
    h.resolve_action(action.id, Resolution::approve(false))
        .await
        .expect("resolve");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Failed, "{r:?}");
    assert_eq!(r.error.expect("error").code, "approval_denied");
    assert_eq!(s.model.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_degrade_budget_switches_to_the_degrade_model() {
    let tools = FakeTools::new();
    tools.add_echo("fs/read", true);
    let s = setup(
        vec![
            calls(0, &[("fs__read", json!({}))]),
            Message::assistant("done cheaply", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    // One model request fits; the second exceeds it, and the strategy is to degrade, not deny.
    let mut budget = Budget::new("acme", "one big request", BudgetWindow::Total);
    budget.limits.max_requests = Some(1);
    budget.strategy = ExceedStrategy::Degrade;
    s.rt.kernel().ledger().put_budget(budget).await.expect("budget");
    let mut req = request("read");
    req.degrade_model = Some("cheap-model".into());
    let h = s.rt.execute(req).await.expect("execute");
    let r = result(&h).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(r.content.as_deref(), Some("done cheaply"));
    assert_eq!(s.model.calls(), 2);
    assert_eq!(
        s.model.last_request().expect("request").model,
        "cheap-model",
        "turn 2 ran on the degrade model"
    );
    let query = keel_kernel::event::EventQuery {
        filter: keel_kernel::event::EventFilter::job(h.job_id()),
        ..Default::default()
    };
    let switched =
        s.rt.kernel()
            .read_events(&query)
            .await
            .expect("events")
            .into_iter()
            .any(|e| e.event_type == EventType::Progress && e.data.value()["degraded_to"] == "cheap-model");
    assert!(switched, "the switch is visible in the job's events");
}

/// A direct call that fails or is refused records its error for people and programs (the job's
/// error, `keel call`, MCP, the API) as the bare reason: the `error: ` / `error (kind): ` framing
/// is for the model's tool message only, and the kind is the error's own field. Both paths: the
/// direct one (no idempotency key) and the runner (with one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_direct_call_records_its_reason_without_the_model_facing_prefix() {
    let tools = FakeTools::new();
    tools.add(
        "p/strict",
        json!({"type": "object", "required": ["name"]}),
        true,
        |_| async { Ok(json!({})) },
    );
    tools.add("p/fails", json!({"type": "object"}), false, |_| async {
        Err(keel_kernel::tool::ToolError::InvalidInput {
            message: "`name` must not be empty".into(),
        })
    });
    let s = setup(vec![], tools, ASK_WRITES);
    let ctx = keel_kernel::context::ExecutionContext::new("acme");
    for key in [None, Some("k1".to_string())] {
        let h =
            s.rt.call_tool(&ctx, "p/fails", json!({}), key.clone())
                .await
                .expect("call");
        let failed = result(&h).await;
        assert_eq!(failed.status, JobState::Failed);
        let error = failed.error.expect("an error");
        assert_eq!(error.code, "invalid_input");
        assert_eq!(error.message, "invalid input: `name` must not be empty", "key {key:?}");
        let key = key.map(|k| format!("{k}-refused"));
        let h =
            s.rt.call_tool(&ctx, "p/strict", json!({}), key.clone())
                .await
                .expect("call");
        let refused = result(&h).await;
        let error = refused.error.expect("an error");
        assert_eq!(error.code, "invalid_input");
        assert!(
            error.message.starts_with("invalid input for `p/strict`: "),
            "key {key:?}: {}",
            error.message
        );
        let tool_result = refused.tool_result.expect("the tool result");
        assert!(
            tool_result.content.starts_with("error: invalid input for `p/strict`"),
            "the model's text keeps it"
        );
    }
}

/// A session name is free text chosen by the client, so two tenants may both call theirs "main":
/// an approval "for this session" in one tenant must never approve the same call in another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_approval_is_not_seen_from_another_tenant_with_the_same_session_name() {
    let tools = FakeTools::new();
    tools.add_echo("fs/write", false);
    let args = json!({"path": "/tmp/a", "data": "hi"});
    let s = setup(
        vec![
            calls(0, &[("fs__write", args.clone())]),
            Message::assistant("written", vec![]),
        ],
        tools,
        ASK_WRITES,
    );
    let in_tenant = |tenant: &str| {
        let mut r = request("write");
        r.scope = tenant.into();
        r.session = Some("main".into());
        r
    };
    let a = s.rt.execute(in_tenant("acme")).await.expect("execute");
    let action = wait_pending(&a).await;
    approve_for_session(&a, action.id).await;
    assert_eq!(result(&a).await.status, JobState::Succeeded);
    assert_eq!(s.tools.count("fs/write"), 1);

    // Same session name, same call, another tenant: it must ask again, not run.
    let b = s.rt.execute(in_tenant("globex")).await.expect("execute");
    let asked = wait_pending(&b).await;
    assert_eq!(asked.request["tool"], "fs/write");
    assert_eq!(
        s.tools.count("fs/write"),
        1,
        "globex's call did not run on acme's approval"
    );
    b.cancel("test").await.expect("cancel");
    assert_eq!(result(&b).await.status, JobState::Cancelled);

    // The approving tenant's session still has it.
    let c = s.rt.execute(in_tenant("acme")).await.expect("execute");
    assert_eq!(result(&c).await.status, JobState::Succeeded);
    assert_eq!(s.tools.count("fs/write"), 2);
    assert!(
        actions_of(&s, &c).await.is_empty(),
        "acme's second job was not asked again"
    );
}
