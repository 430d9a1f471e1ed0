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

/// What a status event says besides `from` and `to`: each field that is set is written. Typed,
/// so no detail can repeat or overwrite `from` or `to`.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub(crate) struct StatusDetail<'a> {
    /// Why the job moved (an error, a cancellation, its parent's end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// The runner that claimed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<&'a str>,
    /// The action it waits for or was resumed by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_id: Option<uuid::Uuid>,
    /// Where its result is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<&'a str>,
}

/// The event announcing `from -> next`, with `detail`.
pub(crate) fn status_event(from: JobState, next: &Job, detail: StatusDetail<'_>, now: DateTime<Utc>) -> NewEvent {
    let event_type = match (from, next.state) {
        (JobState::Queued, JobState::Running) => EventType::JobStarted,
        (_, JobState::Succeeded) => EventType::JobCompleted,
        (_, JobState::Failed) => EventType::JobFailed,
        (_, JobState::Cancelled) => EventType::JobCancelled,
        _ => EventType::JobStatusChanged,
    };
    #[derive(Serialize)]
    struct Status<'a> {
        from: JobState,
        to: JobState,
        #[serde(flatten)]
        detail: StatusDetail<'a>,
    }
    let data = JsonText::of(&Status {
        from,
        to: next.state,
        detail,
    })
    .expect("a status event serialises");
    job_event(next, event_type, data, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::NewJob;

    #[test]
    fn a_status_event_writes_its_transition_once_and_each_detail_that_is_set() {
        let now = Utc::now();
        let mut job = Job::queued(NewJob::new("t1", "agent"), None, now);
        job.state = JobState::Running;
        let action = uuid::Uuid::new_v4();
        let detail = StatusDetail {
            reason: Some("because"),
            owner: Some("runner-1"),
            action_id: Some(action),
            result_ref: None,
        };
        let event = status_event(JobState::Queued, &job, detail, now);
        assert_eq!(event.event_type, EventType::JobStarted);
        assert_eq!(
            event.data.value(),
            json!({"from": "QUEUED", "to": "RUNNING", "reason": "because", "owner": "runner-1", "action_id": action})
        );
        for key in ["\"from\"", "\"to\"", "\"reason\""] {
            assert_eq!(event.data.as_str().matches(key).count(), 1, "{}", event.data.as_str());
        }
        let bare = status_event(JobState::Running, &job, StatusDetail::default(), now);
        assert_eq!(bare.data.value(), json!({"from": "RUNNING", "to": "RUNNING"}));
    }
}
