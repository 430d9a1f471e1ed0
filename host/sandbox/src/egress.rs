//! Outgoing HTTP of plugins: the allowlist and private-network check, and the connection.
//!
//! Host names are resolved once, through the configured [`Resolver`]; every address is checked, and
//! the connection goes to one of those addresses, never to the name: a name that answers a public
//! address to the check and 127.0.0.1 to a second lookup cannot steer the connection (DNS
//! rebinding). For HTTPS, TLS runs over that connection with the name the guest wrote as SNI and for
//! certificate validation. The HTTP/1.1 exchange mirrors wasmtime-wasi-http's
//! `default_send_request` (same timeouts, the connection driven by the returned future).

use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use crate::config::SandboxConfig;
use crate::grants::{NetPolicy, is_non_public};
use crate::host::{CallDiagnostics, Denial, Traffic};

/// Resolves the host names of plugins' outgoing requests (see [`SandboxConfig::resolver`]).
pub trait Resolver: Send + Sync + fmt::Debug {
    /// Every address `host` (a name, never an IP literal) resolves to. The request's port is
    /// added by the caller.
    fn resolve<'a>(&'a self, host: &'a str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system resolver (`getaddrinfo` through [`tokio::net::lookup_host`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, 0)).await?.map(|a| a.ip()).collect()) })
    }
}

/// What the HTTP hooks of every call share.
#[derive(Debug)]
pub(crate) struct Egress {
    resolver: Arc<dyn Resolver>,
    tls: Arc<rustls::ClientConfig>,
}

impl Egress {
    /// Build from the sandbox configuration: the resolver, and a TLS client trusting the Mozilla
    /// roots plus [`SandboxConfig::extra_tls_roots`] (an invalid one is an error).
    pub(crate) fn new(config: &SandboxConfig) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        for (i, der) in config.extra_tls_roots.iter().enumerate() {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| format!("extra TLS root certificate #{} is not valid: {e}", i + 1))?;
        }
        // The provider is named rather than taken from the process default, which panics when
        // several providers are compiled in.
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            resolver: config.resolver.clone(),
            tls: Arc::new(tls),
        })
    }
}

/// The response and the future that drives the connection, as `WasiHttpHooks::send_request` returns them.
pub(crate) type Sent = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
);

/// Check `request` against `policy` and send it. Refusals are recorded in `journal`.
pub(crate) async fn send(
    egress: Arc<Egress>,
    policy: Arc<NetPolicy>,
    journal: Arc<Mutex<CallDiagnostics>>,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> wasmtime_wasi_http::Result<Sent> {
    // Recorded with the grant that would allow it; the guest gets the WASI code for the refusal.
    let deny = |target: String, reason: String, grant: Option<String>, code: Error| {
        // `?`: target and reason carry the guest's text; Debug escapes controls, line breaks and bidi overrides.
        tracing::info!(?target, ?reason, "outbound HTTP refused");
        journal.lock().expect("journal lock").denials.push(Denial {
            capability: "network".into(),
            target,
            reason,
            grant,
        });
        code
    };
    let uri = request.uri().clone();
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let default_port = if https { 443 } else { 80 };
    let Some(authority) = uri.authority() else {
        return Err(deny(
            uri.to_string(),
            "request has no host".into(),
            None,
            Error::HttpRequestDenied,
        ));
    };
    let host = authority.host().to_string();
    let port = authority.port_u16().unwrap_or(default_port);
    let target = format!("{host}:{port}");
    if !policy.allows(&host, port, default_port) {
        // A pattern without a port allows the scheme's default one.
        let pattern = if port == default_port { &host } else { &target };
        let grant = Some(format!("--allow-net {pattern}"));
        return Err(deny(
            target,
            "host is not on the plugin's network allowlist".into(),
            grant,
            Error::HttpRequestDenied,
        ));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let ips = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => egress.resolver.resolve(&bare).await.map_err(|_| Error::DnsError {
            rcode: None,
            info_code: None,
        })?,
    };
    if !policy.allow_private_network
        && let Some(bad) = ips.iter().find(|ip| is_non_public(**ip))
    {
        // Granting the host again would change nothing: say what would.
        return Err(deny(
            target,
            format!("{bad} is a private, loopback, link-local or metadata address"),
            Some("--allow-private-network".into()),
            Error::DestinationIpProhibited,
        ));
    }
    if ips.is_empty() {
        return Err(Error::DestinationNotFound);
    }
    let connect_timeout = options.and_then(|o| o.connect_timeout).unwrap_or(DEFAULT_TIMEOUT);
    let first_byte_timeout = options.and_then(|o| o.first_byte_timeout).unwrap_or(DEFAULT_TIMEOUT);
    let between_bytes_timeout = options.and_then(|o| o.between_bytes_timeout).unwrap_or(DEFAULT_TIMEOUT);

    // Connect to an address that was checked (never to the name), then TLS with the name as written.
    let tcp = match tokio::time::timeout(connect_timeout, connect_any(&ips, port)).await {
        Ok(stream) => stream.map_err(Error::Connect)?,
        Err(_) => return Err(Error::ConnectionTimeout),
    };
    let traffic = journal.lock().expect("journal lock").traffic.clone();
    let tcp = Counted { inner: tcp, traffic };
    let stream: Box<dyn Stream> = if https {
        let name = ServerName::try_from(bare)?;
        let connector = tokio_rustls::TlsConnector::from(egress.tls.clone());
        match tokio::time::timeout(connect_timeout, connector.connect(name, tcp)).await {
            Ok(stream) => Box::new(stream.map_err(tls_error)?),
            Err(_) => return Err(Error::ConnectionTimeout),
        }
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::Builder::new().handshake::<_, WasiBody>(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;

    // Origin-form request target: scheme and authority go only to proxies. The `Host` header,
    // set by wasmtime-wasi-http from the authority, keeps the name the guest wrote.
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;

    let send = async move {
        let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
            .await
            .map_err(|_| Error::ConnectionReadTimeout)?
            .map_err(Error::from)?;
        // `tokio::time::interval` panics on zero.
        let between_bytes_timeout = between_bytes_timeout.max(Duration::from_nanos(1));
        let mut timeout = tokio::time::interval(between_bytes_timeout);
        timeout.reset();
        Ok::<_, Error>(response.map(|incoming| IncomingResponseBody { incoming, timeout }))
    };
    let mut send = pin!(send);
    let mut conn = Some(conn);
    // Wait for the response while driving the connection's I/O.
    let response = poll_fn(|cx| match send.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(result),
        Poll::Pending => {
            let Some(fut) = conn.as_mut() else {
                return Poll::Pending;
            };
            let result = ready!(Pin::new(fut).poll(cx));
            conn = None;
            match result {
                Ok(()) => send.as_mut().poll(cx),
                Err(err) => Poll::Ready(Err(Error::from(err))),
            }
        }
    })
    .await?;
    let io = async move {
        let Some(conn) = conn.take() else {
            return Ok(());
        };
        conn.await.map_err(|err| {
            if err.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(err)
            }
        })
    };
    Ok((
        response.map(BodyExt::boxed_unsync),
        Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ))
}

/// How long each phase may take when the guest sets no `request-options` (wasmtime-wasi-http's
/// default; the call's deadline bounds it anyway).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Stream for T {}

/// Connect to the first of `ips` (all checked) that answers on `port`.
async fn connect_any(ips: &[IpAddr], port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for ip in ips {
        match TcpStream::connect(SocketAddr::new(*ip, port)).await {
            Ok(stream) => return Ok(stream),
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// A certificate the server presented that does not verify is a certificate error, not a protocol error.
fn tls_error(err: io::Error) -> Error {
    match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => Error::TlsCertificateError,
        Some(rustls::Error::AlertReceived(alert)) => Error::TlsAlertReceived {
            alert_id: Some(u8::from(*alert)),
            alert_message: Some(format!("{alert:?}")),
        },
        _ => Error::Tls(err),
    }
}

/// A connection that counts the bytes crossing it into the call's [`Traffic`] (its receipt).
struct Counted<S> {
    inner: S,
    traffic: Arc<Traffic>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.traffic.add_received(buf.filled().len() - before);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.traffic.add_sent(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that fails when the server is silent longer than the between-bytes timeout
/// (as wasmtime-wasi-http's default sender does).
struct IncomingResponseBody {
    incoming: hyper::body::Incoming,
    timeout: tokio::time::Interval,
}

impl http_body::Body for IncomingResponseBody {
    type Data = <hyper::body::Incoming as http_body::Body>::Data;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(if err.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(err)
            }))),
            Poll::Ready(Some(Ok(frame))) => {
                self.timeout.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timeout.poll_tick(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}
