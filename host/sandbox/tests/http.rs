//! Network sandbox tests: the `hostile` guest makes raw `wasi:http` requests to a real HTTP server
//! the test runs on 127.0.0.1. Checks the allowlist (host and port), redirects to hosts that are not
//! granted (each hop is a new request the host re-checks), and the refusal of loopback / private
//! addresses — literal, by name, IPv4-mapped IPv6 — unless `allow_private_network` is granted.
//!
//! No traffic leaves the loopback interface: every URL is either a local server or refused by the
//! allowlist before any name lookup or connection.

use std::sync::{Arc, OnceLock};

use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{CallReport, Grants, Limits, PreparedPlugin, Sandbox, SandboxConfig};
use serde_json::{Value, json};

mod common;
use common::{Response, Server};

fn text(status: u16, body: &str) -> Response {
    (
        status,
        vec![("content-type".into(), "text/plain".into())],
        body.as_bytes().to_vec(),
    )
}

fn redirect(location: String) -> Response {
    (302, vec![("location".into(), location)], Vec::new())
}

// -------------------------------------------------------------------------------------------------
// Sandbox fixture

fn cache_dir() -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("cache tempdir"))
        .path()
        .to_path_buf()
}

struct Env {
    sandbox: Sandbox,
    plugin: Arc<PreparedPlugin>,
}

async fn setup() -> Env {
    let mut config = SandboxConfig::new(cache_dir());
    config.pool_instances = 8;
    config.max_memory_bytes = 256 << 20;
    let sandbox = Sandbox::new(config).expect("sandbox");
    let wasm = keel_testutil::guest_bytes("keel-test-hostile");
    let plugin = sandbox.prepare(&wasm).await.expect("prepare hostile guest");
    Env { sandbox, plugin }
}

fn net(hosts: &[String], allow_private_network: bool) -> Grants {
    Grants {
        net: hosts.to_vec(),
        allow_private_network,
        ..Grants::default()
    }
}

impl Env {
    async fn get(&self, grants: &Grants, url: &str) -> CallReport {
        let limits = Limits {
            timeout_ms: 5_000,
            ..Limits::default()
        };
        let report = self
            .sandbox
            .call(
                &self.plugin,
                grants,
                &limits,
                &ToolCallContext::ad_hoc("test"),
                "http_get",
                &json!({"url": url}),
            )
            .await;
        // The host is alive and the plugin still works after each request.
        let ok = self
            .sandbox
            .call(
                &self.plugin,
                grants,
                &limits,
                &ToolCallContext::ad_hoc("test"),
                "ok",
                &json!({}),
            )
            .await;
        assert_eq!(ok.result.expect("ok after a request").output, json!({"ok": true}));
        report
    }

    /// `url` must be refused as not on the allowlist: a network denial naming `host`, recorded
    /// with the grant that would allow it.
    async fn assert_denied(&self, grants: &Grants, url: &str, host: &str) -> CallReport {
        let report = self.assert_refused(grants, url, host, "HttpRequestDenied").await;
        assert!(
            report.denials.iter().any(|d| d
                .grant
                .as_deref()
                .is_some_and(|g| g.starts_with(&format!("--allow-net {host}")))),
            "{url}: the denial does not name the grant that would allow it: {:?}",
            report.denials
        );
        report
    }

    /// `url` must be refused because it reaches a private address: the guest gets
    /// `destination-ip-prohibited`, and the recorded grant is `--allow-private-network` (granting
    /// the host again would change nothing).
    async fn assert_private(&self, grants: &Grants, url: &str, host: &str) -> CallReport {
        let report = self.assert_refused(grants, url, host, "DestinationIpProhibited").await;
        assert!(
            report
                .denials
                .iter()
                .any(|d| d.grant.as_deref() == Some("--allow-private-network")),
            "{url}: {:?}",
            report.denials
        );
        report
    }

    /// `url` must be refused with a network denial naming `host`, the guest seeing `code`.
    async fn assert_refused(&self, grants: &Grants, url: &str, host: &str, code: &str) -> CallReport {
        let report = self.get(grants, url).await;
        match &report.result {
            Err(ToolError::Denied {
                capability,
                target,
                message,
            }) => {
                assert_eq!(capability, "network", "{url}: {message}");
                assert_eq!(target, host, "{url}: {message}");
                assert!(message.contains(code), "{url}: {message}");
            }
            other => {
                panic!("{url} with grants {grants:?}: expected a network denial, got {other:?}")
            }
        }
        assert!(
            report.denials.iter().any(|d| d.capability == "network"),
            "{url}: the host did not record the denial: {:?}",
            report.denials
        );
        report
    }
}

fn status_of(report: &CallReport) -> (u64, String) {
    let output: &Value = &report.result.as_ref().expect("request succeeded").output;
    (
        output["status"].as_u64().unwrap(),
        output["body"].as_str().unwrap().to_string(),
    )
}

// -------------------------------------------------------------------------------------------------

#[tokio::test]
async fn allowed_host_is_reachable() {
    let env = setup().await;
    let server = Server::start(|_, _| text(200, "hello from loopback"));
    let grants = net(&[format!("localhost:{}", server.port)], true);
    let report = env.get(&grants, &format!("http://localhost:{}/", server.port)).await;
    assert_eq!(status_of(&report), (200, "hello from loopback".into()));
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn hosts_and_ports_not_on_the_allowlist_are_denied() {
    let env = setup().await;
    let server = Server::start(|_, _| text(200, "should not be reached"));
    let other = Server::start(|_, _| text(200, "should not be reached either"));
    let grants = net(&[format!("localhost:{}", server.port)], true);
    // Same server, spelled as an address that is not on the allowlist.
    env.assert_denied(&grants, &format!("http://127.0.0.1:{}/", server.port), "127.0.0.1")
        .await;
    // Allowed name, other port.
    env.assert_denied(&grants, &format!("http://localhost:{}/", other.port), "localhost")
        .await;
    // Allowed name, default port.
    env.assert_denied(&grants, "http://localhost/", "localhost").await;
    // A name that is not granted at all (refused before any lookup).
    env.assert_denied(&grants, "http://example.invalid/", "example.invalid")
        .await;
    env.assert_denied(&grants, "http://169.254.169.254/latest/meta-data/", "169.254.169.254")
        .await;
    // No network grant at all.
    env.assert_denied(
        &Grants::default(),
        &format!("http://localhost:{}/", server.port),
        "localhost",
    )
    .await;
    assert_eq!(server.hits(), 0);
    assert_eq!(other.hits(), 0);
}

#[tokio::test]
async fn redirect_to_a_host_that_is_not_granted_is_denied() {
    let env = setup().await;
    let elsewhere = Server::start(|_, _| text(200, "redirect target: must not be reached"));
    let target = format!("http://127.0.0.1:{}/", elsewhere.port);
    let server = Server::start(move |_, _| redirect(target.clone()));
    let grants = net(&[format!("localhost:{}", server.port)], true);
    let report = env
        .assert_denied(&grants, &format!("http://localhost:{}/", server.port), "127.0.0.1")
        .await;
    assert!(
        report
            .denials
            .iter()
            .any(|d| d.target == format!("127.0.0.1:{}", elsewhere.port)),
        "{:?}",
        report.denials
    );
    assert_eq!(server.hits(), 1, "the allowed host was asked once");
    assert_eq!(elsewhere.hits(), 0, "the redirect target must never be contacted");
}

#[tokio::test]
async fn redirect_within_the_grant_is_followed() {
    let env = setup().await;
    let server = Server::start(|req, _| match req.path.as_str() {
        "/start" => redirect("/end".into()),
        _ => text(200, "arrived"),
    });
    let grants = net(&[format!("localhost:{}", server.port)], true);
    let report = env
        .get(&grants, &format!("http://localhost:{}/start", server.port))
        .await;
    assert_eq!(status_of(&report), (200, "arrived".into()));
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn loopback_and_private_addresses_are_refused_without_allow_private_network() {
    let env = setup().await;
    let server = Server::start(|_, _| text(200, "private service: must not be reached"));
    let p = server.port;
    for (pattern, url, host) in [
        (format!("127.0.0.1:{p}"), format!("http://127.0.0.1:{p}/"), "127.0.0.1"),
        (format!("localhost:{p}"), format!("http://localhost:{p}/"), "localhost"),
        (
            format!("[::ffff:127.0.0.1]:{p}"),
            format!("http://[::ffff:127.0.0.1]:{p}/"),
            "[::ffff:127.0.0.1]",
        ),
        (format!("[::1]:{p}"), format!("http://[::1]:{p}/"), "[::1]"),
        (format!("0.0.0.0:{p}"), format!("http://0.0.0.0:{p}/"), "0.0.0.0"),
        (format!("127.1:{p}"), format!("http://127.1:{p}/"), "127.1"),
        (format!("127.0.0.2:{p}"), format!("http://127.0.0.2:{p}/"), "127.0.0.2"),
    ] {
        let grants = net(&[pattern], false);
        let report = env.assert_private(&grants, &url, host).await;
        let reasons: Vec<_> = report.denials.iter().map(|d| d.reason.clone()).collect();
        assert!(
            reasons.iter().any(|r| r.contains("private") || r.contains("loopback")),
            "{url}: {reasons:?}"
        );
    }
    assert_eq!(
        server.hits(),
        0,
        "no request may reach a loopback service without allow_private_network"
    );
    // Positive control: the same server is reachable once private networks are granted.
    let grants = net(&[format!("127.0.0.1:{p}")], true);
    let report = env.get(&grants, &format!("http://127.0.0.1:{p}/")).await;
    assert_eq!(status_of(&report).0, 200);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn wildcard_patterns_do_not_match_the_bare_domain_or_other_suffixes() {
    let env = setup().await;
    // Only names under `.localhost` are granted; `localhost` itself and look-alikes are not.
    let grants = net(&["*.localhost".into()], true);
    env.assert_denied(&grants, "http://localhost/", "localhost").await;
    env.assert_denied(&grants, "http://evil-localhost/", "evil-localhost")
        .await;
    env.assert_denied(&grants, "http://localhost.evil.invalid/", "localhost.evil.invalid")
        .await;
}

#[tokio::test]
async fn authority_tricks_do_not_bypass_the_allowlist() {
    let env = setup().await;
    let allowed = Server::start(|_, _| text(200, "allowed"));
    let secret = Server::start(|_, _| text(200, "secret service: must not be reached"));
    let grants = net(&[format!("localhost:{}", allowed.port)], true);
    let (a, s) = (allowed.port, secret.port);

    // Userinfo that looks like the allowed host: the real host is 127.0.0.1.
    let report = env.get(&grants, &format!("http://localhost:{a}@127.0.0.1:{s}/")).await;
    assert!(
        matches!(&report.result, Err(ToolError::Denied { capability, .. }) if capability == "network"),
        "userinfo confusion was not refused: {:?}",
        report.result
    );

    // A spoofed Host header naming the allowed host while the URL targets another one.
    let args = json!({"url": format!("http://127.0.0.1:{s}/"), "headers": [["host", format!("localhost:{a}")]]});
    let limits = Limits {
        timeout_ms: 5_000,
        ..Limits::default()
    };
    let report = env
        .sandbox
        .call(
            &env.plugin,
            &grants,
            &limits,
            &ToolCallContext::ad_hoc("test"),
            "http_get",
            &args,
        )
        .await;
    assert!(
        report.result.is_err(),
        "Host header spoofing succeeded: {:?}",
        report.result
    );

    // A spoofed Host header on a request to the allowed host does not redirect it anywhere else.
    let args = json!({"url": format!("http://localhost:{a}/"), "headers": [["host", format!("127.0.0.1:{s}")]]});
    let report = env
        .sandbox
        .call(
            &env.plugin,
            &grants,
            &limits,
            &ToolCallContext::ad_hoc("test"),
            "http_get",
            &args,
        )
        .await;
    if let Ok(out) = &report.result {
        assert_eq!(out.output["body"], "allowed");
    }

    assert_eq!(
        secret.hits(),
        0,
        "the service that was not granted must never be contacted"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_call_deadline() {
    let env = setup().await;
    // The handler parks its connection thread; the guest is left blocked inside a host call.
    let server = Server::start(|_, _| {
        std::thread::sleep(std::time::Duration::from_secs(60));
        text(200, "too late")
    });
    let grants = net(&[format!("localhost:{}", server.port)], true);
    let limits = Limits {
        timeout_ms: 500,
        ..Limits::default()
    };
    let args = json!({"url": format!("http://localhost:{}/", server.port)});
    let ctx = ToolCallContext::ad_hoc("test");
    let report = env
        .sandbox
        .call(&env.plugin, &grants, &limits, &ctx, "http_get", &args)
        .await;
    assert!(
        matches!(report.result, Err(ToolError::TimedOut { .. })),
        "{:?}",
        report.result
    );
    let ok = env
        .sandbox
        .call(&env.plugin, &grants, &limits, &ctx, "ok", &json!({}))
        .await;
    assert_eq!(ok.result.expect("ok after a hung request").output, json!({"ok": true}));
}
