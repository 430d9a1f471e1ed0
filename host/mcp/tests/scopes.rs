//! A plugin installed through the API belongs to the scope that installed it: an MCP session of
//! another scope neither lists it nor calls it (an unknown tool, as the HTTP API answers 404), and
//! the governed call path refuses it whichever front end let the call through.

mod common;

use common::{connect, server};
use keel_app::call::CallRequest;
use rmcp::model::{CallToolRequestParams, ClientCapabilities};
use serde_json::json;

fn greet() -> CallToolRequestParams {
    CallToolRequestParams::new("hello__greet").with_arguments(json!({"name": "Ada"}).as_object().unwrap().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_scopes_plugin_is_neither_listed_nor_called() {
    let home = common::home_with_hello("version = 1\ndefault = \"allow\"\n", "").await;
    let server = server(home.path(), None).await;
    keel_app::keys::set_plugin_owner(&server.host().app.db, "hello", "acme")
        .await
        .unwrap();

    let other = connect(&server, "other", ClientCapabilities::default()).await;
    let listed = other.list_all_tools().await.unwrap();
    assert!(listed.is_empty(), "another scope's plugin is listed: {listed:?}");
    let refused = other
        .call_tool(greet())
        .await
        .expect_err("another scope's tool was called");
    assert!(refused.to_string().contains("Unknown tool: hello__greet"), "{refused}");

    let owner = connect(&server, "acme", ClientCapabilities::default()).await;
    let listed = owner.list_all_tools().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let result = owner.call_tool(greet()).await.unwrap();
    assert_eq!(result.is_error, Some(false), "{result:?}");

    // Past any front end: the governed call of another scope finds no such tool.
    let request = CallRequest::new("other", "hello/greet", json!({"name": "Ada"}));
    let outcome = server.host().call(&request).await.unwrap();
    assert!(!outcome.succeeded());
    let error = outcome.error.expect("the refusal");
    assert_eq!(error.code, "unknown_tool", "{}", error.message);
}
