//! The agent loop on SQLite files: crash (abort every loop task) and restart over the same
//! database, resuming from the journal without re-running completed calls or charging twice.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_kernel::action::{ActionFilter, Resolution};
use keel_kernel::agent::testing::{FakeTools, ScriptedModel, calls};
use keel_kernel::event::EventType;
use keel_kernel::job::JobState;
use keel_kernel::ledger::{LedgerKind, LedgerQuery, ReservationState};
use keel_kernel::model::Message;
use keel_kernel::policy::{Policy, SessionApprovals};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionHandle, ExecutionRequest, Kernel};
use keel_store::Database;
use rust_decimal::Decimal;
use serde_json::json;

const ASK_WRITES: &str = r#"
default = "allow"

[[tool]]
name = "ask-before-writing"
tools = ["fs/write"]
decision = "require_approval"
"#;

const LEASE_MS: u64 = 300;
/// Tool-call deadline: short, so a lease extended for a call lapses soon after a crash.
const TOOL_MS: u64 = 1_000;

/// One "process": its own connection pool, kernel, runtime, model and tools.
struct Host {
    rt: AgentRuntime,
    model: Arc<ScriptedModel>,
    tools: FakeTools,
}

async fn host(path: &std::path::Path, script: Vec<Message>, tools: FakeTools, policy: &str) -> Host {
    let db = Database::open(path).await.expect("open");
    let kernel = Kernel::new(Arc::new(db.kernel_store()));
    let model = Arc::new(ScriptedModel::new(script).with_price(Decimal::from(1), Decimal::from(2)));
    let rt = AgentRuntime::new(
        kernel,
        model.clone(),
        Arc::new(tools.clone()),
        Arc::new(Policy::from_toml_str(policy, "test.toml").expect("policy")),
        Arc::new(SessionApprovals::new()),
        AgentConfig {
            lease_ttl_ms: LEASE_MS,
            tool_timeout_ms: TOOL_MS,
            poll_ms: 20,
            ..AgentConfig::default()
        },
    );
    Host { rt, model, tools }
}

fn blocking(tools: &FakeTools, name: &str, idempotent: bool) {
    tools.add(name, json!({"type": "object"}), idempotent, |_| async {
        futures::future::pending::<()>().await;
        Ok(json!(null))
    });
}

fn request() -> ExecutionRequest {
    ExecutionRequest::new("acme", "test-model", "do it").with_tools(["*"])
}

async fn wait_tool_start(h: &ExecutionHandle, tool: &str) {
    let mut events = h.events();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            if e.event_type == EventType::ToolStart && e.data.value()["tool"] == tool {
                return true;
            }
        }
        false
    })
    .await
    .expect("tool starts in time");
    assert!(found, "{tool} never started");
}

/// Let a dead host's lease lapse, then resume its jobs on `h`. A lease taken for a tool call
/// covers the call's deadline (`TOOL_MS`), the kernel's wait for the report and a margin, so
/// keep trying for that long.
async fn take_over(h: &Host) -> Vec<uuid::Uuid> {
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    // A call's lease covers its deadline, the kernel's 2 s wait for the tool host's report, and
    // a margin.
    let until = std::time::Instant::now() + Duration::from_millis(TOOL_MS + 3_500);
    loop {
        let got = h.rt.resume_orphans(h.rt.kernel().clock().now()).await.expect("resume");
        if !got.is_empty() || std::time::Instant::now() > until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ledger_kinds(k: &Kernel, job: uuid::Uuid) -> Vec<(LedgerKind, Option<uuid::Uuid>)> {
    k.ledger()
        .entries(&LedgerQuery {
            tenant: "acme".into(),
            job_id: Some(job),
            ..Default::default()
        })
        .await
        .expect("ledger")
        .into_iter()
        .map(|e| (e.entry.kind, e.entry.reservation_id))
        .collect()
}

fn count(entries: &[(LedgerKind, Option<uuid::Uuid>)], kind: LedgerKind) -> usize {
    entries.iter().filter(|(k, _)| *k == kind).count()
}

async fn finish(h: &ExecutionHandle) -> keel_kernel::ExecutionResult {
    tokio::time::timeout(Duration::from_secs(10), h.result())
        .await
        .expect("the job ends in time")
        .expect("result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_mid_turn_resumes_without_rerunning_completed_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let script = vec![
        calls(0, &[("fs__read", json!({"path": "/a"}))]),
        calls(1, &[("net__fetch", json!({"url": "https://example.com"}))]),
        Message::assistant("done", vec![]),
    ];
    // Host 1: fs/read completes; net/fetch (idempotent) hangs until the "crash".
    let tools1 = FakeTools::new();
    tools1.add_echo("fs/read", true);
    blocking(&tools1, "net/fetch", true);
    let h1 = host(&path, script.clone(), tools1, ASK_WRITES).await;
    let handle = h1.rt.execute(request()).await.expect("execute");
    let job_id = handle.job_id();
    wait_tool_start(&handle, "net/fetch").await;
    h1.rt.abort_all();
    assert_eq!(h1.tools.count("fs/read"), 1);
    assert_eq!(h1.model.calls(), 2);

    // Host 2 over the same file.
    let tools2 = FakeTools::new();
    tools2.add_echo("fs/read", true);
    tools2.add("net/fetch", json!({"type": "object"}), true, |_| async {
        Ok(json!("<html>"))
    });
    let h2 = host(&path, script, tools2, ASK_WRITES).await;
    assert_eq!(
        h2.rt
            .resume_orphans(h2.rt.kernel().clock().now())
            .await
            .expect("resume"),
        Vec::<uuid::Uuid>::new(),
        "a live lease is not taken"
    );
    assert_eq!(take_over(&h2).await, vec![job_id]);
    let r = finish(&h2.rt.attach("acme", job_id).await.expect("attach")).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(r.content.as_deref(), Some("done"));
    assert_eq!(h2.tools.count("fs/read"), 0, "the completed call is not re-run");
    assert_eq!(
        h2.tools.count("net/fetch"),
        1,
        "the in-flight idempotent call is re-run"
    );
    assert_eq!(h2.model.calls(), 1, "journaled model turns are not re-asked");
    assert_eq!(r.turns, 3);
    assert_eq!(r.usage.tool_calls, 2);
    // Ledger: one charge per attempt (the interrupted one may have run; the re-run took a fresh
    // hold), and the interrupted call's hold settled exactly once.
    let entries = ledger_kinds(h2.rt.kernel(), job_id).await;
    assert_eq!(count(&entries, LedgerKind::ModelUsage), 3);
    assert_eq!(count(&entries, LedgerKind::ToolUsage), 3);
    assert_eq!(count(&entries, LedgerKind::Settle), 6);
    let journal = h2.rt.kernel().store().read_journal(job_id).await.expect("journal");
    let started = journal
        .iter()
        .find(|e| e.entry.key == "t2/c0/started")
        .expect("started entry");
    let reservation = started.entry.payload.field("reservation_id").expect("a reservation id");
    let hold = uuid::Uuid::parse_str(reservation.as_str().expect("id")).expect("uuid");
    let settled: Vec<_> = entries
        .iter()
        .filter(|(k, r)| *k == LedgerKind::Settle && *r == Some(hold))
        .collect();
    assert_eq!(settled.len(), 1);
    let reservation = h2.rt.kernel().ledger().reservation(hold).await.expect("reservation");
    assert_eq!(reservation.state, ReservationState::Settled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_during_non_idempotent_call_asks_a_human_before_rerunning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let script = vec![
        calls(0, &[("db__insert", json!({"row": 1}))]),
        Message::assistant("inserted", vec![]),
    ];
    let tools1 = FakeTools::new();
    blocking(&tools1, "db/insert", false);
    let h1 = host(&path, script.clone(), tools1, ASK_WRITES).await;
    let handle = h1.rt.execute(request()).await.expect("execute");
    let job_id = handle.job_id();
    wait_tool_start(&handle, "db/insert").await;
    h1.rt.abort_all();

    let tools2 = FakeTools::new();
    tools2.add("db/insert", json!({"type": "object"}), false, |_| async {
        Ok(json!({"id": 7}))
    });
    let h2 = host(&path, script, tools2, ASK_WRITES).await;
    assert_eq!(take_over(&h2).await, vec![job_id]);
    let handle = h2.rt.attach("acme", job_id).await.expect("attach");
    let mut action = None;
    for _ in 0..500 {
        if let Some(a) = handle.pending_actions().await.expect("pending").pop() {
            action = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let action = action.expect("an approval to re-run");
    assert!(
        action.title.contains("host stopped during `db/insert`"),
        "{}",
        action.title
    );
    assert_eq!(action.request["arguments"], json!({"row": 1}));
    assert_eq!(handle.job().await.expect("job").state, JobState::WaitingAction);
    assert_eq!(h2.tools.count("db/insert"), 0, "not re-run without a human");
    handle
        .resolve_action(action.id, Resolution::approve(true))
        .await
        .expect("resolve");
    let r = finish(&handle).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(h2.tools.count("db/insert"), 1);
    let entries = ledger_kinds(h2.rt.kernel(), job_id).await;
    assert_eq!(
        count(&entries, LedgerKind::ToolUsage),
        2,
        "each attempt charged once: the interrupted one and the re-run"
    );
    assert_eq!(count(&entries, LedgerKind::ModelUsage), 2);
}

/// A non-idempotent tool whose grants let it change nothing (effect-free, as the host describes
/// it) is re-run after a host's death without asking anyone: a re-run cannot repeat an effect.
/// The re-run tells the host it relies on that, so the host would refuse it under grants that
/// changed since; and once they do, the next interrupted call asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_during_effect_free_call_reruns_it_without_asking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let script = vec![
        calls(0, &[("calc__roll", json!({"sides": 6}))]),
        Message::assistant("rolled", vec![]),
    ];
    let tools1 = FakeTools::new();
    blocking(&tools1, "calc/roll", false);
    tools1.set_effect_free("calc/roll", true);
    let h1 = host(&path, script.clone(), tools1, ASK_WRITES).await;
    let handle = h1.rt.execute(request()).await.expect("execute");
    let job_id = handle.job_id();
    wait_tool_start(&handle, "calc/roll").await;
    // `tool.start` is committed just before the tool host is called.
    for _ in 0..200 {
        if h1.tools.total() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !h1.tools.contexts()[0].effect_free,
        "a first attempt, started on disk, relies on nothing"
    );
    h1.rt.abort_all();

    let tools2 = FakeTools::new();
    tools2.add("calc/roll", json!({"type": "object"}), false, |_| async {
        Ok(json!(4))
    });
    tools2.set_effect_free("calc/roll", true);
    let h2 = host(&path, script, tools2, ASK_WRITES).await;
    assert_eq!(take_over(&h2).await, vec![job_id]);
    let handle = h2.rt.attach("acme", job_id).await.expect("attach");
    let r = finish(&handle).await;
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert!(handle.pending_actions().await.expect("pending").is_empty());
    assert_eq!(h2.tools.count("calc/roll"), 1, "re-run at once");
    assert!(h2.tools.contexts()[0].effect_free, "the re-run relies on it");
    let entries = ledger_kinds(h2.rt.kernel(), job_id).await;
    assert_eq!(
        count(&entries, LedgerKind::ToolUsage),
        2,
        "each attempt charged once: the interrupted one and the re-run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_action_survives_restarts_and_resumes_when_resolved_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let args = json!({"path": "/tmp/out", "data": "x"});
    let script = vec![
        calls(0, &[("fs__write", args.clone())]),
        Message::assistant("written", vec![]),
    ];
    let make_tools = || {
        let t = FakeTools::new();
        t.add_echo("fs/write", false);
        t
    };
    let h1 = host(&path, script.clone(), make_tools(), ASK_WRITES).await;
    let handle = h1.rt.execute(request()).await.expect("execute");
    let job_id = handle.job_id();
    let mut pending = vec![];
    for _ in 0..500 {
        pending = handle.pending_actions().await.expect("pending");
        if !pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let action = pending.pop().expect("approval");
    h1.rt.abort_all();

    // Several restarts while nobody answers: the job stays WAITING_ACTION, nobody claims it.
    for _ in 0..3 {
        let h = host(&path, script.clone(), make_tools(), ASK_WRITES).await;
        tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
        let claimed = h.rt.resume_orphans(h.rt.kernel().clock().now()).await.expect("resume");
        assert!(claimed.is_empty());
        let job = h.rt.kernel().jobs().get("acme", job_id).await.expect("job");
        assert_eq!(job.state, JobState::WaitingAction);
        h.rt.abort_all();
    }

    // A host with a worker is up; another process (the CLI) resolves the action.
    let h4 = host(&path, script, make_tools(), ASK_WRITES).await;
    let stop = keel_kernel::context::CancellationToken::new();
    let worker = h4.rt.spawn_worker(stop.clone());
    let cli = Database::open(&path).await.expect("open");
    let cli_kernel = Kernel::new(Arc::new(cli.kernel_store()));
    cli_kernel
        .actions()
        .resolve("acme", action.id, Resolution::approve(true))
        .await
        .expect("resolve from the CLI");
    let r = finish(&h4.rt.attach("acme", job_id).await.expect("attach")).await;
    stop.cancel();
    worker.await.expect("worker").expect("worker ok");
    assert_eq!(r.status, JobState::Succeeded, "{r:?}");
    assert_eq!(r.content.as_deref(), Some("written"));
    assert_eq!(h4.tools.count("fs/write"), 1);
    assert_eq!(h1.tools.count("fs/write"), 0);
    let actions = h4
        .rt
        .kernel()
        .actions()
        .list(&ActionFilter {
            tenant: "acme".into(),
            job_id: Some(job_id),
            ..Default::default()
        })
        .await
        .expect("actions");
    assert_eq!(actions.len(), 1, "no second approval was asked");
    assert_eq!(h4.model.calls(), 1, "turn 1 came from the journal");
}
