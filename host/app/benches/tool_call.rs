//! The app layer's share of a tool call (issue 10, item 6): `hello/greet` of the real guest, built
//! from source, installed in a temporary Keel home.
//!
//! - `app_call/tool_host`: `RegistryToolHost::call_tool` (the kernel's `ToolHost`): the registry
//!   stamp read, the loaded plugin, the sandboxed call (`Sandbox::call`) and the outcome.
//! - `app_call/governed_in_memory`: `AgentHost::call` over the kernel's in-memory store
//!   (`AgentHost::open_in_memory`, on the same `App` and so the same sandbox): the whole governed
//!   path (policy, budget hold, job, events, ledger receipt) without a durable write, on a fresh
//!   store every [`CALLS_PER_MEMORY_STORE`] calls.
//!
//! Run from the workspace root, Keel's crates optimised over the shared dev build:
//! `cargo bench --profile dev --config 'profile.dev.package.keel-sandbox.opt-level=3'
//! --config 'profile.dev.package.keel-app.opt-level=3' --config 'profile.dev.package.keel-kernel.opt-level=3'
//! --bench tool_call`.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let app = rt.block_on(async {
        let app = Arc::new(App::open(home).await.expect("open home"));
        let bytes = keel_testutil::guest_bytes("hello");
        app.install_unattended(&bytes, "hello").await.expect("install hello");
        app
    });
    let host = rt
        .block_on(RegistryToolHost::new(app.clone(), None))
        .expect("tool host");
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
        b.iter_custom(|iters| rt.block_on(calls_in_memory(&app, home, iters)))
    });
    group.finish();
}

/// Calls made on one in-memory store before the next starts afresh. The store keeps every job,
/// event and ledger entry; a run of 100k calls on one store measured its growth (the kernel
/// zeroing fresh huge pages, hash tables rehashed, vectors copied: the mean rose from ~60 µs to
/// ~110 µs over a few seconds) rather than the governance path, as in `keel-store`'s
/// `agent_memory` bench.
const CALLS_PER_MEMORY_STORE: u64 = 1_000;

/// The time `iters` governed calls of `hello/greet` take in memory, on a fresh store every
/// [`CALLS_PER_MEMORY_STORE`] calls; opening each store and its first call (which loads the
/// plugin into the new host) are not timed.
async fn calls_in_memory(app: &Arc<App>, home: &std::path::Path, iters: u64) -> Duration {
    let mut took = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CALLS_PER_MEMORY_STORE);
        let choice = PolicyChoice::resolve(home, None).expect("policy");
        let memory = AgentHost::open_in_memory(app.clone(), choice)
            .await
            .expect("open in memory");
        governed_call(&memory).await;
        let started = Instant::now();
        for _ in 0..n {
            governed_call(&memory).await;
        }
        took += started.elapsed();
        left -= n;
    }
    took
}

async fn governed_call(host: &AgentHost) {
    let request = CallRequest::new("bench", "hello/greet", json!({"name": "Ada"}));
    let outcome = host.call(&request).await.expect("call");
    assert!(outcome.succeeded(), "{outcome:?}");
}

criterion_group!(app_call, benches);
criterion_main!(app_call);
