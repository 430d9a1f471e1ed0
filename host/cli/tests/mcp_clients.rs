//! Keel's MCP server driven by the official MCP SDKs (installed by `scripts/setup/mcp.sh`): the
//! Python SDK over stdio (`keel mcp`) and over Streamable HTTP (keel-mcp's service mounted in a
//! test server), the TypeScript SDK over stdio. Each lists the tools, calls one, gets a policy
//! denial as an `isError` result, and completes approval-gated calls (approved from another
//! process with `keel actions approve`, and by elicitation); over stdio each also sees
//! `notifications/tools/list_changed` after a `keel install` while connected. The client scripts
//! (`tests/mcp-clients/`) assert what they see and print one JSON line per step, checked here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::Value;

mod common;

/// Denies `read-file`, asks for approval of `word-count`, allows the rest (`hello/greet`).
const POLICY: &str = r#"version = 1
default = "allow"

[[tool]]
name = "no-files"
tools = ["textkit-rust/read-file"]
decision = "deny"

[[tool]]
name = "ask-to-count"
tools = ["textkit-rust/word-count"]
decision = "require_approval"
"#;

fn repo() -> PathBuf {
    keel_testutil::workspace_root()
}

/// A home with `hello` installed, [`POLICY`] as its policy and `config` as its config.toml.
fn home(config: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let hello = keel_testutil::guest("hello");
    common::expect(home.path(), &["install", hello.to_str().unwrap()], 0);
    std::fs::write(home.path().join("policy.toml"), POLICY).unwrap();
    std::fs::write(home.path().join("config.toml"), config).unwrap();
    home
}

fn textkit() -> PathBuf {
    keel_testutil::guest("textkit-rust")
}

/// The client's steps (one JSON line each), after checking it exited 0.
fn steps(what: &str, out: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {steps:?}"))
}

/// The pinned Python SDK, or a clear failure naming the setup script.
fn python() -> Command {
    let probe = Command::new("python3")
        .args(["-c", "import importlib.metadata as m; print(m.version('mcp'))"])
        .output()
        .expect("python3 runs");
    let version = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    assert!(
        probe.status.success() && version == "2.3.0",
        "the MCP Python SDK (mcp==2.3.0) is missing (found {version:?}): run scripts/setup/mcp.sh"
    );
    let mut command = Command::new("python3");
    command.arg(repo().join("tests/mcp-clients/python/keel_client.py"));
    command
}

#[test]
fn python_sdk_over_stdio() {
    let home = home("[mcp]\nwatch_ms = 100\n");
    let out = python()
        .args(["stdio", "--keel", env!("CARGO_BIN_EXE_keel"), "--home"])
        .arg(home.path())
        .arg("--install")
        .arg(textkit())
        .env_remove("KEEL_LOG")
        .output()
        .unwrap();
    let steps = steps("the Python client over stdio", &out);
    assert!(
        step(&steps, "listed")["tools"]
            .as_array()
            .unwrap()
            .contains(&"hello__greet".into())
    );
    assert_eq!(step(&steps, "called")["output"]["greeting"], "Hello, Ada!");
    assert_eq!(step(&steps, "invalid_input")["error"]["kind"], "invalid_input");
    assert!(
        step(&steps, "list_changed")["tools"]
            .as_array()
            .unwrap()
            .contains(&"textkit-rust__word-count".into())
    );
    assert_eq!(step(&steps, "denied")["error"]["kind"], "policy_denied");
    assert_eq!(step(&steps, "approved_by_cli")["output"]["words"], 3);
    assert_eq!(step(&steps, "elicitation_approve")["output"]["words"], 4);
    assert_eq!(
        step(&steps, "elicitation_deny")["output"]["error"]["kind"],
        "approval_denied"
    );
    step(&steps, "done");
    // Every call went through the governed path: each one that ran is in the ledger, with the
    // principal the client named in `initialize`.
    let usage = common::json(home.path(), &["ledger", "usage", "--json"]);
    assert_eq!(
        usage["usage"]["tool_calls"], 3,
        "greet, approved count, elicited count: {usage}"
    );
    let jobs = common::json(home.path(), &["jobs", "list", "--json"]);
    assert!(
        jobs.to_string().contains("\"principal\":\"mcp\""),
        "the Python client's name is the principal: {jobs}"
    );
}

#[test]
fn typescript_sdk_over_stdio() {
    let js = repo().join("tests/mcp-clients/js");
    assert!(
        js.join("node_modules/@modelcontextprotocol/sdk/package.json").exists(),
        "the MCP TypeScript SDK is missing from {}: run scripts/setup/mcp.sh",
        js.display()
    );
    let home = home("[mcp]\nwatch_ms = 100\n");
    let out = Command::new("node")
        .arg(js.join("keel_client.mjs"))
        .args(["--keel", env!("CARGO_BIN_EXE_keel"), "--home"])
        .arg(home.path())
        .arg("--install")
        .arg(textkit())
        .current_dir(&js)
        .env_remove("KEEL_LOG")
        .output()
        .unwrap();
    let steps = steps("the TypeScript client over stdio", &out);
    assert_eq!(step(&steps, "called")["output"]["greeting"], "Hello, Ada!");
    assert_eq!(step(&steps, "denied")["error"]["kind"], "policy_denied");
    assert_eq!(step(&steps, "approved_by_cli")["output"]["words"], 3);
    assert_eq!(step(&steps, "elicitation_approve")["output"]["words"], 4);
    step(&steps, "list_changed");
    step(&steps, "done");
}

/// keel-mcp's HTTP service mounted at `/mcp` on 127.0.0.1, behind a layer that authenticates
/// every request as `caller` (as `keel serve`'s API-key layer does), or as nobody.
async fn serve(home: &Path, caller: Option<keel_app::Caller>) -> (std::net::SocketAddr, keel_mcp::McpServer) {
    let choice = keel_app::runtime::PolicyChoice::resolve(home, None).unwrap();
    let host = keel_app::AgentHost::open_with(home, None, choice, None, false)
        .await
        .unwrap();
    let server = keel_mcp::McpServer::new(Arc::new(host)).await.unwrap();
    let mcp = keel_mcp::http_service(server.clone());
    let app = axum::Router::new()
        .nest_service("/mcp", mcp)
        .layer(axum::middleware::from_fn(
            move |mut request: axum::extract::Request, next: axum::middleware::Next| {
                if let Some(caller) = caller.clone() {
                    request.extensions_mut().insert(caller);
                }
                next.run(request)
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_over_streamable_http() {
    let home = home("[mcp]\napproval_wait_secs = 2\n");
    common::expect(home.path(), &["install", textkit().to_str().unwrap()], 0);
    let caller = keel_app::Caller {
        scope: "default".into(),
        principal: Some("key:test".into()),
        role: keel_app::Role::Write,
    };
    let (addr, _server) = serve(home.path(), Some(caller)).await;
    let mut client = python();
    client
        .args(["http", "--keel", env!("CARGO_BIN_EXE_keel"), "--home"])
        .arg(home.path())
        .arg("--url")
        .arg(format!("http://{addr}/mcp"))
        .env_remove("KEEL_LOG");
    let out = tokio::task::spawn_blocking(move || client.output().unwrap())
        .await
        .unwrap();
    assert_http_session("the Python client over Streamable HTTP", &out, home.path(), "key:test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_http_without_a_caller_is_401() {
    let home = home("");
    let (addr, _server) = serve(home.path(), None).await;
    let response = send(addr, "", INITIALIZE).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(response.contains("unauthorized"), "{response}");
}

/// An MCP session over Streamable HTTP belongs to the key that opened it: another caller (of
/// another scope, of the same scope with another role, or another key with the same scope, role
/// and name) presenting its id is told it does not exist, and one key may hold only so many
/// sessions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_session_serves_only_the_caller_that_opened_it() {
    let home = home("");
    let caller = |scope: &str, role: keel_app::Role| keel_app::Caller {
        scope: scope.into(),
        principal: Some(format!("key:{scope}")),
        role,
    };
    let callers = [
        ("a", caller("acme", keel_app::Role::Write)),
        ("a-reader", caller("acme", keel_app::Role::Read)),
        ("b", caller("other", keel_app::Role::Write)),
        ("c", caller("third", keel_app::Role::Write)),
    ];
    // The key each caller authenticated with: `a-twin` is another key with a's scope, role and
    // name (key names need not be unique).
    let callers: Vec<_> = callers
        .into_iter()
        .chain([("a-twin", caller("acme", keel_app::Role::Write))])
        .map(|(name, caller)| (name, caller, keel_app::keys::KeyId(format!("{name}-key"))))
        .collect();
    let choice = keel_app::runtime::PolicyChoice::resolve(home.path(), None).unwrap();
    let host = keel_app::AgentHost::open_with(home.path(), None, choice, None, false)
        .await
        .unwrap();
    let server = keel_mcp::McpServer::new(Arc::new(host)).await.unwrap();
    let app = axum::Router::new()
        .nest_service("/mcp", keel_mcp::http_service(server))
        .layer(axum::middleware::from_fn(
            move |mut request: axum::extract::Request, next: axum::middleware::Next| {
                let who = request.headers().get("x-test-caller").and_then(|v| v.to_str().ok());
                if let Some((_, caller, key)) = callers.iter().find(|(name, ..)| Some(*name) == who) {
                    request.extensions_mut().insert(caller.clone());
                    request.extensions_mut().insert(key.clone());
                }
                next.run(request)
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let opened = send(addr, "x-test-caller: a\r\n", INITIALIZE).await;
    assert!(opened.starts_with("HTTP/1.1 200"), "{opened}");
    let id = opened
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("mcp-session-id: ")
                .map(str::to_string)
        })
        .expect("a session id");
    let id = id.trim();
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    for other in ["b", "a-reader", "a-twin"] {
        let taken = send(
            addr,
            &format!("x-test-caller: {other}\r\nMcp-Session-Id: {id}\r\n"),
            list,
        )
        .await;
        assert!(
            taken.starts_with("HTTP/1.1 404"),
            "{other} used the session of a: {taken}"
        );
    }
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let own = send(
        addr,
        &format!("x-test-caller: a\r\nMcp-Session-Id: {id}\r\n"),
        initialized,
    )
    .await;
    assert!(own.starts_with("HTTP/1.1 202"), "{own}");

    for _ in 0..keel_mcp::sessions::MAX_PER_CALLER {
        let opened = send(addr, "x-test-caller: c\r\n", INITIALIZE).await;
        assert!(opened.starts_with("HTTP/1.1 200"), "{opened}");
    }
    let refused = send(addr, "x-test-caller: c\r\n", INITIALIZE).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("too_many_sessions"), "{refused}");
    let others = send(addr, "x-test-caller: b\r\n", INITIALIZE).await;
    assert!(
        others.starts_with("HTTP/1.1 200"),
        "another caller's limit is its own: {others}"
    );
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;

/// POST `body` to `/mcp` with `headers` (each ending in CRLF) and return the raw HTTP response.
async fn send(addr: std::net::SocketAddr, headers: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[test]
fn an_unknown_mcp_setting_is_an_error_naming_it() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("config.toml"), "[mcp]\ntool = [\"hello/*\"]\n").unwrap();
    let out = common::keel(home.path(), &["mcp"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `tool`"), "{stderr}");
    assert!(out.stdout.is_empty(), "stdout carries only JSON-RPC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_section_chooses_the_tools_offered() {
    let names = |catalog: keel_mcp::catalog::Catalog| -> Vec<String> {
        catalog.entries.iter().map(|e| e.tool.name.to_string()).collect()
    };
    let open = |home: PathBuf| async move {
        let choice = keel_app::runtime::PolicyChoice::resolve(&home, None).unwrap();
        let host = keel_app::AgentHost::open_with(&home, None, choice, None, false)
            .await
            .unwrap();
        keel_mcp::McpServer::new(Arc::new(host)).await.unwrap()
    };
    let home = home("");
    common::expect(home.path(), &["install", textkit().to_str().unwrap()], 0);
    let all = names(open(home.path().to_path_buf()).await.catalog().await.unwrap());
    assert_eq!(
        all,
        ["hello__greet", "textkit-rust__word-count", "textkit-rust__read-file"],
        "every installed tool by default"
    );
    std::fs::write(
        home.path().join("config.toml"),
        "[mcp]\ntools = [\"hello\", \"textkit-rust/*\"]\nexclude = [\"textkit-rust/read-*\"]\n",
    )
    .unwrap();
    let some = names(open(home.path().to_path_buf()).await.catalog().await.unwrap());
    assert_eq!(some, ["hello__greet", "textkit-rust__word-count"]);
}

/// The real `keel serve` process: `/mcp` sits behind its API keys, Host/Origin check and rate limit,
/// and the Python SDK client gets the same governed behaviour as over stdio, as the key's scope and
/// principal.
#[test]
fn python_sdk_over_keel_serve_with_an_api_key() {
    let home = home("[mcp]\napproval_wait_secs = 2\n");
    common::expect(home.path(), &["install", textkit().to_str().unwrap()], 0);
    let created = common::json(
        home.path(),
        &[
            "keys", "create", "--scope", "default", "--role", "write", "--name", "mcp-test", "--json",
        ],
    );
    let key = created["key"].as_str().expect("the created key").to_string();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--listen", &listen])
        .env("KEEL_HOME", home.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _stop = KillOnDrop(&mut serve);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "keel serve did not listen on {listen}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Without the key: refused before MCP sees the request.
    let refused = python()
        .args(["http", "--keel", env!("CARGO_BIN_EXE_keel"), "--home"])
        .arg(home.path())
        .arg("--url")
        .arg(format!("http://{listen}/mcp"))
        .output()
        .unwrap();
    assert!(!refused.status.success(), "an MCP client without a key was served");
    let out = python()
        .args(["http", "--keel", env!("CARGO_BIN_EXE_keel"), "--home"])
        .arg(home.path())
        .arg("--url")
        .arg(format!("http://{listen}/mcp"))
        .arg("--bearer")
        .arg(&key)
        .env_remove("KEEL_LOG")
        .output()
        .unwrap();
    assert_http_session("the Python client over keel serve", &out, home.path(), "key:mcp-test");
}

/// What the Python client's `http` run must have reported: a call, a policy denial, an approval
/// left pending then given from the CLI, an elicited approval; and `principal` on the jobs.
fn assert_http_session(what: &str, out: &Output, home: &Path, principal: &str) {
    let steps = steps(what, out);
    assert_eq!(step(&steps, "called")["output"]["greeting"], "Hello, Ada!");
    assert_eq!(step(&steps, "denied")["error"]["kind"], "policy_denied");
    let pending = step(&steps, "pending_then_approved");
    assert!(
        pending["action_id"].is_string() && pending["job_id"].is_string(),
        "{pending}"
    );
    assert_eq!(step(&steps, "elicitation_approve")["output"]["words"], 4);
    step(&steps, "done");
    let jobs = common::json(home, &["jobs", "list", "--json"]);
    assert!(jobs.to_string().contains(principal), "{jobs}");
}

/// Kills the child process when the test ends, pass or fail.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
