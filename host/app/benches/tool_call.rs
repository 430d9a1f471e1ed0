//! The app layer's share of a tool call (issue 10, item 6): `hello/greet` of the real guest, built
//! from source, installed in a temporary Keel home.
//!
//! - `app_call/tool_host`: `RegistryToolHost::call_tool` (the kernel's `ToolHost`): the registry
//!   stamp read, the loaded plugin, the sandboxed call (`Sandbox::call`) and the outcome.
//! - `app_call/governed_in_memory`: `AgentHost::call` over the kernel's in-memory store
//!   (`AgentHost::open_in_memory`): the whole governed path (policy, budget hold, job, events,
//!   ledger receipt) without a durable write.
//!
//! Run from the workspace root, Keel's crates optimised over the shared dev build:
//! `cargo bench --profile dev --config 'profile.dev.package.keel-sandbox.opt-level=3'
//! --config 'profile.dev.package.keel-app.opt-level=3' --config 'profile.dev.package.keel-kernel.opt-level=3'
//! --bench tool_call`.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keel_app::call::CallRequest;
use keel_app::keel_kernel::tool::{ToolCallContext, ToolHost as _};
use keel_app::runtime::PolicyChoice;
use keel_app::tools::RegistryToolHost;
use keel_app::{AgentHost, App};
use serde_json::json;

/// The allocator the `keel` binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn benches(c: &mut Criterion) {
    // Multi-threaded, like `keel mcp` and `keel serve`: work the sandbox hands off (refilling
    // ready instances, freeing used ones) runs beside the next call, as it does in a server.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    let (app, memory) = rt.block_on(async {
        let app = Arc::new(App::open(home).await.expect("open home"));
        let bytes = keel_testutil::guest_bytes("hello");
        app.install_unattended(&bytes, "hello").await.expect("install hello");
        let choice = PolicyChoice::resolve(home, None).expect("policy");
        let memory = AgentHost::open_in_memory(home, choice).await.expect("open in memory");
        (app, memory)
    });
    let host = rt.block_on(RegistryToolHost::new(app, None)).expect("tool host");
    let ctx = ToolCallContext::ad_hoc("bench");
    let args = json!({"name": "Ada"});

    let mut group = c.benchmark_group("app_call");
    group.bench_function("tool_host", |b| {
        b.iter(|| {
            let outcome = rt.block_on(host.call_tool(&ctx, "hello/greet", &args));
            assert!(outcome.result.is_ok(), "{:?}", outcome.result);
        })
    });
    group.bench_function("governed_in_memory", |b| {
        b.iter(|| {
            let request = CallRequest::new("bench", "hello/greet", json!({"name": "Ada"}));
            let outcome = rt.block_on(memory.call(&request)).expect("call");
            assert!(outcome.succeeded(), "{outcome:?}");
        })
    });
    group.finish();
}

criterion_group!(app_call, benches);
criterion_main!(app_call);
