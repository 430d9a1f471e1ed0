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
