//! Streamable HTTP sessions belong to the key that opened them.
//!
//! rmcp's session manager knows a session only by its `Mcp-Session-Id`; whoever presents the id
//! is served, including the session's server-to-client requests (an approval elicitation, with
//! the call's arguments) and their answers. An id is not a secret (it is recorded as the Keel
//! session of every job the session starts, which any key of the scope may list), so each session
//! is bound here to the API key ([`KeyId`]) and [`Caller`] whose `initialize` opened it: any other
//! key presenting it — another scope's, or one with the same scope, role and name (key names need
//! not be unique) — gets 404, as if it did not exist. And one key may hold only so many sessions
//! at once (each keeps a worker and its buffers in memory until it closes or idles out). A front
//! end that authenticates without keys binds sessions to the caller alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use http::{Method, StatusCode, header};
use keel_app::Caller;
use keel_app::keys::KeyId;

/// The most sessions one caller (one API key) may hold open at once.
pub const MAX_PER_CALLER: usize = 32;

/// The header that names a session.
const SESSION_ID: &str = "mcp-session-id";

/// The owner of every live session, by session id.
#[derive(Debug)]
pub struct Owners {
    sessions: Mutex<HashMap<String, Owned>>,
    /// A session unused for this long has been closed by rmcp (its keep-alive).
    idle: Option<Duration>,
    max_per_caller: usize,
}

#[derive(Debug)]
struct Owned {
    owner: Owner,
    last_used: Instant,
}

/// Who opened a session: the caller, and the key it authenticated with (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    caller: Caller,
    key: Option<KeyId>,
}

impl Owners {
    /// Owners of sessions that rmcp closes after `idle` without a request (`None`: never), at
    /// most `max_per_caller` of them per caller.
    pub fn new(idle: Option<Duration>, max_per_caller: usize) -> Self {
        Self {
            sessions: Mutex::default(),
            idle,
            max_per_caller,
        }
    }

    /// Whether `owner` owns session `id` (marking it used).
    fn owns(&self, id: &str, owner: &Owner) -> bool {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        match sessions.get_mut(id) {
            Some(owned) if owned.owner == *owner => {
                owned.last_used = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Whether `owner` may open another session (forgetting sessions rmcp has idled out).
    fn may_open(&self, owner: &Owner) -> bool {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(idle) = self.idle {
            sessions.retain(|_, owned| owned.last_used.elapsed() < idle);
        }
        sessions.values().filter(|owned| owned.owner == *owner).count() < self.max_per_caller
    }

    fn open(&self, id: String, owner: Owner) {
        let owned = Owned {
            owner,
            last_used: Instant::now(),
        };
        self.sessions.lock().expect("sessions lock").insert(id, owned);
    }

    fn close(&self, id: &str) {
        self.sessions.lock().expect("sessions lock").remove(id);
    }
}

/// The layer in front of rmcp's service: 401 without a caller; 404 for a session the caller (its
/// key) does not own; 429 for a new session past the key's limit; records who opened each session.
pub async fn guard(State(owners): State<Arc<Owners>>, request: Request, next: Next) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return refusal(StatusCode::UNAUTHORIZED, "unauthorized", "an API key is required");
    };
    let owner = Owner {
        caller,
        key: request.extensions().get::<KeyId>().cloned(),
    };
    let session = request
        .headers()
        .get(SESSION_ID)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    match session {
        Some(id) => {
            if !owners.owns(&id, &owner) {
                return refusal(StatusCode::NOT_FOUND, "not_found", "no such MCP session");
            }
            let closing = request.method() == Method::DELETE;
            let response = next.run(request).await;
            if closing && response.status().is_success() {
                owners.close(&id);
            }
            response
        }
        None => {
            if !owners.may_open(&owner) {
                return refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_sessions",
                    &format!(
                        "this key has {} MCP sessions open: close one (DELETE /mcp with its Mcp-Session-Id) or let it idle out",
                        owners.max_per_caller
                    ),
                );
            }
            let response = next.run(request).await;
            if let Some(id) = response.headers().get(SESSION_ID).and_then(|v| v.to_str().ok()) {
                owners.open(id.to_string(), owner);
            }
            response
        }
    }
}

/// A JSON error body in the shape of the rest of the API.
fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
