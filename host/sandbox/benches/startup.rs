//! Plugin start from the cache on a multi-megabyte component (issue 11, item 8).
//!
//! The guest `keel-test-big` carries 16 MiB of incompressible static data, so both the component
//! (~17 MB) and its precompiled artifact are multi-megabyte, like a componentize-py tool.
//!
//! - `start_big/before_read_hash_copy`: what every start did before: read the stored component
//!   and sha256 it (`ComponentStore::get`), sha256 it again (`Sandbox::prepare`), read the
//!   artifact, HMAC it, and `Component::deserialize` (which copies it into fresh memory).
//! - `start_big/after_mapped`: what a start does now: stat the component, check the artifact's
//!   recorded identity (one `fstat`, one small HMAC) and map it (`Component::deserialize_file`).
//! - `start_big/after_full_check`: the first start after install or after the file changed: read
//!   and HMAC the artifact once, then deserialize (identity recorded for later starts).
//! - `start_big/prepare_stored_and_call`: a whole `keel call`'s sandbox work from a fresh engine:
//!   `Sandbox::new`, `prepare_stored` (map + pre-link + describe), one call.
//!
//! Run: `cargo bench --bench startup`.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use hmac::{Hmac, Mac};
use keel_kernel::tool::ToolCallContext;
use keel_sandbox::cache::sha256_hex;
use keel_sandbox::{ArtifactCache, CacheOutcome, ComponentStore, Grants, Limits, Sandbox, SandboxConfig};
use serde_json::json;
use wasmtime::component::Component;

fn benches(c: &mut Criterion) {
    let wasm = keel_testutil::guest_bytes("keel-test-big");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let store = ComponentStore::new(dir.path().join("components"));
    let sha = store.put(&wasm).unwrap();
    let sandbox = Sandbox::new(SandboxConfig::new(&cache_dir)).unwrap();
    let plugin = rt.block_on(sandbox.prepare_stored(&store, &sha, "big")).unwrap();
    assert_eq!(plugin.cache, CacheOutcome::Compiled);
    let engine = sandbox.engine().clone();
    let cache = ArtifactCache::open(&cache_dir, &engine).unwrap();
    let artifact_path = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let seal_path = artifact_path.with_extension("seal");
    println!(
        "component {} bytes, artifact {} bytes",
        wasm.len(),
        std::fs::metadata(&artifact_path).unwrap().len()
    );
    // Let the artifact settle, then one full check records its identity.
    std::thread::sleep(keel_sandbox::cache::SETTLE + Duration::from_millis(100));
    assert!(cache.load(&engine, &sha, wasm.len()).is_some());
    assert_eq!(std::fs::read(&seal_path).unwrap().len(), 64, "identity recorded");

    let mut group = c.benchmark_group("start_big");
    group.sample_size(20).measurement_time(Duration::from_secs(10));
    let component_path = dir.path().join("components").join(format!("{sha}.wasm"));
    let key = std::fs::read(cache_dir.join("artifact.key")).unwrap();
    group.bench_function("before_read_hash_copy", |b| {
        b.iter(|| {
            let bytes = std::fs::read(&component_path).unwrap();
            assert_eq!(sha256_hex(&bytes), sha); // ComponentStore::get
            assert_eq!(sha256_hex(&bytes), sha); // Sandbox::prepare
            let artifact = std::fs::read(&artifact_path).unwrap();
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
            mac.update(&artifact);
            std::hint::black_box(mac.finalize());
            // SAFETY: the artifact was written by this cache for this engine.
            unsafe { Component::deserialize(&engine, &artifact) }.unwrap()
        })
    });
    group.bench_function("after_mapped", |b| {
        b.iter(|| {
            let len = store.len(&sha).unwrap() as usize;
            cache.load(&engine, &sha, len).expect("cached")
        })
    });
    let seal = std::fs::read(&seal_path).unwrap();
    group.bench_function("after_full_check", |b| {
        b.iter(|| {
            // Only the content tag: as right after install, before the identity is recorded.
            std::fs::write(&seal_path, &seal[..32]).unwrap();
            cache.load(&engine, &sha, wasm.len()).expect("cached")
        })
    });
    std::fs::write(&seal_path, &seal).unwrap();
    let ctx = ToolCallContext::ad_hoc("bench");
    group.bench_function("prepare_stored_and_call", |b| {
        b.iter(|| {
            let fresh = Sandbox::new(SandboxConfig::new(&cache_dir)).unwrap();
            let plugin = rt.block_on(fresh.prepare_stored(&store, &sha, "big")).unwrap();
            assert_eq!(plugin.cache, CacheOutcome::Hit);
            let report = rt.block_on(fresh.call(
                &plugin,
                &Grants::default(),
                &Limits::default(),
                &ctx,
                "byte",
                &json!({"index": 12345}),
            ));
            assert!(report.result.is_ok(), "{:?}", report.result);
        })
    });
    group.finish();
}

criterion_group!(startup, benches);
criterion_main!(startup);
