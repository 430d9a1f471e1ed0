//! The approvals page in a real browser: headless Chromium (Debian `chromium`) driven by
//! `playwright-core` (`tests/web`, installed by `scripts/setup/server.sh`). A job waits for an
//! approval, the page shows it live, the test clicks Approve, the job completes. Also the
//! browser session's cookie rules (HttpOnly, SameSite=Strict, Origin on state changes).
//!
//! Needs the browser and the npm packages: fails (never skips) with the command that installs them.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use common::{ASK_GREET, TestServer, code, expect, greet_turn, text_turn};
use keel_app::Role;
use reqwest::Method;
use serde_json::json;

fn web_dir() -> std::path::PathBuf {
    keel_testutil::workspace_root().join("tests/web")
}

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_is_httponly_strict_and_needs_origin_to_change_state() {
    let server = TestServer::start(json!([greet_turn("Ada"), text_turn("Hi.")]), Some(ASK_GREET), |_| {}).await;
    let key = server.key("acme", Role::Write).await;
    let r = server.req(Method::POST, "/v1/session", &key).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(part), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let job = server.create_job(&key, &["hello"], json!({}), 201).await["job"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let action = server.pending_action(&job, &key).await;
    let approve = format!("{}/v1/actions/{}/approve", server.base, action["id"].as_str().unwrap());
    let with_cookie = |m: Method, url: &str| server.http.request(m, url).header("cookie", &cookie);
    // Reads work with the cookie alone.
    let r = with_cookie(Method::GET, &format!("{}/v1/actions", server.base))
        .send()
        .await
        .unwrap();
    expect(r, 200, "cookie GET").await;
    // A state change without Origin (or from another origin) is refused: CSRF.
    let r = with_cookie(Method::POST, &approve)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(&expect(r, 403, "no Origin").await), "forbidden");
    let r = with_cookie(Method::POST, &approve)
        .header("origin", "http://evil.example")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(&expect(r, 403, "foreign Origin").await), "origin_not_allowed");
    // A page on another port of the same host is another origin (the cookie is same-site, so
    // only the Origin check stands between it and the API).
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    for other in [
        format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        "http://127.0.0.1".to_string(),
    ] {
        let r = with_cookie(Method::POST, &approve)
            .header("origin", &other)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            code(&expect(r, 403, &format!("Origin {other}")).await),
            "origin_not_allowed"
        );
    }
    let r = with_cookie(Method::POST, &approve)
        .header("origin", &server.base)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect(r, 200, "same-origin approve").await;
    // Logging out ends the session.
    let r = with_cookie(Method::DELETE, &format!("{}/v1/session", server.base))
        .header("origin", &server.base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = with_cookie(Method::GET, &format!("{}/v1/actions", server.base))
        .send()
        .await
        .unwrap();
    expect(r, 401, "after logout").await;
    // A cookie never opens a new session (only the key does).
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_in_headless_chromium_completes_the_job() {
    let dir = web_dir();
    assert!(
        std::path::Path::new(&chromium()).exists() && dir.join("node_modules/playwright-core").exists(),
        "headless Chromium or playwright-core is missing: run scripts/setup/server.sh"
    );
    let server = TestServer::start(
        json!([greet_turn("Ada"), text_turn("Greeted.")]),
        Some(ASK_GREET),
        |_| {},
    )
    .await;
    let key = server.key("acme", Role::Write).await;
    let job_file = server.home.path().join("job-id");
    let mut node = Command::new("node")
        .arg(dir.join("approvals.mjs"))
        .current_dir(&dir)
        .env("KEEL_URL", &server.base)
        .env("KEEL_KEY", &key)
        .env("KEEL_JOB_FILE", &job_file)
        .env("CHROMIUM", chromium())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run node (scripts/setup/server.sh installs it)");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut next_line = async || {
        tokio::time::timeout(common::WAIT, lines.recv())
            .await
            .expect("the browser test is stuck")
            .unwrap_or_else(|| "EOF".into())
    };
    assert_eq!(next_line().await, "READY");
    // Created only now: the page must learn of it live.
    let job = server.create_job(&key, &["hello"], json!({}), 201).await["job"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&job_file, &job).unwrap();
    assert_eq!(next_line().await, "CLICKED");
    let done = server
        .wait_job(&job, &key, "the approved job", |v| v["job"]["state"] == "SUCCEEDED")
        .await;
    assert_eq!(done["result"]["content"], "Greeted.");
    assert_eq!(next_line().await, "DONE");
    let status = node.wait().unwrap();
    assert!(status.success(), "the browser script failed: {status}");
    // The approval was recorded as given by this key's session.
    let actions = server.get(&format!("/v1/actions?job={job}&state=all"), &key, 200).await;
    assert_eq!(actions["actions"][0]["resolution"]["approved"], true);
    server.stop().await;
}
