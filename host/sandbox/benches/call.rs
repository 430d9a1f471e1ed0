//! Sandbox benchmarks (issue: Sandboxed component host, item 12).
//!
//! - `warm_call/keel`: `Sandbox::call` of `hello/greet` (fresh store, instantiate from `InstancePre`, call, drop).
//! - `warm_call/bare_wasmtime`: the same work with wasmtime alone: same engine config, a minimal store.
//! - `startup/compile` vs `startup/load_cached`: compiling the component vs loading the verified artifact.
//! - `startup/first_call_from_cache`: new engine + load from cache + pre-link + describe + first call.
//! - idle memory of a ready plugin: printed once (RSS delta over 32 prepared variants).
//!
//! Run: `cargo bench -p keel-sandbox --bench call`.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keel_kernel::tool::ToolCallContext;
use keel_sandbox::{ArtifactCache, Grants, Limits, Sandbox, SandboxConfig};
use serde_json::json;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod bare {
    wasmtime::component::bindgen!({ world: "tool", path: "../../wit", exports: { default: async } });
}

struct BareState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bare::keel::plugin::types::Host for BareState {}
impl bare::keel::plugin::host::Host for BareState {
    fn log(&mut self, _level: bare::keel::plugin::host::LogLevel, _message: String) {}
    fn progress(&mut self, _fraction: Option<f32>, _message: String) {}
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A distinct but equivalent component: the bytes plus a custom section, so its sha256 differs.
fn variant(wasm: &[u8], i: usize) -> Vec<u8> {
    let name = format!("keel-bench-{i}");
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    out.push(payload.len() as u8);
    out.extend_from_slice(&payload);
    out
}

fn benches(c: &mut Criterion) {
    let wasm = keel_testutil::guest_bytes("hello");
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(SandboxConfig::new(dir.path().join("cache"))).unwrap();
    let plugin = rt.block_on(sandbox.prepare(&wasm)).unwrap();
    let ctx = ToolCallContext::ad_hoc("bench");
    let args = json!({"name": "Ada"});
    let grants = Grants::default();
    let limits = Limits::default();

    let mut group = c.benchmark_group("warm_call");
    group.bench_function("keel", |b| {
        b.iter(|| {
            let report = rt.block_on(sandbox.call(&plugin, &grants, &limits, &ctx, "greet", &args));
            assert!(report.result.is_ok());
        })
    });

    // Bare wasmtime with the same engine configuration as the sandbox.
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(128)
        .total_core_instances(1024)
        .total_memories(256)
        .total_tables(1024);
    pool.max_core_instances_per_component(32)
        .max_memories_per_component(4)
        .max_tables_per_component(32);
    pool.max_memory_size(1 << 30).table_elements(100_000);
    pool.max_component_instance_size(4 << 20)
        .max_core_instance_size(4 << 20);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config).unwrap();
    let component = Component::new(&engine, &wasm).unwrap();
    let mut linker = Linker::<BareState>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    bare::keel::plugin::host::add_to_linker::<BareState, HasSelf<BareState>>(&mut linker, |s| s).unwrap();
    bare::keel::plugin::types::add_to_linker::<BareState, HasSelf<BareState>>(&mut linker, |s| s).unwrap();
    let pre = bare::ToolPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    let bare_ctx = bare::keel::plugin::types::CallContext {
        call_id: "bench".into(),
        job_id: None,
        scope: "bench".into(),
        principal: None,
        trace_id: None,
        deadline_ms: 10_000,
    };
    let arguments = args.to_string();
    group.bench_function("bare_wasmtime", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut store = Store::new(
                    &engine,
                    BareState {
                        wasi: WasiCtx::builder().build(),
                        table: ResourceTable::new(),
                    },
                );
                store.set_epoch_deadline(1_000);
                let tool = pre.instantiate_async(&mut store).await.unwrap();
                let out = tool
                    .keel_plugin_tools()
                    .call_call(&mut store, &bare_ctx, "greet", &arguments)
                    .await
                    .unwrap();
                assert!(out.is_ok());
            })
        })
    });
    group.finish();

    let mut group = c.benchmark_group("startup");
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    let sandbox_engine = sandbox.engine().clone();
    group.bench_function("compile", |b| {
        b.iter(|| Component::new(&sandbox_engine, &wasm).unwrap())
    });
    let cache = ArtifactCache::open(&dir.path().join("cache"), &sandbox_engine).unwrap();
    let sha = plugin.sha256.clone();
    group.bench_function("load_cached", |b| {
        b.iter(|| cache.load(&sandbox_engine, &sha, wasm.len()).expect("cached"))
    });
    group.bench_function("first_call_from_cache", |b| {
        b.iter(|| {
            let fresh = Sandbox::new(SandboxConfig::new(dir.path().join("cache"))).unwrap();
            let plugin = rt.block_on(fresh.prepare(&wasm)).unwrap();
            assert_eq!(plugin.cache, keel_sandbox::CacheOutcome::Hit);
            let report = rt.block_on(fresh.call(&plugin, &grants, &limits, &ctx, "greet", &args));
            assert!(report.result.is_ok());
        })
    });
    group.finish();

    // Idle memory of a ready plugin: prepare 32 distinct copies, measure the RSS growth. Compiling 32
    // copies is slow, so this runs only under `cargo bench`, not when `cargo test` smoke-runs benches.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    const COPIES: usize = 32;
    let variants: Vec<Vec<u8>> = (0..COPIES).map(|i| variant(&wasm, i)).collect();
    for v in &variants {
        rt.block_on(sandbox.prepare(v)).expect("variant compiles"); // compile + cache once
    }
    let fresh = Sandbox::new(SandboxConfig::new(dir.path().join("cache"))).unwrap();
    let before = rss_bytes();
    let ready: Vec<_> = variants
        .iter()
        .map(|v| rt.block_on(fresh.prepare(v)).unwrap())
        .collect();
    let after = rss_bytes();
    println!(
        "idle_ready_plugin_memory: {:.1} KiB per plugin (RSS {} -> {} over {} plugins loaded from cache)",
        (after.saturating_sub(before)) as f64 / COPIES as f64 / 1024.0,
        before,
        after,
        ready.len()
    );
}

criterion_group!(call, benches);
criterion_main!(call);
