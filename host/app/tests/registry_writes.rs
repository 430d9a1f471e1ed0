//! Changes to a plugin's record (grant, revoke, limits, a replacing install) are applied to the
//! record as it is when they are written, never to a copy read earlier: a revoke that reported
//! success stays in force, and no concurrent grant is lost. A real SQLite home and the
//! `hello` guests built from source.

use std::sync::Arc;

use keel_app::install::InstallRequest;
use keel_app::plugin_types::Grants;
use keel_app::plugins::{GrantRequest, RevokeRequest};
use keel_app::{App, Caller};
// The registry is a kernel trait; `Database` implements it.
use keel_kernel::registry::PluginRegistry as _;
use serde_json::Value;

async fn home_with_hello() -> (tempfile::TempDir, Arc<App>) {
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(App::open(dir.path()).await.unwrap());
    let bytes = keel_testutil::guest_bytes("keel-test-hello-v2");
    app.install_unattended(&bytes, "hello").await.unwrap();
    (dir, app)
}

fn admin() -> Caller {
    Caller::local_admin("default")
}

async fn grants(app: &App) -> Grants {
    let view = app.show_plugin(&admin(), "hello").await.unwrap();
    serde_json::from_value(view.grants).unwrap()
}

/// Twenty grants and a revoke at once: every grant is kept and the revoke stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_grants_and_a_revoke_are_all_applied() {
    let (_home, app) = home_with_hello().await;
    let revoke_me = GrantRequest {
        env: vec!["REVOKED".into()],
        ..GrantRequest::default()
    };
    app.grant(&admin(), "hello", &revoke_me).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let granting = app.clone();
        tasks.push(tokio::spawn(async move {
            let request = GrantRequest {
                env: vec![format!("V{i}")],
                ..GrantRequest::default()
            };
            granting.grant(&admin(), "hello", &request).await.map(|_| ())
        }));
        if i == 10 {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                let request = RevokeRequest {
                    env: vec!["REVOKED".into()],
                    ..RevokeRequest::default()
                };
                app.revoke(&admin(), "hello", &request).await.map(|_| ())
            }));
        }
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let env = grants(&app).await.env;
    assert!(!env.contains(&"REVOKED".to_string()), "the revoke was undone: {env:?}");
    for i in 0..20 {
        assert!(env.contains(&format!("V{i}")), "the grant of V{i} was lost: {env:?}");
    }
}

/// An install that replaces a plugin (here keeping its grants) while a revoke happens meanwhile
/// (the install waits at its "replace it?" question) does not write back the grants it read
/// before: it fails and says why, and the revoke stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacing_install_does_not_undo_a_revoke_made_while_it_waited() {
    let (_home, app) = home_with_hello().await;
    let request = GrantRequest {
        env: vec!["GREETING".into()],
        ..GrantRequest::default()
    };
    app.grant(&admin(), "hello", &request).await.unwrap();
    let other = keel_testutil::guest_bytes("hello");
    let install = InstallRequest {
        bytes: &other,
        label: "hello",
        replace: false,
        keep_grants: true,
        limits: Value::Object(Default::default()),
        owner: None,
    };
    let revoked = app.clone();
    let result = app
        .install(
            install,
            |_, _| {
                // "Another shell", while the question is on screen.
                let revoke = RevokeRequest {
                    env: vec!["GREETING".into()],
                    ..RevokeRequest::default()
                };
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(revoked.revoke(&admin(), "hello", &revoke))
                })
                .unwrap();
                Ok(())
            },
            |_, _| Ok(()),
        )
        .await;
    let error = result.expect_err("the install wrote grants read before the revoke");
    assert!(error.message.contains("changed"), "{error:?}");
    assert!(grants(&app).await.env.is_empty(), "the revoke was undone");
}

/// A removal finds a component unused and deletes it under the component store's lock, which an
/// install (here another process's) holds from storing the component to recording its plugin:
/// an install that records the plugin meanwhile keeps the removal from deleting the file from
/// under it (which left an installed plugin that could not load). The removal is held at that
/// point by the test taking the lock as an install would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_never_deletes_a_component_an_install_is_recording() {
    let (home, app) = home_with_hello().await;
    let other = App::open(home.path()).await.unwrap();
    let record = app.db.get_plugin("hello").await.unwrap().unwrap();

    // The other process's install, between storing the component and recording the plugin.
    let lock = other.lock_components().await.unwrap();
    let removing = app.clone();
    let remove = tokio::spawn(async move { removing.remove_plugin(&admin(), "hello").await.map(|_| ()) });
    // The removal deletes the record, then waits for the lock before looking at the component.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.db.get_plugin("hello").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < until, "the record was never removed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!remove.is_finished(), "the removal waits for the install");
    assert!(
        app.components.get(&record.sha256).is_ok(),
        "not deleted while an install may be recording it"
    );
    // The install records its plugin on the component, and lets go.
    assert!(other.db.replace_plugin_if(&record, None, None).await.unwrap());
    drop(lock);
    remove.await.unwrap().unwrap();
    assert!(
        app.components.get(&record.sha256).is_ok(),
        "kept: the plugin installed meanwhile uses it"
    );
    let host = keel_app::tools::RegistryToolHost::new(app.clone(), None).await.unwrap();
    let ctx = keel_kernel::tool::ToolCallContext::ad_hoc("default");
    use keel_kernel::tool::ToolHost as _;
    let greeted = host
        .call_tool(&ctx, "hello/greet", &serde_json::json!({"name": "Ada"}))
        .await;
    assert!(greeted.result.is_ok(), "{:?}", greeted.result);
}
