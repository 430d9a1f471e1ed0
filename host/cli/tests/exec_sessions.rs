//! The host side of the exec plugins, on `plugins/python-exec` built from source and run in one
//! in-process sandbox (sessions live in a running host, not across `keel call` processes):
//! a fresh private scratch directory per call, capped and removed afterwards; sessions that keep
//! an interpreter between the calls naming the same `session_id`, scoped to the caller, with an
//! idle TTL and a memory cap; and every run outside a session starting clean.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use keel_build::Lang;
use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{Grants, Limits, PreparedPlugin, Sandbox, SandboxConfig, ScratchConfig, SessionConfig};
use serde_json::{Value, json};

mod langs;

/// The python-exec component, built once; its native code is cached in [`cache_dir`] by the
/// first sandbox that prepares it (CPython takes a minute to compile on a small machine).
fn component() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        let path = langs::build(Lang::Python, "plugins/python-exec");
        let wasm = std::fs::read(path).unwrap();
        // Compile once here, under the lock, so concurrent tests only load the cached artifact
        // (on a thread of its own: the caller is inside a runtime already).
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    let sandbox = Sandbox::new(SandboxConfig::new(cache_dir())).unwrap();
                    sandbox.prepare(&wasm).await.unwrap();
                });
            });
        });
        wasm
    })
}

/// The js-exec component, built and compiled once like [`component`].
fn js_component() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        let wasm = std::fs::read(langs::build(Lang::Js, "plugins/js-exec")).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    let sandbox = Sandbox::new(SandboxConfig::new(cache_dir())).unwrap();
                    sandbox.prepare(&wasm).await.unwrap();
                });
            });
        });
        wasm
    })
}

fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("exec-sessions-cache")
}

/// A host with its own scratch parent directory (so a test can see what is left in it).
struct Host {
    sandbox: Sandbox,
    plugin: std::sync::Arc<PreparedPlugin>,
    scratch_parent: tempfile::TempDir,
    limits: Limits,
}

async fn host(sessions: SessionConfig, limits: Limits) -> Host {
    host_of(component(), sessions, limits).await
}

async fn host_of(wasm: &[u8], sessions: SessionConfig, limits: Limits) -> Host {
    let scratch_parent = tempfile::tempdir().unwrap();
    let mut config = SandboxConfig::new(cache_dir());
    config.scratch = ScratchConfig {
        enabled: true,
        dir: Some(scratch_parent.path().to_path_buf()),
    };
    config.sessions = sessions;
    let sandbox = Sandbox::new(config).unwrap();
    let plugin = sandbox.prepare(wasm).await.unwrap();
    Host {
        sandbox,
        plugin,
        scratch_parent,
        limits,
    }
}

/// A host whose calls may leave at most 1 MiB in their scratch directory.
async fn scratch_capped_at_1_mib() -> Host {
    let limits = Limits {
        max_scratch_bytes: 1 << 20,
        ..limits()
    };
    host(SessionConfig::default(), limits).await
}

fn limits() -> Limits {
    Limits {
        timeout_ms: 10_000,
        ..Limits::default()
    }
}

impl Host {
    /// `run` as `scope`/`principal`: the output, or the tool error.
    async fn run_as(&self, scope: &str, principal: Option<&str>, arguments: Value) -> Result<Value, ToolError> {
        let mut ctx = ToolCallContext::ad_hoc(scope);
        ctx.principal = principal.map(str::to_string);
        let report = self
            .sandbox
            .call(&self.plugin, &Grants::default(), &self.limits, &ctx, "run", &arguments)
            .await;
        report.result.map(|o| o.output)
    }

    async fn run(&self, arguments: Value) -> Value {
        self.run_as("default", None, arguments.clone())
            .await
            .unwrap_or_else(|e| panic!("{arguments}: {e}"))
    }

    async fn code(&self, code: &str) -> Value {
        self.run(json!({ "code": code })).await
    }

    async fn session(&self, id: &str, code: &str) -> Value {
        self.run(json!({ "code": code, "session_id": id })).await
    }

    /// Scratch directories on the host: (all, the ones not empty).
    fn dirs(&self) -> (usize, usize) {
        let all: Vec<_> = std::fs::read_dir(self.scratch_parent.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let used = all
            .iter()
            .filter(|d| std::fs::read_dir(d).unwrap().next().is_some())
            .count();
        (all.len(), used)
    }

    /// Once the finished calls' directories are removed (in the background, after the result):
    /// the scratch directories still on the host are the ready instances' (empty) and the live
    /// sessions'. Returns how many are not empty.
    async fn left(&self) -> usize {
        for _ in 0..100 {
            let (all, used) = self.dirs();
            if all == self.sandbox.ready_instances() + self.sandbox.live_sessions() {
                return used;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        panic!(
            "scratch directories: {:?}, ready instances {}, sessions {}",
            self.dirs(),
            self.sandbox.ready_instances(),
            self.sandbox.live_sessions()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_get_their_own_scratch_and_nothing_remains() {
    let host = host(SessionConfig::default(), limits()).await;
    let code = |tag: &str| {
        format!(
            "import os, time\n\
             before = sorted(os.listdir('/scratch'))\n\
             open('/scratch/x', 'w').write('{tag}')\n\
             time.sleep(0.4)\n\
             print(before, open('/scratch/x').read())"
        )
    };
    let (first, second) = (code("first"), code("second"));
    let (a, b) = tokio::join!(host.code(&first), host.code(&second));
    assert_eq!(a["stdout"], "[] first\n", "{a}");
    assert_eq!(b["stdout"], "[] second\n", "{b}");
    // The files came back with each result, and the directories are gone.
    assert_eq!(a["files"], json!({"x": "first"}));
    assert_eq!(host.left().await, 0, "a finished call left files behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_past_the_scratch_cap_fails_clearly() {
    let host = scratch_capped_at_1_mib().await;
    let error = host
        .run_as(
            "default",
            None,
            json!({"code": "f = open('/scratch/big', 'wb')\nfor _ in range(64):\n    f.write(b'x' * 65536)\n    f.flush()"}),
        )
        .await
        .unwrap_err();
    match &error {
        ToolError::LimitExceeded { limit, message } => {
            assert_eq!(limit, "scratch");
            assert!(message.contains("/scratch") && message.contains("1048576"), "{message}");
        }
        other => panic!("expected the scratch limit, got {other:?}"),
    }
    assert_eq!(host.left().await, 0, "a finished call left files behind");
    // Under the cap is fine, and the host goes on.
    let out = host.code("open('/scratch/small', 'w').write('y' * 1000)").await;
    assert_eq!(out["value"], "1000");
}

/// A directory granted at `/scratch` is where the plugin's scratch directories are made, not one
/// that calls share: each call still gets a fresh, private one inside it, capped like any
/// other and removed after the call (one scope's files never reach another's call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_scratch_directory_holds_fresh_private_ones() {
    let host = scratch_capped_at_1_mib().await;
    let granted = tempfile::tempdir().unwrap();
    let grants = Grants {
        fs: vec![
            keel_sandbox::FsGrant::parse(
                &format!("{}::/scratch", granted.path().display()),
                keel_sandbox::FsMode::ReadWrite,
            )
            .unwrap(),
        ],
        ..Grants::default()
    };
    let run = |scope: &'static str, code: &'static str| {
        let (host, grants) = (&host, &grants);
        async move {
            let ctx = ToolCallContext::ad_hoc(scope);
            let report = host
                .sandbox
                .call(
                    &host.plugin,
                    grants,
                    &host.limits,
                    &ctx,
                    "run",
                    &json!({ "code": code }),
                )
                .await;
            report.result.map(|o| o.output)
        }
    };
    let planted = run("tenant-a", "open('/scratch/secret', 'w').write('of tenant a')")
        .await
        .unwrap();
    assert_eq!(planted["error"], Value::Null, "{planted}");
    let seen = run("tenant-b", "import os\nprint(sorted(os.listdir('/scratch')))")
        .await
        .unwrap();
    assert_eq!(seen["stdout"], "[]\n", "another scope's files: {seen}");
    let error = run(
        "tenant-b",
        "f = open('/scratch/big', 'wb')\nfor _ in range(64):\n    f.write(b'x' * 65536)\n    f.flush()",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, ToolError::LimitExceeded { limit, .. } if limit == "scratch"),
        "{error:?}"
    );
    // What remains is the ready instances' directories, empty.
    let left = || -> Vec<_> {
        std::fs::read_dir(granted.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    for _ in 0..100 {
        let left = left();
        if left.len() == host.sandbox.ready_instances()
            && left.iter().all(|d| std::fs::read_dir(d).unwrap().next().is_none())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!(
        "left in the granted directory: {:?} ({} ready instances)",
        left(),
        host.sandbox.ready_instances()
    );
}

/// Bytes written to a file unlinked while still open count against the cap: its blocks stay
/// allocated while no walk of the tree can see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_a_file_unlinked_while_open_still_count() {
    let host = scratch_capped_at_1_mib().await;
    let code = "import os, time\n\
                f = open('big', 'wb')\n\
                os.unlink('big')\n\
                for _ in range(64):\n\
                \x20   f.write(b'x' * 65536)\n\
                \x20   f.flush()\n\
                \x20   time.sleep(0.005)\n\
                time.sleep(0.3)";
    let error = host.run_as("default", None, json!({ "code": code })).await.unwrap_err();
    match &error {
        ToolError::LimitExceeded { limit, .. } => assert_eq!(limit, "scratch", "{error:?}"),
        other => panic!("expected the scratch limit, got {other:?}"),
    }
}

/// Bytes written below a directory whose host path is longer than `PATH_MAX` (made by
/// directory handle, as CPython on WASI allows) count against the cap like any others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_hidden_below_a_path_longer_than_path_max_still_count() {
    let host = scratch_capped_at_1_mib().await;
    let code = "import os\n\
                fd = os.open('/scratch', os.O_RDONLY | os.O_DIRECTORY)\n\
                for _ in range(20):\n\
                \x20   os.mkdir('d' * 250, dir_fd=fd)\n\
                \x20   fd = os.open('d' * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)\n\
                f = os.open('f', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)\n\
                for _ in range(64):\n\
                \x20   os.write(f, b'x' * 65536)";
    let error = host.run_as("default", None, json!({ "code": code })).await.unwrap_err();
    match &error {
        ToolError::LimitExceeded { limit, .. } => assert_eq!(limit, "scratch", "{error:?}"),
        other => panic!("expected the scratch limit, got {other:?}"),
    }
    assert_eq!(host.left().await, 0, "a finished call left files behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_state_for_its_owner_only() {
    let host = host(SessionConfig::default(), limits()).await;
    let set = host
        .session("s1", "x = 41\nopen('/scratch/kept', 'w').write('k')")
        .await;
    assert_eq!(set["error"], Value::Null, "{set}");
    let out = host.session("s1", "x + 1").await;
    assert_eq!(out["value"], "42", "{out}");
    assert_eq!(out["files"], json!({"kept": "k"}), "the session's scratch is kept");
    assert_eq!(host.sandbox.live_sessions(), 1);

    // Another session, no session, and the same id from another scope or principal: no `x`.
    let name_error = |out: &Value| out["error"].as_str().is_some_and(|e| e.starts_with("NameError"));
    assert!(name_error(&host.session("s2", "x").await));
    assert!(name_error(&host.code("x").await));
    for (scope, principal) in [("other-scope", None), ("default", Some("mallory"))] {
        let out = host
            .run_as(scope, principal, json!({"code": "x", "session_id": "s1"}))
            .await
            .unwrap();
        assert!(name_error(&out), "{scope}/{principal:?} reached the session: {out}");
    }
    // The owner's session is still intact.
    assert_eq!(host.session("s1", "x").await["value"], "41");
    // Files remain only in the live sessions' directories (s1's; the others wrote nothing).
    assert_eq!(host.left().await, 1);

    // A bad id is refused before anything runs.
    let bad = host
        .run_as("default", None, json!({"code": "1", "session_id": "x".repeat(1000)}))
        .await;
    assert!(matches!(bad, Err(ToolError::InvalidInput { .. })), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_expires_and_the_oldest_is_evicted() {
    let host = host(
        SessionConfig {
            ttl: Duration::from_secs(5),
            max_live: 2,
            ..SessionConfig::default()
        },
        limits(),
    )
    .await;
    host.session("a", "x = 1").await;
    host.session("b", "x = 2").await;
    host.session("a", "x").await;
    // A third session evicts the least recently used one (b).
    host.session("c", "x = 3").await;
    assert_eq!(host.sandbox.live_sessions(), 2);
    let out = host.session("a", "x").await;
    assert_eq!(out["value"], "1", "{out}");
    // b is gone (asking for it starts a new one, which evicts c, now the least recently used).
    assert!(
        host.session("b", "x").await["error"]
            .as_str()
            .unwrap()
            .starts_with("NameError")
    );
    assert!(
        host.session("c", "x").await["error"]
            .as_str()
            .unwrap()
            .starts_with("NameError")
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let out = host.session("a", "x").await;
    assert!(
        out["error"].as_str().is_some_and(|e| e.starts_with("NameError")),
        "{out}"
    );
    // The expired sessions' scratch directories are gone with them.
    assert_eq!(host.left().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cannot_exceed_its_memory_cap() {
    let cap = 96u64 << 20;
    let host = host(
        SessionConfig::default(),
        Limits {
            memory_bytes: cap,
            ..limits()
        },
    )
    .await;
    // Each allocation alone fits in the cap; in one session they add up until one fails.
    let first = host.session("m", "held = [bytearray(40 << 20)]\nlen(held)").await;
    assert_eq!(first["value"], "1", "{first}");
    let second = host.session("m", "held.append(bytearray(40 << 20))\nlen(held)").await;
    let third = host.session("m", "held.append(bytearray(40 << 20))\nlen(held)").await;
    let failed = [&second, &third]
        .iter()
        .filter(|out| out["error"].as_str().is_some_and(|e| e.starts_with("MemoryError")))
        .count();
    assert!(failed >= 1, "120 MiB fit in a 96 MiB session: {second} {third}");
    // The session survives its failed allocation, its state intact.
    let kept = host.session("m", "len(held)").await;
    assert!(kept["value"] == "1" || kept["value"] == "2", "{kept}");
    // Outside the session the same allocation succeeds: the cap is the session's.
    let alone = host.code("b = bytearray(40 << 20)\nlen(b)").await;
    assert_eq!(alone["error"], Value::Null, "{alone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_from_one_run_is_invisible_to_the_next() {
    // Ready instances and resident memory are on (the defaults): later runs start in instances
    // built while earlier ones ran, in pool slots whose memory was reset in place.
    let host = host(SessionConfig::default(), limits()).await;
    assert!(host.sandbox.config().ready_instances > 0 && host.sandbox.config().memory_keep_resident_bytes > 0);
    for _ in 0..4 {
        let out = host
            .code(
                "import sys, builtins, os\n\
                 seen = ('secret' in globals(), hasattr(builtins, 'leak'), hasattr(sys, 'leak'), os.listdir('/scratch'), 'leaked_mod' in sys.modules)\n\
                 secret = 1\nbuiltins.leak = 1\nsys.leak = 1\nopen('/scratch/f', 'w').write('x')\nsys.modules['leaked_mod'] = sys\n\
                 print('mine', end='')\n\
                 seen",
            )
            .await;
        assert_eq!(out["value"], "(False, False, False, [], False)", "{out}");
        // Only this run's output: nothing buffered by an earlier one.
        assert_eq!(out["stdout"], "mine", "{out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_runs_start_clean_and_sessions_keep_globals() {
    let host = host_of(js_component(), SessionConfig::default(), limits()).await;
    // Outside a session (ready instances on): nothing of one run reaches the next.
    for _ in 0..3 {
        let out = host
            .code(
                "const seen = [typeof leak, typeof globalThis.marker, fs.readdirSync().length];\n\
                 var leak = 1; globalThis.marker = 2; fs.writeFileSync('f', 'x');\n\
                 seen",
            )
            .await;
        assert_eq!(out["value"], json!(["undefined", "undefined", 0]), "{out}");
    }
    // In a session, globals and files carry over; another session sees neither.
    host.session("j", "var x = 41; fs.writeFileSync('kept', 'k')").await;
    let out = host.session("j", "x + 1").await;
    assert_eq!(out["value"], 42, "{out}");
    assert_eq!(out["files"]["/scratch/kept"], "k", "{out}");
    let other = host.session("k", "typeof x").await;
    assert_eq!(other["value"], "undefined", "{other}");
}

mod common;

/// An agent gets `python/run` (an alias of `python-exec/run`) as a tool like any other: a policy
/// rule names it, the call runs through the governed path, and the job's events and the ledger
/// show it with its receipt.
#[test]
fn an_agent_calls_python_through_the_governed_path() {
    let component = langs::build(Lang::Python, "plugins/python-exec");
    let home = langs::reusable_home("exec-agent-home");
    let script = json!({ "turns": [
        { "tool_calls": [{ "name": "python__run", "arguments": { "code": "print(6*7)" } }],
          "usage": { "input_tokens": 10, "output_tokens": 5 } },
        { "text": "It is 42.", "usage": { "input_tokens": 10, "output_tokens": 5 } },
    ]});
    std::fs::write(home.join("script.json"), script.to_string()).unwrap();
    std::fs::write(
        home.join("config.toml"),
        "[agent]\nlease_ttl_ms = 5000\npoll_ms = 50\n\n\
         [models.providers.scripted]\nkind = \"scripted\"\nscript = \"script.json\"\n",
    )
    .unwrap();
    // Only the alias is allowed: the rule names `python/run`, not the plugin behind it.
    std::fs::write(
        home.join("policy.toml"),
        "version = 1\ndefault = \"deny\"\n\n[[tool]]\nname = \"code\"\ntools = [\"python/run\"]\ndecision = \"allow\"\n\n\
         [[model]]\nname = \"m\"\nmodels = [\"*\"]\ndecision = \"allow\"\n",
    )
    .unwrap();
    // No grant: the tool gets a fresh scratch directory per call.
    common::expect(&home, &["install", &component.to_string_lossy()], 0);
    let out = common::run(
        &home,
        &[
            "run",
            "what is 6*7?",
            "--model",
            "scripted:test",
            "--tools",
            "python",
            "--json",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let result = lines.iter().find(|l| l["type"] == "result").expect("a result line")["result"].clone();
    assert_eq!(result["status"], "SUCCEEDED", "{stdout}");
    assert_eq!(result["usage"]["tool_calls"], 1, "{stdout}");
    let job = result["job_id"].as_str().unwrap();

    // The job's events: the alias ran, and printed 42.
    let shown = common::json(&home, &["jobs", "show", job, "--json"]);
    let end = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "tool.end" && e["data"]["tool"] == "python/run")
        .unwrap_or_else(|| panic!("no tool.end for python/run: {shown}"));
    assert!(end["data"]["receipt"]["wall_us"].as_u64().unwrap() > 0, "{end}");

    // The journal: the call and its result, what the model was shown (42 printed).
    let journal = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                use keel_kernel::store::KernelStore as _;
                let db = keel_store::Database::open(&home.join("keel.db")).await.unwrap();
                let id = job.parse().unwrap();
                db.kernel_store().read_journal(id).await.unwrap()
            })
        })
        .join()
        .unwrap()
    });
    let journal = serde_json::to_string(&journal).unwrap();
    assert!(
        journal.contains("python/run") && journal.contains(r#"42\\n"#),
        "{journal}"
    );

    // The ledger: one tool entry for the alias, with its receipt.
    let usage = common::json(&home, &["ledger", "usage", "--job", job, "--json"]);
    let entries: Vec<&Value> = usage["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["tool"] == "python/run")
        .collect();
    assert_eq!(entries.len(), 1, "{usage}");
    let receipt = &entries[0]["data"]["receipt"];
    assert!(receipt["wall_us"].as_u64().unwrap() > 0, "{receipt}");
    assert!(receipt["peak_memory_bytes"].as_u64().unwrap() > 0, "{receipt}");
}

/// `keel install` of a plugin that requests `/scratch` with no grant: no "requested but not
/// granted" warning (the host gives a fresh directory per call), and the screen says so instead.
#[test]
fn install_says_scratch_is_provided_instead_of_warning() {
    let component = langs::build(Lang::Python, "plugins/python-exec");
    let home = langs::reusable_home("exec-install-home");
    // The cap shown is the plugin's effective one.
    std::fs::write(home.join("config.toml"), "[limits]\nmax_scratch_bytes = 8388608\n").unwrap();
    let out = common::expect(&home, &["install", &component.to_string_lossy()], 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("not granted"), "{text}");
    assert!(
        text.contains(
            "provided without a grant: /scratch (read-write): a fresh, private, empty directory for each call (or session), removed after it, at most 8 MiB (max_scratch_bytes)"
        ),
        "{text}"
    );
    // The same in --json.
    let shown = common::json(&home, &["install", &component.to_string_lossy(), "--json"]);
    let notes = shown["notes"].to_string();
    assert!(!notes.contains("not granted"), "{shown}");
    assert!(
        shown["provided"][0]
            .as_str()
            .unwrap()
            .starts_with("/scratch (read-write): a fresh"),
        "{shown}"
    );
    // Granting now: a grant that cannot take effect is still named (python-exec imports no
    // wasi:http), even though nothing else is missing.
    let out = common::expect(
        &home,
        &["plugins", "grant", "python-exec", "--allow-net", "example.com"],
        0,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("network grants have no effect"), "{text}");
    // A directory granted at /scratch replaces the fresh one: nothing is "provided" then.
    let dir = tempfile::tempdir().unwrap();
    let grant = format!("{}::/scratch", dir.path().display());
    let shown = common::json(
        &home,
        &[
            "install",
            &component.to_string_lossy(),
            "--json",
            "--allow-write",
            &grant,
        ],
    );
    assert_eq!(shown["provided"], serde_json::json!([]), "{shown}");
}

/// `[sandbox] prepare_timeout_ms` (the bound on compiling and describing a plugin): a
/// misspelt key or a bad value is one clear error naming the key; a good one is accepted.
#[test]
fn the_prepare_limit_is_a_checked_setting() {
    for (config, needle) in [
        (
            "[sandbox]\nprepare_timout_ms = 600000\n",
            "unknown field `prepare_timout_ms`",
        ),
        ("[sandbox]\nprepare_timeout_ms = \"10m\"\n", "prepare_timeout_ms"),
        (
            "[sandbox]\nprepare_timeout_ms = 0\n",
            "`prepare_timeout_ms` is 0; it must be from 1000",
        ),
        // Pool sizes past what one address space holds overflowed (a panic) or failed later
        // blaming a component; 0 deleted a valid compiled artifact.
        (
            "[sandbox]\npool_instances = 536870912\n",
            "`pool_instances` is 536870912; it must be from 1 to 1000",
        ),
        (
            "[sandbox]\npool_instances = 0\n",
            "`pool_instances` is 0; it must be from 1 to 1000",
        ),
        (
            "[sandbox]\nmax_memory_bytes = 4294967297\n",
            "`max_memory_bytes` is 4294967297; it must be from",
        ),
    ] {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("config.toml"), config).unwrap();
        let out = common::expect(home.path(), &["plugins", "list"], 2);
        let stderr = String::from_utf8_lossy(&out.stderr);
        common::one_clear_line(&stderr);
        assert!(
            stderr.contains("config.toml") && stderr.contains(needle),
            "{config}: {stderr}"
        );
    }
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        "[sandbox]\nprepare_timeout_ms = 1800000\n",
    )
    .unwrap();
    common::expect(home.path(), &["plugins", "list"], 0);
}
