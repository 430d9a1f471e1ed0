//! The events the managers emit with their writes.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use crate::action::Action;
use crate::event::{EventType, NewEvent};
use crate::job::{Job, JobState};
use crate::json::JsonText;

pub(crate) fn job_event(job: &Job, event_type: EventType, data: impl Into<JsonText>, at: DateTime<Utc>) -> NewEvent {
    NewEvent {
        job_id: job.id,
        tenant: job.tenant.clone(),
        event_type,
        data: data.into(),
        at,
    }
}

pub(crate) fn action_event(a: &Action, event_type: EventType, at: DateTime<Utc>) -> NewEvent {
    let data = json!({
        "action_id": a.id,
        "action_type": a.action_type,
        "title": a.title,
        "state": a.state,
        "request": a.request,
        "call_digest": a.call_digest,
        "expires_at": a.expires_at,
        "resolution": a.resolution,
    });
    NewEvent {
        job_id: a.job_id,
        tenant: a.tenant.clone(),
        event_type,
        data: data.into(),
        at,
    }
}

/// The event announcing `from -> next`.
pub(crate) fn status_event(from: JobState, next: &Job, extra: serde_json::Value, now: DateTime<Utc>) -> NewEvent {
    let event_type = match (from, next.state) {
        (JobState::Queued, JobState::Running) => EventType::JobStarted,
        (_, JobState::Succeeded) => EventType::JobCompleted,
        (_, JobState::Failed) => EventType::JobFailed,
        (_, JobState::Cancelled) => EventType::JobCancelled,
        _ => EventType::JobStatusChanged,
    };
    /// `{"from", "to"}` and the caller's fields, serialised at once.
    #[derive(Serialize)]
    struct Status<'a> {
        from: JobState,
        to: JobState,
        #[serde(flatten)]
        extra: &'a serde_json::Map<String, serde_json::Value>,
    }
    let none = serde_json::Map::new();
    let extra = extra.as_object().unwrap_or(&none);
    let data = JsonText::of(&Status {
        from,
        to: next.state,
        extra,
    })
    .expect("a status event serialises");
    job_event(next, event_type, data, now)
}
