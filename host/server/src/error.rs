//! The API's one error shape: `{"error": {"code": "...", "message": "..."}}` with a stable code.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_app::{AppError, ErrorKind};
use keel_kernel::KernelError;
use serde_json::json;

/// A failed request: HTTP status, stable machine code, one sentence.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (`not_found`, `forbidden`, `invalid_request`, ...).
    pub code: &'static str,
    /// One sentence for humans.
    pub message: String,
    /// Seconds to wait (429 only), sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

/// Handlers' result.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with `status` and `code`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`: also what a caller gets for another scope's resources.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{} not found", what.into()))
    }

    /// 403 `forbidden`: the caller's role is too low within its own scope.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 409 with `code`.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = ?self.message, "request failed");
        }
        let mut response = (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        if let Some(secs) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<KernelError> for ApiError {
    fn from(e: KernelError) -> Self {
        use KernelError as E;
        let message = e.to_string();
        match e {
            // A resume token that matches nothing is "not found" like any other id.
            E::JobNotFound(_) | E::ActionNotFound(_) | E::InvalidToken | E::ReservationNotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            E::IdempotencyKeyReused { .. } => Self::conflict("idempotency_key_reused", message),
            E::ActionNotPending { .. } => Self::conflict("action_not_pending", message),
            E::ActionExpired(_) => Self::conflict("action_expired", message),
            E::IllegalTransition { .. } | E::ReservationState { .. } => Self::conflict("illegal_transition", message),
            E::CallDigestMismatch(_) | E::Invalid(_) => Self::invalid(message),
            E::BudgetExceeded(_) => Self::new(StatusCode::PAYMENT_REQUIRED, "budget_exceeded", message),
            E::Contention(_) | E::EventsClosed | E::Store(_) => Self::internal(message),
        }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        // The kernel's refusals keep their stable code (and so their status) through keel-app.
        match e.code {
            Some(code @ "budget_exceeded") => return Self::new(StatusCode::PAYMENT_REQUIRED, code, e.message),
            Some(
                code @ ("action_not_pending" | "action_expired" | "illegal_transition" | "idempotency_key_reused"),
            ) => {
                return Self::conflict(code, e.message);
            }
            _ => {}
        }
        match e.kind {
            ErrorKind::User => Self::invalid(e.message),
            ErrorKind::Plugin => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "plugin_failed", e.message),
            ErrorKind::Internal => Self::internal(e.message),
            ErrorKind::NotFound => Self::new(StatusCode::NOT_FOUND, "not_found", e.message),
            ErrorKind::Forbidden => Self::forbidden(e.message),
        }
    }
}

impl From<keel_kernel::agent::AgentError> for ApiError {
    fn from(e: keel_kernel::agent::AgentError) -> Self {
        match e {
            keel_kernel::agent::AgentError::Invalid(m) => Self::invalid(m),
            keel_kernel::agent::AgentError::Kernel(k) => k.into(),
        }
    }
}

/// Give axum's own rejections (a body that is not JSON, a missing field, a wrong method, a body
/// too large: plain text) the API's error shape, so every error a client sees is
/// `{"error": {"code", "message"}}`.
pub(crate) async fn json_rejections(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "invalid_request",
    };
    let body = axum::body::to_bytes(response.into_body(), 64 << 10)
        .await
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&body).trim().to_string();
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("bad request").to_string()
    } else {
        message
    };
    ApiError::new(status, code, message).into_response()
}
