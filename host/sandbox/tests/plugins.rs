//! The first-party plugins doing their real jobs inside their grants, and failing clearly outside:
//! `fs` (plugins/fs) on a temporary directory tree, `http-fetch` (plugins/http-fetch) against an
//! HTTP server the test runs on 127.0.0.1.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{CallReport, FsGrant, FsMode, Grants, Limits, PreparedPlugin, Sandbox, SandboxConfig};
use serde_json::{Value, json};

mod common;
use common::{Response, Server};

fn cache_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("cache tempdir"))
        .path()
        .to_path_buf()
}

async fn sandbox_with(package: &str) -> (Sandbox, Arc<PreparedPlugin>) {
    let mut config = SandboxConfig::new(cache_dir());
    config.pool_instances = 8;
    config.max_memory_bytes = 256 << 20;
    let sandbox = Sandbox::new(config).expect("sandbox");
    let wasm = keel_testutil::guest_bytes(package);
    let plugin = sandbox.prepare(&wasm).await.expect("prepare plugin");
    (sandbox, plugin)
}

async fn call(sandbox: &Sandbox, plugin: &PreparedPlugin, grants: &Grants, tool: &str, args: Value) -> CallReport {
    sandbox
        .call(
            plugin,
            grants,
            &Limits::default(),
            &ToolCallContext::ad_hoc("test"),
            tool,
            &args,
        )
        .await
}

fn output(report: CallReport) -> Value {
    match report.result {
        Ok(out) => out.output,
        Err(e) => panic!("call failed: {e:?}"),
    }
}

fn denied(report: &CallReport, capability: &str) -> (String, String) {
    match &report.result {
        Err(ToolError::Denied {
            capability: c,
            target,
            message,
        }) => {
            assert_eq!(c, capability, "{message}");
            (target.clone(), message.clone())
        }
        other => panic!("expected a {capability} denial, got {other:?}"),
    }
}

// =================================================================================================
// fs

struct Fs {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    sandbox: Sandbox,
    plugin: Arc<PreparedPlugin>,
    grants: Grants,
}

async fn fs_setup() -> Fs {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    std::fs::write(base.join("secret.txt"), "host secret").unwrap();
    std::fs::create_dir_all(base.join("data/sub")).unwrap();
    std::fs::write(base.join("data/notes.txt"), "line one\nline two\n").unwrap();
    std::fs::write(base.join("data/sub/inner.txt"), "inner").unwrap();
    std::fs::write(base.join("data/utf8.txt"), "héllo wörld").unwrap();
    std::fs::create_dir(base.join("out")).unwrap();
    let (sandbox, plugin) = sandbox_with("keel-plugin-fs").await;
    let grants = Grants {
        fs: vec![
            FsGrant {
                host: base.join("data"),
                guest: "/data".into(),
                mode: FsMode::Read,
                identity: None,
            },
            FsGrant {
                host: base.join("out"),
                guest: "/out".into(),
                mode: FsMode::ReadWrite,
                identity: None,
            },
        ],
        ..Grants::default()
    };
    Fs {
        _tmp: tmp,
        base,
        sandbox,
        plugin,
        grants,
    }
}

impl Fs {
    async fn call(&self, tool: &str, args: Value) -> CallReport {
        call(&self.sandbox, &self.plugin, &self.grants, tool, args).await
    }
}

#[tokio::test]
async fn fs_describes_four_tools_and_requests_no_fixed_paths() {
    let fs = fs_setup().await;
    assert_eq!(fs.plugin.info.name, "fs");
    let mut names: Vec<_> = fs.plugin.info.tools.iter().map(|t| t.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["list", "read", "stat", "write"]);
    for tool in &fs.plugin.info.tools {
        assert!(
            tool.capabilities.filesystem.is_empty(),
            "{} requests fixed paths",
            tool.name
        );
        assert_eq!(tool.input_schema["type"], "object", "{}", tool.name);
    }
}

#[tokio::test]
async fn fs_reads_lists_and_stats_inside_the_grant() {
    let fs = fs_setup().await;
    let out = output(fs.call("read", json!({"path": "/data/notes.txt"})).await);
    assert_eq!(out["content"], "line one\nline two\n");
    assert_eq!(out["size"], 18);
    assert_eq!(out["truncated"], false);

    let out = output(
        fs.call("read", json!({"path": "/data/notes.txt", "offset": 5, "length": 3}))
            .await,
    );
    assert_eq!(out["content"], "one");
    assert_eq!(out["truncated"], true);

    // A cut in the middle of a multi-byte character is not reported as invalid UTF-8.
    let out = output(fs.call("read", json!({"path": "/data/utf8.txt", "length": 2})).await);
    assert_eq!(out["content"], "h");
    assert_eq!(out["lossy"], false);

    // `.` and `..` inside the grant are fine.
    let out = output(fs.call("read", json!({"path": "/data/sub/../notes.txt"})).await);
    assert_eq!(out["bytes_read"], 18);

    let out = output(fs.call("list", json!({"path": "/data"})).await);
    assert_eq!(
        out["entries"],
        json!([
            {"name": "notes.txt", "type": "file", "size": 18},
            {"name": "sub", "type": "directory", "size": null},
            {"name": "utf8.txt", "type": "file", "size": 13},
        ])
    );
    let out = output(fs.call("list", json!({"path": "/data/sub"})).await);
    assert_eq!(
        out["entries"],
        json!([{"name": "inner.txt", "type": "file", "size": 5}])
    );

    let out = output(fs.call("stat", json!({"path": "/data/notes.txt"})).await);
    assert_eq!(out["type"], "file");
    assert_eq!(out["size"], 18);
    assert_eq!(out["writable"], false);
    let out = output(fs.call("stat", json!({"path": "/out"})).await);
    assert_eq!(out["type"], "directory");
    assert_eq!(out["writable"], true);
}

#[tokio::test]
async fn fs_writes_inside_a_read_write_grant() {
    let fs = fs_setup().await;
    let out = output(
        fs.call("write", json!({"path": "/out/report.md", "content": "# Report\n"}))
            .await,
    );
    assert_eq!(out["bytes_written"], 9);
    assert_eq!(
        std::fs::read_to_string(fs.base.join("out/report.md")).unwrap(),
        "# Report\n"
    );

    output(
        fs.call(
            "write",
            json!({"path": "/out/report.md", "content": "more\n", "mode": "append"}),
        )
        .await,
    );
    assert_eq!(
        std::fs::read_to_string(fs.base.join("out/report.md")).unwrap(),
        "# Report\nmore\n"
    );

    output(
        fs.call("write", json!({"path": "/out/report.md", "content": "new"}))
            .await,
    );
    assert_eq!(std::fs::read_to_string(fs.base.join("out/report.md")).unwrap(), "new");

    let report = fs
        .call(
            "write",
            json!({"path": "/out/report.md", "content": "x", "mode": "create"}),
        )
        .await;
    assert!(
        matches!(&report.result, Err(ToolError::Failed { message }) if message.contains("already exists")),
        "{:?}",
        report.result
    );

    let report = fs
        .call("write", json!({"path": "/out/a/b/c.txt", "content": "deep"}))
        .await;
    assert!(
        matches!(report.result, Err(ToolError::Failed { .. })),
        "no parents: {:?}",
        report.result
    );
    output(
        fs.call(
            "write",
            json!({"path": "/out/a/b/c.txt", "content": "deep", "create_parents": true}),
        )
        .await,
    );
    assert_eq!(std::fs::read_to_string(fs.base.join("out/a/b/c.txt")).unwrap(), "deep");
}

#[tokio::test]
async fn fs_refuses_paths_outside_the_grants_and_names_the_roots() {
    let fs = fs_setup().await;
    for path in [
        "/etc/passwd",
        "/data/../secret.txt",
        "/out/../../etc/passwd",
        "/",
        "/dat",
        "/data2/x",
    ] {
        let report = fs.call("read", json!({"path": path})).await;
        let (target, message) = denied(&report, "filesystem");
        assert_eq!(target, path);
        assert!(
            message.contains("outside the granted directories: /data (read), /out (read-write)"),
            "{path}: {message}"
        );
    }
    let report = fs
        .call(
            "write",
            json!({"path": fs.base.join("pwned.txt").display().to_string(), "content": "x"}),
        )
        .await;
    denied(&report, "filesystem");
    assert!(!fs.base.join("pwned.txt").exists());
    let report = fs.call("list", json!({"path": "/data/.."})).await;
    denied(&report, "filesystem");
}

#[tokio::test]
async fn fs_refuses_writes_to_a_read_only_grant() {
    let fs = fs_setup().await;
    for (path, mode) in [
        ("/data/new.txt", "create"),
        ("/data/notes.txt", "overwrite"),
        ("/data/notes.txt", "append"),
    ] {
        let report = fs
            .call("write", json!({"path": path, "content": "x", "mode": mode}))
            .await;
        let (target, message) = denied(&report, "filesystem");
        assert_eq!(target, path);
        assert!(message.contains("/data (read)"), "{message}");
    }
    let report = fs
        .call(
            "write",
            json!({"path": "/data/sub2/x.txt", "content": "x", "create_parents": true}),
        )
        .await;
    denied(&report, "filesystem");
    assert!(!fs.base.join("data/new.txt").exists());
    assert!(!fs.base.join("data/sub2").exists());
    assert_eq!(
        std::fs::read_to_string(fs.base.join("data/notes.txt")).unwrap(),
        "line one\nline two\n"
    );
}

#[tokio::test]
async fn fs_refuses_symlinks_that_leave_the_grant() {
    let fs = fs_setup().await;
    std::os::unix::fs::symlink(fs.base.join("secret.txt"), fs.base.join("out/abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", fs.base.join("out/rel-link")).unwrap();
    for path in ["/out/abs-link", "/out/rel-link"] {
        let report = fs.call("read", json!({"path": path})).await;
        let (_, message) = denied(&report, "filesystem");
        assert!(message.contains("refused"), "{message}");
        assert!(!format!("{:?}", report.result).contains("host secret"));
        let report = fs.call("write", json!({"path": path, "content": "pwned"})).await;
        denied(&report, "filesystem");
    }
    assert_eq!(
        std::fs::read_to_string(fs.base.join("secret.txt")).unwrap(),
        "host secret"
    );
}

#[tokio::test]
async fn fs_errors_are_clear() {
    let fs = fs_setup().await;
    let report = fs.call("read", json!({"path": "/data/missing.txt"})).await;
    assert!(
        matches!(&report.result, Err(ToolError::Failed { message }) if message.contains("no such file")),
        "{:?}",
        report.result
    );
    let report = fs.call("read", json!({"path": "/data/sub"})).await;
    assert!(
        matches!(&report.result, Err(ToolError::Failed { message }) if message.contains("is a directory")),
        "{:?}",
        report.result
    );
    let report = fs.call("read", json!({"path": "notes.txt"})).await;
    assert!(
        matches!(report.result, Err(ToolError::InvalidInput { .. })),
        "relative with two roots: {:?}",
        report.result
    );
    let report = fs
        .call("read", json!({"path": "/data/notes.txt", "length": 1u64 << 40}))
        .await;
    assert!(
        matches!(report.result, Err(ToolError::InvalidInput { .. })),
        "{:?}",
        report.result
    );
    let report = fs.call("read", json!({"nope": 1})).await;
    assert!(
        matches!(report.result, Err(ToolError::InvalidInput { .. })),
        "{:?}",
        report.result
    );

    // Without any grant the plugin says so.
    let report = call(
        &fs.sandbox,
        &fs.plugin,
        &Grants::default(),
        "read",
        json!({"path": "/data/notes.txt"}),
    )
    .await;
    let (_, message) = denied(&report, "filesystem");
    assert!(message.contains("no directories are granted"), "{message}");
}

/// A relative path is refused even with one grant: a policy matches the path as written, and
/// `sub/inner.txt` resolved against `/data` would reach files its rules name only absolutely.
#[tokio::test]
async fn fs_refuses_relative_paths_even_with_one_grant() {
    let fs = fs_setup().await;
    let grants = Grants {
        fs: vec![FsGrant {
            host: fs.base.join("data"),
            guest: "/data".into(),
            mode: FsMode::Read,
            identity: None,
        }],
        ..Grants::default()
    };
    for path in ["sub/inner.txt", "inner.txt", "./sub/inner.txt"] {
        let report = call(&fs.sandbox, &fs.plugin, &grants, "read", json!({ "path": path })).await;
        assert!(
            matches!(&report.result, Err(ToolError::InvalidInput { message }) if message.contains("relative")),
            "{path}: {:?}",
            report.result
        );
    }
    let out = output(
        call(
            &fs.sandbox,
            &fs.plugin,
            &grants,
            "read",
            json!({"path": "/data/sub/inner.txt"}),
        )
        .await,
    );
    assert_eq!(out["content"], "inner");
}

// =================================================================================================
// http-fetch

fn redirect(status: u16, location: &str) -> Response {
    (status, vec![("location".into(), location.into())], Vec::new())
}

/// A server with the routes the http-fetch tests use. `elsewhere` is a port that is never granted.
fn app(elsewhere: u16) -> Server {
    Server::start(move |req, _port| {
        let path = req.path.as_str();
        if path == "/hello" {
            return (
                200,
                vec![
                    ("content-type".into(), "text/plain".into()),
                    ("x-test".into(), "1".into()),
                ],
                b"hello".to_vec(),
            );
        }
        if path == "/echo" {
            let header = |n: &str| {
                req.headers
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let body = json!({
                "method": req.method,
                "body": String::from_utf8_lossy(&req.body),
                "content_type": header("content-type"),
                "x_custom": header("x-custom"),
                "authorization": header("authorization"),
                "idempotency_key": header("idempotency-key"),
            });
            return (
                200,
                vec![("content-type".into(), "application/json".into())],
                body.to_string().into_bytes(),
            );
        }
        if let Some(n) = path.strip_prefix("/hop/") {
            let n: u32 = n.parse().unwrap_or(0);
            return if n == 0 {
                redirect(302, "/hello")
            } else {
                redirect(302, &format!("/hop/{}", n - 1))
            };
        }
        match path {
            "/loop" => redirect(302, "/loop"),
            "/relative/start" => redirect(301, "next"),
            "/relative/next" => redirect(307, "/echo"),
            "/see-other" => redirect(303, "/echo"),
            "/keep-post" => redirect(308, "/echo"),
            "/elsewhere" => redirect(302, &format!("http://127.0.0.1:{elsewhere}/hello")),
            "/big" => (200, vec![], vec![b'a'; 100_000]),
            _ => (404, vec![], b"not found".to_vec()),
        }
    })
}

struct Http {
    sandbox: Sandbox,
    plugin: Arc<PreparedPlugin>,
    server: Server,
    elsewhere: Server,
    grants: Grants,
}

async fn http_setup() -> Http {
    let elsewhere = Server::start(|_, _| (200, vec![], b"must not be reached".to_vec()));
    let server = app(elsewhere.port);
    let (sandbox, plugin) = sandbox_with("keel-plugin-http-fetch").await;
    let grants = Grants {
        net: vec![format!("localhost:{}", server.port)],
        allow_private_network: true,
        ..Grants::default()
    };
    Http {
        sandbox,
        plugin,
        server,
        elsewhere,
        grants,
    }
}

impl Http {
    fn url(&self, path: &str) -> String {
        format!("http://localhost:{}{path}", self.server.port)
    }

    async fn call(&self, tool: &str, args: Value) -> CallReport {
        call(&self.sandbox, &self.plugin, &self.grants, tool, args).await
    }
}

#[tokio::test]
async fn http_fetch_gets_and_posts_on_a_granted_host() {
    let h = http_setup().await;
    assert_eq!(h.plugin.info.name, "http-fetch");
    let out = output(h.call("get", json!({"url": h.url("/hello")})).await);
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], "hello");
    assert_eq!(out["headers"]["x-test"], "1");
    assert_eq!(out["truncated"], false);
    assert_eq!(out["redirects"], json!([]));

    let out = output(
        h.call(
            "post",
            json!({"url": h.url("/echo"), "body": "{\"a\":1}", "content_type": "application/json",
                   "headers": {"X-Custom": "yes"}}),
        )
        .await,
    );
    let echoed: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["body"], "{\"a\":1}");
    assert_eq!(echoed["content_type"], "application/json");
    assert_eq!(echoed["x_custom"], "yes");

    let out = output(h.call("get", json!({"url": h.url("/nowhere")})).await);
    assert_eq!(out["status"], 404, "HTTP errors are results, not tool errors");
}

#[tokio::test]
async fn http_fetch_follows_redirects_within_the_grant() {
    let h = http_setup().await;
    let out = output(h.call("get", json!({"url": h.url("/hop/3")})).await);
    assert_eq!(out["body"], "hello");
    assert_eq!(out["url"], h.url("/hello"));
    assert_eq!(out["redirects"].as_array().unwrap().len(), 4);

    // 301 with a relative location, then 307 which keeps the method and body.
    let out = output(
        h.call("post", json!({"url": h.url("/relative/start"), "body": "payload"}))
            .await,
    );
    let echoed: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["method"], "GET", "301 after POST becomes GET");
    let out = output(
        h.call("post", json!({"url": h.url("/keep-post"), "body": "payload"}))
            .await,
    );
    let echoed: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        (echoed["method"].as_str(), echoed["body"].as_str()),
        (Some("POST"), Some("payload"))
    );
    let out = output(
        h.call("post", json!({"url": h.url("/see-other"), "body": "payload"}))
            .await,
    );
    let echoed: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        (echoed["method"].as_str(), echoed["body"].as_str()),
        (Some("GET"), Some(""))
    );

    // Not following: the redirect itself is the result.
    let out = output(
        h.call("get", json!({"url": h.url("/hop/1"), "follow_redirects": false}))
            .await,
    );
    assert_eq!(out["status"], 302);
    assert_eq!(out["headers"]["location"], "/hop/0");
}

#[tokio::test]
async fn http_fetch_gives_up_after_five_redirects() {
    let h = http_setup().await;
    let report = h.call("get", json!({"url": h.url("/loop")})).await;
    assert!(
        matches!(&report.result, Err(ToolError::Failed { message }) if message.contains("too many redirects")),
        "{:?}",
        report.result
    );
    assert_eq!(h.server.hits(), 6, "the first request plus five redirects");
}

#[tokio::test]
async fn http_fetch_redirect_to_an_ungranted_host_is_denied() {
    let h = http_setup().await;
    let report = h.call("get", json!({"url": h.url("/elsewhere")})).await;
    let (target, message) = denied(&report, "network");
    assert_eq!(target, "127.0.0.1");
    assert!(
        message.contains(&format!("127.0.0.1:{}", h.elsewhere.port)),
        "{message}"
    );
    assert_eq!(h.elsewhere.hits(), 0);
}

#[tokio::test]
async fn http_fetch_refuses_hosts_outside_the_grant() {
    let h = http_setup().await;
    let report = h
        .call(
            "get",
            json!({"url": format!("http://localhost:{}/hello", h.elsewhere.port)}),
        )
        .await;
    let (target, _) = denied(&report, "network");
    assert_eq!(target, "localhost");
    let report = h.call("get", json!({"url": "http://example.invalid/"})).await;
    let (target, message) = denied(&report, "network");
    assert_eq!(target, "example.invalid");
    assert!(message.contains("not in this plugin's network grant"), "{message}");
    // The granted name, but private networks not granted.
    let grants = Grants {
        allow_private_network: false,
        ..h.grants.clone()
    };
    let report = call(&h.sandbox, &h.plugin, &grants, "get", json!({"url": h.url("/hello")})).await;
    let (_, message) = denied(&report, "network");
    assert!(message.contains("private networks are not granted"), "{message}");
    assert_eq!(h.elsewhere.hits(), 0);
    assert_eq!(h.server.hits(), 0);
}

#[tokio::test]
async fn http_fetch_caps_the_body() {
    let h = http_setup().await;
    let out = output(h.call("get", json!({"url": h.url("/big"), "max_bytes": 1000})).await);
    assert_eq!(out["truncated"], true);
    assert_eq!(out["bytes"], 1000);
    assert_eq!(out["body"].as_str().unwrap().len(), 1000);
    let out = output(h.call("get", json!({"url": h.url("/big")})).await);
    assert_eq!(out["truncated"], false);
    assert_eq!(out["bytes"], 100_000);
    let report = h
        .call("get", json!({"url": h.url("/big"), "max_bytes": 1u64 << 40}))
        .await;
    assert!(
        matches!(report.result, Err(ToolError::InvalidInput { .. })),
        "{:?}",
        report.result
    );
}

#[tokio::test]
async fn http_fetch_rejects_bad_urls_clearly() {
    let h = http_setup().await;
    for url in [
        "ftp://localhost/",
        "not a url",
        "http://user:pw@localhost/",
        "http:///path",
        // Not fetched as another spelling than a policy saw.
        " http://localhost/",
        "\u{a0}http://localhost/",
        "http://localhost/\n",
    ] {
        let report = h.call("get", json!({"url": url})).await;
        assert!(
            matches!(report.result, Err(ToolError::InvalidInput { .. })),
            "{url}: {:?}",
            report.result
        );
    }
}

/// `post` passes the call's stable `call_id` on as `Idempotency-Key` (unless the caller set one);
/// `get` (idempotent) sends none.
#[tokio::test]
async fn http_fetch_post_sends_the_call_id_as_idempotency_key() {
    let h = http_setup().await;
    let mut ctx = ToolCallContext::ad_hoc("test");
    ctx.call_id = "job-1/t1/c0".into();
    let post = |args: Value| {
        let ctx = ctx.clone();
        let h = &h;
        async move {
            h.sandbox
                .call(&h.plugin, &h.grants, &Limits::default(), &ctx, "post", &args)
                .await
        }
    };
    let echoed = |out: Value| -> Value { serde_json::from_str(out["body"].as_str().unwrap()).unwrap() };
    let out = output(post(json!({"url": h.url("/echo"), "body": "x"})).await);
    assert_eq!(echoed(out)["idempotency_key"], "job-1/t1/c0");
    let out = output(post(json!({"url": h.url("/echo"), "headers": {"Idempotency-Key": "mine"}})).await);
    assert_eq!(echoed(out)["idempotency_key"], "mine");
    let out = output(h.call("get", json!({"url": h.url("/echo")})).await);
    assert_eq!(echoed(out)["idempotency_key"], "");
}
