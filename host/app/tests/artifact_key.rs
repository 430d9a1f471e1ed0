//! The key that seals precompiled artifacts lives in the home's database, not in the directory it
//! protects: whoever can write `cache/` (and so could replace a key file there) still cannot make
//! Keel map native code of their choosing as a plugin's artifact. A real SQLite home and guests
//! built from source.

use keel_app::App;
use keel_sandbox::cache::ArtifactCache;
use wasmtime::component::Component;

/// Native code of another component, sealed under a key the attacker wrote into `cache/`, is
/// never run as `hello`: loading `hello` recompiles it from its stored component.
#[tokio::test]
async fn an_artifact_sealed_with_a_key_written_into_the_cache_is_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let hello = keel_testutil::guest_bytes("hello");
    let sha256 = {
        let app = App::open(dir.path()).await.unwrap();
        app.install_unattended(&hello, "hello").await.unwrap();
        app.load(&app.record("hello").await.unwrap()).await.unwrap();
        assert!(
            !dir.path().join("cache/artifact.key").exists(),
            "no key is kept in the directory it protects"
        );

        // The attacker: a key of their own in `cache/`, and the native code of another component
        // sealed under it as `hello`'s artifact.
        std::fs::write(dir.path().join("cache/artifact.key"), [7u8; 32]).unwrap();
        let forger = ArtifactCache::open(&dir.path().join("cache"), app.sandbox.engine()).unwrap();
        let hostile = keel_testutil::guest_bytes("keel-test-hostile");
        let other = Component::new(app.sandbox.engine(), &hostile).unwrap();
        let sha256 = keel_sandbox::cache::sha256_hex(&hello);
        forger.store(&sha256, hello.len(), &other);
        sha256
    };

    let app = App::open(dir.path()).await.unwrap();
    let (loaded, _, _) = app
        .load(&app.record("hello").await.unwrap())
        .await
        .expect("hello loads, recompiled from its own component");
    assert_eq!(loaded.info.name, "hello");
    let forged = ArtifactCache::open(&dir.path().join("cache"), app.sandbox.engine()).unwrap();
    assert!(
        forged.load(app.sandbox.engine(), &sha256, hello.len()).is_none(),
        "the forged artifact was discarded, and the one in its place is sealed under another key"
    );
}

/// Names in `cache/` that belong to component `sha256` (its artifact, seal and notes).
fn cached_files_of(home: &std::path::Path, sha256: &str) -> Vec<String> {
    std::fs::read_dir(home.join("cache"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(sha256))
        .collect()
}

/// Native code of a plugin that is removed, replaced or refused at install does not stay in the
/// cache (disk, and executable code of a plugin the user turned down).
#[tokio::test]
async fn artifacts_of_removed_replaced_and_refused_plugins_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::open(dir.path()).await.unwrap();
    let v1 = keel_testutil::guest_bytes("hello");
    let v2 = keel_testutil::guest_bytes("keel-test-hello-v2");
    let (sha1, sha2) = (
        keel_sandbox::cache::sha256_hex(&v1),
        keel_sandbox::cache::sha256_hex(&v2),
    );
    app.install_unattended(&v1, "hello").await.unwrap();
    assert!(
        !cached_files_of(dir.path(), &sha1).is_empty(),
        "installing caches its code"
    );

    // Refused: the user does not confirm replacing hello 0.1.0.
    let refused = app
        .install(
            keel_app::install::InstallRequest {
                bytes: &v2,
                label: "hello-v2",
                replace: false,
                keep_grants: false,
                limits: serde_json::Value::Null,
                owner: None,
            },
            |_, _| Err(keel_app::AppError::user("not confirmed")),
            |_, _| Ok(()),
        )
        .await;
    assert!(refused.is_err());
    assert_eq!(
        cached_files_of(dir.path(), &sha2),
        Vec::<String>::new(),
        "refused: nothing kept"
    );
    assert!(
        !cached_files_of(dir.path(), &sha1).is_empty(),
        "the installed one is kept"
    );

    // Replaced, then removed.
    app.install(
        keel_app::install::InstallRequest {
            bytes: &v2,
            label: "hello-v2",
            replace: true,
            keep_grants: false,
            limits: serde_json::Value::Null,
            owner: None,
        },
        |_, _| Ok(()),
        |_, _| Ok(()),
    )
    .await
    .unwrap();
    assert_eq!(
        cached_files_of(dir.path(), &sha1),
        Vec::<String>::new(),
        "replaced: deleted"
    );
    app.remove_plugin(&keel_app::Caller::local_admin("default"), "hello")
        .await
        .unwrap();
    assert_eq!(
        cached_files_of(dir.path(), &sha2),
        Vec::<String>::new(),
        "removed: deleted"
    );
}
