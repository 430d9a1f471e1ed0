//! Egress pinning: the address a request's host name was checked at is the address it connects
//! to, for HTTPS as for plain HTTP. A test [`Resolver`] answers the check with one loopback address
//! (127.0.0.2) while the system resolver knows `localhost` as 127.0.0.1; a trap listener on
//! 127.0.0.1 (same port) records any connection a second lookup would make. HTTPS runs against a
//! local rustls server with a self-signed certificate (rcgen) trusted through
//! `SandboxConfig::extra_tls_roots`.
//!
//! No traffic leaves the loopback interface.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{CallReport, Grants, Limits, PreparedPlugin, Resolver, Sandbox, SandboxConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

const CHECKED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SYSTEM: Ipv4Addr = Ipv4Addr::LOCALHOST;

// -------------------------------------------------------------------------------------------------
// A resolver with fixed answers

#[derive(Debug, Default)]
struct FixedResolver {
    answers: HashMap<String, Vec<IpAddr>>,
    asked: Mutex<Vec<String>>,
}

impl FixedResolver {
    fn with(host: &str, ips: &[Ipv4Addr]) -> Arc<Self> {
        let mut answers = HashMap::new();
        answers.insert(host.to_string(), ips.iter().map(|ip| IpAddr::V4(*ip)).collect());
        Arc::new(Self {
            answers,
            asked: Mutex::default(),
        })
    }
}

impl Resolver for FixedResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        self.asked.lock().unwrap().push(host.to_string());
        let answer = self
            .answers
            .get(host)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no test answer for {host}")));
        Box::pin(async move { answer })
    }
}

// -------------------------------------------------------------------------------------------------
// Listeners

/// Two listeners on the same port: one on 127.0.0.1 (where a fresh system lookup of `localhost`
/// leads), one on 127.0.0.2 (the address the test resolver answers).
fn same_port_pair() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let system = TcpListener::bind((SYSTEM, 0)).expect("bind 127.0.0.1");
        let port = system.local_addr().unwrap().port();
        if let Ok(checked) = TcpListener::bind((CHECKED, port)) {
            return (system, checked);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// Accepts and counts connections (and the bytes sent on them, e.g. a TLS ClientHello), then
/// closes them, so a client that reached it fails at once instead of waiting for a deadline.
struct Trap {
    connections: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl Trap {
    fn start(listener: TcpListener) -> Trap {
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (c, b) = (connections.clone(), bytes.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 4096];
                if let Ok(n) = stream.read(&mut buf) {
                    b.fetch_add(n, Ordering::SeqCst);
                }
            }
        });
        Trap { connections, bytes }
    }

    fn assert_untouched(&self) {
        assert_eq!(
            (
                self.connections.load(Ordering::SeqCst),
                self.bytes.load(Ordering::SeqCst)
            ),
            (0, 0),
            "a connection (connections, bytes) reached 127.0.0.1, an address that was never checked"
        );
    }
}

/// What a test server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    /// TLS server name indication (None for plain HTTP or when absent).
    sni: Option<String>,
    /// The `host` header.
    host: Option<String>,
}

/// A one-answer HTTP/1.1 server (TLS when `tls` is given) on `listener`.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    fn start(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, body: &'static str) -> Server {
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let seen = s.clone();
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let _ = match tls {
                        Some(config) => {
                            let conn = rustls::ServerConnection::new(config).expect("server connection");
                            let mut stream = rustls::StreamOwned::new(conn, stream);
                            serve(&mut stream, &seen, |s| s.conn.server_name().map(str::to_string), body).and_then(
                                |()| {
                                    stream.conn.send_close_notify();
                                    stream.flush()
                                },
                            )
                        }
                        None => {
                            let mut stream = stream;
                            serve(&mut stream, &seen, |_| None, body)
                        }
                    };
                });
            }
        });
        Server {
            port,
            seen,
            connections,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve<S: Read + Write>(
    stream: &mut S,
    seen: &Mutex<Vec<Seen>>,
    sni: impl Fn(&S) -> Option<String>,
    body: &str,
) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let host = head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case("host").then(|| v.trim().to_string())
    });
    seen.lock().unwrap().push(Seen { sni: sni(stream), host });
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// A self-signed certificate for `names` and the server configuration presenting it.
fn certificate(names: &[&str]) -> (Vec<u8>, Arc<rustls::ServerConfig>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("generate certificate");
    let der: CertificateDer<'static> = cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server certificate");
    (der.to_vec(), Arc::new(config))
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

async fn setup(resolver: Option<Arc<FixedResolver>>, roots: &[Vec<u8>]) -> Env {
    let mut config = SandboxConfig::new(cache_dir());
    config.pool_instances = 4;
    config.max_memory_bytes = 256 << 20;
    if let Some(resolver) = resolver {
        config.resolver = resolver;
    }
    config.extra_tls_roots = roots.to_vec();
    let sandbox = Sandbox::new(config).expect("sandbox");
    let wasm = keel_testutil::guest_bytes("keel-test-hostile");
    let plugin = sandbox.prepare(&wasm).await.expect("prepare hostile guest");
    Env { sandbox, plugin }
}

fn net(host: &str, allow_private_network: bool) -> Grants {
    Grants {
        net: vec![host.to_string()],
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
        self.sandbox
            .call(
                &self.plugin,
                grants,
                &limits,
                &ToolCallContext::ad_hoc("test"),
                "http_get",
                &json!({"url": url, "follow_redirects": false}),
            )
            .await
    }
}

fn ok_body(report: &CallReport) -> (u64, String) {
    let output = &report.result.as_ref().expect("request succeeded").output;
    (
        output["status"].as_u64().unwrap(),
        output["body"].as_str().unwrap().to_string(),
    )
}

fn failure(report: &CallReport) -> String {
    match &report.result {
        Err(ToolError::Failed { message, .. }) => message.clone(),
        other => panic!("expected the request to fail, got {other:?}"),
    }
}

// -------------------------------------------------------------------------------------------------

/// Reproducer of issue 7 item 4: HTTPS looked `localhost` up again at connect time and reached
/// 127.0.0.1, an address the check never saw.
#[tokio::test]
async fn https_connects_to_the_checked_address_not_a_fresh_lookup() {
    let (system, checked) = same_port_pair();
    let (root, tls) = certificate(&["localhost"]);
    let trap = Trap::start(system);
    let server = Server::start(checked, Some(tls), "served on the checked address");
    let resolver = FixedResolver::with("localhost", &[CHECKED]);
    let env = setup(Some(resolver.clone()), &[root]).await;
    let p = server.port;
    let report = env
        .get(
            &net(&format!("localhost:{p}"), true),
            &format!("https://localhost:{p}/pinned"),
        )
        .await;
    trap.assert_untouched();
    assert_eq!(ok_body(&report), (200, "served on the checked address".into()));
    assert_eq!(*resolver.asked.lock().unwrap(), vec!["localhost".to_string()]);
}

#[tokio::test]
async fn https_to_a_trusted_local_server_succeeds_with_the_original_name_for_sni() {
    let (root, tls) = certificate(&["localhost"]);
    let server = Server::start(TcpListener::bind((SYSTEM, 0)).unwrap(), Some(tls), "hello over TLS");
    let env = setup(Some(FixedResolver::with("localhost", &[SYSTEM])), &[root]).await;
    let p = server.port;
    let report = env
        .get(
            &net(&format!("localhost:{p}"), true),
            &format!("https://localhost:{p}/"),
        )
        .await;
    assert_eq!(ok_body(&report), (200, "hello over TLS".into()));
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].sni.as_deref(), Some("localhost"));
    assert_eq!(seen[0].host.as_deref(), Some(format!("localhost:{p}").as_str()));
}

#[tokio::test]
async fn https_refuses_a_certificate_for_another_name_or_from_an_untrusted_issuer() {
    // Trusted issuer, wrong name.
    let (root, tls) = certificate(&["not-localhost.test"]);
    let server = Server::start(TcpListener::bind((SYSTEM, 0)).unwrap(), Some(tls), "must not be served");
    let env = setup(Some(FixedResolver::with("localhost", &[SYSTEM])), &[root]).await;
    let p = server.port;
    let report = env
        .get(
            &net(&format!("localhost:{p}"), true),
            &format!("https://localhost:{p}/"),
        )
        .await;
    let message = failure(&report);
    assert!(message.contains("TlsCertificateError"), "{message}");
    assert!(server.seen().is_empty(), "{:?}", server.seen());

    // Right name, issuer not trusted (only the built-in roots).
    let (_, tls) = certificate(&["localhost"]);
    let server = Server::start(TcpListener::bind((SYSTEM, 0)).unwrap(), Some(tls), "must not be served");
    let env = setup(Some(FixedResolver::with("localhost", &[SYSTEM])), &[]).await;
    let p = server.port;
    let report = env
        .get(
            &net(&format!("localhost:{p}"), true),
            &format!("https://localhost:{p}/"),
        )
        .await;
    let message = failure(&report);
    assert!(message.contains("TlsCertificateError"), "{message}");
    assert!(server.seen().is_empty(), "{:?}", server.seen());
}

#[tokio::test]
async fn plain_http_is_pinned_to_the_checked_address_and_keeps_the_host_header() {
    let (system, checked) = same_port_pair();
    let trap = Trap::start(system);
    let server = Server::start(checked, None, "plain and pinned");
    let env = setup(Some(FixedResolver::with("localhost", &[CHECKED])), &[]).await;
    let p = server.port;
    let report = env
        .get(&net(&format!("localhost:{p}"), true), &format!("http://localhost:{p}/"))
        .await;
    trap.assert_untouched();
    assert_eq!(ok_body(&report), (200, "plain and pinned".into()));
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].host.as_deref(), Some(format!("localhost:{p}").as_str()));
}

#[tokio::test]
async fn every_checked_address_may_be_tried_but_no_other() {
    // The first answer has nothing listening; the second is the server. Both were checked.
    let (system, checked) = same_port_pair();
    let trap = Trap::start(system);
    let server = Server::start(checked, None, "second answer");
    let env = setup(
        Some(FixedResolver::with(
            "localhost",
            &[Ipv4Addr::new(127, 0, 0, 3), CHECKED],
        )),
        &[],
    )
    .await;
    let p = server.port;
    let report = env
        .get(&net(&format!("localhost:{p}"), true), &format!("http://localhost:{p}/"))
        .await;
    trap.assert_untouched();
    assert_eq!(ok_body(&report), (200, "second answer".into()));
}

#[tokio::test]
async fn a_name_with_any_private_answer_is_refused_before_connecting() {
    let (system, checked) = same_port_pair();
    let trap = Trap::start(system);
    let server = Server::start(checked, None, "must not be reached");
    // A public answer first does not excuse a loopback one after it.
    let env = setup(
        Some(FixedResolver::with("localhost", &[Ipv4Addr::new(8, 8, 8, 8), CHECKED])),
        &[],
    )
    .await;
    let p = server.port;
    for scheme in ["http", "https"] {
        let report = env
            .get(
                &net(&format!("localhost:{p}"), false),
                &format!("{scheme}://localhost:{p}/"),
            )
            .await;
        match &report.result {
            Err(ToolError::Denied {
                capability, message, ..
            }) => {
                assert_eq!(capability, "network");
                assert!(message.contains("DestinationIpProhibited"), "{scheme}: {message}");
            }
            other => panic!("{scheme}: expected a network denial, got {other:?}"),
        }
        assert!(
            report
                .denials
                .iter()
                .any(|d| d.reason.contains("127.0.0.2") && d.grant.as_deref() == Some("--allow-private-network")),
            "{:?}",
            report.denials
        );
    }
    trap.assert_untouched();
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn an_invalid_extra_root_is_refused_when_the_sandbox_is_built() {
    let mut config = SandboxConfig::new(cache_dir());
    config.pool_instances = 1;
    config.extra_tls_roots = vec![b"not a certificate".to_vec()];
    let error = Sandbox::new(config).err().expect("an invalid root must be refused");
    assert!(error.to_string().contains("TLS root"), "{error}");
}
