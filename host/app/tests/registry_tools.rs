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

/// A directory holding `note.txt` ("kept"), kept alive by the first value: its canonical path,
/// and `fs/read`'s arguments for the note.
fn note_dir() -> (tempfile::TempDir, String, serde_json::Value) {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("note.txt"), "kept").unwrap();
    let dir = data.path().canonicalize().unwrap().display().to_string();
    let read = json!({ "path": format!("{dir}/note.txt") });
    (data, dir, read)
}

fn ctx() -> ToolCallContext {
    ToolCallContext {
        call_id: "c".into(),
        job_id: None,
        scope: "default".into(),
        principal: None,
        trace_id: None,
        timeout: None,
        effect_free: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_revokes_and_removal_apply_to_a_running_tool_host() {
    let (_home, app) = home_with_fs().await;
    let (_data, dir, read) = note_dir();
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
    assert_eq!(
        host.tool("fs/read", "default").await.unwrap(),
        listed,
        "looked up as listed"
    );
    assert!(
        host.tool("fs/nope", "default").await.unwrap().is_none(),
        "an unknown tool of a known plugin"
    );
    other.remove_plugin(&admin, "fs").await.unwrap();
    assert!(host.tool("fs/read", "default").await.unwrap().is_none(), "removed");
    let gone = host.call_tool(&ctx(), "fs/read", &read).await.result;
    assert!(matches!(gone, Err(ToolError::UnknownTool { .. })), "removed: {gone:?}");
}

/// One governed call ([`keel_app::tools::one_call`]) reads a plugin's registry stamp once, when it
/// first asks, and its later steps reuse that read: a change committed while it runs applies from
/// the next call, one committed before it starts applies to it, and work it hands to another task
/// reads afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_reads_the_registry_once_from_its_start() {
    let (home, app) = home_with_fs().await;
    let (_data, dir, read) = note_dir();
    let admin = Caller::local_admin("default");
    let grant = GrantRequest {
        read: vec![dir.clone()],
        ..GrantRequest::default()
    };
    // Another process's change (a second App on the same home).
    let other = App::open(home.path()).await.unwrap();
    let host = Arc::new(RegistryToolHost::new(app.clone(), None).await.unwrap());

    keel_app::tools::one_call(async {
        assert!(host.offers("fs/read", "default").await.unwrap(), "offered");
        other.grant(&admin, "fs", &grant).await.unwrap();
        // The call's steps see the registry as the call found it: no grant.
        assert!(host.tool("fs/read", "default").await.unwrap().is_some());
        let denied = host.call_tool(&ctx(), "fs/read", &read).await.result;
        assert!(matches!(denied, Err(ToolError::Denied { .. })), "{denied:?}");
        // A task the call hands work to reads the registry afresh.
        let spawned = tokio::spawn({
            let (host, read) = (host.clone(), read.clone());
            async move { host.call_tool(&ctx(), "fs/read", &read).await.result }
        });
        assert!(spawned.await.unwrap().is_ok(), "another task sees the grant");
    })
    .await;

    // The next call starts after the grant: it sees it; and a removal before the call after it.
    let granted = keel_app::tools::one_call(host.call_tool(&ctx(), "fs/read", &read)).await;
    assert!(granted.result.is_ok(), "{:?}", granted.result);
    other.remove_plugin(&admin, "fs").await.unwrap();
    keel_app::tools::one_call(async {
        assert!(
            !host.offers("fs/read", "default").await.unwrap(),
            "removed before the call"
        );
        assert!(host.tool("fs/read", "default").await.unwrap().is_none());
        // Nested: shares the outer call's reads.
        let gone = keel_app::tools::one_call(host.call_tool(&ctx(), "fs/read", &read)).await;
        assert!(
            matches!(gone.result, Err(ToolError::UnknownTool { .. })),
            "{:?}",
            gone.result
        );
    })
    .await;
}

/// A plugin one scope owns is no tool at all to another: its descriptor (what the kernel
/// validates arguments against, before policy and approvals) is not shown to that scope, as its
/// call is refused; scopes that may see it get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_scope_gets_no_descriptor_of_an_owned_plugin() {
    let (_home, app) = home_with_fs().await;
    let host = RegistryToolHost::new(app.clone(), None).await.unwrap();
    // Home-wide: every scope sees it.
    assert!(host.tool("fs/read", "default").await.unwrap().is_some());
    assert!(host.tool("fs/read", "team-b").await.unwrap().is_some());

    app.db.set_plugin_owner("fs", "team-a").await.unwrap();
    let seen = host.tool("fs/read", "team-a").await.unwrap();
    assert_eq!(seen.map(|d| d.qualified_name()), Some("fs/read".to_string()));
    assert_eq!(host.tool("fs/read", "team-b").await.unwrap(), None);
    assert_eq!(host.tool("fs/read", "default").await.unwrap(), None);
    let mut other = ctx();
    other.scope = "team-b".into();
    let refused = host.call_tool(&other, "fs/read", &json!({"path": "/x"})).await.result;
    assert!(matches!(refused, Err(ToolError::UnknownTool { .. })), "{refused:?}");
}

/// A tool is effect-free while the grants it gets let it write nothing and reach no network (the
/// host's word, from what the user granted; a plugin cannot claim it), and a call that relied on
/// that ([`ToolCallContext::effect_free`]: its start was not put on disk first) is refused once a
/// grant allows an effect, without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_is_effect_free_only_while_its_grants_allow_no_effect() {
    let (_home, app) = home_with_fs().await;
    let (_data, dir, read) = note_dir();
    let admin = Caller::local_admin("default");
    let host = RegistryToolHost::new(app.clone(), None).await.unwrap();
    let effect_free = || async { host.tool("fs/read", "default").await.unwrap().unwrap().effect_free };
    let relying = ToolCallContext {
        effect_free: true,
        ..ctx()
    };

    assert!(effect_free().await, "nothing granted");
    let read_only = GrantRequest {
        read: vec![dir.clone()],
        ..GrantRequest::default()
    };
    app.grant(&admin, "fs", &read_only).await.unwrap();
    assert!(effect_free().await, "a read-only directory changes nothing");
    let listed = host.list_tools().await.unwrap();
    assert!(listed.iter().all(|d| d.effect_free), "listed alike: {listed:?}");
    let got = host.call_tool(&relying, "fs/read", &read).await.result;
    assert!(got.expect("runs").to_string().contains("kept"));

    let writable = tempfile::tempdir().unwrap();
    let write_grant = GrantRequest {
        write: vec![writable.path().canonicalize().unwrap().display().to_string()],
        ..GrantRequest::default()
    };
    app.grant(&admin, "fs", &write_grant).await.unwrap();
    assert!(!effect_free().await, "a writable directory is an effect");
    let refused = host.call_tool(&relying, "fs/read", &read).await;
    match &refused.result {
        Err(ToolError::Host { message }) => assert!(message.contains("grants changed"), "{message}"),
        other => panic!("refused: {other:?}"),
    }
    assert_eq!(refused.receipt.wall_us, 0, "not run");
    assert!(
        host.call_tool(&ctx(), "fs/read", &read).await.result.is_ok(),
        "run when not relied on"
    );

    let revoke = RevokeRequest {
        all: true,
        ..RevokeRequest::default()
    };
    app.revoke(&admin, "fs", &revoke).await.unwrap();
    let net = GrantRequest {
        net: vec!["example.com".into()],
        ..GrantRequest::default()
    };
    app.grant(&admin, "fs", &net).await.unwrap();
    assert!(!effect_free().await, "a network host is an effect");
}
