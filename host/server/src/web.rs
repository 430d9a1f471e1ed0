//! The approvals page: one HTML file with a little JavaScript, embedded in the binary, no
//! front-end build. It asks for an API key once, trades it for a session cookie
//! (`POST /v1/session`), lists the scope's pending actions (tool, arguments, job) and follows
//! `action.*` events over SSE; Approve, Deny and Approve for session call the API.
//!
//! The page itself holds no data and needs no key; every request it makes is authenticated.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// The page (`web/approvals.html`).
const PAGE: &str = include_str!("../web/approvals.html");

/// Its script (`web/approvals.js`), served from this origin so the page's CSP needs no inline script.
const SCRIPT: &str = include_str!("../web/approvals.js");

pub(crate) fn router() -> Router {
    Router::new()
        .route("/", get(page))
        .route("/approvals", get(page))
        .route("/approvals.js", get(script))
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        SCRIPT,
    )
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Only this page's own script and the same origin; no framing (clickjacking).
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}
