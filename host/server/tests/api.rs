//! The HTTP API against a real server: jobs, idempotency, pagination, approvals, tenant isolation
//! (404 for every kind of resource), roles (403), rate limit (429), Host/Origin checks, plugins
//! by upload, budgets, usage, policy dry-run, governed tool calls, and the OpenAPI document.

mod common;

use std::collections::BTreeSet;

use common::{ASK_GREET, TestServer, code, expect, greet_turn, text_turn};
use keel_app::Role;
use reqwest::Method;
use serde_json::{Value, json};

fn id_of(created: &Value) -> String {
    created["job"]["id"].as_str().expect("job id").to_string()
}

fn state_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |v: &Value| v["job"]["state"] == s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_create_get_list_cancel_and_idempotency() {
    let server = TestServer::start(json!([greet_turn("Ada"), text_turn("Done.")]), Some(ASK_GREET), |_| {}).await;
    let key = server.key("acme", Role::Write).await;

    // A job that finishes: `hello` needs an approval, given through the API.
    let created = server.create_job(&key, &["hello"], json!({}), 201).await;
    assert_eq!(created["created"], true);
    let id = id_of(&created);
    assert_eq!(created["job"]["tenant"], "acme");
    assert!(
        created["job"]["input"]["policy"].get("source").is_none(),
        "policy text is not shown"
    );
    let action = server.pending_action(&id, &key).await;
    assert_eq!(action["request"]["tool"], "hello/greet");
    assert_eq!(action["request"]["arguments"]["name"], "Ada");
    assert!(action.get("token_hash").is_none());
    let resolved = server
        .post(
            &format!("/v1/actions/{}/approve", action["id"].as_str().unwrap()),
            &key,
            json!({}),
            200,
        )
        .await;
    assert_eq!(resolved["state"], "RESOLVED");
    let done = server.wait_job(&id, &key, "success", state_is("SUCCEEDED")).await;
    assert_eq!(done["result"]["content"], "Done.");
    // Approving again: not pending any more.
    let again = server
        .post(
            &format!("/v1/actions/{}/approve", action["id"].as_str().unwrap()),
            &key,
            json!({}),
            409,
        )
        .await;
    assert_eq!(code(&again), "action_not_pending");

    // Idempotency: same key, same request → the same job (200); other request → 409.
    let first = server
        .create_job(&key, &["hello"], json!({ "idempotency_key": "k-1" }), 201)
        .await;
    let header_retry = server
        .req(Method::POST, "/v1/jobs", &key)
        .header("Idempotency-Key", "k-1")
        .json(&json!({ "prompt": "greet someone", "model": common::MODEL, "tools": ["hello"] }))
        .send()
        .await
        .unwrap();
    let second = expect(header_retry, 200, "retry").await;
    assert_eq!(second["created"], false);
    assert_eq!(id_of(&first), id_of(&second));
    let other = server
        .post(
            "/v1/jobs",
            &key,
            json!({ "prompt": "something else", "model": common::MODEL, "idempotency_key": "k-1" }),
            409,
        )
        .await;
    assert_eq!(code(&other), "idempotency_key_reused");

    // Cancel the waiting job; cancelling twice is a conflict.
    let waiting = id_of(&first);
    server.pending_action(&waiting, &key).await;
    let cancelled = server
        .post(
            &format!("/v1/jobs/{waiting}/cancel"),
            &key,
            json!({ "reason": "test" }),
            200,
        )
        .await;
    assert_eq!(cancelled["state"], "CANCELLED");
    let twice = server
        .post(&format!("/v1/jobs/{waiting}/cancel"), &key, json!({}), 409)
        .await;
    assert_eq!(code(&twice), "job_finished");

    // List: filters and cursor pagination, newest first, every job exactly once.
    server.create_job(&key, &[], json!({ "prompt": "third" }), 201).await;
    let all = server.get("/v1/jobs?limit=500", &key, 200).await;
    assert_eq!(all["jobs"].as_array().unwrap().len(), 3);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=2&cursor={c}"),
            None => "/v1/jobs?limit=2".to_string(),
        };
        let page = server.get(&path, &key, 200).await;
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, expected);
    let cancelled_only = server.get("/v1/jobs?state=cancelled", &key, 200).await;
    assert_eq!(cancelled_only["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(cancelled_only["jobs"][0]["id"], waiting.as_str());
    let bad = server.get("/v1/jobs?state=sleeping", &key, 400).await;
    assert_eq!(code(&bad), "invalid_request");

    // Bad input gets the API's error shape, even where axum rejects it.
    let r = server
        .req(Method::POST, "/v1/jobs", &key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let body = expect(r, 400, "malformed JSON").await;
    assert_eq!(code(&body), "invalid_request");
    let unknown_model = server
        .post("/v1/jobs", &key, json!({ "prompt": "x", "model": "nope:x" }), 400)
        .await;
    assert!(unknown_model["error"]["message"].as_str().unwrap().contains("provider"));
    let missing = server
        .get("/v1/jobs/00000000-0000-7000-8000-000000000000", &key, 404)
        .await;
    assert_eq!(code(&missing), "not_found");
    let no_route = server.get("/v1/nothing-here", &key, 404).await;
    assert_eq!(code(&no_route), "no_route");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_scope_cannot_see_or_touch_anything() {
    let mut server = TestServer::start(json!([greet_turn("Ada"), text_turn("Done.")]), Some(ASK_GREET), |_| {}).await;
    let a = server.key("tenant-a", Role::Admin).await;
    let b = server.key("tenant-b", Role::Admin).await;
    let mut tokens = server.tokens.take().unwrap();

    // A's job waits for approval; A's resume token is captured as a human would get it.
    let job = id_of(
        &server
            .create_job(&a, &["hello"], json!({ "idempotency_key": "shared" }), 201)
            .await,
    );
    let action = server.pending_action(&job, &a).await;
    let action_id = action["id"].as_str().unwrap().to_string();
    let token = tokio::time::timeout(common::WAIT, async {
        loop {
            let t = tokens.recv().await.unwrap();
            if t.action_id.to_string() == action_id {
                return t.token;
            }
        }
    })
    .await
    .unwrap();

    // Every kind of A's resource is "not found" for B, exactly like a missing one.
    for path in [
        format!("/v1/jobs/{job}"),
        format!("/v1/jobs/{job}/events"),
        format!("/v1/actions/{action_id}"),
        format!("/v1/actions?job={job}"),
        format!("/v1/usage?job={job}"),
    ] {
        let body = server.get(&path, &b, 404).await;
        assert_eq!(code(&body), "not_found", "{path}");
    }
    for path in [
        format!("/v1/jobs/{job}/cancel"),
        format!("/v1/actions/{action_id}/approve"),
        format!("/v1/actions/{action_id}/deny"),
    ] {
        let body = server.post(&path, &b, json!({}), 404).await;
        assert_eq!(code(&body), "not_found", "{path}");
    }
    let by_token = server
        .post(
            "/v1/actions/resolve",
            &b,
            json!({ "token": token, "approved": false }),
            404,
        )
        .await;
    assert_eq!(code(&by_token), "not_found");
    assert!(
        server.get("/v1/jobs", &b, 200).await["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        server.get("/v1/actions", &b, 200).await["actions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The same idempotency key in B's scope is B's own job, not A's.
    let bs = server
        .create_job(&b, &[], json!({ "prompt": "mine", "idempotency_key": "shared" }), 201)
        .await;
    assert_ne!(id_of(&bs), job);

    // A plugin A installs by upload is A's alone, from the moment it exists: an observer reading
    // the registry throughout the upload never sees it without its owner (home-wide).
    let db = keel_app::kernel::open_db(server.home.path()).await.unwrap();
    let uploading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let observer = {
        let uploading = uploading.clone();
        std::thread::spawn(move || {
            use keel_app::keel_kernel::registry::PluginRegistry as _;
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                while uploading.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Some(stamp) = db.plugin_stamp("textkit-rust").await.unwrap() {
                        return Some(stamp.owner);
                    }
                }
                // The upload finished between two reads: the first sighting is this one.
                db.plugin_stamp("textkit-rust").await.unwrap().map(|stamp| stamp.owner)
            })
        })
    };
    let upload = server
        .req(Method::POST, "/v1/plugins?label=textkit", &a)
        .header("content-type", "application/wasm")
        .body(keel_testutil::guest_bytes("textkit-rust"))
        .send()
        .await
        .unwrap();
    uploading.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        observer.join().unwrap(),
        Some(Some("tenant-a".to_string())),
        "the uploaded plugin was first seen without its owner, visible to every scope"
    );
    let installed = expect(upload, 201, "install").await;
    let name = installed["plugin"]["name"].as_str().unwrap().to_string();
    assert_eq!(installed["plugin"]["owner"]["scope"], "tenant-a");
    let tool = installed["plugin"]["tools"][0]["name"].as_str().unwrap().to_string();
    server.get(&format!("/v1/plugins/{name}"), &a, 200).await;
    assert!(code(&server.get(&format!("/v1/plugins/{name}"), &b, 404).await) == "not_found");
    let b_list = server.get("/v1/plugins", &b, 200).await;
    let b_names: Vec<&str> = b_list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(b_names, ["hello"], "B sees the home-wide plugin only");
    server.create_job(&b, &[&name], json!({}), 404).await;
    server
        .post(
            &format!("/v1/tools/{name}/{tool}/call"),
            &b,
            json!({ "arguments": {} }),
            404,
        )
        .await;
    server
        .post("/v1/policy/eval", &b, json!({ "tool": format!("{name}/{tool}") }), 404)
        .await;
    server
        .post(
            &format!("/v1/plugins/{name}/grant"),
            &b,
            json!({ "net": ["example.com"] }),
            404,
        )
        .await;
    let r = server
        .req(Method::DELETE, &format!("/v1/plugins/{name}"), &b)
        .send()
        .await
        .unwrap();
    expect(r, 404, "B removes A's plugin").await;
    let upload = server
        .req(Method::POST, "/v1/plugins?replace=true", &b)
        .body(keel_testutil::guest_bytes("textkit-rust"))
        .send()
        .await
        .unwrap();
    assert_eq!(code(&expect(upload, 409, "B takes A's name").await), "name_unavailable");
    // A job of B asking for every tool gets B's visible plugins only.
    let star = server.create_job(&b, &["*"], json!({ "prompt": "star" }), 201).await;
    let tools: Vec<&str> = star["job"]["input"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tools, ["hello/*"]);
    // The home-wide plugin: visible to B, changeable only by the default scope's admin.
    server.get("/v1/plugins/hello", &b, 200).await;
    let r = server
        .req(Method::DELETE, "/v1/plugins/hello", &b)
        .send()
        .await
        .unwrap();
    assert_eq!(code(&expect(r, 403, "B removes hello").await), "forbidden");

    // A grants and revokes on its own plugin, then finishes its job with its token.
    let granted = server
        .post(
            &format!("/v1/plugins/{name}/grant"),
            &a,
            json!({ "net": ["api.example.com"] }),
            200,
        )
        .await;
    assert_eq!(granted["grants"]["net"], json!(["api.example.com"]));
    server
        .post(&format!("/v1/plugins/{name}/revoke"), &a, json!({ "all": true }), 200)
        .await;
    let resolved = server
        .post(
            "/v1/actions/resolve",
            &a,
            json!({ "token": token, "approved": true }),
            200,
        )
        .await;
    assert_eq!(resolved["id"], action_id.as_str());
    server.wait_job(&job, &a, "success", state_is("SUCCEEDED")).await;

    // Usage and budgets are per scope.
    let usage_a = server.get("/v1/usage", &a, 200).await;
    assert!(usage_a["requests"].as_u64().unwrap() >= 2, "{usage_a}");
    assert!(usage_a["tool_calls"].as_u64().unwrap() >= 1, "{usage_a}");
    let budget = server
        .req(Method::PUT, "/v1/budgets", &a)
        .json(&json!({ "window": "daily", "limits": { "max_requests": 100 } }))
        .send()
        .await
        .unwrap();
    let budget = expect(budget, 200, "set budget").await;
    let budget_id = budget["id"].as_str().unwrap();
    assert_eq!(
        server.get("/v1/budgets", &a, 200).await["budgets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        server.get("/v1/budgets", &b, 200).await["budgets"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let r = server
        .req(Method::DELETE, &format!("/v1/budgets/{budget_id}"), &b)
        .send()
        .await
        .unwrap();
    expect(r, 404, "B deletes A's budget").await;
    let r = server
        .req(Method::DELETE, &format!("/v1/budgets/{budget_id}"), &a)
        .send()
        .await
        .unwrap();
    expect(r, 200, "A deletes its budget").await;

    let r = server
        .req(Method::DELETE, &format!("/v1/plugins/{name}"), &a)
        .send()
        .await
        .unwrap();
    expect(r, 200, "A removes its plugin").await;
    server.get(&format!("/v1/plugins/{name}"), &a, 404).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_keys_rate_limit_and_host_checks() {
    let server = TestServer::start(json!([text_turn("Hi.")]), Some(ASK_GREET), |c| {
        c.rate_per_second = 1;
        c.rate_burst = 20;
    })
    .await;
    let read = server.key("acme", Role::Read).await;
    let write = server.key("acme", Role::Write).await;

    // No key, a wrong key, a revoked key: 401 alike.
    let r = server
        .http
        .get(format!("{}/v1/jobs", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(code(&expect(r, 401, "no key").await), "unauthorized");
    let mut wrong = write.clone();
    wrong.pop();
    wrong.push('x');
    server.get("/v1/jobs", &wrong, 401).await;

    // Roles within the scope: 403.
    server.get("/v1/jobs", &read, 200).await;
    assert_eq!(code(&server.create_job(&read, &[], json!({}), 403).await), "forbidden");
    server.post("/v1/tools/hello/greet/call", &read, json!({}), 403).await;
    let r = server
        .req(Method::POST, "/v1/plugins", &write)
        .body(keel_testutil::guest_bytes("hello"))
        .send()
        .await
        .unwrap();
    expect(r, 403, "write installs").await;
    let r = server
        .req(Method::PUT, "/v1/budgets", &write)
        .json(&json!({ "window": "total", "limits": {} }))
        .send()
        .await
        .unwrap();
    expect(r, 403, "write sets budgets").await;

    // Policy dry run: the decision without running anything.
    let decision = server
        .post(
            "/v1/policy/eval",
            &read,
            json!({ "tool": "hello/greet", "arguments": { "name": "x" } }),
            200,
        )
        .await;
    assert_eq!(decision["outcome"], "REQUIRE_APPROVAL", "{decision}");
    assert!(
        server.get("/v1/jobs", &read, 200).await["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Host/Origin (DNS rebinding): refused on every endpoint, the page included.
    for path in ["/", "/v1/jobs"] {
        let r = server
            .req(Method::GET, path, &read)
            .header("host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(code(&expect(r, 403, "foreign Host").await), "host_not_allowed");
        let r = server
            .req(Method::GET, path, &read)
            .header("origin", "http://evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(code(&expect(r, 403, "foreign Origin").await), "origin_not_allowed");
    }
    let port = server.base.rsplit(':').next().unwrap();
    let r = server
        .req(Method::GET, "/v1/jobs", &read)
        .header("host", format!("localhost:{port}"))
        .header("origin", format!("http://localhost:{port}"))
        .send()
        .await
        .unwrap();
    expect(r, 200, "localhost").await;

    // Revoking a key ends it at once.
    let db = keel_app::kernel::open_db(server.home.path()).await.unwrap();
    let doomed = keel_app::keys::create_key(&db, "acme", Role::Read, None).await.unwrap();
    server.get("/v1/jobs", &doomed.key, 200).await;
    let mut open = common::SseReader::new(server.req(Method::GET, "/v1/events", &doomed.key).send().await.unwrap());
    keel_app::keys::revoke_key(&db, &doomed.info.id).await.unwrap();
    server.get("/v1/jobs", &doomed.key, 401).await;
    // A stream the key opened before ends too: it would go on carrying the scope's events.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while open.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the revoked key's open event stream went on");

    // Rate limit per key: the burst is spent, then 429 with Retry-After; other keys unaffected.
    let mut limited = None;
    for _ in 0..40 {
        let r = server.req(Method::GET, "/v1/jobs", &read).send().await.unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the read key was never limited");
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(code(&expect(r, 429, "limited").await), "rate_limited");
    server.get("/v1/jobs", &write, 200).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_go_through_the_governed_path() {
    let server = TestServer::start(json!([]), Some(ASK_GREET), |c| {
        c.call_wait = std::time::Duration::from_millis(300);
    })
    .await;
    let key = server.key("acme", Role::Write).await;
    // Needs approval: 202 with the call's job, which finishes once approved.
    let waiting = server
        .post(
            "/v1/tools/hello/greet/call",
            &key,
            json!({ "arguments": { "name": "Ada" }, "session": "s1" }),
            202,
        )
        .await;
    let job = waiting["job_id"].as_str().unwrap().to_string();
    let action = server.pending_action(&job, &key).await;
    server
        .post(
            &format!("/v1/actions/{}/approve", action["id"].as_str().unwrap()),
            &key,
            json!({ "for_session": true }),
            200,
        )
        .await;
    let done = server.wait_job(&job, &key, "the call", state_is("SUCCEEDED")).await;
    let output = done["result"]["tool_result"]["output"].to_string();
    assert!(output.contains("Ada"), "{done}");
    // The policy dry run answers as the session's next call is decided: that call is allowed,
    // another session's or other arguments are still asked about.
    let eval =
        |session: &str, name: &str| json!({ "tool": "hello/greet", "arguments": { "name": name }, "session": session });
    for (session, name, outcome) in [
        ("s1", "Ada", "ALLOW"),
        ("s2", "Ada", "REQUIRE_APPROVAL"),
        ("s1", "Bob", "REQUIRE_APPROVAL"),
    ] {
        let decision = server.post("/v1/policy/eval", &key, eval(session, name), 200).await;
        assert_eq!(decision["outcome"], outcome, "{session} {name}: {decision}");
    }
    let again = server
        .post(
            "/v1/tools/hello/greet/call",
            &key,
            json!({ "arguments": { "name": "Ada" }, "session": "s1" }),
            200,
        )
        .await;
    assert_eq!(again["status"], "SUCCEEDED", "approved for the session: {again}");
    // Invalid input is refused by the schema check, as an outcome (not a protocol error).
    let refused = server
        .post(
            "/v1/tools/hello/greet/call",
            &key,
            json!({ "arguments": { "name": 5 } }),
            200,
        )
        .await;
    assert_eq!(refused["status"], "FAILED", "{refused}");
    // A tool the plugin does not have.
    server.post("/v1/tools/hello/nope/call", &key, json!({}), 400).await;
    server.stop().await;
}

/// Every path of `/v1/openapi.json` is routed (never the `no_route` answer) and the document
/// lists every route the API serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let server = TestServer::start(json!([]), None, |_| {}).await;
    let key = server.key("acme", Role::Admin).await;
    let spec = server.get("/v1/openapi.json", &key, 200).await;
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
            // Every documented response has a schema (a 204 has no body); every error
            // response is the one error shape, and the common errors are documented.
            let responses = ops[method]["responses"].as_object().unwrap();
            for status in ["400", "401", "403", "429", "500"] {
                assert!(responses.contains_key(status), "{method} {path}: no {status} response");
            }
            for (status, response) in responses {
                if status == "204" {
                    assert!(response.get("content").is_none(), "{method} {path} {status}: a body");
                    continue;
                }
                let content = response["content"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{method} {path} {status}: no content"));
                assert!(!content.is_empty(), "{method} {path} {status}: no content");
                for (media, body) in content {
                    let schema = &body["schema"];
                    assert!(schema.is_object(), "{method} {path} {status} {media}: no schema");
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            schema["$ref"], "#/components/schemas/ErrorBody",
                            "{method} {path} {status}"
                        );
                    }
                    // A named schema is defined in the document.
                    if let Some(reference) = schema["$ref"].as_str() {
                        let name = reference.trim_start_matches("#/components/schemas/");
                        assert!(
                            spec["components"]["schemas"][name].is_object(),
                            "{method} {path} {status}: {reference} is not defined"
                        );
                    }
                }
            }
            let concrete = path
                .replace("{id}", "00000000-0000-7000-8000-000000000000")
                .replace("{name}", "no-such-plugin")
                .replace("{plugin}", "no-such-plugin")
                .replace("{tool}", "t");
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut request = server.req(method.clone(), &concrete, &key);
            if method != Method::GET && method != Method::DELETE {
                request = request.json(&json!({}));
            }
            // Streams answer at once with headers; do not wait for their end.
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            if r.headers()
                .get("content-type")
                .is_some_and(|c| c.to_str().unwrap().starts_with("text/event-stream"))
            {
                continue;
            }
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_ne!(code(&body), "no_route", "{method} {path} is documented but not routed");
            assert_ne!(status, 405, "{method} {path}: method not routed");
        }
    }
    let expected: BTreeSet<String> = [
        "GET /v1/openapi.json",
        "POST /v1/session",
        "DELETE /v1/session",
        "POST /v1/jobs",
        "GET /v1/jobs",
        "GET /v1/jobs/{id}",
        "POST /v1/jobs/{id}/cancel",
        "GET /v1/jobs/{id}/events",
        "GET /v1/events",
        "GET /v1/actions",
        "GET /v1/actions/{id}",
        "POST /v1/actions/{id}/approve",
        "POST /v1/actions/{id}/deny",
        "POST /v1/actions/resolve",
        "GET /v1/plugins",
        "POST /v1/plugins",
        "GET /v1/plugins/{name}",
        "DELETE /v1/plugins/{name}",
        "POST /v1/plugins/{name}/grant",
        "POST /v1/plugins/{name}/revoke",
        "GET /v1/usage",
        "GET /v1/budgets",
        "PUT /v1/budgets",
        "DELETE /v1/budgets/{id}",
        "POST /v1/policy/eval",
        "POST /v1/tools/{plugin}/{tool}/call",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, expected);
    let error = &spec["components"]["schemas"]["ErrorDetail"];
    assert_eq!(error["required"], json!(["code", "message"]), "{error}");
    // And a path outside the document is not routed.
    let stray = server.get("/v1/jobs/x/y/z", &key, 404).await;
    assert_eq!(code(&stray), "no_route");
    server.stop().await;
}
