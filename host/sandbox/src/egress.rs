//! Outgoing HTTP of plugins: the allowlist and private-network check, and the connection.
//!
//! Host names are resolved once, through the configured [`Resolver`]; every address is checked.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use crate::config::SandboxConfig;
use crate::grants::{NetPolicy, is_non_public};
use crate::host::{CallJournal, Denial};

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
}

impl Egress {
    /// Build from the sandbox configuration.
    pub(crate) fn new(config: &SandboxConfig) -> Result<Self, String> {
        Ok(Self {
            resolver: config.resolver.clone(),
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
    journal: Arc<Mutex<CallJournal>>,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> wasmtime_wasi_http::Result<Sent> {
    let deny = |target: String, reason: String| {
        tracing::info!(%target, %reason, "outbound HTTP refused");
        journal.lock().expect("journal lock").denials.push(Denial {
            capability: "network".into(),
            target,
            reason,
        });
        Error::HttpRequestDenied
    };
    let uri = request.uri().clone();
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let default_port = if https { 443 } else { 80 };
    let Some(authority) = uri.authority() else {
        return Err(deny(uri.to_string(), "request has no host".into()));
    };
    let host = authority.host().to_string();
    let port = authority.port_u16().unwrap_or(default_port);
    let target = format!("{host}:{port}");
    if !policy.allows(&host, port, default_port) {
        return Err(deny(target, "host is not on the plugin's network allowlist".into()));
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
        return Err(deny(
            target,
            format!("{bad} is a private, loopback, link-local or metadata address"),
        ));
    }
    let Some(pinned) = ips.first().map(|ip| std::net::SocketAddr::new(*ip, port)) else {
        return Err(Error::DestinationNotFound);
    };
    if !https {
        // Connect to the address that was checked; the Host header keeps the original name.
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        *request.uri_mut() = format!("http://{pinned}{path}")
            .parse()
            .map_err(|_| Error::HttpRequestUriInvalid)?;
    }
    let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
    Ok((
        response.map(BodyExt::boxed_unsync),
        Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ))
}
