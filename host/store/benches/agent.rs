//! Agent-loop throughput on a file-backed SQLite database (WAL, production pragmas), with a
//! scripted model and in-memory tools: what the journal, ledger and events cost per step.
//!
//! `cargo bench -p keel-store --bench agent -- --warm-up-time 1 --measurement-time 5`
//!
//! - `agent_sqlite/bare_tool_call`: `ToolHost::call_tool` on the echo tool (the floor).
//! - `agent_sqlite/job_no_tools`: execute -> one model turn -> final answer -> result (jobs/s).
//! - `agent_sqlite/job_1_call`: one turn with 1 tool call, then the final answer.
//! - `agent_sqlite/job_10_calls`: one turn with 10 concurrent tool calls, then the final answer.
//!
//! - `agent_sqlite/governed_call`: `AgentRuntime::call_tool` (the one governed path: schema,
//!   policy, hold, call, settle with receipt, events, journal) of the echo tool, durable.
//! - `agent_sqlite/bare_commit`: one `BEGIN IMMEDIATE; INSERT; COMMIT` on the same file (the floor
//!   a durable call is compared with).
//! - `agent_memory/governed_call` and `agent_memory/bare_tool_call`: the same path over the
//!   in-memory store (the governance path alone, no durable write).
//!
//! Per-tool-call overhead ~= (job_10_calls - job_1_call) / 9 - bare_tool_call: a budget hold
//! (1 transaction) + `tool_started` and `tool_result` journal commits (2 transactions, the second
//! also settling the hold and appending the events).

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn.

mod common;

use std::sync::Arc;

use criterion::{Criterion, Throughput};
use keel_kernel::agent::testing::{FakeTools, ScriptedModel, calls};
use keel_kernel::context::ExecutionContext;
use keel_kernel::memory::MemoryStore;
use keel_kernel::model::Message;
use keel_kernel::policy::{Policy, SessionApprovals};
use keel_kernel::tool::{ToolCallContext, ToolHost};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionRequest, Kernel};
use keel_store::Database;
use serde_json::json;

fn script(n_calls: usize) -> Vec<Message> {
    if n_calls == 0 {
        return vec![Message::assistant("done", vec![])];
    }
    let list: Vec<(&str, serde_json::Value)> = (0..n_calls).map(|i| ("p__echo", json!({ "i": i }))).collect();
    vec![calls(0, &list), Message::assistant("done", vec![])]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = rt.block_on(Database::open(&dir.path().join("agent.db"))).expect("open");
    let kernel = Kernel::new(Arc::new(db.kernel_store()));
    let tools = FakeTools::new();
    tools.add_echo("p/echo", true);
    let mut group = c.benchmark_group("agent_sqlite");
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
    let governed = AgentRuntime::new(
        kernel.clone(),
        Arc::new(ScriptedModel::new(vec![])),
        Arc::new(tools.clone()),
        Arc::new(Policy::allow_all()),
        Arc::new(SessionApprovals::new()),
        AgentConfig::default(),
    );
    let call_ctx = ExecutionContext::new("bench");
    group.bench_function("governed_call", |b| {
        b.iter(|| rt.block_on(governed_call(&governed, &call_ctx)))
    });
    let pool = db.pool().clone();
    rt.block_on(common::create_bare_commit_table(&pool));
    group.bench_function("bare_commit", |b| b.iter(|| rt.block_on(common::bare_commit(&pool))));

    for (name, n) in [("job_no_tools", 0), ("job_1_call", 1), ("job_10_calls", 10)] {
        let agent = AgentRuntime::new(
            kernel.clone(),
            Arc::new(ScriptedModel::new(script(n))),
            Arc::new(tools.clone()),
            Arc::new(Policy::allow_all()),
            Arc::new(SessionApprovals::new()),
            AgentConfig::default(),
        );
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

    let mut group = c.benchmark_group("agent_memory");
    group.throughput(Throughput::Elements(1));
    let memory = Kernel::new(Arc::new(MemoryStore::new()));
    let governed = AgentRuntime::new(
        memory,
        Arc::new(ScriptedModel::new(vec![])),
        Arc::new(tools.clone()),
        Arc::new(Policy::allow_all()),
        Arc::new(SessionApprovals::new()),
        AgentConfig::default(),
    );
    group.bench_function("bare_tool_call", |b| {
        b.iter(|| {
            rt.block_on(tools.call_tool(&ctx, "p/echo", &args))
                .result
                .expect("call")
        })
    });
    group.bench_function("governed_call", |b| {
        b.iter(|| rt.block_on(governed_call(&governed, &call_ctx)))
    });
    group.finish();
}

/// One governed call of the echo tool, to its end.
async fn governed_call(agent: &AgentRuntime, ctx: &ExecutionContext) {
    let h = agent
        .call_tool(ctx, "p/echo", json!({ "i": 1 }), None)
        .await
        .expect("call");
    let r = h.result().await.expect("result");
    assert_eq!(r.status, keel_kernel::job::JobState::Succeeded, "{r:?}");
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
