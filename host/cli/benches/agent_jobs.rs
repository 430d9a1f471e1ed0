//! End-to-end agent jobs per second over SQLite: the keel-models scripted provider, a real
//! WebAssembly tool (the `hello` example, in the sandbox) and a file-backed SQLite database —
//! the same pieces `keel run` wires together, minus process start-up.
//!
//! `cargo bench -p keel --bench agent_jobs` (optional args: `JOBS CONCURRENCY`, default 200 8).
//!
//! Scenarios: `text` (one model turn, no tools) and `wasm_tool` (a turn calling `hello/greet`,
//! then the answer), each run sequentially and with CONCURRENCY jobs in flight.
//! For the kernel-only cost with in-memory tools see `host/store/benches/agent.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_kernel::clock::SystemClock;
use keel_kernel::job::JobState;
use keel_kernel::policy::{Policy, SessionApprovals};
use keel_kernel::{AgentConfig, AgentRuntime, ExecutionRequest, Kernel, KernelConfig};
use keel_models::{ScriptedProvider, ScriptedTurn};
use keel_sandbox::{Grants, InstalledTool, Sandbox, SandboxConfig, SandboxToolHost};
use keel_store::Database;
use serde_json::json;

/// The allocator the `keel` binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn runtime(dir: &std::path::Path, name: &str, turns: Vec<ScriptedTurn>) -> AgentRuntime {
    let db = Database::open(&dir.join(format!("{name}.db")))
        .await
        .expect("open SQLite");
    let kernel = Kernel::with_clock(
        Arc::new(db.kernel_store()),
        Arc::new(SystemClock),
        KernelConfig::default(),
    );
    let config = SandboxConfig::new(dir.join("cache"));
    let limits = config.default_limits.clone();
    let sandbox = Sandbox::new(config).expect("sandbox");
    let bytes = keel_testutil::guest_bytes("hello");
    let plugin = sandbox.prepare(&bytes).await.expect("prepare hello");
    let tools = SandboxToolHost::new(
        sandbox,
        [InstalledTool {
            plugin,
            grants: Grants::default(),
            limits,
        }],
    );
    AgentRuntime::new(
        kernel,
        Arc::new(ScriptedProvider::new(turns)),
        Arc::new(tools),
        Arc::new(Policy::allow_all()),
        Arc::new(SessionApprovals::new()),
        AgentConfig {
            poll_ms: 20,
            ..AgentConfig::default()
        },
    )
}

async fn one_job(rt: &AgentRuntime) {
    let request = ExecutionRequest::new("bench", "scripted:bench", "greet Ada").with_tools(["hello/*"]);
    let handle = rt.execute(request).await.expect("execute");
    let result = handle.result().await.expect("result");
    assert_eq!(result.status, JobState::Succeeded, "{result:?}");
}

async fn measure(rt: &AgentRuntime, jobs: usize, concurrency: usize) -> Duration {
    let start = Instant::now();
    let per_worker = jobs.div_ceil(concurrency);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move {
                for _ in 0..per_worker {
                    one_job(&rt).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    start.elapsed() / (per_worker * concurrency) as u32
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let jobs = args.first().copied().unwrap_or(200);
    let concurrency = args.get(1).copied().unwrap_or(8).max(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(async {
        let scenarios = [
            ("text", vec![ScriptedTurn::text("done")]),
            (
                "wasm_tool",
                vec![
                    ScriptedTurn::tool_call("hello__greet", json!({ "name": "Ada" })),
                    ScriptedTurn::text("done"),
                ],
            ),
        ];
        for (name, turns) in scenarios {
            let agent = runtime(dir.path(), name, turns).await;
            one_job(&agent).await; // warm-up: first instantiation, SQLite pages
            for c in [1, concurrency] {
                let per_job = measure(&agent, jobs, c).await;
                println!(
                    "agent_jobs/{name:<9} concurrency {c:>2}: {:>8.1} jobs/s  ({:.2} ms/job, {jobs} jobs)",
                    1.0 / per_job.as_secs_f64(),
                    per_job.as_secs_f64() * 1e3
                );
            }
        }
    });
}
