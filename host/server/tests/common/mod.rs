//! A real `keel-server` on an ephemeral port over a fresh SQLite Keel home with the `hello`
//! plugin (built from source), a scripted model, and API keys; a `reqwest` client; an SSE reader.

#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt as _;
use keel_app::Role;
use keel_server::{Server, ServerConfig};
use serde_json::{Value, json};

/// How long any wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// The scripted model's name.
pub const MODEL: &str = "scripted:test";

/// A policy asking a human before every `hello/greet`.
pub const ASK_GREET: &str = r#"
version = 1
default = "allow"

[[tool]]
name = "ask-before-greeting"
tools = ["hello/greet"]
decision = "require_approval"
reason = "greetings need a human"
"#;

/// One scripted turn calling `hello/greet`.
pub fn greet_turn(name: &str) -> Value {
    json!({ "tool_calls": [{ "name": "hello__greet", "arguments": { "name": name } }],
            "usage": { "input_tokens": 10, "output_tokens": 5 } })
}

/// A final text turn.
pub fn text_turn(text: &str) -> Value {
    json!({ "text": text, "usage": { "input_tokens": 10, "output_tokens": 3 } })
}

/// A running server and its home.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The Keel home.
    pub home: tempfile::TempDir,
    /// A client that sends no key by itself.
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Resume tokens of approvals the server's loops create (in-process, as a human would get them).
    pub tokens: Option<tokio::sync::broadcast::Receiver<keel_kernel::IssuedToken>>,
}

impl TestServer {
    /// A home whose scripted model answers `turns`, with `policy` (none: allow-all), `hello`
    /// installed from the CLI side (home-wide), and a server configured by `configure`.
    pub async fn start(turns: Value, policy: Option<&str>, configure: impl FnOnce(&mut ServerConfig)) -> Self {
        let home = tempfile::tempdir().unwrap();
        let p = home.path();
        std::fs::write(p.join("script.json"), json!({ "turns": turns }).to_string()).unwrap();
        std::fs::write(
            p.join("config.toml"),
            "[agent]\nlease_ttl_ms = 2000\npoll_ms = 50\n\n\
             [models.providers.scripted]\nkind = \"scripted\"\nscript = \"script.json\"\n\n\
             [models.providers.scripted.prices.test]\ninput_per_mtok = \"0\"\noutput_per_mtok = \"1000\"\n",
        )
        .unwrap();
        if let Some(policy) = policy {
            std::fs::write(p.join("policy.toml"), policy).unwrap();
        }
        install_home_wide(p, "hello").await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ServerConfig {
            listen: addr,
            ..ServerConfig::default()
        };
        configure(&mut config);
        let server = Server::open(p, config).await.expect("open the server");
        let tokens = server.host().rt.issued_tokens();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Self {
            base: format!("http://{addr}"),
            home,
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
            stop: Some(stop),
            task: Some(task),
            tokens: Some(tokens),
        }
    }

    /// A new API key of `scope` with `role`.
    pub async fn key(&self, scope: &str, role: Role) -> String {
        let db = keel_app::kernel::open_db(self.home.path()).await.unwrap();
        keel_app::keys::create_key(&db, scope, role, Some(&format!("{scope}-test")))
            .await
            .unwrap()
            .key
    }

    /// `METHOD /path` with `key`.
    pub fn req(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    /// GET, expecting `status`; the JSON body.
    pub async fn get(&self, path: &str, key: &str, status: u16) -> Value {
        let r = self.req(reqwest::Method::GET, path, key).send().await.unwrap();
        expect(r, status, &format!("GET {path}")).await
    }

    /// POST JSON, expecting `status`; the JSON body.
    pub async fn post(&self, path: &str, key: &str, body: Value, status: u16) -> Value {
        let r = self
            .req(reqwest::Method::POST, path, key)
            .json(&body)
            .send()
            .await
            .unwrap();
        expect(r, status, &format!("POST {path}")).await
    }

    /// Create a job with `tools`, expecting `status`; the response.
    pub async fn create_job(&self, key: &str, tools: &[&str], extra: Value, status: u16) -> Value {
        let mut body = json!({ "prompt": "greet someone", "model": MODEL, "tools": tools });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        self.post("/v1/jobs", key, body, status).await
    }

    /// Poll job `id` until `f` holds for it (`{job, result}`).
    pub async fn wait_job(&self, id: &str, key: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let shown = self.get(&format!("/v1/jobs/{id}"), key, 200).await;
            if f(&shown) {
                return shown;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "timed out waiting for {what}: {shown}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The first pending action of job `id` (waits for it).
    pub async fn pending_action(&self, id: &str, key: &str) -> Value {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let listed = self.get(&format!("/v1/actions?job={id}"), key, 200).await;
            if let Some(a) = listed["actions"].as_array().and_then(|a| a.first()) {
                return a.clone();
            }
            assert!(tokio::time::Instant::now() < until, "no pending action for job {id}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stop the server (graceful: open streams end).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await.expect("the server stops");
        }
    }
}

/// Install component `package` into `home` as the CLI does (home-wide: no owning scope).
pub async fn install_home_wide(home: &std::path::Path, package: &str) {
    let bytes = keel_testutil::guest_bytes(package);
    let app = keel_app::App::open(home).await.unwrap();
    app.install_unattended(&bytes, package).await.expect("install");
}

/// Assert the status; return the JSON body (Null when empty).
pub async fn expect(r: reqwest::Response, status: u16, what: &str) -> Value {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{what}: {text}");
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"))
    }
}

/// The `error.code` of an error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    /// `id:`.
    pub id: String,
    /// `event:`.
    pub event: String,
    /// `data:` parsed as JSON.
    pub data: Value,
}

/// Reads events from an open SSE response.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    /// Wrap a response (asserting 200 and `text/event-stream`).
    pub fn new(r: reqwest::Response) -> Self {
        assert_eq!(r.status(), 200, "event stream");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Self {
            stream: r.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended. Comments (keep-alives) are skipped.
    pub async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(Sse {
                    id,
                    event,
                    data: serde_json::from_str(&data).expect("event data is JSON"),
                });
            }
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("event within WAIT")
            {
                Some(Ok(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Some(Err(e)) => panic!("event stream failed: {e}"),
                None => return None,
            }
        }
    }
}
