//! Long calls on the direct path (a call that needs no approval): a client that declared MCP
//! tasks gets a task once the call runs past `[mcp] task_after_ms`, and `tasks/cancel` stops it;
//! a client that sends `notifications/cancelled` stops it too. Either way the guest stops, the
//! job is recorded CANCELLED and the attempt is charged. rmcp's own client over an in-process pipe
//! against a real Keel home (SQLite, the `hostile` guest built from source).

mod common;

use std::time::{Duration, Instant};

use common::{connect, server};
use keel_app::Caller;
use keel_app::jobs::JobQuery;
use keel_app::ledger::UsageRequest;
use keel_app::plugins::{GrantRequest, LimitOverrides};
use rmcp::model::{CallToolRequestParams, CallToolResponse, CancelTaskParams, ClientCapabilities, GetTaskParams};
use rmcp::model::{JsonObject, TaskStatus};
use serde_json::json;

/// A home with `hostile` installed (a 60 s deadline per call; `marks` writable as `/marks`, if
/// any) and MCP tasks after 300 ms.
async fn home(marks: Option<&std::path::Path>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "[mcp]\ntask_after_ms = 300\n").unwrap();
    let app = keel_app::App::open(dir.path()).await.unwrap();
    let bytes = keel_testutil::guest_bytes("keel-test-hostile");
    app.install_unattended(&bytes, "hostile").await.unwrap();
    let admin = Caller::local_admin("default");
    let limits = LimitOverrides {
        timeout_ms: Some(60_000),
        ..LimitOverrides::default()
    };
    app.set_limits(&admin, "hostile", &limits, false).await.unwrap();
    if let Some(marks) = marks {
        let grant = GrantRequest {
            write: vec![format!("{}::/marks", marks.display())],
            ..GrantRequest::default()
        };
        app.grant(&admin, "hostile", &grant).await.unwrap();
    }
    dir
}

fn call(tool: &str, arguments: serde_json::Value) -> CallToolRequestParams {
    let arguments: JsonObject = arguments.as_object().cloned().unwrap();
    CallToolRequestParams::new(tool.to_string()).with_arguments(arguments)
}

/// `hostile/infinite_loop` granted nothing (effect-free: one commit, after the call), and
/// `hostile/spin_ms` granted a writable directory (two commits, one on each side of the call).
fn long_calls(marks: &std::path::Path) -> [(&'static str, Option<&std::path::Path>, CallToolRequestParams); 2] {
    [
        ("one commit", None, call("hostile__infinite_loop", json!({}))),
        (
            "two commits",
            Some(marks),
            call("hostile__spin_ms", json!({"dir": "/marks", "ms": 60_000})),
        ),
    ]
}

/// Wait (at most 15 s, well inside the call's 60 s deadline) until the scope has a job in a
/// terminal state and one tool call charged: the guest stopped and its attempt was recorded.
/// Task `id` as `tasks/get` answers it.
async fn task_of(peer: &rmcp::Peer<rmcp::RoleClient>, id: &str) -> rmcp::model::DetailedTask {
    peer.get_task(GetTaskParams::new(id)).await.expect("tasks/get").task
}

async fn ended_and_charged(server: &keel_mcp::McpServer, what: &str) -> keel_app::keel_kernel::job::Job {
    let kernel = &server.host().kernel;
    let admin = Caller::local_admin("default");
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let jobs = keel_app::jobs::list_jobs(kernel, &admin, &JobQuery::default())
            .await
            .unwrap();
        let usage = keel_app::ledger::usage(kernel, &admin, &UsageRequest::default())
            .await
            .unwrap();
        if let [job] = jobs.jobs.as_slice()
            && job.state.is_terminal()
            && usage.usage.tool_calls == 1
        {
            return job.clone();
        }
        assert!(
            Instant::now() < until,
            "{what}: the cancelled call did not end and get charged: {:?}, {:?}",
            jobs.jobs,
            usage.usage
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_call_becomes_a_task_and_tasks_cancel_stops_it() {
    let marks = tempfile::tempdir().unwrap();
    for (what, grant, params) in long_calls(marks.path()) {
        let home = home(grant).await;
        let server = server(home.path(), None).await;
        let caps = ClientCapabilities::builder().enable_tasks().build();
        let client = connect(&server, "default", caps).await;
        let answered = tokio::time::timeout(Duration::from_secs(10), client.peer().call_tool_once(params))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer 10 s into a 60 s call: no task"))
            .expect("tools/call");
        let CallToolResponse::Task(created) = answered else {
            panic!("{what}: expected a task, got {answered:?}");
        };
        assert_eq!(created.task.status, TaskStatus::Working, "{what}: {created:?}");
        let id = created.task.task_id;
        let task = task_of(client.peer(), &id).await;
        assert_eq!(task.status(), TaskStatus::Working, "{what}: {task:?}");

        client
            .peer()
            .cancel_task(CancelTaskParams::new(&id))
            .await
            .expect("tasks/cancel");
        let job = ended_and_charged(&server, what).await;
        assert_eq!(job.id.to_string(), id, "{what}: the task is the call's job");
        assert_eq!(job.state.to_string(), "CANCELLED", "{what}: {job:?}");
        let task = task_of(client.peer(), &id).await;
        assert_eq!(task.status(), TaskStatus::Cancelled, "{what}: {task:?}");
        let _ = client.cancel().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_a_call_stops_it() {
    let marks = tempfile::tempdir().unwrap();
    for (what, grant, params) in long_calls(marks.path()) {
        let home = home(grant).await;
        let server = server(home.path(), None).await;
        // No tasks: the client waits for the result; it gives up after 500 ms, and rmcp's client
        // sends `notifications/cancelled` for a call it stops waiting for.
        let client = connect(&server, "default", ClientCapabilities::default()).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(500), client.peer().call_tool_once(params)).await;
        assert!(gave_up.is_err(), "{what}: the call ended before it was cancelled");
        let job = ended_and_charged(&server, what).await;
        assert_eq!(job.state.to_string(), "CANCELLED", "{what}: {job:?}");
        assert_eq!(
            job.error.as_ref().map(|e| e.code.as_str()),
            Some("cancelled"),
            "{what}: {job:?}"
        );
        let _ = client.cancel().await;
    }
}
