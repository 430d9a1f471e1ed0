//! Agent-loop overhead on the in-memory store, with a scripted model and in-memory tools.
//!
//! `cargo bench -p keel-kernel --features conformance --bench agent -- --warm-up-time 1 --measurement-time 5`
//!
//! - `agent/bare_tool_call`: `ToolHost::call_tool` on the echo tool, nothing else (the floor).
//! - `agent/job_no_tools`: execute -> one model turn -> final answer -> result (jobs/s).
//! - `agent/job_1_call`: one turn with 1 tool call, then the final answer.
//! - `agent/job_10_calls`: one turn with 10 concurrent tool calls, then the final answer.
//!
//! Per-tool-call kernel overhead (policy + schema + hold + 2 journaled commits with events +
//! settlement) ~= (job_10_calls - job_1_call) / 9 - bare_tool_call.
//!
//! And the governed tool-call path alone (issue 9.11: at most 10 µs over the bare call), as
//! keel-store's `agent_memory` group measures it but without keel-store, on a 2-worker runtime:
//! - `agent_memory/bare_tool_call`: the echo tool, nothing else;
//! - `agent_memory/governed_call`: `AgentRuntime::call_tool` of a non-idempotent echo tool to its
//!   result (schema, policy, hold, call, settlement with receipt, events, journal: two commits);
//! - `agent_memory/governed_call_idempotent`: the same, idempotent, no budget (one commit).

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn.

use std::sync::Arc;

use criterion::{Criterion, Throughput};
use keel_kernel::agent::testing::{FakeTools, calls, scripted_runtime};
use keel_kernel::context::ExecutionContext;
use keel_kernel::memory::MemoryStore;
use keel_kernel::model::Message;
use keel_kernel::tool::{ToolCallContext, ToolHost};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionRequest, Kernel};
use serde_json::json;

fn runtime(script: Vec<Message>, tools: &FakeTools) -> AgentRuntime {
    let kernel = Kernel::new(Arc::new(MemoryStore::new()));
    scripted_runtime(kernel, script, tools, AgentConfig::default())
}

fn script(n_calls: usize) -> Vec<Message> {
    if n_calls == 0 {
        return vec![Message::assistant("done", vec![])];
    }
    let list: Vec<(&str, serde_json::Value)> = (0..n_calls).map(|i| ("p__echo", json!({ "i": i }))).collect();
    vec![calls(0, &list), Message::assistant("done", vec![])]
}

fn bench(c: &mut Criterion) {
    // Single-threaded: measures the work, not cross-thread wake-ups on a shared machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tools = FakeTools::new();
    tools.add_echo("p/echo", true);
    let mut group = c.benchmark_group("agent");
    group.throughput(Throughput::Elements(1));

    let ctx = ToolCallContext::ad_hoc("bench");
    let args = json!({ "i": 1 });
    group.bench_function("bare_tool_call", |b| {
        b.iter(|| {
            rt.block_on(tools.call_tool(&ctx, "p/echo", &args))
                .result
                .expect("call")
        })
    });

    for (name, n) in [("job_no_tools", 0), ("job_1_call", 1), ("job_10_calls", 10)] {
        // A fresh store per case so the in-memory maps stay comparable.
        let agent = runtime(script(n), &tools);
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let h = agent
                        .execute(ExecutionRequest::new("bench", "scripted", "go").with_tools(["p/*"]))
                        .await
                        .expect("execute");
                    let r = h.result().await.expect("result");
                    assert_eq!(r.status, keel_kernel::job::JobState::Succeeded);
                })
            })
        });
    }
    group.finish();
    governed(c);
}

/// The `agent_memory` group (see the module docs).
fn governed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tools = FakeTools::new();
    tools.add_echo("p/echo", false);
    tools.add_echo("p/idem", true);
    let ctx = ToolCallContext::ad_hoc("bench");
    let args = json!({ "i": 1 });
    let mut group = c.benchmark_group("agent_memory");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare_tool_call", |b| {
        b.iter(|| {
            rt.block_on(tools.call_tool(&ctx, "p/echo", &args))
                .result
                .expect("call")
        })
    });
    let agent = runtime(vec![], &tools);
    let call_ctx = ExecutionContext::new("bench");
    group.bench_function("governed_call", |b| {
        b.iter(|| rt.block_on(governed_call(&agent, &call_ctx, "p/echo")))
    });
    group.bench_function("governed_call_idempotent", |b| {
        b.iter(|| rt.block_on(governed_call(&agent, &call_ctx, "p/idem")))
    });
    group.finish();
}

/// One governed call of `tool` (an echo tool), to its end.
async fn governed_call(agent: &AgentRuntime, ctx: &ExecutionContext, tool: &str) {
    let h = agent.call_tool(ctx, tool, json!({ "i": 1 }), None).await.expect("call");
    let r = h.result().await.expect("result");
    assert_eq!(r.status, keel_kernel::job::JobState::Succeeded, "{r:?}");
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
