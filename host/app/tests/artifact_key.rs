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
