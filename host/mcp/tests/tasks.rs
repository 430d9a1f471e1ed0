//! MCP tasks (the `io.modelcontextprotocol/tasks` extension as rmcp 3.11 implements it), driven
//! by rmcp's own client over an in-process pipe against a real Keel home (the `hello` guest built
//! from source, SQLite, the kernel's governed path). The official Python SDK (PyPI `mcp` 2.3.0)
//! can claim task results only on the stateless 2026-07-28 protocol, which this server does not
//! negotiate, so rmcp's client is the real client here.
//!
//! The task follows the call's job: `input_required` with an approval elicitation while the job
//! waits for an approval, `completed` with the tool result once approved (by `tasks/update` or by
//! `keel actions approve` elsewhere), `cancelled` after `tasks/cancel`; another scope never sees
//! the task.

mod common;

use std::time::Duration;

use common::{connect, server};
use keel_app::Caller;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, ClientCapabilities, ClientConfig, DetailedTask,
    GetTaskParams, TaskPayload, TaskStatus, UpdateTaskParams,
};
use rmcp::service::{RoleClient, RunningService};
use serde_json::json;

/// Every call of `hello/greet` needs an approval.
const POLICY: &str = r#"version = 1
default = "allow"

[[tool]]
name = "ask-to-greet"
tools = ["hello/greet"]
decision = "require_approval"
"#;

async fn home() -> tempfile::TempDir {
    common::home_with_hello(POLICY, "").await
}

fn tasks_and_forms() -> ClientCapabilities {
    ClientCapabilities::builder()
        .enable_elicitation()
        .enable_tasks()
        .build()
}

fn greet(name: &str) -> CallToolRequestParams {
    CallToolRequestParams::new("hello__greet").with_arguments(json!({"name": name}).as_object().cloned().unwrap())
}

/// Call and expect a task; its id.
async fn call_as_task(client: &RunningService<RoleClient, ClientConfig>, name: &str) -> String {
    match client.peer().call_tool_once(greet(name)).await.expect("tools/call") {
        CallToolResponse::Task(created) => {
            assert_eq!(created.task.status, TaskStatus::InputRequired, "{created:?}");
            created.task.task_id
        }
        other => panic!("expected a task, got {other:?}"),
    }
}

async fn get(client: &RunningService<RoleClient, ClientConfig>, id: &str) -> DetailedTask {
    client
        .peer()
        .get_task(GetTaskParams::new(id))
        .await
        .expect("tasks/get")
        .task
}

/// Poll until the task's status is `want` (at most 30 s).
async fn wait_for(client: &RunningService<RoleClient, ClientConfig>, id: &str, want: TaskStatus) -> DetailedTask {
    for _ in 0..300 {
        let task = get(client, id).await;
        if task.status() == want {
            return task;
        }
        assert!(
            !task.status().is_terminal(),
            "task ended {:?}, expected {want:?}: {task:?}",
            task.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("task {id} never reached {want:?}");
}

fn greeting(task: &DetailedTask) -> String {
    let TaskPayload::Completed { result } = &task.payload else {
        panic!("not completed: {task:?}");
    };
    assert_eq!(result["isError"], json!(false), "{result:?}");
    result["structuredContent"]["greeting"]
        .as_str()
        .expect("a greeting")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_for_approval_as_input_required_and_completes_when_approved_by_tasks_update() {
    let home = home().await;
    let server = server(home.path(), None).await;
    let client = connect(&server, "default", tasks_and_forms()).await;
    let info = client.peer().peer_info().expect("server info");
    assert!(
        info.capabilities.supports_tasks(),
        "the server advertises the tasks extension"
    );

    let id = call_as_task(&client, "Ada").await;
    let task = get(&client, &id).await;
    let TaskPayload::InputRequired { input_requests } = &task.payload else {
        panic!("expected input_required: {task:?}");
    };
    assert_eq!(input_requests.len(), 1, "one approval: {input_requests:?}");
    let (key, request) = input_requests.iter().next().unwrap();
    let request = serde_json::to_value(request).unwrap();
    assert_eq!(request["method"], "elicitation/create", "{request}");
    assert!(
        request["params"]["message"].as_str().unwrap().contains("hello/greet"),
        "{request}"
    );
    assert!(
        task.task
            .status_message
            .as_deref()
            .unwrap_or("")
            .contains("keel actions approve")
    );

    // The task is the job: the same id, waiting for the action the input request names.
    let caller = Caller::local_admin("default");
    let job = keel_app::jobs::get_job(&server.host().kernel, &caller, id.parse().unwrap())
        .await
        .expect("the task's job");
    assert_eq!(job.state.to_string(), "WAITING_ACTION");

    let answer = json!({"action": "accept", "content": {"decision": "approve"}});
    client
        .peer()
        .update_task(UpdateTaskParams::new(
            &id,
            [(key.clone(), answer)].into_iter().collect(),
        ))
        .await
        .expect("tasks/update");
    let done = wait_for(&client, &id, TaskStatus::Completed).await;
    assert_eq!(greeting(&done), "Hello, Ada!");
    let job = keel_app::jobs::get_job(&server.host().kernel, &caller, id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(job.state.to_string(), "SUCCEEDED");
    let _ = client.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_denied_by_tasks_update_completes_as_an_error_result() {
    let home = home().await;
    let server = server(home.path(), None).await;
    let client = connect(&server, "default", tasks_and_forms()).await;
    let id = call_as_task(&client, "Bob").await;
    let task = get(&client, &id).await;
    let TaskPayload::InputRequired { input_requests } = &task.payload else {
        panic!("expected input_required: {task:?}");
    };
    let key = input_requests.keys().next().unwrap().clone();
    client
        .peer()
        .update_task(UpdateTaskParams::new(
            &id,
            [(key, json!({"action": "decline"}))].into_iter().collect(),
        ))
        .await
        .expect("tasks/update");
    let done = wait_for(&client, &id, TaskStatus::Completed).await;
    let TaskPayload::Completed { result } = &done.payload else {
        unreachable!()
    };
    assert_eq!(result["isError"], json!(true), "{result:?}");
    assert_eq!(
        result["structuredContent"]["error"]["kind"], "approval_denied",
        "{result:?}"
    );
    let _ = client.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_cancel_cancels_the_job_and_another_scope_never_sees_the_task() {
    let home = home().await;
    let server = server(home.path(), None).await;
    let client = connect(&server, "default", tasks_and_forms()).await;
    let id = call_as_task(&client, "Cy").await;

    // Another tenant: "unknown task" for get, update and cancel alike.
    let other = connect(&server, "other", tasks_and_forms()).await;
    let refused = other
        .peer()
        .get_task(GetTaskParams::new(&id))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("unknown task"), "{refused}");
    let refused = other
        .peer()
        .cancel_task(CancelTaskParams::new(&id))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("unknown task"), "{refused}");
    assert_eq!(get(&client, &id).await.status(), TaskStatus::InputRequired);

    client
        .peer()
        .cancel_task(CancelTaskParams::new(&id))
        .await
        .expect("tasks/cancel");
    let task = get(&client, &id).await;
    assert_eq!(task.status(), TaskStatus::Cancelled, "{task:?}");
    let job = keel_app::jobs::get_job(
        &server.host().kernel,
        &Caller::local_admin("default"),
        id.parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(job.state.to_string(), "CANCELLED");
    // An ended task cannot be cancelled again.
    let again = client
        .peer()
        .cancel_task(CancelTaskParams::new(&id))
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("already ended"), "{again}");
    let _ = other.cancel().await;
    let _ = client.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_elicitation_the_task_works_on_until_approved_elsewhere() {
    let home = home().await;
    let server = server(home.path(), None).await;
    let client = connect(&server, "default", ClientCapabilities::builder().enable_tasks().build()).await;
    let created = match client.peer().call_tool_once(greet("Di")).await.expect("tools/call") {
        CallToolResponse::Task(created) => created,
        other => panic!("expected a task, got {other:?}"),
    };
    // No elicitation: nothing the client could answer, so `working` with how to approve.
    assert_eq!(created.task.status, TaskStatus::Working);
    let id = created.task.task_id;
    let task = get(&client, &id).await;
    let message = task.task.status_message.clone().unwrap_or_default();
    assert!(message.contains("keel actions approve"), "{message}");

    // Approved from outside the MCP client (as `keel actions approve` does).
    let caller = Caller::local_admin("default");
    let query = keel_app::actions::ActionQuery::pending(Some(id.parse().unwrap()));
    let pending = keel_app::actions::list_actions(&server.host().kernel, &caller, &query)
        .await
        .expect("list");
    assert_eq!(pending.len(), 1, "{pending:?}");
    let approve = keel_app::actions::Decision {
        approved: true,
        for_session: false,
        value: serde_json::Value::Null,
        by: Some("test".into()),
    };
    keel_app::actions::decide(&server.host().kernel, &caller, pending[0].id, approve)
        .await
        .expect("approve");
    let done = wait_for(&client, &id, TaskStatus::Completed).await;
    assert_eq!(greeting(&done), "Hello, Di!");
    let _ = client.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_call_answers_directly_and_a_client_without_tasks_never_gets_one() {
    let home = home().await;
    let allow_all = home.path().join("allow.toml");
    std::fs::write(&allow_all, "version = 1\ndefault = \"allow\"\n").unwrap();
    let server = server(home.path(), Some(&allow_all)).await;
    let client = connect(&server, "default", tasks_and_forms()).await;
    match client.peer().call_tool_once(greet("Eve")).await.expect("tools/call") {
        CallToolResponse::Complete(result) => {
            assert_eq!(result.structured_content.unwrap()["greeting"], "Hello, Eve!");
        }
        other => panic!("a call that ends at once is answered directly: {other:?}"),
    }
    // tasks/* from a client that did not declare the extension: refused (missing capability).
    let plain = connect(&server, "default", ClientCapabilities::default()).await;
    let refused = plain
        .peer()
        .get_task(GetTaskParams::new("x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("-32021") || refused.to_lowercase().contains("capabilit"),
        "{refused}"
    );
    let result = plain.peer().call_tool(greet("Fay")).await.expect("a plain result");
    assert_eq!(result.structured_content.unwrap()["greeting"], "Hello, Fay!");
    let _ = plain.cancel().await;
    let _ = client.cancel().await;
}
