//! `tools/call` reaches exactly the tools `tools/list` offers, by the names it gives them: a tool
//! the `[mcp]` config leaves out, an unknown tool and an unknown plugin are invalid params (a
//! protocol error, not a tool result), whichever way the server looks the name up.

mod common;

use rmcp::ServiceError;
use rmcp::model::ClientConfig;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ErrorCode};
use rmcp::service::{RoleClient, RunningService};
use serde_json::json;

const ALLOW: &str = "version = 1\ndefault = \"allow\"\n";

async fn call(
    client: &RunningService<RoleClient, ClientConfig>,
    name: &'static str,
) -> Result<rmcp::model::CallToolResult, ServiceError> {
    let params = CallToolRequestParams::new(name).with_arguments(json!({"name": "Ada"}).as_object().cloned().unwrap());
    client.call_tool(params).await
}

fn assert_invalid_params(result: Result<rmcp::model::CallToolResult, ServiceError>, what: &str) {
    match result {
        Err(ServiceError::McpError(e)) => assert_eq!(e.code, ErrorCode::INVALID_PARAMS, "{what}: {e:?}"),
        other => panic!("{what}: expected invalid params, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_exactly_the_listed_tools() {
    let home = common::home_with_hello(ALLOW, "").await;
    let server = common::server(home.path(), None).await;
    let client = common::connect(&server, "default", ClientCapabilities::default()).await;
    let listed: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(listed, ["hello__greet"]);
    let greeted = call(&client, "hello__greet").await.expect("a listed tool runs");
    assert_eq!(greeted.is_error, Some(false), "{greeted:?}");
    assert_invalid_params(
        call(&client, "hello__nope").await,
        "an unknown tool of an installed plugin",
    );
    assert_invalid_params(call(&client, "nope__greet").await, "an unknown plugin");
    assert_invalid_params(call(&client, "hello/greet").await, "the Keel name is not an MCP name");
    let _ = client.cancel().await;

    // The same tool left out by the config: not listed, not callable.
    std::fs::write(home.path().join("config.toml"), "[mcp]\nexclude = [\"hello/greet\"]\n").unwrap();
    let server = common::server(home.path(), None).await;
    let client = common::connect(&server, "default", ClientCapabilities::default()).await;
    assert!(client.list_all_tools().await.unwrap().is_empty());
    assert_invalid_params(call(&client, "hello__greet").await, "a tool the config leaves out");
    let _ = client.cancel().await;
}
