//! Runtime events: every state change, persisted with a per-job sequence number and broadcast live.
//!
//! Events are written in the same store transaction as the change that caused them, and only
//! published on the [`EventBus`] after that transaction commits, so a subscriber never sees an
//! event that a reader of the store could not. A reader that missed events (lag, restart, SSE
//! reconnect) catches up with `KernelStore::read_events` from the last sequence it saw.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::action::string_enum;
use crate::json::JsonText;

string_enum! {
    /// The seed event types.
    EventType, "event type" {
        /// Job progress update.
        Progress => "progress",
        /// A streamed model output token (or chunk).
        ModelToken => "model.token",
        /// A streamed model reasoning chunk.
        ModelReasoning => "model.reasoning",
        /// A model call finished.
        ModelDone => "model.done",
        /// A tool call started.
        ToolStart => "tool.start",
        /// A tool call returned.
        ToolEnd => "tool.end",
        /// A tool call failed.
        ToolError => "tool.error",
        /// A human action was requested.
        ActionRequired => "action.required",
        /// A human action was resolved.
        ActionResolved => "action.resolved",
        /// A human action expired.
        ActionExpired => "action.expired",
        /// A human action was cancelled.
        ActionCancelled => "action.cancelled",
        /// An artifact was created.
        ArtifactCreated => "artifact.created",
        /// An artifact was updated.
        ArtifactUpdated => "artifact.updated",
        /// The job started running.
        JobStarted => "job.started",
        /// The job changed state (other than the transitions with their own type).
        JobStatusChanged => "job.status_changed",
        /// The job succeeded.
        JobCompleted => "job.completed",
        /// The job failed.
        JobFailed => "job.failed",
        /// The job was cancelled.
        JobCancelled => "job.cancelled",
        /// The final result of a run.
        FinalResult => "final.result",
        /// The final error of a run.
        FinalError => "final.error",
    }
}

/// An event to be persisted; the store assigns `id` and `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Job the event belongs to.
    pub job_id: Uuid,
    /// Tenant scope (the job's).
    pub tenant: String,
    /// Type.
    pub event_type: EventType,
    /// Type-specific payload (JSON).
    pub data: JsonText,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// A persisted event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeEvent {
    /// Store-wide, monotonically increasing id (ordering across jobs).
    pub id: i64,
    /// Per-job sequence number: 1, 2, 3, ... with no gaps.
    pub seq: u64,
    /// Job.
    pub job_id: Uuid,
    /// Tenant.
    pub tenant: String,
    /// Type.
    pub event_type: EventType,
    /// Payload (JSON).
    pub data: JsonText,
    /// When it happened.
    pub at: DateTime<Utc>,
}

impl RuntimeEvent {
    /// Whether this event marks the end of its job (a final result/error, a terminal job event,
    /// or a status change into a terminal state): a follower can stop after it.
    pub fn ends_job(&self) -> bool {
        match self.event_type {
            EventType::FinalResult
            | EventType::FinalError
            | EventType::JobCompleted
            | EventType::JobFailed
            | EventType::JobCancelled => true,
            EventType::JobStatusChanged => self
                .data
                .field("to")
                .and_then(|v| serde_json::from_value::<crate::job::JobState>(v).ok())
                .is_some_and(crate::job::JobState::is_terminal),
            _ => false,
        }
    }
}

/// Which events a subscriber or reader wants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this job.
    pub job_id: Option<Uuid>,
    /// Only these types (any if empty).
    pub types: Vec<EventType>,
}

impl EventFilter {
    /// Every event of one job.
    pub fn job(job_id: Uuid) -> Self {
        Self {
            job_id: Some(job_id),
            ..Default::default()
        }
    }

    /// Every event of one tenant.
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Self {
            tenant: Some(tenant.into()),
            ..Default::default()
        }
    }

    /// Restrict to `types`.
    pub fn with_types(mut self, types: impl IntoIterator<Item = EventType>) -> Self {
        self.types = types.into_iter().collect();
        self
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &RuntimeEvent) -> bool {
        self.tenant.as_ref().is_none_or(|t| &event.tenant == t)
            && self.job_id.is_none_or(|j| event.job_id == j)
            && (self.types.is_empty() || self.types.contains(&event.event_type))
    }
}

/// A read from the persisted event log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventQuery {
    /// Which events.
    pub filter: EventFilter,
    /// Only events with `seq > after_seq` (meaningful with a job filter; SSE resume).
    pub after_seq: u64,
    /// Only events with `id > after_id` (store-wide cursor).
    pub after_id: i64,
    /// At most this many, in order.
    pub limit: Option<u32>,
}

/// Live fan-out of committed events (in-process).
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<RuntimeEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl EventBus {
    /// A bus buffering up to `capacity` events per slow subscriber before it lags.
    pub fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Publish committed events. Having no subscribers is fine.
    pub fn publish(&self, events: impl IntoIterator<Item = RuntimeEvent>) {
        for event in events {
            let _ = self.tx.send(event);
        }
    }

    /// Whether anyone is subscribed: publishing to nobody need not copy the events.
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Subscribe to events matching `filter`, from now on.
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            filter,
        }
    }
}

/// Why a subscription yielded no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The subscriber fell behind and `0` events were dropped; re-read from the store.
    #[error("subscriber lagged; {0} events skipped")]
    Lagged(u64),
    /// The bus is gone.
    #[error("event bus closed")]
    Closed,
}

/// A filtered live subscription.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<RuntimeEvent>,
    filter: EventFilter,
}

impl Subscription {
    /// The next matching event.
    pub async fn recv(&mut self) -> Result<RuntimeEvent, SubscriptionError> {
        loop {
            match self.rx.recv().await {
                Ok(event) if self.filter.matches(&event) => return Ok(event),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Err(SubscriptionError::Lagged(n));
                }
                Err(broadcast::error::RecvError::Closed) => return Err(SubscriptionError::Closed),
            }
        }
    }

    /// The filter.
    pub fn filter(&self) -> &EventFilter {
        &self.filter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_seed_types_with_stable_names() {
        assert_eq!(EventType::ALL.len(), 20);
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().unwrap(), *t);
            assert_eq!(serde_json::to_value(t).unwrap(), serde_json::json!(t.as_str()));
        }
    }
}
