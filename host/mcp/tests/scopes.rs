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

/// Counts `notifications/tools/list_changed`.
#[derive(Clone, Default)]
struct Changes(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Changes {
    fn seen(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn wait_for(&self, n: usize) {
        for _ in 0..400 {
            if self.seen() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("saw {} list changes, expected {n}", self.seen());
    }
}

impl rmcp::ClientHandler for Changes {
    async fn on_tool_list_changed(&self, _context: rmcp::service::NotificationContext<rmcp::RoleClient>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A scope learns nothing of another scope's plugins from `tools/list_changed`: installing a
/// plugin one scope owns tells that scope's sessions only; a home-wide change tells everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_changes_are_told_only_to_the_scopes_that_see_them() {
    let home = common::home_with_hello("version = 1\ndefault = \"allow\"\n", "[mcp]\nwatch_ms = 50\n").await;
    let server = server(home.path(), None).await;
    let (acme, other) = (Changes::default(), Changes::default());
    let _acme = common::connect_with(&server, "acme", acme.clone()).await;
    let _other = common::connect_with(&server, "other", other.clone()).await;

    let app = &server.host().app;
    let fs = keel_testutil::guest_bytes("keel-plugin-fs");
    let request = keel_app::install::InstallRequest {
        bytes: &fs,
        label: "fs",
        replace: false,
        keep_grants: false,
        limits: json!({}),
        owner: Some("acme"),
    };
    app.install(request, |_, _| Ok(()), |_, _| Ok(())).await.unwrap();
    acme.wait_for(1).await;
    // Several polls of the registry later, the other scope has heard nothing.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(other.seen(), 0, "another scope's install was announced");
    assert_eq!(acme.seen(), 1);

    // A home-wide plugin goes: both scopes' lists change, both are told.
    app.remove_plugin(&keel_app::Caller::local_admin("default"), "hello")
        .await
        .unwrap();
    other.wait_for(1).await;
    acme.wait_for(2).await;
}
