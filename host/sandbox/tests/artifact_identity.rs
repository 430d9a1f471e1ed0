//! The precompiled-artifact cache binds each artifact to the component it was compiled from, and
//! caches only components that passed their checks (issue 7, item 12).

use keel_sandbox::{CacheOutcome, Grants, Limits, Sandbox, SandboxConfig, SandboxError};

fn sandbox(dir: &tempfile::TempDir) -> Sandbox {
    Sandbox::new(SandboxConfig::new(dir.path().join("cache"))).unwrap()
}

/// The cached artifact files of component `sha256`.
fn artifacts(dir: &tempfile::TempDir, sha256: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(sha256) && name.ends_with(".cwasm")
        })
        .collect()
}

#[tokio::test]
async fn an_artifact_renamed_over_another_plugins_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let hello = keel_testutil::guest_bytes("hello");
    let other = keel_testutil::guest_bytes("keel-test-hello-v2");
    let first = sandbox(&dir);
    let victim = first.prepare(&hello).await.unwrap();
    let attacker = first.prepare(&other).await.unwrap();
    assert_eq!(victim.info.version, "0.1.0");
    assert_eq!(attacker.info.version, "0.2.0");
    drop(first);

    // Someone with write access to the cache puts the other plugin's valid artifact in hello's place.
    let [victim_artifact] = &artifacts(&dir, &victim.sha256)[..] else {
        panic!("one artifact for hello")
    };
    let [attacker_artifact] = &artifacts(&dir, &attacker.sha256)[..] else {
        panic!("one artifact for hello-v2")
    };
    std::fs::copy(attacker_artifact, victim_artifact).unwrap();

    let fresh = sandbox(&dir);
    let loaded = fresh.prepare(&hello).await.unwrap();
    assert_eq!(loaded.cache, CacheOutcome::Compiled, "the swapped artifact was loaded");
    assert_eq!(loaded.info.version, "0.1.0", "the other plugin's code ran as hello");
    // The recompiled artifact replaced the foreign one and loads next time.
    drop(fresh);
    let again = sandbox(&dir).prepare(&hello).await.unwrap();
    assert_eq!(again.cache, CacheOutcome::Hit);
    assert_eq!(again.info.version, "0.1.0");
}

#[tokio::test]
async fn exec_caches_nothing_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    // A tool plugin is not a WASI command: `exec` refuses it, and must not have cached it.
    let hello = keel_testutil::guest_bytes("hello");
    let sha = keel_sandbox::cache::sha256_hex(&hello);
    let error = sandbox
        .exec(&hello, &Grants::default(), &Limits::default(), &["hello".into()])
        .await
        .unwrap_err();
    assert!(matches!(error, SandboxError::WrongWorld(_)), "{error}");
    assert!(artifacts(&dir, &sha).is_empty(), "exec cached a component it refused");

    // A real command is cached once it ran.
    let cmd = keel_testutil::guest_bytes("keel-test-cmd");
    let report = sandbox
        .exec(&cmd, &Grants::default(), &Limits::default(), &["cmd".into()])
        .await
        .unwrap();
    assert!(report.status.is_ok(), "{:?}", report.status);
    assert_eq!(artifacts(&dir, &keel_sandbox::cache::sha256_hex(&cmd)).len(), 1);
}

/// The seal of component `sha256`'s artifact.
fn seal(dir: &tempfile::TempDir, sha256: &str) -> std::path::PathBuf {
    let [artifact] = &artifacts(dir, sha256)[..] else {
        panic!("one artifact")
    };
    artifact.with_extension("seal")
}

/// Issue 11, item 8: once an artifact's content was verified (and its timestamps settled), later
/// starts trust its recorded identity and map it without hashing; a file put in its place, a
/// file others may write, or a modified one gets the full check and is refused.
#[tokio::test]
async fn a_verified_artifact_is_mapped_by_its_identity_and_a_replaced_one_is_caught() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let hello = keel_testutil::guest_bytes("hello");
    let other = keel_testutil::guest_bytes("keel-test-hello-v2");
    let first = sandbox(&dir);
    let victim = first.prepare(&hello).await.unwrap();
    let attacker = first.prepare(&other).await.unwrap();
    drop(first);
    assert_eq!(
        std::fs::read(seal(&dir, &victim.sha256)).unwrap().len(),
        32,
        "not settled yet"
    );

    tokio::time::sleep(keel_sandbox::cache::SETTLE + std::time::Duration::from_millis(200)).await;
    // A full check, which records the identity.
    assert_eq!(sandbox(&dir).prepare(&hello).await.unwrap().cache, CacheOutcome::Hit);
    assert_eq!(
        std::fs::read(seal(&dir, &victim.sha256)).unwrap().len(),
        64,
        "identity recorded"
    );
    // Mapped by identity.
    let mapped = sandbox(&dir);
    let plugin = mapped.prepare(&hello).await.unwrap();
    assert_eq!(plugin.cache, CacheOutcome::Hit);
    let report = mapped
        .call(
            &plugin,
            &Grants::default(),
            &Limits::default(),
            &keel_kernel::tool::ToolCallContext::ad_hoc("t"),
            "greet",
            &serde_json::json!({"name": "mapped"}),
        )
        .await;
    assert!(report.result.is_ok(), "{:?}", report.result);

    // Another plugin's valid artifact renamed into place: a new inode, so the full check runs.
    let [victim_artifact] = &artifacts(&dir, &victim.sha256)[..] else {
        panic!("one artifact for hello")
    };
    let [attacker_artifact] = &artifacts(&dir, &attacker.sha256)[..] else {
        panic!("one artifact for hello-v2")
    };
    let staged = dir.path().join("staged");
    std::fs::copy(attacker_artifact, &staged).unwrap();
    std::fs::rename(&staged, victim_artifact).unwrap();
    let loaded = sandbox(&dir).prepare(&hello).await.unwrap();
    assert_eq!(
        loaded.cache,
        CacheOutcome::Compiled,
        "the replaced artifact was trusted"
    );
    assert_eq!(loaded.info.version, "0.1.0");

    // An artifact others may write is refused outright.
    let [victim_artifact] = &artifacts(&dir, &victim.sha256)[..] else {
        panic!("one artifact for hello")
    };
    std::fs::set_permissions(victim_artifact, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        sandbox(&dir).prepare(&hello).await.unwrap().cache,
        CacheOutcome::Compiled
    );
}
