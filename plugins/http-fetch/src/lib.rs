//! `http-fetch` — Keel's first-party HTTP client plugin.
//!
//! Tools `get` and `post` send requests through raw `wasi:http/outgoing-handler`, so every request —
//! including every redirect hop, which this plugin follows itself (at most 5) — is a fresh outgoing
//! request that the host checks against the plugin's network grant. A host refusal becomes a
//! `denied` error for the `network` capability naming the host. Responses carry the status, the
//! headers and the body as text, capped at `max_bytes` (default 1 MiB) with a `truncated` flag.
//!
//! `post` (not idempotent) sends the call's `call-id` as an `Idempotency-Key` header unless the
//! caller set one: Keel keeps that id the same when it re-runs an interrupted call, so a server
//! that honours the header applies the request once.

use std::collections::BTreeMap;

use keel_sdk::prelude::*;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, HeaderError, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use wasip2::io::streams::StreamError;

/// Default response body cap.
const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;
/// Largest `max_bytes` accepted.
const MAX_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;
/// Largest chunk handed to `blocking-write-and-flush` (the WASI limit is 4096 bytes).
const WRITE_CHUNK: usize = 4096;

/// An absolute `http` or `https` URL, split the way `wasi:http` wants it.
#[derive(Clone, Debug, PartialEq)]
struct Url {
    https: bool,
    /// `host[:port]` as written (IPv6 literals keep their brackets).
    authority: String,
    /// The host part of `authority`, without port.
    host: String,
    /// Path plus query, always starting with `/`.
    path_with_query: String,
}

impl Url {
    fn parse(text: &str) -> Result<Url, String> {
        // Exactly as written: a policy matches the URL it is given, so this plugin must not
        // fetch another spelling of it (a trimmed one, say).
        if text.trim() != text {
            return Err(format!("`{text}` has leading or trailing whitespace"));
        }
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("`{text}` is not an absolute URL"))?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            other => {
                return Err(format!("scheme `{other}` is not supported (use http or https)"));
            }
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() {
            return Err(format!("`{text}` has no host"));
        }
        if authority.contains('@') {
            return Err("credentials in URLs are not supported; send an Authorization header instead".into());
        }
        let host = if let Some(v6) = authority.strip_prefix('[') {
            let close = v6
                .find(']')
                .ok_or_else(|| format!("`{authority}` has an unterminated IPv6 literal"))?;
            format!("[{}]", &v6[..close])
        } else {
            authority.split(':').next().unwrap_or_default().to_string()
        };
        if host.is_empty() {
            return Err(format!("`{text}` has no host"));
        }
        let path_with_query = match path.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{path}"),
            _ => path.to_string(),
        };
        Ok(Url {
            https,
            authority: authority.to_string(),
            host,
            path_with_query,
        })
    }

    /// Resolve a `Location` header against this URL.
    fn join(&self, location: &str) -> Result<Url, String> {
        let location = location.trim();
        let has_scheme = location
            .split_once(':')
            .is_some_and(|(s, _)| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)));
        if has_scheme {
            return Url::parse(location);
        }
        let scheme = if self.https { "https" } else { "http" };
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{scheme}://{rest}"));
        }
        let path = self.path_with_query.split('?').next().unwrap_or("/");
        let joined = if location.starts_with('/') {
            location.to_string()
        } else if location.starts_with('?') {
            format!("{path}{location}")
        } else {
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        Url::parse(&format!(
            "{scheme}://{}{}",
            self.authority,
            if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        ))
    }

    fn to_text(&self) -> String {
        format!(
            "{}://{}{}",
            if self.https { "https" } else { "http" },
            self.authority,
            self.path_with_query
        )
    }
}

/// One response, before redirect handling.
struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    truncated: bool,
}

fn network_error(url: &Url, code: ErrorCode) -> ToolError {
    let host = url.host.clone();
    match code {
        ErrorCode::HttpRequestDenied => ToolError::denied(
            "network",
            host,
            format!(
                "the host refused the request to `{}`: it is not in this plugin's network grant",
                url.authority
            ),
        ),
        ErrorCode::DestinationIpProhibited => ToolError::denied(
            "network",
            host,
            format!(
                "the host refused to connect to `{}`: it is a loopback, private, link-local or metadata address \
                 and private networks are not granted",
                url.authority
            ),
        ),
        ErrorCode::HttpRequestUriInvalid => ToolError::invalid_input(format!("`{}` is not a valid URL", url.to_text())),
        ErrorCode::ConnectionTimeout | ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            ToolError::TimedOut(format!("request to `{}` timed out ({code:?})", url.to_text()))
        }
        other => ToolError::failed(format!("request to `{}` failed: {other:?}", url.to_text())),
    }
}

fn header_error(e: HeaderError) -> ToolError {
    match e {
        HeaderError::InvalidSyntax => ToolError::invalid_input("a header name or value is not valid"),
        HeaderError::Forbidden => ToolError::invalid_input("a header is forbidden (e.g. Host or Connection)"),
        HeaderError::Immutable => ToolError::failed("headers are immutable"),
    }
}

/// Send one request and read at most `max_bytes` of its body.
fn send(
    method: Method,
    url: &Url,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    max_bytes: u64,
) -> Result<Response, ToolError> {
    let mut entries: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect();
    if let Some(body) = body
        && !entries.iter().any(|(k, _)| k == "content-length")
    {
        entries.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
    let fields = Fields::from_list(&entries).map_err(header_error)?;
    let request = OutgoingRequest::new(fields);
    request
        .set_method(&method)
        .map_err(|()| ToolError::invalid_input("invalid HTTP method"))?;
    request
        .set_scheme(Some(&if url.https { Scheme::Https } else { Scheme::Http }))
        .map_err(|()| ToolError::invalid_input("invalid URL scheme"))?;
    request
        .set_authority(Some(&url.authority))
        .map_err(|()| ToolError::invalid_input(format!("`{}` is not a valid host", url.authority)))?;
    request
        .set_path_with_query(Some(&url.path_with_query))
        .map_err(|()| ToolError::invalid_input(format!("`{}` is not a valid path", url.path_with_query)))?;
    let outgoing_body = request
        .body()
        .map_err(|()| ToolError::failed("request body already taken"))?;

    let future = outgoing_handler::handle(request, None).map_err(|code| network_error(url, code))?;

    {
        let stream = outgoing_body
            .write()
            .map_err(|()| ToolError::failed("request body stream already taken"))?;
        for chunk in body.unwrap_or_default().chunks(WRITE_CHUNK) {
            stream.blocking_write_and_flush(chunk).map_err(|e| {
                ToolError::failed(format!("sending the request body to `{}` failed: {e:?}", url.to_text()))
            })?;
        }
    }
    OutgoingBody::finish(outgoing_body, None).map_err(|code| network_error(url, code))?;

    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(network_error(url, code)),
        Some(Err(())) => return Err(ToolError::failed("the response was already taken")),
        None => {
            return Err(ToolError::failed("the response was not ready after waiting for it"));
        }
    };
    let status = response.status();
    let headers = response.headers().entries();
    let incoming: IncomingBody = response
        .consume()
        .map_err(|()| ToolError::failed("response body already taken"))?;
    let mut data = Vec::new();
    let mut truncated = false;
    {
        let stream = incoming
            .stream()
            .map_err(|()| ToolError::failed("response body stream already taken"))?;
        loop {
            let want = (max_bytes + 1).saturating_sub(data.len() as u64).clamp(1, 64 * 1024);
            match stream.blocking_read(want) {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() as u64 > max_bytes {
                        data.truncate(max_bytes as usize);
                        truncated = true;
                        break;
                    }
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(ToolError::failed(format!(
                        "reading the response from `{}` failed: {}",
                        url.to_text(),
                        e.to_debug_string()
                    )));
                }
            }
        }
    }
    drop(incoming);
    drop(response);
    Ok(Response {
        status,
        headers,
        body: data,
        truncated,
    })
}

/// UTF-8 text of a (possibly truncated) body: a sequence cut by the cap is dropped, invalid bytes replaced.
fn body_text(bytes: Vec<u8>, truncated: bool) -> (String, bool) {
    match String::from_utf8(bytes) {
        Ok(s) => (s, false),
        Err(e) if truncated && e.utf8_error().error_len().is_none() => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            (String::from_utf8(bytes).unwrap_or_default(), false)
        }
        Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), true),
    }
}

/// Result of `get` and `post`.
#[derive(Serialize, JsonSchema)]
struct FetchOutput {
    /// The URL of the final response (after redirects).
    url: String,
    /// HTTP status code of the final response.
    status: u16,
    /// Response headers, lower-case names; repeated headers are joined with `, `.
    headers: BTreeMap<String, String>,
    /// Response body as text (invalid UTF-8 replaced, see `lossy`).
    body: String,
    /// Bytes of body returned.
    bytes: u64,
    /// True when the body was longer than `max_bytes` and was cut.
    truncated: bool,
    /// True when the body was not valid UTF-8.
    lossy: bool,
    /// URLs of the redirects followed, in order.
    redirects: Vec<String>,
}

/// Run a request with redirect handling.
fn fetch(
    method: Method,
    url: &str,
    headers: BTreeMap<String, String>,
    body: Option<Vec<u8>>,
    max_bytes: Option<u64>,
    follow_redirects: bool,
) -> Result<FetchOutput, ToolError> {
    let max_bytes = max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
    if max_bytes > MAX_MAX_BYTES {
        return Err(ToolError::invalid_input(format!(
            "`max_bytes` must be at most {MAX_MAX_BYTES}"
        )));
    }
    let mut url = Url::parse(url).map_err(ToolError::invalid_input)?;
    let mut method = method;
    let mut body = body;
    let mut headers: Vec<(String, String)> = headers.into_iter().collect();
    let mut redirects = Vec::new();
    loop {
        let response = send(method.clone(), &url, &headers, body.as_deref(), max_bytes)?;
        let location = response
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("location"))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let is_redirect = matches!(response.status, 301 | 302 | 303 | 307 | 308);
        if follow_redirects
            && is_redirect
            && let Some(location) = location
        {
            if redirects.len() == MAX_REDIRECTS {
                return Err(ToolError::failed(format!(
                    "too many redirects: gave up after {MAX_REDIRECTS} (last: {})",
                    url.to_text()
                )));
            }
            let next = url.join(&location).map_err(|e| {
                ToolError::failed(format!(
                    "`{}` redirected to an unusable location `{location}`: {e}",
                    url.to_text()
                ))
            })?;
            // 303 always, and 301/302 after a POST, become a GET without body (as browsers do).
            if response.status == 303 || (matches!(response.status, 301 | 302) && matches!(method, Method::Post)) {
                method = Method::Get;
                body = None;
                headers.retain(|(k, _)| {
                    !k.eq_ignore_ascii_case("content-type") && !k.eq_ignore_ascii_case("content-length")
                });
            }
            // Never carry credentials to another origin.
            if next.authority != url.authority || next.https != url.https {
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization") && !k.eq_ignore_ascii_case("cookie"));
            }
            redirects.push(next.to_text());
            url = next;
            continue;
        }
        let mut out_headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in response.headers {
            let v = String::from_utf8_lossy(&v).into_owned();
            out_headers
                .entry(k.to_ascii_lowercase())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(&v);
                })
                .or_insert(v);
        }
        let bytes = response.body.len() as u64;
        let (body, lossy) = body_text(response.body, response.truncated);
        return Ok(FetchOutput {
            url: url.to_text(),
            status: response.status,
            headers: out_headers,
            body,
            bytes,
            truncated: response.truncated,
            lossy,
            redirects,
        });
    }
}

fn yes() -> bool {
    true
}

/// Arguments of `get`.
#[derive(Deserialize, JsonSchema)]
struct GetInput {
    /// Absolute `http://` or `https://` URL.
    url: String,
    /// Extra request headers (name → value).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Largest body returned, in bytes (default 1048576, at most 8388608); longer bodies are cut.
    #[serde(default)]
    max_bytes: Option<u64>,
    /// Follow up to 5 redirects (default true).
    #[serde(default = "yes")]
    follow_redirects: bool,
}

fn get(_ctx: &Context, input: GetInput) -> Result<FetchOutput, ToolError> {
    fetch(
        Method::Get,
        &input.url,
        input.headers,
        None,
        input.max_bytes,
        input.follow_redirects,
    )
}

/// Arguments of `post`.
#[derive(Deserialize, JsonSchema)]
struct PostInput {
    /// Absolute `http://` or `https://` URL.
    url: String,
    /// Extra request headers (name → value).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Request body (text).
    #[serde(default)]
    body: String,
    /// Content type of the body when no `content-type` header is given (default `text/plain; charset=utf-8`).
    #[serde(default)]
    content_type: Option<String>,
    /// Largest body returned, in bytes (default 1048576, at most 8388608); longer bodies are cut.
    #[serde(default)]
    max_bytes: Option<u64>,
    /// Follow up to 5 redirects (default true; 301/302/303 turn the POST into a GET).
    #[serde(default = "yes")]
    follow_redirects: bool,
}

fn post(ctx: &Context, input: PostInput) -> Result<FetchOutput, ToolError> {
    let mut headers = input.headers;
    if !headers.keys().any(|k| k.eq_ignore_ascii_case("idempotency-key")) {
        headers.insert("idempotency-key".into(), ctx.call_id.clone());
    }
    if !headers.keys().any(|k| k.eq_ignore_ascii_case("content-type")) {
        headers.insert(
            "content-type".into(),
            input.content_type.unwrap_or_else(|| "text/plain; charset=utf-8".into()),
        );
    }
    fetch(
        Method::Post,
        &input.url,
        headers,
        Some(input.body.into_bytes()),
        input.max_bytes,
        input.follow_redirects,
    )
}

struct HttpFetch;

impl Plugin for HttpFetch {
    fn meta() -> PluginMeta {
        PluginMeta::new(
            "http-fetch",
            env!("CARGO_PKG_VERSION"),
            "Fetch URLs over HTTP(S) from the hosts the user granted. Follows up to 5 redirects (each one checked \
             against the grant) and returns status, headers and the body as text, capped at 1 MiB by default.",
        )
    }

    fn tools() -> Vec<Tool> {
        vec![
            Tool::new(
                "get",
                "HTTP GET a URL on a granted host. Returns status, headers and body text (cut at `max_bytes`, \
                 default 1 MiB, with `truncated` set).",
                get,
            )
            .idempotent(),
            Tool::new(
                "post",
                "HTTP POST a text body to a URL on a granted host. Returns status, headers and body text \
                 (cut at `max_bytes`, default 1 MiB, with `truncated` set). Sends an `Idempotency-Key` header \
                 (stable across re-runs of the same call) unless one is given.",
                post,
            ),
        ]
    }
}

keel_sdk::export_plugin!(HttpFetch);

#[cfg(test)]
mod tests {
    use super::Url;

    #[test]
    fn parses_and_joins() {
        let u = Url::parse("http://localhost:8080/a/b?x=1#frag").unwrap();
        assert_eq!(u.authority, "localhost:8080");
        assert_eq!(u.host, "localhost");
        assert_eq!(u.path_with_query, "/a/b?x=1");
        assert_eq!(u.join("c").unwrap().to_text(), "http://localhost:8080/a/c");
        assert_eq!(u.join("/d").unwrap().to_text(), "http://localhost:8080/d");
        assert_eq!(u.join("?y").unwrap().to_text(), "http://localhost:8080/a/b?y");
        assert_eq!(u.join("//other/x").unwrap().to_text(), "http://other/x");
        assert_eq!(u.join("http://127.0.0.1:9/").unwrap().host, "127.0.0.1");
        let v6 = Url::parse("http://[::ffff:127.0.0.1]:81").unwrap();
        assert_eq!(v6.host, "[::ffff:127.0.0.1]");
        assert_eq!(v6.path_with_query, "/");
        assert!(Url::parse("ftp://x").is_err());
        assert!(Url::parse("http://user:pw@x/").is_err());
    }
}
