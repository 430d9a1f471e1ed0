//! What the HTTP providers share: the client, retries with backoff, status → error mapping, SSE with idle timeouts.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use keel_kernel::model::ModelError;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};

use crate::config::{ConfigError, ProviderConfig};

/// Longest provider error text carried into a [`ModelError`] message.
const MAX_ERROR_TEXT: usize = 500;

/// Bytes of an error response's body read at most (only its start is shown).
const MAX_ERROR_BODY: usize = 64 << 10;

/// Client plus retry/timeout policy for one provider.
pub(crate) struct HttpCore {
    client: reqwest::Client,
    /// Per attempt: longest wait for the response head, and longest silence between body chunks.
    timeout: Duration,
    max_retries: u32,
    base_delay: Duration,
    max_delay: Duration,
    /// Provider label for messages (`openai`, `anthropic`).
    label: &'static str,
    /// The most bytes one response (body or event stream) may have.
    max_response_bytes: usize,
}

/// One failed attempt: the error it would end with, and whether another attempt may help.
#[derive(Debug)]
struct AttemptError {
    error: ModelError,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl AttemptError {
    fn fatal(error: ModelError) -> Self {
        Self {
            error,
            retryable: false,
            retry_after: None,
        }
    }

    fn transient(error: ModelError) -> Self {
        Self {
            error,
            retryable: true,
            retry_after: None,
        }
    }
}

impl HttpCore {
    pub(crate) fn new(config: &ProviderConfig, label: &'static str) -> Result<Self, ConfigError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .user_agent(concat!("keel-models/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the key (reqwest strips only `Authorization` across hosts,
            // not `x-api-key`) and the conversation to whatever host the server names.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::Client(e.to_string()))?;
        Ok(Self {
            client,
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
            max_retries: config.max_retries,
            base_delay: Duration::from_millis(config.retry_base_delay_ms),
            max_delay: Duration::from_millis(config.max_retry_delay_ms),
            label,
            max_response_bytes: usize::try_from(config.max_response_bytes).unwrap_or(usize::MAX),
        })
    }

    /// POSTs `body` as JSON, retrying transient failures, and returns the first successful response (its body not
    /// yet read). `model` names the model in UnknownModel errors.
    pub(crate) async fn post(
        &self,
        url: &str,
        headers: &HeaderMap,
        body: &serde_json::Value,
        model: &str,
    ) -> Result<reqwest::Response, ModelError> {
        tracing::debug!(provider = self.label, model, url, "model call");
        let attempts = AtomicU32::new(0);
        let attempt = || async {
            attempts.fetch_add(1, Ordering::Relaxed);
            self.attempt(url, headers, body, model).await
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries as usize)
            .with_jitter();
        let max_delay = self.max_delay;
        let result = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &AttemptError| e.retryable)
            // The server's Retry-After beats our schedule; one longer than we are willing to wait ends the retries.
            .adjust(|e: &AttemptError, planned| match (planned, e.retry_after) {
                (None, _) => None,
                (Some(_), Some(asked)) if asked > max_delay => None,
                (Some(_), Some(asked)) => Some(asked),
                (Some(planned), None) => Some(planned),
            })
            .notify(|e: &AttemptError, delay| {
                tracing::debug!(provider = self.label, error = %e.error, ?delay, "model call failed; retrying");
            })
            .await;
        result.map_err(|e| {
            let n = attempts.load(Ordering::Relaxed);
            if n > 1 {
                with_suffix(e.error, &format!(" (after {n} attempts)"))
            } else {
                e.error
            }
        })
    }

    async fn attempt(
        &self,
        url: &str,
        headers: &HeaderMap,
        body: &serde_json::Value,
        model: &str,
    ) -> Result<reqwest::Response, AttemptError> {
        let send = self.client.post(url).headers(headers.clone()).json(body).send();
        let response = match tokio::time::timeout(self.timeout, send).await {
            Err(_) => return Err(AttemptError::transient(self.timeout_error())),
            Ok(Err(e)) => return Err(self.transport_error(&e)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nowhere");
            return Err(AttemptError::fatal(ModelError::InvalidRequest {
                message: format!(
                    "{}: HTTP {status}: the server redirects to {location}; model calls do not follow redirects (set base_url to the address that answers)",
                    self.label
                ),
            }));
        }
        let retry_after = retry_after(response.headers());
        // Only the start of an error body is read; if it does not arrive in time the status alone still
        // classifies the failure.
        let text = match self.read_up_to(response, MAX_ERROR_BODY).await {
            Ok((bytes, _)) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        };
        let mut err = classify(self.label, status, &text, url, model);
        err.retry_after = retry_after;
        Err(err)
    }

    /// The whole body, each chunk within the idle timeout; a body past `max_response_bytes` is an
    /// invalid response.
    pub(crate) async fn read_body(&self, response: reqwest::Response) -> Result<Vec<u8>, ModelError> {
        let (body, cut) = self.read_up_to(response, self.max_response_bytes).await?;
        if cut {
            return Err(self.too_large("the response body"));
        }
        Ok(body)
    }

    /// At most `limit` bytes of the body, and whether there was more (left unread).
    async fn read_up_to(&self, response: reqwest::Response, limit: usize) -> Result<(Vec<u8>, bool), ModelError> {
        let mut stream = response.bytes_stream();
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout(self.timeout, stream.next()).await {
                Err(_) => return Err(self.timeout_error()),
                Ok(None) => return Ok((body, false)),
                Ok(Some(Err(e))) => return Err(self.transport_error(&e).error),
                Ok(Some(Ok(chunk))) => {
                    let room = limit - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        return Ok((body, true));
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
    }

    fn too_large(&self, what: &str) -> ModelError {
        invalid(
            self.label,
            format!(
                "{what} is larger than {} bytes (max_response_bytes)",
                self.max_response_bytes
            ),
        )
    }

    /// The body as a stream of server-sent events, each within the idle timeout; the stream fails
    /// once its bytes pass `max_response_bytes`.
    pub(crate) fn events(&self, response: reqwest::Response) -> SseStream {
        let over = Arc::new(AtomicBool::new(false));
        let flag = over.clone();
        let (limit, mut seen) = (self.max_response_bytes, 0usize);
        let bytes = response.bytes_stream().take_while(move |chunk| {
            seen = seen.saturating_add(chunk.as_ref().map_or(0, |c| c.len()));
            if seen > limit {
                flag.store(true, Ordering::Relaxed);
            }
            std::future::ready(seen <= limit)
        });
        SseStream {
            inner: Box::pin(bytes.eventsource()),
            idle: self.timeout,
            label: self.label,
            over,
            too_large: self.too_large("the event stream"),
            last_progress: tokio::time::Instant::now(),
        }
    }

    fn timeout_error(&self) -> ModelError {
        ModelError::Timeout {
            message: format!("{}: no response within {:?}", self.label, self.timeout),
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> AttemptError {
        if e.is_timeout() {
            return AttemptError::transient(self.timeout_error());
        }
        // Connection refused/reset and friends: worth another try. `{:#}`-style source chains help diagnose TLS.
        let mut message = format!("{}: {e}", self.label);
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        AttemptError::transient(ModelError::Unavailable { message })
    }
}

type EventResult = Result<Event, EventStreamError<reqwest::Error>>;

/// Server-sent events from a response body.
pub(crate) struct SseStream {
    inner: Pin<Box<dyn Stream<Item = EventResult> + Send>>,
    idle: Duration,
    label: &'static str,
    /// Set when the body was cut off at `max_response_bytes`.
    over: Arc<AtomicBool>,
    /// The error to end with then.
    too_large: ModelError,
    /// When the last event that carried something arrived (see [`SseStream::progressed`]).
    last_progress: tokio::time::Instant,
}

impl SseStream {
    /// The next event; `None` at the end of the body. The idle timeout runs from the last event the
    /// provider said carried something ([`SseStream::progressed`]), not from the last event: a
    /// server that sends only keep-alives stalls as surely as a silent one.
    pub(crate) async fn next(&mut self) -> Option<Result<Event, ModelError>> {
        let deadline = self.last_progress + self.idle;
        match tokio::time::timeout_at(deadline, self.inner.next()).await {
            Err(_) => Some(Err(ModelError::Timeout {
                message: format!(
                    "{}: stream stalled for {:?} (nothing but keep-alives, or silence)",
                    self.label, self.idle
                ),
            })),
            Ok(None) if self.over.load(Ordering::Relaxed) => Some(Err(self.too_large.clone())),
            Ok(None) => None,
            Ok(Some(Ok(event))) => Some(Ok(event)),
            Ok(Some(Err(EventStreamError::Transport(e)))) => Some(Err(ModelError::Unavailable {
                message: format!("{}: stream interrupted: {e}", self.label),
            })),
            Ok(Some(Err(e))) => Some(Err(invalid(self.label, format!("malformed event stream: {e}")))),
        }
    }
}

impl SseStream {
    /// The event just read carried part of the response (text, reasoning, a tool-call fragment,
    /// usage, the end): the idle timeout starts again.
    pub(crate) fn progressed(&mut self) {
        self.last_progress = tokio::time::Instant::now();
    }
}

/// An InvalidResponse error.
pub(crate) fn invalid(label: &str, message: impl std::fmt::Display) -> ModelError {
    ModelError::InvalidResponse {
        message: format!("{label}: {message}"),
    }
}

/// Parses a JSON payload, or reports it as an invalid response.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    label: &str,
    what: &str,
    data: &[u8],
) -> Result<T, ModelError> {
    serde_json::from_slice(data).map_err(|e| {
        invalid(
            label,
            format!("{what} is not the expected JSON ({e}): {}", snippet(data)),
        )
    })
}

/// Whether a (successful) response carries JSON rather than an event stream: servers that ignore `stream: true`.
pub(crate) fn is_json(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// A header value that `Debug` output of requests will not show.
pub(crate) fn secret_header(value: &str) -> Result<HeaderValue, ModelError> {
    let mut value = HeaderValue::from_str(value).map_err(|_| ModelError::Auth {
        message: "the API key contains characters not allowed in a header".into(),
    })?;
    value.set_sensitive(true);
    Ok(value)
}

fn snippet(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    truncate(text.trim())
}

fn truncate(text: &str) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_string();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The human part of a provider error body: OpenAI `{"error":{"message"}}`, Anthropic
/// `{"type":"error","error":{"message"}}`, Ollama `{"error":"..."}`; else the raw text.
pub(crate) fn error_text(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let err = v.get("error").unwrap_or(v);
        err.get("message")
            .and_then(|m| m.as_str())
            .or_else(|| err.as_str())
            .map(str::to_string)
    });
    truncate(message.as_deref().unwrap_or(body).trim())
}

fn error_code(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let err = v.get("error")?;
    err.get("code")
        .or_else(|| err.get("type"))
        .and_then(|c| c.as_str())
        .map(str::to_string)
}

fn classify(label: &str, status: StatusCode, body: &str, url: &str, model: &str) -> AttemptError {
    let text = error_text(body);
    let code = error_code(body).unwrap_or_default();
    let detail = if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    };
    let message = format!("{label}: {detail}");
    if code == "model_not_found" || status == StatusCode::NOT_FOUND {
        return AttemptError::fatal(ModelError::UnknownModel {
            model: model.to_string(),
            message: format!("{message} (POST {url}: unknown model, or a wrong base_url)"),
        });
    }
    match status.as_u16() {
        401 | 403 => AttemptError::fatal(ModelError::Auth {
            message: format!("{message} (check the API key)"),
        }),
        408 => AttemptError::transient(ModelError::Timeout { message }),
        // Out of credit is a 429 too, but waiting will not fix it.
        429 if code == "insufficient_quota" => AttemptError::fatal(ModelError::RateLimited { message }),
        429 => AttemptError::transient(ModelError::RateLimited { message }),
        500..=599 => AttemptError::transient(ModelError::Unavailable { message }),
        _ => AttemptError::fatal(ModelError::InvalidRequest { message }),
    }
}

/// `retry-after-ms` (OpenAI) or `retry-after` in seconds. HTTP dates fall back to our own backoff.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    if let Some(ms) = get("retry-after-ms").filter(|ms| ms.is_finite() && *ms >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    get("retry-after")
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

fn with_suffix(error: ModelError, suffix: &str) -> ModelError {
    match error {
        ModelError::Auth { message } => ModelError::Auth {
            message: message + suffix,
        },
        ModelError::UnknownModel { model, message } => ModelError::UnknownModel {
            model,
            message: message + suffix,
        },
        ModelError::RateLimited { message } => ModelError::RateLimited {
            message: message + suffix,
        },
        ModelError::Timeout { message } => ModelError::Timeout {
            message: message + suffix,
        },
        ModelError::InvalidRequest { message } => ModelError::InvalidRequest {
            message: message + suffix,
        },
        ModelError::Unavailable { message } => ModelError::Unavailable {
            message: message + suffix,
        },
        ModelError::InvalidResponse { message } => ModelError::InvalidResponse {
            message: message + suffix,
        },
    }
}

/// Tool-call arguments as the model wrote them → a JSON value: an empty string is `{}`, unparsable text is kept as
/// a string value (the agent loop reports it back as invalid input).
pub(crate) fn parse_arguments(raw: &str) -> serde_json::Value {
    if raw.trim().is_empty() {
        return serde_json::Value::Object(Default::default());
    }
    serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies() {
        assert_eq!(error_text(r#"{"error":{"message":"bad key","type":"x"}}"#), "bad key");
        assert_eq!(
            error_text(r#"{"type":"error","error":{"type":"t","message":"m"}}"#),
            "m"
        );
        assert_eq!(error_text(r#"{"error":"model not found"}"#), "model not found");
        assert_eq!(error_text("plain"), "plain");
        let e = classify(
            "x",
            StatusCode::BAD_REQUEST,
            r#"{"error":{"code":"model_not_found","message":"m"}}"#,
            "u",
            "m1",
        );
        assert!(matches!(e.error, ModelError::UnknownModel { .. }));
    }

    #[test]
    fn arguments() {
        assert_eq!(parse_arguments(""), serde_json::json!({}));
        assert_eq!(parse_arguments(r#"{"a":1}"#), serde_json::json!({"a":1}));
        assert_eq!(parse_arguments(r#"{"a":"#), serde_json::json!(r#"{"a":"#));
    }

    #[test]
    fn retry_after_headers() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
    }
}
