//! Server-Sent Event streams: one job's events (`id:` = the job's sequence number, resumable with
//! `Last-Event-ID`) and a scope's events (`id:` = the store's event id).
//!
//! No gap, no duplicate: the stream subscribes to the live bus *before* it replays the store, so
//! an event committed during the replay is either read back or arrives live; it never emits an
//! event at or below the last sequence it sent; and a live event that does not follow the last
//! one directly (a gap, a lagging subscriber) sends it back to the store, which has them all.
//! Events committed by other processes on the same database arrive by the periodic re-read.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use keel_kernel::event::{EventFilter, EventQuery, EventType, RuntimeEvent, SubscriptionError};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// Events read from the store at once.
const PAGE: u32 = 500;

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

/// Job `job_id`'s events after sequence `after`, then live, until the job ends.
pub(crate) fn job_stream(state: AppState, scope: String, job_id: Uuid, after: u64) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let kernel = state.host.kernel.clone();
        // Before the replay: nothing committed from here on can be missed.
        let mut sub = kernel.subscribe(EventFilter::job(job_id));
        let mut last = after;
        let mut read_store = true;
        let mut ended_live = false;
        loop {
            if read_store {
                let events = match kernel
                    .read_events(&EventQuery {
                        filter: EventFilter::job(job_id),
                        after_seq: last,
                        limit: Some(PAGE),
                        ..EventQuery::default()
                    })
                    .await
                {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::warn!(job = %job_id, error = %e, "event stream stopped");
                        return;
                    }
                };
                let full = events.len() as u32 == PAGE;
                let finishing = ended_live;
                let mut ended = false;
                for e in events {
                    if e.seq <= last {
                        continue;
                    }
                    last = e.seq;
                    ended |= e.ends_job();
                    if tx.send(sse_event(&e, e.seq.to_string())).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                // A read after the job's ending event has the whole final batch: done.
                if ended || finishing {
                    return;
                }
                read_store = false;
                // Nothing more to come for a job that already ended (e.g. a resume after its end).
                if matches!(kernel.jobs().get(&scope, job_id).await, Ok(job) if job.state.is_terminal()) {
                    // Its terminal event may have been committed after the read above.
                    let tail = kernel
                        .read_events(&EventQuery {
                            filter: EventFilter::job(job_id),
                            after_seq: last,
                            ..EventQuery::default()
                        })
                        .await
                        .unwrap_or_default();
                    for e in tail.into_iter().filter(|e| e.seq > last) {
                        if tx.send(sse_event(&e, e.seq.to_string())).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
            }
            tokio::select! {
                _ = state.stopping.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(poll(&state)) => read_store = true,
                got = sub.recv() => match got {
                    Ok(e) if e.seq == last + 1 => {
                        last = e.seq;
                        if tx.send(sse_event(&e, e.seq.to_string())).await.is_err() {
                            return;
                        }
                        // The job's last events are committed together: read the rest of that
                        // batch from the store (the read ends the stream).
                        if e.ends_job() {
                            ended_live = true;
                            read_store = true;
                        }
                    }
                    // Already sent (replayed, or a duplicate delivery).
                    Ok(e) if e.seq <= last => {}
                    // A gap, or events dropped for a slow subscriber: the store has them in order.
                    Ok(_) | Err(SubscriptionError::Lagged(_)) => read_store = true,
                    Err(SubscriptionError::Closed) => return,
                },
            }
        }
    });
    into_sse(rx)
}

/// Every event of `scope` (only `types` if not empty) after store id `after`, then live. Runs
/// until the client goes away or the server stops.
pub(crate) fn scope_stream(state: AppState, scope: String, types: Vec<EventType>, after: i64) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let kernel = state.host.kernel.clone();
        let filter = EventFilter::tenant(scope).with_types(types);
        let mut sub = kernel.subscribe(filter.clone());
        let mut last = after;
        loop {
            // Store ids are global (other scopes' events lie between ours), so every wake-up
            // re-reads the store after the last id sent: in order, once each.
            loop {
                let events = match kernel
                    .read_events(&EventQuery {
                        filter: filter.clone(),
                        after_id: last,
                        limit: Some(PAGE),
                        ..EventQuery::default()
                    })
                    .await
                {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::warn!(error = %e, "scope event stream stopped");
                        return;
                    }
                };
                let n = events.len() as u32;
                for e in events {
                    if e.id <= last {
                        continue;
                    }
                    last = e.id;
                    if tx.send(sse_event(&e, e.id.to_string())).await.is_err() {
                        return;
                    }
                }
                if n < PAGE {
                    break;
                }
            }
            tokio::select! {
                _ = state.stopping.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(poll(&state)) => {}
                got = sub.recv() => if let Err(SubscriptionError::Closed) = got { return },
            }
        }
    });
    into_sse(rx)
}
