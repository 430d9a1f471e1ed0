//! Issue 7, filesystem and resource-exhaustion holes: grants are opened by handle and verified
//! (items 1 and 2), one call cannot take every descriptor (item 6), opening a FIFO cannot block a
//! call past its deadline (item 9), and the memory limit counts all of a call's memories (item 10);
//! and a component declaring much memory runs on the engine whose memory reset suits it.
//!
//! The guests are `tests/guests/hostile` (plugin-wide grants) and `tests/guests/narrowed`, whose
//! tools declare paths, so the host narrows its grants per tool.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{
    CacheOutcome, CallReport, ComponentStore, FsGrant, FsMode, Grants, Limits, PreparedPlugin, Sandbox, SandboxConfig,
};
use serde_json::{Value, json};

const SECRET: &str = "secret-outside-the-grant";

/// One artifact cache per test binary, so each guest is compiled once.
fn cache_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("cache tempdir"))
        .path()
        .to_path_buf()
}

fn sandbox() -> Sandbox {
    let mut config = SandboxConfig::new(cache_dir());
    config.pool_instances = 16;
    config.max_memory_bytes = 256 << 20;
    Sandbox::new(config).expect("sandbox")
}

async fn prepare(sandbox: &Sandbox, package: &str) -> Arc<PreparedPlugin> {
    let wasm = keel_testutil::guest_bytes(package);
    sandbox.prepare(&wasm).await.expect("prepare guest")
}

async fn call(
    sandbox: &Sandbox,
    plugin: &PreparedPlugin,
    grants: &Grants,
    limits: &Limits,
    tool: &str,
    args: Value,
) -> CallReport {
    sandbox
        .call(plugin, grants, limits, &ToolCallContext::ad_hoc("test"), tool, &args)
        .await
}

fn grant(host: &Path, guest: Option<&str>, mode: FsMode) -> FsGrant {
    let spec = match guest {
        Some(guest) => format!("{}::{guest}", host.display()),
        None => host.display().to_string(),
    };
    FsGrant::parse(&spec, mode).expect("grant")
}

fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().canonicalize().expect("canonical");
    (tmp, base)
}

// -------------------------------------------------------------------------------------------------
// Item 1: per-tool narrowing opens the sub-path beneath the grant's handle.

/// The `narrowed` guest granted `base/data` (read-write, as `/data`), which holds
/// `sub/inside.txt`; the secret lies in `base`, above the grant.
struct NarrowedData {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    sandbox: Sandbox,
    plugin: Arc<PreparedPlugin>,
    grants: Grants,
}

async fn narrowed_data() -> NarrowedData {
    let (tmp, base) = canonical_tempdir();
    std::fs::write(base.join(SECRET), SECRET).unwrap();
    std::fs::create_dir_all(base.join("data/sub")).unwrap();
    std::fs::write(base.join("data/sub/inside.txt"), "inside").unwrap();
    let sandbox = sandbox();
    let plugin = prepare(&sandbox, "keel-test-narrowed").await;
    let grants = Grants {
        fs: vec![grant(&base.join("data"), Some("/data"), FsMode::ReadWrite)],
        ..Grants::default()
    };
    NarrowedData {
        _tmp: tmp,
        base,
        sandbox,
        plugin,
        grants,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_symlink_swaps_never_widen_a_narrowed_grant() {
    let NarrowedData {
        _tmp,
        sandbox,
        plugin,
        grants,
        ..
    } = narrowed_data().await;

    let done = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (sandbox, plugin, grants, done) = (sandbox.clone(), plugin.clone(), grants.clone(), done.clone());
        tokio::spawn(async move {
            let limits = Limits {
                timeout_ms: 60_000,
                ..Limits::default()
            };
            let report = call(&sandbox, &plugin, &grants, &limits, "swap", json!({"rounds": 4000})).await;
            done.store(true, Ordering::SeqCst);
            report
        })
    };
    let (mut ok, mut refused, mut leaked) = (0, 0, Vec::new());
    let mut readers = tokio::task::JoinSet::new();
    let started = Instant::now();
    while !done.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(15) {
        for _ in 0..4 {
            let (sandbox, plugin, grants) = (sandbox.clone(), plugin.clone(), grants.clone());
            readers
                .spawn(async move { call(&sandbox, &plugin, &grants, &Limits::default(), "reader", json!({})).await });
        }
        while let Some(report) = readers.join_next().await {
            match report.unwrap().result {
                Ok(out) => {
                    let seen = out.output["seen"].to_string();
                    if seen.contains(SECRET) || seen.contains("\"/data/sub:data\"") {
                        leaked.push(seen);
                    } else {
                        ok += 1;
                    }
                }
                Err(ToolError::Host { message }) => {
                    assert!(message.contains("/data"), "the refusal names the grant: {message}");
                    refused += 1;
                }
                Err(other) => panic!("unexpected reader error: {other:?}"),
            }
        }
    }
    let swapped = swapper.await.unwrap();
    eprintln!("reader calls: {ok} ok, {refused} refused, {} leaked", leaked.len());
    assert!(swapped.result.is_ok(), "swap: {:?}", swapped.result);
    assert!(
        leaked.is_empty(),
        "a narrowed preopen showed the directory above the grant: {leaked:?}"
    );
    assert!(ok > 0, "some reader calls ran while `sub` was the real directory");
    // Once the swapping stops, the tool gets its sub-directory again.
    let report = call(&sandbox, &plugin, &grants, &Limits::default(), "reader", json!({})).await;
    assert_eq!(report.result.unwrap().output, json!({"seen": ["/data/sub:inside.txt"]}));
}

/// A ready instance is built ahead of its call and reused only while its directories are still
/// what it recorded. The record must be of the very handles it holds: recorded from a second open
/// a moment earlier, a rename between the two left an instance holding no `/data/sub` recorded as
/// holding it (the next call saw nothing while `sub` was there; CI, stop 20), or holding the
/// renamed directory recorded as none (the next call saw `sub` after it was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_instance_holds_the_directories_it_recorded_while_they_are_renamed() {
    let NarrowedData {
        _tmp,
        base,
        sandbox,
        plugin,
        grants,
    } = narrowed_data().await;
    let (sub, real) = (base.join("data/sub"), base.join("data/real"));
    let mut mismatches = Vec::new();
    for round in 0..150 {
        // Rename `sub` away and back on a host thread while calls (and the refills after them)
        // run, then stop it in whichever state it is in.
        let stop = Arc::new(AtomicBool::new(false));
        let renamer = {
            let (sub, real, stop) = (sub.clone(), real.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut present = sub.exists();
                let mut turns = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (from, to) = if present { (&sub, &real) } else { (&real, &sub) };
                    std::fs::rename(from, to).unwrap();
                    present = !present;
                    turns += 1;
                    // States of uneven length, so each is sometimes caught mid-build.
                    for _ in 0..(turns * 7919 % 4000) {
                        std::hint::spin_loop();
                    }
                }
                present
            })
        };
        for _ in 0..8 {
            let _ = call(&sandbox, &plugin, &grants, &Limits::default(), "peek", json!({})).await;
        }
        stop.store(true, Ordering::Relaxed);
        let present = renamer.join().unwrap();
        let expected = if present {
            json!({"seen": ["/data/sub:inside.txt"]})
        } else {
            json!({"seen": []})
        };
        for _ in 0..2 {
            let report = call(&sandbox, &plugin, &grants, &Limits::default(), "peek", json!({})).await;
            let seen = report.result.expect("peek").output;
            if seen != expected {
                mismatches.push(format!("round {round}: `sub` present: {present}, the call saw {seen}"));
            }
        }
    }
    assert!(mismatches.is_empty(), "calls saw stale directories: {mismatches:#?}");
}

// -------------------------------------------------------------------------------------------------
// Item 2: a grant is opened by handle every call and verified against what was granted.

struct Nested {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    sandbox: Sandbox,
    plugin: Arc<PreparedPlugin>,
    grants: Grants,
    project: String,
    docs: String,
}

/// `--allow-write base/project --allow-read base/project/docs`, as the CLI records them.
async fn nested() -> Nested {
    let (tmp, base) = canonical_tempdir();
    std::fs::write(base.join(SECRET), SECRET).unwrap();
    std::fs::create_dir_all(base.join("project/docs")).unwrap();
    std::fs::write(base.join("project/docs/readme.txt"), "docs").unwrap();
    let sandbox = sandbox();
    let plugin = prepare(&sandbox, "keel-test-hostile").await;
    let project = grant(&base.join("project"), None, FsMode::ReadWrite);
    let docs = grant(&base.join("project/docs"), None, FsMode::Read);
    let (project_guest, docs_guest) = (project.guest.clone(), docs.guest.clone());
    Nested {
        _tmp: tmp,
        base,
        sandbox,
        plugin,
        grants: Grants {
            fs: vec![project, docs],
            ..Grants::default()
        },
        project: project_guest,
        docs: docs_guest,
    }
}

impl Nested {
    async fn call(&self, tool: &str, args: Value) -> CallReport {
        call(
            &self.sandbox,
            &self.plugin,
            &self.grants,
            &Limits::default(),
            tool,
            args,
        )
        .await
    }

    /// The next call is refused with a message naming the docs grant, and shows nothing outside.
    async fn assert_docs_refused(&self, why: &str) {
        let report = self.call("list", json!({"dir": self.docs})).await;
        let rendered = format!("{:?}", report.result);
        assert!(
            !rendered.contains(SECRET),
            "the guest saw outside the grant: {rendered}"
        );
        match report.result {
            Err(ToolError::Host { message }) => {
                assert!(message.contains(&self.docs), "names the grant: {message}");
                assert!(message.contains(why), "says why ({why}): {message}");
                assert!(!message.contains('\n'), "one line: {message}");
            }
            other => panic!("expected a refusal naming {}, got {other:?}", self.docs),
        }
    }
}

#[tokio::test]
async fn a_nested_grant_swapped_for_a_symlink_is_refused() {
    let env = nested().await;
    let report = env.call("list", json!({"dir": env.docs})).await;
    assert_eq!(report.result.unwrap().output, json!({"names": ["readme.txt"]}));
    let report = env
        .call(
            "replace_with_symlink",
            json!({"dir": env.project, "name": "docs", "target": ".."}),
        )
        .await;
    assert!(
        report.result.is_ok(),
        "the plugin may rewrite its writable grant: {:?}",
        report.result
    );
    assert!(env.base.join("project/docs").is_symlink());
    env.assert_docs_refused("symbolic link").await;
}

#[tokio::test]
async fn a_granted_directory_replaced_by_another_is_refused() {
    let env = nested().await;
    std::fs::rename(env.base.join("project/docs"), env.base.join("project/docs.old")).unwrap();
    std::fs::create_dir(env.base.join("project/docs")).unwrap();
    env.assert_docs_refused("no longer the directory that was granted")
        .await;
}

// -------------------------------------------------------------------------------------------------
// Item 6: handles and descriptors are capped per call.

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_thousands_of_files_hits_the_handle_limit() {
    let (_tmp, base) = canonical_tempdir();
    std::fs::write(base.join("file.txt"), "x").unwrap();
    let sandbox = sandbox();
    let plugin = prepare(&sandbox, "keel-test-hostile").await;
    let grants = Grants {
        fs: vec![grant(&base, Some("/ro"), FsMode::Read)],
        ..Grants::default()
    };
    let limits = Limits::default();
    // Well under the cap works.
    let report = call(
        &sandbox,
        &plugin,
        &grants,
        &limits,
        "open_many",
        json!({"dir": "/ro", "path": "file.txt", "count": 100}),
    )
    .await;
    assert_eq!(report.result.unwrap().output, json!({"opened": 100}));

    let baseline = open_fds();
    let peak = Arc::new(AtomicUsize::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(open_fds(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let report = call(
        &sandbox,
        &plugin,
        &grants,
        &limits,
        "open_many",
        json!({"dir": "/ro", "path": "file.txt", "count": 5000}),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!("open descriptors: baseline {baseline}, peak during the call {peak}");
    match &report.result {
        Err(ToolError::LimitExceeded { limit, message }) => {
            assert_eq!(limit, "handles", "{message}");
            assert!(message.contains("handles"), "{message}");
        }
        other => panic!("expected a handle limit error, got {other:?}"),
    }
    assert!(
        peak <= baseline + 700,
        "one call held {} descriptors (baseline {baseline}, peak {peak})",
        peak - baseline
    );
    let report = call(&sandbox, &plugin, &grants, &limits, "ok", json!({})).await;
    assert!(report.result.is_ok(), "the host survives: {:?}", report.result);
}

// -------------------------------------------------------------------------------------------------
// Item 9: opening a FIFO cannot block a call past its deadline.

pub(crate) fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Unblock anything stuck opening `fifo` for reading, so a failing test still ends.
fn release_fifo(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(fifo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_fifo_fails_within_the_deadline() {
    let (_tmp, base) = canonical_tempdir();
    mkfifo(&base.join("fifo"));
    std::fs::write(base.join("file.txt"), "plain").unwrap();
    let sandbox = sandbox();
    let plugin = prepare(&sandbox, "keel-test-hostile").await;
    let grants = Grants {
        fs: vec![grant(&base, Some("/ro"), FsMode::Read)],
        ..Grants::default()
    };
    let limits = Limits {
        timeout_ms: 2_000,
        ..Limits::default()
    };
    let started = Instant::now();
    let report = call(
        &sandbox,
        &plugin,
        &grants,
        &limits,
        "open_path",
        json!({"dir": "/ro", "path": "fifo"}),
    )
    .await;
    let took = started.elapsed();
    release_fifo(&base.join("fifo"));
    match &report.result {
        Err(ToolError::Failed { message }) => assert!(message.contains("open_at(fifo)"), "{message}"),
        other => panic!("expected the open to be refused, got {other:?} after {took:?}"),
    }
    assert!(
        took < Duration::from_millis(1_000),
        "refused at once, not at the deadline: {took:?}"
    );
    // Regular files and directories still open.
    let report = call(
        &sandbox,
        &plugin,
        &grants,
        &limits,
        "open_path",
        json!({"dir": "/ro", "path": "file.txt"}),
    )
    .await;
    assert_eq!(report.result.unwrap().output, json!({"content": "plain"}));
}

/// A grant never reaches the kernel's process and system filesystems: `/proc/self` is the Keel
/// process (its environment holds every secret, its memory the cache key), so a file on procfs or
/// sysfs is refused even under a grant of `/` or of `/proc` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_proc_and_sys_are_refused_under_any_grant() {
    let sandbox = sandbox();
    let plugin = prepare(&sandbox, "keel-test-hostile").await;
    let refused = FsGrant::parse("/proc::/p", FsMode::Read).expect_err("a grant of /proc");
    assert!(refused.to_string().contains("procfs"), "{refused}");
    let grants = Grants {
        fs: vec![
            grant(Path::new("/"), Some("/root"), FsMode::Read),
            // As recorded before grants of /proc were refused.
            FsGrant {
                host: "/proc".into(),
                guest: "/p".into(),
                mode: FsMode::Read,
                identity: None,
            },
        ],
        ..Grants::default()
    };
    for (dir, path) in [
        ("/root", "proc/self/environ"),
        ("/p", "self/environ"),
        ("/p", "self/status"),
        ("/root", "sys/kernel/hostname"),
    ] {
        let report = call(
            &sandbox,
            &plugin,
            &grants,
            &Limits::default(),
            "open_path",
            json!({"dir": dir, "path": path}),
        )
        .await;
        match &report.result {
            Err(ToolError::Failed { message }) => assert!(message.contains("open_at"), "{dir}/{path}: {message}"),
            other => panic!("{dir}/{path} was read: {other:?}"),
        }
    }
    // Ordinary files under the same grant still open.
    let report = call(
        &sandbox,
        &plugin,
        &grants,
        &Limits::default(),
        "open_path",
        json!({"dir": "/root", "path": "etc/hostname"}),
    )
    .await;
    assert!(report.result.is_ok(), "{:?}", report.result);
}

// -------------------------------------------------------------------------------------------------
// Item 10: the memory limit is the sum of all of a call's linear memories.

/// `wasm` with `extra` more core instances appended, each owning a memory of `pages` 64 KiB pages.
fn with_extra_memories(wasm: &[u8], extra: u32, pages: u64) -> Vec<u8> {
    // Core modules already defined at the top level: the new module's index follows them.
    let mut depth = 0usize;
    let mut modules = 0u32;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.expect("parse component") {
            wasmparser::Payload::Version { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth -= 1,
            wasmparser::Payload::ModuleSection { .. } if depth == 1 => modules += 1,
            _ => {}
        }
    }
    let mut module = wasm_encoder::Module::new();
    let mut memories = wasm_encoder::MemorySection::new();
    memories.memory(wasm_encoder::MemoryType {
        minimum: pages,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    module.section(&memories);
    let mut component = wasm_encoder::Component::new();
    component.section(&wasm_encoder::ModuleSection(&module));
    let mut instances = wasm_encoder::InstanceSection::new();
    for _ in 0..extra {
        instances.instantiate(modules, Vec::<(&str, wasm_encoder::ModuleArg)>::new());
    }
    component.section(&instances);
    let appended = component.finish();
    let mut out = wasm.to_vec();
    out.extend_from_slice(&appended[8..]); // skip the second header
    out
}

/// A component whose modules declare much linear memory runs on the sandbox's second engine (its
/// memory reset in full, not page by page: `MemoryClass` in `sandbox.rs`), a small one on the
/// first; either way, freshly compiled and from the cached artifact, and call after call in a
/// reused pool slot.
#[tokio::test]
async fn a_component_declaring_much_memory_runs_on_the_large_memory_engine() {
    let small = keel_testutil::guest_bytes("keel-test-hostile");
    let large = with_extra_memories(&small, 1, (16 << 20) / 65536);
    let dir = tempfile::tempdir().unwrap();
    let store = ComponentStore::new(dir.path().join("components"));
    let limits = Limits {
        memory_bytes: 64 << 20,
        ..Limits::default()
    };
    for (wasm, on_first) in [(&small, true), (&large, false)] {
        let sha = store.put(wasm).unwrap();
        for expected in [CacheOutcome::Compiled, CacheOutcome::Hit] {
            let mut config = SandboxConfig::new(dir.path().join("cache"));
            config.pool_instances = 16;
            let sandbox = Sandbox::new(config).expect("sandbox");
            let plugin = sandbox.prepare_stored(&store, &sha, "hostile").await.unwrap();
            assert_eq!(plugin.cache, expected);
            assert_eq!(
                wasmtime::Engine::same(plugin.engine(), sandbox.engine()),
                on_first,
                "{} bytes, {expected:?}",
                wasm.len()
            );
            for _ in 0..3 {
                let report = call(&sandbox, &plugin, &Grants::default(), &limits, "ok", json!({})).await;
                assert!(report.result.is_ok(), "{:?}", report.result);
            }
        }
    }
}

#[tokio::test]
async fn all_memories_count_against_one_memory_limit() {
    let cap: u64 = 12 << 20;
    let pages = (cap * 6 / 10).div_ceil(65536); // 0.6 × the cap each
    let wasm = with_extra_memories(&keel_testutil::guest_bytes("keel-test-hostile"), 3, pages);
    let sandbox = sandbox();
    let plugin = sandbox.prepare(&wasm).await.expect("prepare the four-memory component");
    let limits = Limits {
        memory_bytes: cap,
        ..Limits::default()
    };
    let report = call(&sandbox, &plugin, &Grants::default(), &limits, "ok", json!({})).await;
    match &report.result {
        Err(ToolError::LimitExceeded { limit, message }) => {
            assert_eq!(limit, "memory", "{message}");
            assert!(message.contains(&cap.to_string()), "{message}");
        }
        other => panic!("four memories of 0.6 × the cap ran under it: {other:?}"),
    }
    // Under a cap that fits all four, it runs.
    let roomy = Limits {
        memory_bytes: 4 * cap,
        ..Limits::default()
    };
    let report = call(&sandbox, &plugin, &Grants::default(), &roomy, "ok", json!({})).await;
    assert!(report.result.is_ok(), "{:?}", report.result);
}
