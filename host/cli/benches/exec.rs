//! Speed of code execution steps, in one run so the numbers compare:
//! - python-exec `print(1)` / js-exec `console.log(1)` start-to-result inside a running host
//!   (`Sandbox::call`: fresh instance, call, result), with and without the pool of
//!   pre-instantiated instances;
//! - a native `python3 -c 'print(1)'` / `node -e 'console.log(1)'` process;
//! - a whole `keel call python-exec/run` / `keel call js-exec/run` process and a whole
//!   `keel exec --lang python|js -c ...` process (the profile this bench was built with:
//!   `--profile dev` or release), the latter run in turn with the native interpreter, with the
//!   per-round ratio (load on a shared machine drifts between blocks of runs, not within a round);
//! - per language (the `textkit` examples): component size, and instantiate + call of
//!   `word-count` inside a running host.
//!
//! `cargo bench -p keel --bench exec [-- ROUNDS]` (add `--profile dev` to skip the release
//! build). The first run builds the components and JIT-compiles them (minutes); later runs load
//! the cached artifacts. Under `cargo test` (no `--bench` argument) it only says so and exits.
//! `EXEC_BENCH_PROFILE=python|js` (and `EXEC_BENCH_RESIDENT_MB`) runs only ready-instance calls of
//! one plugin, for `perf record`; `EXEC_BENCH_WASM=PATH` runs that component instead of the one
//! built from `plugins/` (to compare two builds of a plugin on one machine state).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keel_build::Lang;
use keel_kernel::tool::ToolCallContext;
use keel_sandbox::{Grants, Limits, PreparedPlugin, Sandbox, SandboxConfig};
use serde_json::{Value, json};

/// The allocator the `keel` binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/langs/mod.rs"]
mod langs;

/// Median, 10th and 90th percentile of `samples`, in ms.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    format!(
        "median {:8.2} ms   p10 {:8.2}   p90 {:8.2}   (n={})",
        at(0.5),
        at(0.1),
        at(0.9),
        samples.len()
    )
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

fn time_process(rounds: usize, mut command: impl FnMut() -> Command) -> Vec<Duration> {
    (0..rounds)
        .map(|_| {
            let started = Instant::now();
            let out = command().output().expect("run the process");
            let took = started.elapsed();
            assert!(
                out.status.success(),
                "{:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            took
        })
        .collect()
}

async fn time_calls(
    sandbox: &Sandbox,
    plugin: &PreparedPlugin,
    tool: &str,
    arguments: &Value,
    rounds: usize,
    check: impl Fn(&Value),
) -> Vec<Duration> {
    let limits = Limits::default();
    let ctx = ToolCallContext::ad_hoc("bench");
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let report = sandbox
            .call(plugin, &Grants::default(), &limits, &ctx, tool, arguments)
            .await;
        samples.push(started.elapsed());
        check(&report.result.expect("the call succeeds").output);
        // Let the pool refill between calls, as it does between the calls of an agent.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("exec bench: run with `cargo bench -p keel --bench exec`; skipped under `cargo test`");
        return;
    }
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(30);
    let profile = if cfg!(debug_assertions) { "dev" } else { "release" };
    println!("exec bench, {rounds} rounds, keel built with the {profile} profile");

    let py = langs::build(Lang::Python, "plugins/python-exec");
    let js = langs::build(Lang::Js, "plugins/js-exec");
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("exec-bench-cache");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // `EXEC_BENCH_PROFILE=python|js`: only ready-instance calls of that plugin, `rounds` of them,
    // back to back, for `perf record` (what a ready `print(1)` spends its time on).
    if let Ok(which) = std::env::var("EXEC_BENCH_PROFILE") {
        let (wasm, code) = if which == "js" {
            (js.clone(), "console.log(1)")
        } else {
            (py.clone(), "print(1)")
        };
        let wasm = std::env::var_os("EXEC_BENCH_WASM").map_or(wasm, PathBuf::from);
        let resident_mb: usize = std::env::var("EXEC_BENCH_RESIDENT_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut config = SandboxConfig::new(&cache);
        config.ready_instances = 2;
        config.memory_keep_resident_bytes = resident_mb << 20;
        let sandbox = Sandbox::new(config).unwrap();
        rt.block_on(async {
            let plugin = sandbox.prepare(&std::fs::read(&wasm).unwrap()).await.unwrap();
            let arguments = json!({ "code": code });
            let check = |v: &Value| assert_eq!(v["stdout"], "1\n", "{v}");
            time_calls(&sandbox, &plugin, "run", &arguments, 3, check).await;
            let samples = time_calls(&sandbox, &plugin, "run", &arguments, rounds, check).await;
            println!("profile {which} ready resident={resident_mb}M: {}", summary(samples));
        });
        return;
    }

    // Native processes: the real interpreter (`python3` may be a version manager's shell shim,
    // which alone costs hundreds of ms).
    let python = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    let python = String::from_utf8(python.stdout).unwrap().trim().to_string();
    println!("native python: {python}");
    let native_py = time_process(rounds, || {
        let mut c = Command::new(&python);
        c.args(["-c", "print(1)"]);
        c
    });
    let native_node = time_process(rounds, || {
        let mut c = Command::new("node");
        c.args(["-e", "console.log(1)"]);
        c
    });

    // Inside a running host: fresh instance per call (pool off), then pooled.
    let mut results = Vec::new();
    // Fresh instance per call, then ready instances; each without and with resident memory
    // (the default, 16 MiB: the next instance in a pool slot starts on resident pages).
    for (pool, resident_mb) in [(0usize, 0usize), (0, 16), (2, 0), (2, 16)] {
        let mut config = SandboxConfig::new(&cache);
        config.ready_instances = pool;
        config.memory_keep_resident_bytes = resident_mb << 20;
        let sandbox = Sandbox::new(config).unwrap();
        rt.block_on(async {
            for (name, wasm, code, out) in [
                ("python-exec print(1)", &py, "print(1)", "1\n"),
                ("js-exec console.log(1)", &js, "console.log(1)", "1\n"),
            ] {
                let bytes = std::fs::read(wasm).unwrap();
                let started = Instant::now();
                let plugin = sandbox.prepare(&bytes).await.unwrap();
                let prepared = started.elapsed();
                let arguments = json!({ "code": code });
                let check = |v: &Value| assert_eq!(v["stdout"], out, "{v}");
                // Warm up (first calls fill the pool and fault in the shared code).
                time_calls(&sandbox, &plugin, "run", &arguments, 3, check).await;
                let samples = time_calls(&sandbox, &plugin, "run", &arguments, rounds, check).await;
                println!(
                    "in-host {name:28} pool={pool} resident={resident_mb}M: {}   (prepare {:.0} ms, {} bytes)",
                    summary(samples.clone()),
                    prepared.as_secs_f64() * 1e3,
                    bytes.len()
                );
                results.push((name, pool, resident_mb, median_ms(samples)));
            }
        });
    }
    println!(
        "native  python3 -c 'print(1)'          : {}",
        summary(native_py.clone())
    );
    println!(
        "native  node -e 'console.log(1)'       : {}",
        summary(native_node.clone())
    );
    let (npy, nnode) = (median_ms(native_py), median_ms(native_node));
    for (name, pool, resident_mb, ms) in &results {
        let native = if name.starts_with("python") { npy } else { nnode };
        println!(
            "ratio   {name:28} pool={pool} resident={resident_mb}M: {:.3} of the native process",
            ms / native
        );
    }

    // Whole `keel call` processes.
    let home = langs::reusable_home("exec-bench-home");
    for (wasm, name, code) in [(&py, "python-exec", "print(1)"), (&js, "js-exec", "console.log(1)")] {
        let installed = keel(&home)
            .args(["install", &wasm.to_string_lossy(), "--replace"])
            .output()
            .unwrap();
        if !installed.status.success() {
            // e.g. the JIT compile of a big component exceeding the prepare bound on a loaded machine.
            println!(
                "process keel call {name}/run: not measured, install failed: {}",
                String::from_utf8_lossy(&installed.stderr).trim()
            );
            continue;
        }
        let args = json!({ "code": code }).to_string();
        let tool = format!("{name}/run");
        let samples = time_process(rounds.min(20), || {
            let mut c = keel(&home);
            c.args(["call", &tool, &args]);
            c
        });
        println!("process keel call {tool:22}: {}", summary(samples));
        // The same step as `keel exec --lang`: streamed output, the code's exit status. Run in
        // turn with the native interpreter, so both see the same machine (load drifts on a
        // shared machine; the per-round ratio does not).
        let lang = if name == "python-exec" { "python" } else { "js" };
        let native = || {
            let mut c = if lang == "python" {
                Command::new(&python)
            } else {
                Command::new("node")
            };
            c.args([if lang == "python" { "-c" } else { "-e" }, code]);
            c
        };
        let (mut keel_samples, mut native_samples, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds.min(40) {
            let n = time_process(1, native)[0];
            let k = time_process(1, || {
                let mut c = keel(&home);
                c.args(["exec", "--lang", lang, "-c", code]);
                c
            })[0];
            ratios.push(k.as_secs_f64() / n.as_secs_f64());
            keel_samples.push(k);
            native_samples.push(n);
        }
        println!(
            "process keel exec --lang {lang:6} -c {code:16}: {}",
            summary(keel_samples)
        );
        println!(
            "  in turn with native {lang:10}           : {}",
            summary(native_samples)
        );
        ratios.sort_by(f64::total_cmp);
        println!(
            "  ratio keel exec / native, per round: median {:.3}, p10 {:.3}, p90 {:.3}",
            ratios[ratios.len() / 2],
            ratios[(ratios.len() - 1) / 10],
            ratios[(ratios.len() - 1) * 9 / 10]
        );
    }

    // Per language: the same tool (textkit word-count), size and instantiate + call in the host.
    let sandbox = Sandbox::new(SandboxConfig::new(&cache)).unwrap();
    for (lang, project) in [
        (Lang::Rust, "examples/rust/textkit"),
        (Lang::Python, "examples/python/textkit"),
        (Lang::Js, "examples/js/textkit"),
        (Lang::C, "examples/c/textkit"),
    ] {
        let wasm = langs::build(lang, project);
        let bytes = std::fs::read(&wasm).unwrap();
        rt.block_on(async {
            let plugin = sandbox.prepare(&bytes).await.unwrap();
            let arguments = json!({ "text": "the quick brown fox jumps over the lazy dog" });
            let check = |v: &Value| assert_eq!(v["words"], 9, "{v}");
            time_calls(&sandbox, &plugin, "word-count", &arguments, 3, check).await;
            let samples = time_calls(&sandbox, &plugin, "word-count", &arguments, rounds, check).await;
            println!(
                "textkit {:6} {:>10} bytes   instantiate+call: {}",
                format!("{lang:?}"),
                bytes.len(),
                summary(samples)
            );
        });
    }
}

fn keel(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
    c.env("KEEL_HOME", home).env_remove("KEEL_LOG");
    c
}
