//! Server-Sent Event streams: one job's events (`id:` = the job's sequence number, resumable with
//! `Last-Event-ID`) and a scope's events (`id:` = the store's event id), both the streams of
//! `keel_app::events` (which keep "no gap, no duplicate"), served until the client goes away or
//! the server stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use keel_app::Caller;
use keel_app::events::{JobStreamItem, StreamOptions};
use keel_kernel::event::{EventType, RuntimeEvent};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// The `Last-Event-ID` header as a number, if sent.
pub(crate) fn last_event_id(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID is not an event sequence number"))
        })
        .transpose()
}

fn sse_event(e: &RuntimeEvent, id: String) -> Event {
    Event::default()
        .id(id)
        .event(e.event_type.as_str())
        .json_data(e)
        .unwrap_or_else(|_| Event::default().comment("unserializable event"))
}

fn into_sse(rx: mpsc::Receiver<Event>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// How often a stream re-reads the store for events of other processes.
fn poll(state: &AppState) -> Duration {
    state.host.poll.clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Job `job_id`'s events after sequence `after`, then live, until the job ends
/// (`keel_app::events::job_events`: no gap, no duplicate).
pub(crate) fn job_stream(state: AppState, caller: Caller, job_id: Uuid, after: u64) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let options = StreamOptions::after(after, poll(&state));
        let mut events = match keel_app::events::job_events(&state.host.kernel, &caller, job_id, options).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e.message, "event stream not opened");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = state.stopping.cancelled() => return,
                _ = tx.closed() => return,
                item = events.next() => match item {
                    // The stream ends after the job's terminal event.
                    None => return,
                    Some(Ok(JobStreamItem::Event { event })) => {
                        if tx.send(sse_event(&event, event.seq.to_string())).await.is_err() {
                            return;
                        }
                    }
                    // The "waiting for an action" signal: its `action.required` event was sent.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(job = %job_id, error = %e.message, "event stream stopped");
                        return;
                    }
                },
            }
        }
    });
    into_sse(rx)
}

/// Every event of the caller's scope (only `types` if not empty) after store id `after`, then
/// live (`keel_app::events::scope_events`). Runs until the client goes away or the server stops.
pub(crate) fn scope_stream(state: AppState, caller: Caller, types: Vec<EventType>, after: i64) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let kernel = &state.host.kernel;
        let mut events = match keel_app::events::scope_events(kernel, &caller, types, after, poll(&state)).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e.message, "scope event stream not opened");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = state.stopping.cancelled() => return,
                _ = tx.closed() => return,
                item = events.next() => match item {
                    None => return,
                    Some(Ok(event)) => {
                        if tx.send(sse_event(&event, event.id.to_string())).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e.message, "scope event stream stopped");
                        return;
                    }
                },
            }
        }
    });
    into_sse(rx)
}
