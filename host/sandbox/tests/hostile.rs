//! Adversarial tests: the `hostile` guest (tests/guests/hostile) attacks the sandbox's filesystem
//! grants with raw `wasi:filesystem` calls, exhausts resources and abuses the raw host ABI.
//!
//! Every case must end as a clear error, the host must stay alive (the next `ok` call succeeds on
//! the same sandbox and prepared plugin), and for filesystem attacks the host directory tree outside
//! the writable grant must be byte-for-byte (and mtime-for-mtime) unchanged.
//!
//! Layout of each test's temporary directory:
//! ```text
//! base/secret.txt          not granted
//! base/outside/secret.txt  not granted
//! base/ro/file.txt         granted read-only as /ro
//! base/ro/empty_dir/
//! base/rw/                 granted read-write as /rw
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{CallReport, FsGrant, FsMode, Grants, Limits, PreparedPlugin, Sandbox, SandboxConfig};
use serde_json::{Value, json};

const SECRET: &str = "TOP SECRET: the host's private data";
const RO_CONTENT: &str = "read-only content that must never change";

/// One artifact cache per test binary, so the hostile component is compiled once.
fn cache_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("cache tempdir"))
        .path()
        .to_path_buf()
}

struct Env {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    sandbox: Sandbox,
    plugin: Arc<PreparedPlugin>,
    grants: Grants,
}

async fn setup() -> Env {
    setup_with(|_| {}).await
}

/// [`setup`] with the sandbox configuration changed by `configure`.
async fn setup_with(configure: impl FnOnce(&mut SandboxConfig)) -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().canonicalize().expect("canonical tempdir");
    std::fs::write(base.join("secret.txt"), SECRET).unwrap();
    std::fs::create_dir(base.join("outside")).unwrap();
    std::fs::write(base.join("outside/secret.txt"), SECRET).unwrap();
    std::fs::create_dir(base.join("ro")).unwrap();
    std::fs::write(base.join("ro/file.txt"), RO_CONTENT).unwrap();
    std::fs::create_dir(base.join("ro/empty_dir")).unwrap();
    std::fs::create_dir(base.join("rw")).unwrap();
    std::fs::create_dir(base.join("rw/sub")).unwrap();

    let mut config = SandboxConfig::new(cache_dir());
    config.pool_instances = 8;
    config.max_memory_bytes = 256 << 20;
    configure(&mut config);
    let sandbox = Sandbox::new(config).expect("sandbox");
    let wasm = keel_testutil::guest_bytes("keel-test-hostile");
    let plugin = sandbox.prepare(&wasm).await.expect("prepare hostile guest");
    let grants = Grants {
        fs: vec![
            FsGrant {
                host: base.join("ro"),
                guest: "/ro".into(),
                mode: FsMode::Read,
                identity: None,
            },
            FsGrant {
                host: base.join("rw"),
                guest: "/rw".into(),
                mode: FsMode::ReadWrite,
                identity: None,
            },
        ],
        ..Grants::default()
    };
    Env {
        _tmp: tmp,
        base,
        sandbox,
        plugin,
        grants,
    }
}

impl Env {
    async fn call_with(&self, grants: &Grants, limits: &Limits, tool: &str, args: Value) -> CallReport {
        self.sandbox
            .call(
                &self.plugin,
                grants,
                limits,
                &ToolCallContext::ad_hoc("test"),
                tool,
                &args,
            )
            .await
    }

    async fn call(&self, tool: &str, args: Value) -> CallReport {
        self.call_with(&self.grants, &Limits::default(), tool, args).await
    }

    /// The host is alive and the plugin still works after an attack.
    async fn assert_alive(&self) {
        let report = self.call("ok", json!({})).await;
        let output = report
            .result
            .unwrap_or_else(|e| panic!("`ok` after an attack failed: {e}"));
        assert_eq!(output.output, json!({"ok": true}));
    }

    /// Everything under `base` except the writable grant: type, size, mode, mtime, content.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        walk(&self.base, &self.base, &mut out);
        out
    }

    /// Run a filesystem attack: it must fail with a `denied` filesystem error, never leak the
    /// secret, and leave everything outside `/rw` untouched. Returns the error message.
    async fn assert_fs_refused(&self, tool: &str, args: Value) -> String {
        let before = self.snapshot();
        let report = self.call(tool, args.clone()).await;
        let after = self.snapshot();
        assert_eq!(
            before, after,
            "{tool} {args} changed the host filesystem outside the writable grant"
        );
        let rendered = format!("{:?}", report.result);
        assert!(
            !rendered.contains(SECRET),
            "{tool} {args} leaked the secret: {rendered}"
        );
        assert!(!rendered.contains(RO_CONTENT), "{tool} {args} leaked: {rendered}");
        let message = match report.result {
            Err(ToolError::Denied {
                capability, message, ..
            }) => {
                assert_eq!(capability, "filesystem", "{tool} {args}: {message}");
                message
            }
            other => panic!("{tool} {args}: expected a filesystem denial, got {other:?}"),
        };
        eprintln!("{tool} {args}: {message}");
        self.assert_alive().await;
        message
    }
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(base).unwrap().to_path_buf();
        if rel == Path::new("rw") {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mut desc = format!(
            "type={:?} size={} mode={:o} mtime={}.{} nlink={}",
            meta.file_type(),
            meta.len(),
            meta.permissions().mode(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.nlink()
        );
        if meta.is_file() {
            desc.push_str(&format!(
                " content={:?}",
                std::fs::read_to_string(&path).unwrap_or_default()
            ));
        }
        out.insert(rel, desc);
        if meta.is_dir() {
            walk(base, &path, out);
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Filesystem escapes

#[tokio::test]
async fn dot_dot_traversal_is_refused() {
    let env = setup().await;
    for (dir, path) in [
        ("/ro", "../secret.txt"),
        ("/rw", "../secret.txt"),
        ("/rw", "../outside/secret.txt"),
        ("/rw", "./../secret.txt"),
        ("/rw", "sub/../../secret.txt"),
        ("/ro", "empty_dir/../../secret.txt"),
        ("/ro", "empty_dir/../../../../../../etc/passwd"),
        ("/rw", "../ro/file.txt"),
    ] {
        env.assert_fs_refused("traverse_read", json!({"dir": dir, "path": path}))
            .await;
    }
}

#[tokio::test]
async fn dot_dot_create_is_refused() {
    let env = setup().await;
    for path in ["../created.txt", "../outside/created.txt", "../ro/created.txt"] {
        env.assert_fs_refused("traverse_create", json!({"dir": "/rw", "path": path}))
            .await;
    }
    assert!(!env.base.join("created.txt").exists());
    assert!(!env.base.join("outside/created.txt").exists());
    assert!(!env.base.join("ro/created.txt").exists());
}

#[tokio::test]
async fn absolute_paths_are_refused() {
    let env = setup().await;
    let host_secret = env.base.join("secret.txt").display().to_string();
    let host_ro = env.base.join("ro/file.txt").display().to_string();
    for (dir, path) in [
        ("/rw", host_secret.as_str()),
        ("/ro", host_secret.as_str()),
        ("/rw", "/etc/passwd"),
        ("/rw", "/ro/file.txt"),
        ("/rw", host_ro.as_str()),
    ] {
        env.assert_fs_refused("absolute_read", json!({"dir": dir, "path": path}))
            .await;
    }
}

#[tokio::test]
async fn symlink_pointing_outside_is_not_followed() {
    let env = setup().await;
    let host_secret = env.base.join("secret.txt").display().to_string();
    let host_outside = env.base.join("outside/secret.txt").display().to_string();
    for (i, target) in [
        "../secret.txt",
        "../outside/secret.txt",
        host_secret.as_str(),
        host_outside.as_str(),
        "../ro/file.txt",
        "/etc/passwd",
    ]
    .into_iter()
    .enumerate()
    {
        let link = format!("link{i}");
        env.assert_fs_refused(
            "symlink_escape",
            json!({"dir": "/rw", "link": link, "target": target, "write": true}),
        )
        .await;
    }
    assert_eq!(std::fs::read_to_string(env.base.join("secret.txt")).unwrap(), SECRET);
}

#[tokio::test]
async fn trailing_slash_symlink_is_not_followed() {
    let env = setup().await;
    let host_outside = env.base.join("outside").display().to_string();
    for (i, target) in ["../outside", host_outside.as_str(), "..", "../ro", "/"]
        .into_iter()
        .enumerate()
    {
        let link = format!("dirlink{i}");
        env.assert_fs_refused(
            "symlink_trailing_slash",
            json!({"dir": "/rw", "link": link, "target": target}),
        )
        .await;
    }
    assert!(!env.base.join("outside/pwned.txt").exists());
    assert!(!env.base.join("outside/pwned.d").exists());
    assert!(!env.base.join("pwned.txt").exists());
}

#[tokio::test]
async fn hardlink_from_readonly_grant_is_refused() {
    let env = setup().await;
    env.assert_fs_refused(
        "hardlink_escape",
        json!({"from_dir": "/ro", "from_path": "file.txt", "to_dir": "/rw", "to_path": "linked.txt"}),
    )
    .await;
    assert!(
        !env.base.join("rw/linked.txt").exists(),
        "a hard link to a read-only file appeared in /rw"
    );
    // Linking a read-write file into the read-only grant is refused too.
    std::fs::write(env.base.join("rw/mine.txt"), "mine").unwrap();
    env.assert_fs_refused(
        "hardlink_escape",
        json!({"from_dir": "/rw", "from_path": "mine.txt", "to_dir": "/ro", "to_path": "planted.txt"}),
    )
    .await;
    assert!(!env.base.join("ro/planted.txt").exists());
}

#[tokio::test]
async fn rename_across_grants_is_refused() {
    let env = setup().await;
    env.assert_fs_refused(
        "rename_escape",
        json!({"from_dir": "/ro", "from_path": "file.txt", "to_dir": "/rw", "to_path": "moved.txt"}),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(env.base.join("ro/file.txt")).unwrap(),
        RO_CONTENT
    );
    assert!(!env.base.join("rw/moved.txt").exists());
    std::fs::write(env.base.join("rw/mine.txt"), "mine").unwrap();
    env.assert_fs_refused(
        "rename_escape",
        json!({"from_dir": "/rw", "from_path": "mine.txt", "to_dir": "/ro", "to_path": "planted.txt"}),
    )
    .await;
    assert!(!env.base.join("ro/planted.txt").exists());
    assert!(env.base.join("rw/mine.txt").exists());
    env.assert_fs_refused(
        "rename_escape",
        json!({"from_dir": "/rw", "from_path": "mine.txt", "to_dir": "/rw", "to_path": "../planted.txt"}),
    )
    .await;
    assert!(!env.base.join("planted.txt").exists());
}

#[tokio::test]
async fn truncating_a_readonly_file_is_refused() {
    let env = setup().await;
    let message = env
        .assert_fs_refused("truncate_readonly", json!({"dir": "/ro", "path": "file.txt"}))
        .await;
    assert!(message.contains("open_at(truncate, write)"), "{message}");
    assert_eq!(
        std::fs::read_to_string(env.base.join("ro/file.txt")).unwrap(),
        RO_CONTENT
    );
}

#[tokio::test]
async fn writing_a_readonly_file_is_refused() {
    let env = setup().await;
    env.assert_fs_refused("write_readonly", json!({"dir": "/ro", "path": "file.txt"}))
        .await;
    assert_eq!(
        std::fs::read_to_string(env.base.join("ro/file.txt")).unwrap(),
        RO_CONTENT
    );
}

#[tokio::test]
async fn creating_in_a_readonly_dir_is_refused() {
    let env = setup().await;
    for path in ["new.txt", "empty_dir/new.txt"] {
        env.assert_fs_refused("create_in_readonly", json!({"dir": "/ro", "path": path}))
            .await;
    }
    let names: Vec<_> = std::fs::read_dir(env.base.join("ro"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "unexpected entries in the read-only grant: {names:?}");
}

#[tokio::test]
async fn deleting_in_a_readonly_dir_is_refused() {
    let env = setup().await;
    env.assert_fs_refused(
        "delete_in_readonly",
        json!({"dir": "/ro", "file": "file.txt", "subdir": "empty_dir"}),
    )
    .await;
    assert!(env.base.join("ro/file.txt").exists());
    assert!(env.base.join("ro/empty_dir").is_dir());
}

#[tokio::test]
async fn preopens_are_exactly_the_grants() {
    let env = setup().await;
    let report = env.call("preopens", json!({})).await;
    let mut list = report.result.expect("preopens").output.as_array().cloned().unwrap();
    list.sort_by_key(|v| v["path"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        list,
        vec![
            json!({"path": "/ro", "writable": false}),
            json!({"path": "/rw", "writable": true})
        ]
    );
    // No grants: no preopens at all.
    let report = env
        .call_with(&Grants::default(), &Limits::default(), "preopens", json!({}))
        .await;
    assert_eq!(report.result.expect("preopens").output, json!([]));
}

// -------------------------------------------------------------------------------------------------
// Resource exhaustion and host ABI abuse

fn small_limits() -> Limits {
    Limits {
        memory_bytes: 16 << 20,
        timeout_ms: 500,
        ..Limits::default()
    }
}

#[tokio::test]
async fn infinite_loop_times_out() {
    let env = setup().await;
    let report = env
        .call_with(&env.grants, &small_limits(), "infinite_loop", json!({}))
        .await;
    assert!(
        matches!(report.result, Err(ToolError::TimedOut { .. })),
        "{:?}",
        report.result
    );
    env.assert_alive().await;
}

/// A guest spinning until its deadline does not hold the caller's thread for that long: it
/// yields to the async runtime at every epoch tick, so the host's other work (a server's other
/// requests, approvals, heartbeats) goes on meanwhile, even on a single-threaded runtime.
#[tokio::test(flavor = "current_thread")]
async fn a_spinning_guest_leaves_the_runtime_to_other_tasks() {
    let env = setup().await;
    let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let report = env
        .call_with(&env.grants, &small_limits(), "infinite_loop", json!({}))
        .await;
    ticker.abort();
    assert!(
        matches!(report.result, Err(ToolError::TimedOut { .. })),
        "{:?}",
        report.result
    );
    let ticks = ticks.load(std::sync::atomic::Ordering::Relaxed);
    assert!(ticks >= 20, "another task ran {ticks} times in the guest's 500 ms");
    env.assert_alive().await;
}

#[tokio::test]
async fn call_context_timeout_is_honoured() {
    let env = setup().await;
    let mut ctx = ToolCallContext::ad_hoc("test");
    ctx.timeout = Some(Duration::from_millis(300));
    let report = env
        .sandbox
        .call(
            &env.plugin,
            &env.grants,
            &Limits::default(),
            &ctx,
            "infinite_loop",
            &json!({}),
        )
        .await;
    assert!(
        matches!(report.result, Err(ToolError::TimedOut { .. })),
        "{:?}",
        report.result
    );
    env.assert_alive().await;
}

#[tokio::test]
async fn memory_bomb_hits_the_memory_limit() {
    let env = setup().await;
    let report = env
        .call_with(&env.grants, &small_limits(), "memory_bomb", json!({}))
        .await;
    match &report.result {
        Err(ToolError::LimitExceeded { limit, .. }) => assert_eq!(limit, "memory"),
        other => panic!("expected a memory limit error, got {other:?}"),
    }
    env.assert_alive().await;
}

#[tokio::test]
async fn deep_recursion_is_stopped() {
    let env = setup().await;
    let report = env
        .call_with(&env.grants, &small_limits(), "deep_recursion", json!({}))
        .await;
    assert!(
        matches!(&report.result, Err(ToolError::Trapped { .. }))
            || matches!(&report.result, Err(ToolError::LimitExceeded { limit, .. }) if limit == "stack"),
        "{:?}",
        report.result
    );
    env.assert_alive().await;
}

#[tokio::test]
async fn huge_output_is_refused() {
    let env = setup().await;
    // 8 MiB fits in memory but not in the 1 MiB output limit.
    let report = env.call("huge_output", json!({"mb": 8})).await;
    match &report.result {
        Err(ToolError::LimitExceeded { limit, .. }) => assert_eq!(limit, "output"),
        other => panic!(
            "expected an output limit error, got {:?}",
            other.as_ref().map(|_| "a 8 MiB output")
        ),
    }
    // 50 MiB does not even fit in memory: some limit must stop it.
    let report = env.call("huge_output", json!({"mb": 50})).await;
    assert!(
        matches!(&report.result, Err(ToolError::LimitExceeded { .. })),
        "{:?}",
        report.result.as_ref().map(|_| "a 50 MiB output")
    );
    env.assert_alive().await;
}

#[tokio::test]
async fn out_of_bounds_string_to_host_traps_cleanly() {
    let env = setup().await;
    for at in ["end", "zero"] {
        let report = env.call("huge_host_arg", json!({"at": at})).await;
        assert!(
            matches!(
                &report.result,
                Err(ToolError::Trapped { .. }) | Err(ToolError::LimitExceeded { .. })
            ),
            "huge_host_arg at {at}: {:?}",
            report.result
        );
        // The error must say what went wrong (wasmtime's root cause is "string pointer/length out of
        // bounds of memory"), not the first line of the backtrace.
        let message = format!("{:?}", report.result);
        assert!(
            (message.contains("bounds") || message.contains("string")) && !message.contains("wasm backtrace"),
            "huge_host_arg at {at}: the error does not name the cause: {message}"
        );
        let logged: usize = report.logs.iter().map(|l| l.message.len()).sum();
        assert!(logged <= Limits::default().max_log_bytes as usize);
        env.assert_alive().await;
    }
}

#[tokio::test]
async fn log_flood_is_capped() {
    let env = setup().await;
    let report = env.call("log_flood", json!({"lines": 100_000})).await;
    assert!(
        report.result.is_ok(),
        "a log flood is dropped, not fatal: {:?}",
        report.result
    );
    let logged: usize = report.logs.iter().map(|l| l.message.len()).sum();
    assert!(
        logged as u64 <= Limits::default().max_log_bytes,
        "{logged} bytes of logs kept"
    );
    assert!(report.logs_truncated, "dropped log lines must be reported");
    assert!(!report.logs.is_empty(), "the first lines are kept");
    env.assert_alive().await;
}

#[tokio::test]
async fn one_huge_log_line_is_truncated() {
    let env = setup().await;
    let report = env.call("log_flood", json!({"lines": 3, "line_bytes": 1 << 20})).await;
    assert!(report.result.is_ok(), "{:?}", report.result);
    let logged: usize = report.logs.iter().map(|l| l.message.len()).sum();
    assert!(
        logged as u64 <= Limits::default().max_log_bytes,
        "{logged} bytes of logs kept"
    );
    assert!(
        report.logs.iter().all(|l| l.message.len() <= 4096 + 64),
        "a log line was not truncated"
    );
    env.assert_alive().await;
}

#[tokio::test]
async fn stdout_flood_is_capped() {
    let env = setup().await;
    let report = env.call("stdout_flood", json!({"mb": 8})).await;
    assert!(report.result.is_ok(), "{:?}", report.result);
    let cap = Limits::default().max_stdio_bytes as usize;
    assert!(
        report.stdout.len() <= cap,
        "{} bytes of stdout kept",
        report.stdout.len()
    );
    assert!(
        report.stderr.len() <= cap,
        "{} bytes of stderr kept",
        report.stderr.len()
    );
    // The receipt counts what was kept.
    assert_eq!(report.receipt.stdout_bytes, report.stdout.len() as u64);
    assert_eq!(report.receipt.stderr_bytes, report.stderr.len() as u64);
    assert!(report.receipt.stdout_bytes > 0);
    env.assert_alive().await;
}

/// A writer that keeps what it is given (a terminal or a pipe, for the test).
#[derive(Clone, Default)]
struct Kept(Arc<std::sync::Mutex<Vec<u8>>>);

impl tokio::io::AsyncWrite for Kept {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Streaming a tool call's stdout and stderr changes where they go, not how much a call may
/// print: each stream stops at the call's `max_output_bytes`, with one line that says so.
#[tokio::test]
async fn a_streamed_stdout_flood_stops_at_the_output_cap() {
    let env = setup().await;
    let limits = Limits {
        max_output_bytes: 100_000,
        ..Limits::default()
    };
    let (stdout, stderr) = (Kept::default(), Kept::default());
    let ctx = ToolCallContext::ad_hoc("test");
    let report = env
        .sandbox
        .call_streaming(
            &env.plugin,
            &env.grants,
            &limits,
            &ctx,
            "stdout_flood",
            &json!({"mb": 8}),
            Box::new(stdout.clone()),
            Box::new(stderr.clone()),
        )
        .await;
    for (name, kept, counted) in [
        ("stdout", &stdout, report.receipt.stdout_bytes),
        ("stderr", &stderr, report.receipt.stderr_bytes),
    ] {
        let kept = kept.0.lock().unwrap();
        assert!(kept.len() <= 100_000 + 200, "{} bytes of {name} streamed", kept.len());
        // The receipt counts what reached the writer, the cut's note not included.
        assert_eq!(counted, 100_000, "{name} bytes in the receipt");
        let text = String::from_utf8_lossy(&kept);
        assert!(
            text.ends_with("(max_output_bytes)]\n"),
            "{name} ends {:?}",
            &text[text.len().saturating_sub(120)..]
        );
    }
    drop(report);
    env.assert_alive().await;
}

#[tokio::test]
async fn panic_is_a_clean_trap() {
    let env = setup().await;
    let report = env.call("panic", json!({})).await;
    match &report.result {
        Err(ToolError::Trapped { message }) => {
            assert!(message.contains("panicked"), "{message}");
            // The panic payload (on the line after `panicked at file:line:`) must reach the caller.
            assert!(
                message.contains("hostile panic"),
                "the panic message was lost: {message}"
            );
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    env.assert_alive().await;
}

#[tokio::test]
async fn only_granted_environment_variables_are_visible() {
    let env = setup().await;
    let Ok(path_value) = std::env::var("PATH") else {
        return;
    };
    let grants = Grants {
        env: vec!["PATH".into()],
        ..env.grants.clone()
    };
    let report = env
        .call_with(&grants, &Limits::default(), "read_env", json!({"name": "PATH"}))
        .await;
    let output = report.result.expect("read_env").output;
    assert_eq!(output["value"], json!(path_value));
    assert_eq!(output["visible"], json!(["PATH"]));
    let report = env
        .call_with(&grants, &Limits::default(), "read_env", json!({"name": "HOME"}))
        .await;
    let output = report.result.expect("read_env").output;
    assert_eq!(output["value"], Value::Null, "an ungranted variable leaked: {output}");
    // No grant: nothing at all.
    let report = env.call("read_env", json!({"name": "PATH"})).await;
    let output = report.result.expect("read_env").output;
    assert_eq!(output["value"], Value::Null);
    assert_eq!(output["visible"], json!([]));
}

#[tokio::test]
async fn unknown_tool_is_a_clear_error() {
    let env = setup().await;
    let report = env.call("no_such_tool", json!({})).await;
    assert!(
        matches!(report.result, Err(ToolError::UnknownTool { .. })),
        "{:?}",
        report.result
    );
    env.assert_alive().await;
}

#[tokio::test]
async fn host_survives_a_barrage_of_attacks_in_a_row() {
    let env = setup().await;
    let limits = small_limits();
    for (tool, args) in [
        ("infinite_loop", json!({})),
        ("memory_bomb", json!({})),
        ("deep_recursion", json!({})),
        ("panic", json!({})),
        ("huge_host_arg", json!({"at": "end"})),
        ("traverse_read", json!({"dir": "/rw", "path": "../secret.txt"})),
    ] {
        let report = env.call_with(&env.grants, &limits, tool, args).await;
        eprintln!("{tool}: {:?}", report.result);
        assert!(report.result.is_err(), "{tool} unexpectedly succeeded");
        let ok = env.call_with(&env.grants, &limits, "ok", json!({})).await;
        assert_eq!(
            ok.result.expect("ok after attack").output,
            json!({"ok": true}),
            "after {tool}"
        );
    }
}

/// A current-thread runtime with one blocking thread.
fn one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .expect("runtime")
}

/// Twelve calls of `ok`, one after another, on the pool of 8: each must succeed.
async fn twelve_calls_in_a_row(env: &Env) {
    for i in 0..12 {
        let report = env.call("ok", json!({})).await;
        assert_eq!(
            report.result.map(|r| r.output),
            Ok(json!({"ok": true})),
            "call {i} of 12 on a pool of 8"
        );
    }
}

/// Calls one after another never run out of pool slots, however slowly the instances of earlier
/// calls are freed (they are freed off the caller's task; under load that lags): a call waits for
/// a slot being freed instead of failing with "too many concurrent plugin calls".
#[test]
fn back_to_back_calls_wait_for_slots_still_being_freed() {
    // One blocking thread, kept busy: every instance freed meanwhile queues behind it.
    one_blocking_thread().block_on(async {
        // Every finished store freed on the blocking pool, however small.
        let env = setup_with(|config| config.housekeeping_free_bytes = 0).await;
        let busy = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(1500)));
        twelve_calls_in_a_row(&env).await;
        busy.await.expect("busy task");
    });
}

/// A small instance is freed by the housekeeping thread, not the blocking pool: with the only
/// blocking thread held until every call is done, the slots of the `ok` instances (8 in the
/// pool) come back by the housekeeper alone.
#[test]
fn small_instances_are_freed_without_the_blocking_pool() {
    one_blocking_thread().block_on(async {
        let env = setup().await;
        let (release, held) = std::sync::mpsc::channel::<()>();
        let busy = tokio::task::spawn_blocking(move || held.recv());
        twelve_calls_in_a_row(&env).await;
        release.send(()).expect("release the blocking thread");
        busy.await.expect("busy task").expect("released");
    });
}

#[test]
fn a_caller_that_never_yields_leaves_few_stores_waiting_to_be_freed() {
    // On a current-thread runtime, its tasks run only when the caller yields: a caller that makes
    // call after call without yielding must not leave every store it used waiting on it (they
    // would fill the pool until its calls wait). The housekeeping thread frees them meanwhile;
    // past a few queued there, they go to the blocking pool.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let env = setup_with(|config| config.pool_instances = 64).await;
        let mut most = 0;
        for _ in 0..24 {
            let call = env.call("ok", json!({}));
            // Polled to completion here, without yielding to the runtime's other tasks.
            let report = futures::executor::block_on(call);
            assert_eq!(report.result.map(|r| r.output), Ok(json!({"ok": true})));
            most = most.max(env.sandbox.frees_queued_on_housekeeper());
        }
        assert!(most <= 8, "{most} stores waited to be freed");
    });
}

/// Small stores are freed by the housekeeping thread whatever the caller's runtime is doing: with
/// that runtime's only thread blocked after a call (never yielding to its tasks), the call's store
/// is freed all the same, so a caller stuck elsewhere never keeps pool slots taken.
#[test]
fn a_small_store_is_freed_while_the_callers_runtime_is_blocked() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let env = setup().await;
        let report = futures::executor::block_on(env.call("ok", json!({})));
        assert_eq!(report.result.map(|r| r.output), Ok(json!({"ok": true})));
        // This thread is the runtime's only one, and it does not yield until the free is seen.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while env.sandbox.frees_queued_on_housekeeper() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the store waited for the caller's runtime"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

#[tokio::test]
async fn concurrent_bombs_all_fail_cleanly() {
    let env = setup().await;
    let limits = small_limits();
    let calls = ["memory_bomb", "deep_recursion", "panic", "memory_bomb"]
        .map(|tool| env.call_with(&env.grants, &limits, tool, json!({})));
    let reports = futures::future::join_all(calls).await;
    for report in reports {
        assert!(report.result.is_err(), "{:?}", report.result);
    }
    env.assert_alive().await;
}

#[tokio::test]
async fn fuel_limit_stops_an_infinite_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = SandboxConfig::new(tmp.path());
    config.fuel_metering = true;
    config.pool_instances = 4;
    config.max_memory_bytes = 64 << 20;
    let sandbox = Sandbox::new(config).expect("sandbox");
    let plugin = sandbox
        .prepare(&keel_testutil::guest_bytes("keel-test-hostile"))
        .await
        .expect("prepare");
    let limits = Limits {
        fuel: Some(5_000_000),
        timeout_ms: 10_000,
        ..Limits::default()
    };
    let ctx = ToolCallContext::ad_hoc("test");
    let report = sandbox
        .call(&plugin, &Grants::default(), &limits, &ctx, "infinite_loop", &json!({}))
        .await;
    match &report.result {
        Err(ToolError::LimitExceeded { limit, .. }) => assert_eq!(limit, "fuel"),
        other => panic!("expected the fuel limit, got {other:?}"),
    }
    let report = sandbox
        .call(&plugin, &Grants::default(), &limits, &ctx, "ok", &json!({}))
        .await;
    let fuel = report.receipt.fuel;
    let out = report.result.expect("ok after running out of fuel");
    assert_eq!(out.output, json!({"ok": true}));
    assert!(fuel.is_some_and(|f| f > 0), "fuel is in the receipt: {fuel:?}");
}

#[tokio::test]
async fn preexisting_symlinks_inside_a_grant_cannot_leave_it() {
    let env = setup().await;
    let rw = env.base.join("rw");
    std::os::unix::fs::symlink("chain2", rw.join("chain1")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", rw.join("chain2")).unwrap();
    std::os::unix::fs::symlink("..", rw.join("sub/up")).unwrap();
    std::os::unix::fs::symlink(env.base.join("secret.txt"), rw.join("abs")).unwrap();
    std::os::unix::fs::symlink(env.base.join("outside"), rw.join("absdir")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", env.base.join("ro/link")).unwrap();
    for (dir, path) in [
        ("/rw", "chain1"),
        ("/rw", "chain2"),
        ("/rw", "sub/up/../secret.txt"),
        ("/rw", "sub/up/sub/up/../secret.txt"),
        ("/rw", "abs"),
        ("/rw", "absdir/secret.txt"),
        ("/ro", "link"),
    ] {
        env.assert_fs_refused("traverse_read", json!({"dir": dir, "path": path}))
            .await;
    }
    // Following a link that stays inside the grant is fine.
    let report = env
        .call("traverse_read", json!({"dir": "/rw", "path": "sub/up/sub"}))
        .await;
    assert!(!format!("{:?}", report.result).contains(SECRET));
    env.assert_alive().await;
}

#[tokio::test]
async fn no_state_survives_between_calls() {
    let env = setup().await;
    for _ in 0..3 {
        let report = env.call("counter", json!({})).await;
        assert_eq!(
            report.result.expect("counter").output,
            json!({"count": 1}),
            "guest state leaked between calls"
        );
    }
    // Not even across a trap.
    let _ = env.call("panic", json!({})).await;
    let report = env.call("counter", json!({})).await;
    assert_eq!(report.result.expect("counter").output, json!({"count": 1}));
}
