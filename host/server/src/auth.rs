//! Who may ask: the Host/Origin check on every request, API keys and browser sessions on every
//! protected one, and the per-key rate limit.
//!
//! - **Host/Origin** (DNS rebinding): a page on `evil.example` whose name is re-pointed at
//!   127.0.0.1 sends `Host: evil.example`; only the listen address, `localhost`, `127.0.0.1`,
//!   `[::1]` and the configured names are served. A cross-site `Origin` is refused the same way.
//! - **Keys**: `Authorization: Bearer keel_<id>_<secret>`, verified by `keel_app::keys`
//!   (constant-time). A missing, malformed, wrong or revoked key gets one answer: 401.
//! - **Browser sessions**: `EventSource` cannot send headers, so the approvals page trades the key
//!   once (`POST /v1/session`) for an `HttpOnly; SameSite=Strict` cookie. A cookie-authenticated
//!   request that changes anything must carry an allowed `Origin` (CSRF). A session re-checks
//!   its key on every request: revoking the key ends it.
//! - **Rate limit**: a token bucket per key (`governor`): 429 with `Retry-After`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use keel_app::Caller;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::{AppState, ServerConfig};

/// Name of the browser session cookie.
pub const SESSION_COOKIE: &str = "keel_session";

pub use keel_app::keys::KeyId;

/// How the request was authenticated (request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `Authorization: Bearer`.
    Bearer,
    /// The session cookie.
    Cookie,
}

struct Session {
    key_id: String,
    expires: Instant,
}

/// Authentication state of one server.
pub(crate) struct Auth {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    /// Browser sessions by the sha256 of the cookie's value (the value itself is not kept).
    sessions: Mutex<HashMap<String, Session>>,
    /// Host names served (lower case, no port).
    allowed_hosts: Vec<String>,
}

impl Auth {
    pub fn new(config: &ServerConfig) -> Self {
        let rate = NonZeroU32::new(config.rate_per_second.max(1)).expect("nonzero");
        let burst = NonZeroU32::new(config.rate_burst.max(1)).expect("nonzero");
        let mut allowed_hosts = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        let ip = config.listen.ip();
        if !ip.is_unspecified() {
            allowed_hosts.push(ip.to_string());
        }
        allowed_hosts.extend(config.allowed_hosts.iter().map(|h| h.trim().to_ascii_lowercase()));
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            sessions: Mutex::new(HashMap::new()),
            allowed_hosts,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        self.allowed_hosts.contains(&host)
    }

    /// Open a browser session for key `key_id`; returns the cookie value.
    pub fn open_session(&self, key_id: &str, ttl: std::time::Duration) -> String {
        let mut token = [0u8; 32];
        rand::rng().fill_bytes(&mut token);
        let token = hex::encode(token);
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            digest(&token),
            Session {
                key_id: key_id.to_string(),
                expires: now + ttl,
            },
        );
        token
    }

    /// End the session with cookie value `token`.
    pub fn close_session(&self, token: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&digest(token));
    }

    fn session_key(&self, token: &str) -> Option<String> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(&digest(token))
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.key_id.clone())
    }
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The host part of a `Host` header value or URL authority (`[::1]:7700` → `::1`).
fn host_part(authority: &str) -> &str {
    let authority = authority.trim();
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority.rsplit_once(':').map_or(authority, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            authority
        }
    })
}

/// Whether an `Origin` of `scheme` with `authority` names the host and port of the request's
/// `Host` (a port left out is the scheme's default, for both: a client that left it out of `Host`
/// used the scheme it shows in `Origin`).
fn same_authority(scheme: &str, authority: &str, host: &str) -> bool {
    let default = if scheme == "https" { 443 } else { 80 };
    let split = |a: &str| -> Option<(String, u16)> {
        let a = a.trim();
        let name = host_part(a);
        let rest = if a.starts_with('[') {
            a.split_once(']').map_or("", |(_, rest)| rest)
        } else {
            &a[name.len()..]
        };
        let port = match rest.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if rest.is_empty() => default,
            None => return None,
        };
        Some((name.to_ascii_lowercase(), port))
    };
    matches!((split(authority), split(host)), (Some(a), Some(b)) if a == b)
}

/// Refuse a request whose `Host` or `Origin` names a host this server does not serve.
pub(crate) async fn check_host(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match &host {
        Some(h) if state.auth.host_allowed(host_part(h)) => {}
        _ => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                "this server does not serve that host name (add it with --allow-host)",
            )
            .into_response();
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        // Same origin only: an allowed host name is not enough, as a page on another port of
        // that host (another local service) is same-site, so the browser sends the cookie.
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
            .is_some_and(|(scheme, authority)| {
                state.auth.host_allowed(host_part(authority))
                    && host
                        .as_deref()
                        .is_some_and(|host| same_authority(scheme, authority, host))
            });
        if !ok {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "cross-origin requests are refused",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// How often an open event stream checks that the key it was opened with is still valid.
const REVOCATION_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// End an event stream (an SSE response: `/v1/events`, a job's events, MCP's streams) once the
/// key that opened it is revoked: authentication runs when a request starts, and a stream lives
/// on for as long as its client keeps it open, carrying the scope's events (tool output among
/// them). Checked every [`REVOCATION_CHECK`]; a failed check ends the stream too (the client
/// resumes with `Last-Event-ID`, authenticated afresh).
pub(crate) async fn end_streams_on_revocation(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let key = req.extensions().get::<KeyId>().cloned();
    let response = next.run(req).await;
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let Some(KeyId(key_id)) = key.filter(|_| streaming) else {
        return response;
    };
    let revoked = async move {
        loop {
            tokio::time::sleep(REVOCATION_CHECK).await;
            match keel_app::keys::caller_of_key(&state.host.app.db, &key_id).await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e.message, "cannot check an event stream's key: ending the stream");
                    return;
                }
            }
        }
    };
    let (parts, body) = response.into_parts();
    let body = futures::StreamExt::take_until(body.into_data_stream(), Box::pin(revoked));
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(key.trim())
}

/// The value of cookie `name`, if sent.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn unauthorized() -> Response {
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid API key is required (Authorization: Bearer KEY; create one with `keel keys create`)",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// Authenticate a protected request, apply the key's rate limit and hand the handlers its
/// [`Caller`], [`KeyId`] and [`Via`].
pub(crate) async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let db = &state.host.app.db;
    let (key_id, caller, via) = if let Some(key) = bearer(req.headers()) {
        match keel_app::keys::authenticate(db, key).await {
            Ok(Some(a)) => (a.key_id, a.caller, Via::Bearer),
            Ok(None) => return unauthorized(),
            Err(e) => return ApiError::from(e).into_response(),
        }
    } else if let Some(token) = cookie(req.headers(), SESSION_COOKIE) {
        let Some(key_id) = state.auth.session_key(token) else {
            return unauthorized();
        };
        // CSRF: SameSite=Strict keeps the cookie off cross-site requests in browsers that honour
        // it; a state-changing request must also prove its origin (check_host vetted its value).
        let safe = matches!(*req.method(), Method::GET | Method::HEAD);
        if !safe && !req.headers().contains_key(header::ORIGIN) {
            return ApiError::forbidden("a cookie-authenticated request that changes state needs an Origin header")
                .into_response();
        }
        match keel_app::keys::caller_of_key(db, &key_id).await {
            Ok(Some(caller)) => (key_id, caller, Via::Cookie),
            Ok(None) => return unauthorized(),
            Err(e) => return ApiError::from(e).into_response(),
        }
    } else {
        return unauthorized();
    };
    if let Err(not_until) = state.auth.limiter.check_key(&key_id) {
        let wait = not_until.wait_time_from(state.auth.clock.now());
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests with this key; retry in {} ms", wait.as_millis()),
        );
        error.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        return error.into_response();
    }
    req.extensions_mut().insert::<Caller>(caller);
    req.extensions_mut().insert(KeyId(key_id));
    req.extensions_mut().insert(via);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_is_the_same_only_with_the_same_host_and_port() {
        assert!(same_authority("http", "127.0.0.1:7700", "127.0.0.1:7700"));
        assert!(same_authority("http", "LOCALHOST:7700", "localhost:7700"));
        assert!(same_authority("http", "keel.example", "keel.example:80"));
        assert!(same_authority("https", "keel.example", "keel.example"));
        assert!(same_authority("http", "[::1]:7700", "[::1]:7700"));
        assert!(!same_authority("http", "localhost:9999", "localhost:7700"));
        assert!(!same_authority("http", "127.0.0.1", "127.0.0.1:7700"));
        assert!(!same_authority("https", "keel.example", "keel.example:80"));
        assert!(!same_authority("http", "127.0.0.1:7700", "localhost:7700"));
        assert!(!same_authority("http", "[::1]:7700", "[::1]:7701"));
        assert!(!same_authority("http", "127.0.0.1:7700@evil", "127.0.0.1:7700"));
    }

    #[test]
    fn host_parts() {
        assert_eq!(host_part("127.0.0.1:7700"), "127.0.0.1");
        assert_eq!(host_part("localhost"), "localhost");
        assert_eq!(host_part("[::1]:7700"), "::1");
        assert_eq!(host_part("evil.example:80"), "evil.example");
    }
}
