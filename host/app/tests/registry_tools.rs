//! The tool host of a running process follows the plugin registry: it keeps what it decoded and
//! verified of each plugin's record while the record's stamp is unchanged, and a grant, a revoke,
//! a removal or an upgrade made meanwhile (by this process or another) applies at the next call.
//! A real SQLite home and the `keel-plugin-fs` guest built from source.

use std::sync::Arc;

use keel_app::plugins::{GrantRequest, RevokeRequest};
use keel_app::tools::RegistryToolHost;
use keel_app::{App, Caller};
use keel_kernel::tool::{ToolCallContext, ToolError, ToolHost as _};
use serde_json::json;

async fn home_with_fs() -> (tempfile::TempDir, Arc<App>) {
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(App::open(dir.path()).await.unwrap());
    let bytes = keel_testutil::guest_bytes("keel-plugin-fs");
    app.install_unattended(&bytes, "fs").await.unwrap();
    (dir, app)
}

fn ctx() -> ToolCallContext {
    ToolCallContext {
        call_id: "c".into(),
        job_id: None,
        scope: "default".into(),
        principal: None,
        trace_id: None,
        timeout: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_revokes_and_removal_apply_to_a_running_tool_host() {
    let (_home, app) = home_with_fs().await;
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("note.txt"), "kept").unwrap();
    let dir = data.path().canonicalize().unwrap().display().to_string();
    let read = json!({ "path": format!("{dir}/note.txt") });
    let admin = Caller::local_admin("default");

    let host = RegistryToolHost::new(app.clone(), None).await.unwrap();
    let denied = host.call_tool(&ctx(), "fs/read", &read).await.result;
    assert!(
        matches!(denied, Err(ToolError::Denied { .. })),
        "no grant yet: {denied:?}"
    );
    // The same host again, so the record is now cached: still denied.
    assert!(host.call_tool(&ctx(), "fs/read", &read).await.result.is_err());

    let grant = GrantRequest {
        read: vec![dir.clone()],
        ..GrantRequest::default()
    };
    app.grant(&admin, "fs", &grant).await.unwrap();
    let granted = host
        .call_tool(&ctx(), "fs/read", &read)
        .await
        .result
        .expect("granted now");
    assert!(granted.to_string().contains("kept"), "{granted}");

    let revoke = RevokeRequest {
        all: true,
        ..RevokeRequest::default()
    };
    app.revoke(&admin, "fs", &revoke).await.unwrap();
    let revoked = host.call_tool(&ctx(), "fs/read", &read).await.result;
    assert!(matches!(revoked, Err(ToolError::Denied { .. })), "revoked: {revoked:?}");

    // Another process's change (a second App on the same home) applies too.
    let other = App::open(_home.path()).await.unwrap();
    other.grant(&admin, "fs", &grant).await.unwrap();
    assert!(host.call_tool(&ctx(), "fs/read", &read).await.result.is_ok());

    let listed = host
        .list_tools()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.is_named("fs/read"));
    assert!(listed.is_some());
    assert_eq!(host.tool("fs/read").await.unwrap(), listed, "looked up as listed");
    assert!(
        host.tool("fs/nope").await.unwrap().is_none(),
        "an unknown tool of a known plugin"
    );
    other.remove_plugin(&admin, "fs").await.unwrap();
    assert!(host.tool("fs/read").await.unwrap().is_none(), "removed");
    let gone = host.call_tool(&ctx(), "fs/read", &read).await.result;
    assert!(matches!(gone, Err(ToolError::UnknownTool { .. })), "removed: {gone:?}");
}
