//! The governed tool call next to its floors, on file-backed SQLite databases (WAL, production
//! pragmas) and in memory, with a scripted model and in-memory tools (issue 9.11).
//!
//! `cargo bench --profile dev --bench agent -- --warm-up-time 1 --measurement-time 5 'agent_'`
//! (from the workspace root; keel-kernel's `agent` bench runs too unless filtered, e.g.
//! `'agent_(sqlite|normal|memory)/'`).
//!
//! One run prints, per durability level (`agent_sqlite`: `synchronous = FULL`, the default;
//! `agent_normal`: `synchronous = NORMAL`), each on its own file:
//! - `bare_commit`: one `BEGIN IMMEDIATE; INSERT; COMMIT` on the same file, on a plain SQLite
//!   connection on the calling thread (the floor);
//! - `bare_commit_wide`: the same, one row into each of [`GOVERNED_COMMIT_BTREES`] tables: a
//!   commit that writes as many pages as one of a governed call's, and does nothing else (the
//!   floor of the store's data model: two of them are what a two-commit call cannot go below);
//! - `governed_call`: `AgentRuntime::call_tool` of a non-idempotent echo tool to its result:
//!   schema, policy, hold, call, settle with receipt, events, journal — two commits (the durable
//!   "started" commit before the side effect, the result after);
//! - `log_commit_pair`: two one-row commits together carrying the bytes the store keeps for one
//!   `governed_call` (half each): the floor of a design that appends each commit as one row of a
//!   per-call log and writes the tables in the background;
//! - `materialize_calls`: what that design's background writer pays at best: the rows of
//!   [`MATERIALIZED_CALLS`] calls (as many b-trees as their commits write, their bytes) in one
//!   commit (divide by that many for a call's share);
//! - `governed_call_idempotent`: the same with an idempotent tool and no budget: one commit;
//! - `governed_call_effect_free`: a non-idempotent tool whose grants allow no effect (no
//!   writable directory, no network), no budget: one commit, as it is safe to re-run;
//! - `governed_call_budgeted`: `governed_call` for a tenant with a budget in force (the hold is
//!   checked against it in the first commit); its ledger grows with every call of the run, which
//!   the check must not read;
//! - `governed_call_runner` (FULL only): the same call on the runner path (taken because the call
//!   carries an idempotency key), i.e. how every call ran before the direct path.
//!
//! Plus `agent_sqlite/bare_tool_call` and the agent-loop jobs (`job_no_tools`, `job_1_call`,
//! `job_10_calls`), and in memory (`agent_memory`) `bare_tool_call` next to the three governed
//! calls: the governance path alone, no durable write (on a fresh in-memory store every
//! [`CALLS_PER_MEMORY_STORE`] calls).

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use keel_kernel::agent::testing::{FakeTools, calls, scripted_runtime};
use keel_kernel::context::ExecutionContext;
use keel_kernel::ledger::{Budget, BudgetWindow};
use keel_kernel::memory::MemoryStore;
use keel_kernel::model::Message;
use keel_kernel::tool::{ToolCallContext, ToolHost};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionRequest, Kernel};
use keel_store::{Database, Durability};
use serde_json::json;

/// The allocator the `keel` binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Calls whose rows `materialize_calls` writes in one commit.
const MATERIALIZED_CALLS: usize = 16;

/// B-trees (tables and indexes) one commit of a non-idempotent governed call writes rows to, on
/// average: its first writes 14 (the job's table, id, listing and claimable indexes; its hold's
/// table and live-holds index; its events' table, per-job and per-tenant indexes; its journal's
/// table and key index; its ledger entry's table, per-tenant and per-job indexes), its second 12
/// (the job's id and listing entries are not rewritten). Counted from the WAL frames each commit
/// writes.
const GOVERNED_COMMIT_BTREES: usize = 13;

fn script(n_calls: usize) -> Vec<Message> {
    if n_calls == 0 {
        return vec![Message::assistant("done", vec![])];
    }
    let list: Vec<(&str, serde_json::Value)> = (0..n_calls).map(|i| ("p__echo", json!({ "i": i }))).collect();
    vec![calls(0, &list), Message::assistant("done", vec![])]
}

fn runtime(kernel: Kernel, tools: &FakeTools, script: Vec<Message>) -> AgentRuntime {
    scripted_runtime(kernel, script, tools, AgentConfig::default())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let tools = FakeTools::new();
    tools.add_echo("p/echo", false);
    tools.add_echo("p/idem", true);
    // Non-idempotent, but its grants allow no effect (as the host describes a plugin granted no
    // writable directory and no network).
    tools.add_echo("p/pure", false);
    tools.set_effect_free("p/pure", true);
    let call_ctx = ExecutionContext::new("bench");
    let budgeted_ctx = ExecutionContext::new("budgeted");
    let ctx = ToolCallContext::ad_hoc("bench");
    let args = json!({ "i": 1 });
    let keys = AtomicU64::new(0);

    for (group_name, durability) in [("agent_sqlite", Durability::Full), ("agent_normal", Durability::Normal)] {
        let path = dir.path().join(format!("{group_name}.db"));
        let db = rt.block_on(Database::open_with(&path, durability)).expect("open");
        let kernel = Kernel::new(Arc::new(db.kernel_store()));
        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Elements(1));
        let synchronous = if durability == Durability::Full {
            "FULL"
        } else {
            "NORMAL"
        };
        let mut bare = common::BareCommit::open(&path, synchronous);
        group.bench_function("bare_commit", |b| b.iter(|| bare.commit()));
        let mut wide = common::BareCommit::open_wide(&path, synchronous, GOVERNED_COMMIT_BTREES);
        group.bench_function("bare_commit_wide", |b| b.iter(|| wide.commit()));
        let governed = runtime(kernel.clone(), &tools, vec![]);
        group.bench_function("governed_call", |b| {
            b.iter(|| rt.block_on(governed_call(&governed, &call_ctx, "p/echo", None)))
        });
        // The floor of a per-call log (each commit one appended row carrying what the call's
        // commit writes, its tables written later in the background): two one-row commits that
        // together carry the bytes the store keeps for one non-idempotent call (a call of its
        // own, measured, so that a filtered run that skipped `governed_call` has one too).
        let job = rt.block_on(governed_call(&governed, &call_ctx, "p/echo", None));
        let call_bytes = bare.job_bytes(&job.to_string());
        println!("{group_name}: one governed call's rows hold {call_bytes} bytes");
        let mut log = common::BareCommit::open_sized(&path, synchronous, "bench_call_log", call_bytes / 2);
        group.bench_function("log_commit_pair", |b| {
            b.iter(|| {
                log.commit();
                log.commit();
            })
        });
        // What the background writer of such a log would pay per call at best: the rows of
        // MATERIALIZED_CALLS calls (GOVERNED_COMMIT_BTREES b-trees per commit, two commits a call,
        // the call's bytes spread over them) in one commit; time per call = this / that many.
        let per_row = call_bytes / (2 * GOVERNED_COMMIT_BTREES);
        let mut batch = common::BareCommit::open_batch(
            &path,
            synchronous,
            2 * GOVERNED_COMMIT_BTREES,
            MATERIALIZED_CALLS,
            per_row,
        );
        group.bench_function("materialize_calls", |b| b.iter(|| batch.commit()));
        group.bench_function("governed_call_idempotent", |b| {
            b.iter(|| rt.block_on(governed_call(&governed, &call_ctx, "p/idem", None)))
        });
        group.bench_function("governed_call_effect_free", |b| {
            b.iter(|| rt.block_on(governed_call(&governed, &call_ctx, "p/pure", None)))
        });
        // The same tenant's calls so far are its usage: the budget check must not read them.
        rt.block_on(async {
            let mut budget = Budget::new("budgeted", "all time", BudgetWindow::Total);
            budget.limits.max_tool_calls = Some(u64::MAX / 4);
            kernel.ledger().put_budget(budget).await.expect("budget");
        });
        group.bench_function("governed_call_budgeted", |b| {
            b.iter(|| rt.block_on(governed_call(&governed, &budgeted_ctx, "p/echo", None)))
        });
        if durability == Durability::Full {
            group.bench_function("governed_call_runner", |b| {
                b.iter(|| {
                    let key = format!("k{}", keys.fetch_add(1, Ordering::Relaxed));
                    rt.block_on(governed_call(&governed, &call_ctx, "p/echo", Some(key)))
                })
            });
            group.bench_function("bare_tool_call", |b| {
                b.iter(|| {
                    rt.block_on(tools.call_tool(&ctx, "p/echo", &args))
                        .result
                        .expect("call")
                })
            });
            for (name, n) in [("job_no_tools", 0), ("job_1_call", 1), ("job_10_calls", 10)] {
                let agent = runtime(kernel.clone(), &tools, script(n));
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
        }
        group.finish();
    }

    let mut group = c.benchmark_group("agent_memory");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare_tool_call", |b| {
        b.iter(|| {
            rt.block_on(tools.call_tool(&ctx, "p/echo", &args))
                .result
                .expect("call")
        })
    });
    for (name, tool) in [
        ("governed_call", "p/echo"),
        ("governed_call_idempotent", "p/idem"),
        ("governed_call_effect_free", "p/pure"),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(calls_in_memory(&tools, &call_ctx, tool, iters)))
        });
    }
    group.finish();
}

/// Calls made on one in-memory store before the next starts afresh. The store keeps every job,
/// event and ledger entry, so a long run on one store measured its growth (the kernel zeroing
/// fresh pages, the allocator consolidating: ~110 µs a call after a 4 s run, ~34 µs in a short
/// one) rather than the governance path.
const CALLS_PER_MEMORY_STORE: u64 = 1_000;

/// The time `iters` governed calls of `tool` take in memory, on a fresh store every
/// [`CALLS_PER_MEMORY_STORE`] calls (making and dropping the stores is not timed).
async fn calls_in_memory(tools: &FakeTools, ctx: &ExecutionContext, tool: &str, iters: u64) -> Duration {
    let mut took = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CALLS_PER_MEMORY_STORE);
        let agent = runtime(Kernel::new(Arc::new(MemoryStore::new())), tools, vec![]);
        let started = Instant::now();
        for _ in 0..n {
            governed_call(&agent, ctx, tool, None).await;
        }
        took += started.elapsed();
        left -= n;
    }
    took
}

/// One governed call of `tool` (an echo tool), to its end; its job.
async fn governed_call(agent: &AgentRuntime, ctx: &ExecutionContext, tool: &str, key: Option<String>) -> uuid::Uuid {
    let h = agent.call_tool(ctx, tool, json!({ "i": 1 }), key).await.expect("call");
    let r = h.result().await.expect("result");
    assert_eq!(r.status, keel_kernel::job::JobState::Succeeded, "{r:?}");
    r.job_id
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
