//! A job's event stream: the stored events after a sequence number, then the live ones, with no
//! gap and no duplicate, ending after the job's terminal event; plus the signal that the job is
//! waiting for an action. `keel jobs watch`/`keel run` render it on a terminal; the HTTP server
//! serves it as SSE (`id:` = sequence number, resumed with `Last-Event-ID`).
//!
//! How "no gap, no duplicate" holds: the live subscription is opened *before* the first read of
//! the store, and the store commits an event before it is published, so every event is in the
//! store, in the subscription, or both. Events are yielded strictly by sequence number: one
//! already yielded is dropped, and a live event that skips ahead (the subscriber lagged, or another
//! process on the same database wrote it and nothing here was published) sends the stream back
//! to the store from the last one yielded. When nothing arrives for `poll`, the store is read
//! again, which is how events written by other processes arrive.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures::stream::BoxStream;
use keel_kernel::action::{Action, ActionState};
use keel_kernel::event::{EventFilter, EventQuery, EventType, RuntimeEvent, Subscription, SubscriptionError};
use keel_kernel::{IssuedToken, Kernel};
use serde::Serialize;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::caller::{Caller, Role};
use crate::error::AppError;

/// One item of a job's stream.
#[derive(Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobStreamItem {
    /// The next event of the job (sequence numbers 1, 2, 3, ... with no gap).
    Event {
        /// The event.
        event: RuntimeEvent,
    },
    /// The job waits for this action: it was still pending when the stream passed its
    /// `action.required` event. Follows that event.
    Waiting {
        /// The action.
        action: Box<Action>,
        /// Its resume token, when this process issued it (see [`StreamOptions::tokens`]). A
        /// secret: never serialized, never printed by `Debug`.
        #[serde(skip)]
        token: Option<String>,
    },
}

impl std::fmt::Debug for JobStreamItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Event { event } => f.debug_struct("Event").field("event", event).finish(),
            Self::Waiting { action, token } => f
                .debug_struct("Waiting")
                .field("action", action)
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// How a stream follows its job.
#[derive(Debug)]
pub struct StreamOptions {
    /// Yield only events with a sequence number above this (0: from the first; SSE: the
    /// `Last-Event-ID`).
    pub after_seq: u64,
    /// Re-read the store after this long without a live event (events of other processes).
    pub poll: Duration,
    /// Resume tokens issued by this process's agent loops
    /// (`AgentRuntime::issued_tokens`, subscribed before the job started), attached to
    /// [`JobStreamItem::Waiting`].
    pub tokens: Option<broadcast::Receiver<IssuedToken>>,
}

impl StreamOptions {
    /// From `after_seq`, re-reading the store every `poll`, without tokens.
    pub fn after(after_seq: u64, poll: Duration) -> Self {
        Self {
            after_seq,
            poll,
            tokens: None,
        }
    }
}

/// The stream of one of the caller's jobs. Fails at once (not-found) for a job outside the
/// caller's scope. A read error ends the stream after yielding it.
pub async fn job_events(
    kernel: &Kernel,
    caller: &Caller,
    job_id: Uuid,
    options: StreamOptions,
) -> Result<BoxStream<'static, Result<JobStreamItem, AppError>>, AppError> {
    caller.require(Role::Read)?;
    // Subscribe before anything is read: an event committed from now on is in `sub`.
    let sub = kernel.subscribe(EventFilter::job(job_id));
    kernel.jobs().get(&caller.scope, job_id).await?;
    let follower = Follower {
        kernel: kernel.clone(),
        scope: caller.scope.clone(),
        job_id,
        sub: Some(sub),
        last: options.after_seq,
        poll: options.poll.max(Duration::from_millis(1)),
        tokens: options.tokens,
        issued: HashMap::new(),
        buf: VecDeque::new(),
        out: VecDeque::new(),
        read: true,
        ending: false,
        done: false,
    };
    Ok(Box::pin(futures::stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        if item.is_err() {
            f.done = true;
            f.buf.clear();
            f.out.clear();
        }
        Some((item, f))
    })))
}

struct Follower {
    kernel: Kernel,
    scope: String,
    job_id: Uuid,
    /// `None` once the bus closed: the store is polled alone.
    sub: Option<Subscription>,
    /// The last sequence number yielded.
    last: u64,
    poll: Duration,
    tokens: Option<broadcast::Receiver<IssuedToken>>,
    issued: HashMap<Uuid, String>,
    /// Events not yielded yet, in order (from the store or live).
    buf: VecDeque<RuntimeEvent>,
    /// Signals to yield before the next event.
    out: VecDeque<JobStreamItem>,
    /// Read the store before waiting.
    read: bool,
    /// The terminal event was yielded: read the store once more, then end.
    ending: bool,
    done: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<JobStreamItem, AppError>> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return Some(Ok(item));
            }
            if let Some(e) = self.buf.pop_front() {
                if e.seq <= self.last {
                    continue;
                }
                if e.seq != self.last + 1 {
                    // A gap: what is missing is in the store.
                    self.buf.clear();
                    self.read = true;
                    continue;
                }
                self.last = e.seq;
                self.ending |= e.ends_job();
                if e.event_type == EventType::ActionRequired {
                    match self.waiting(&e).await {
                        Ok(Some(item)) => self.out.push_back(item),
                        Ok(None) => {}
                        Err(err) => return Some(Err(err)),
                    }
                }
                return Some(Ok(JobStreamItem::Event { event: e }));
            }
            if self.done {
                return None;
            }
            if self.read {
                self.read = false;
                let events = match self.read_store().await {
                    Ok(events) => events,
                    Err(e) => return Some(Err(e)),
                };
                if !events.is_empty() {
                    self.buf.extend(events);
                    continue;
                }
                if self.ending {
                    // Everything committed with the terminal event has been yielded.
                    self.done = true;
                    return None;
                }
                match self.kernel.jobs().get(&self.scope, self.job_id).await {
                    // Ended without a terminal event this stream recognises: read once more, then stop.
                    Ok(job) if job.state.is_terminal() => {
                        self.ending = true;
                        self.read = true;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => return Some(Err(e.into())),
                }
            } else if self.ending {
                self.read = true;
                continue;
            }
            self.wait().await;
        }
    }

    /// Wait for a live event, or `poll`.
    async fn wait(&mut self) {
        let Some(sub) = self.sub.as_mut() else {
            tokio::time::sleep(self.poll).await;
            self.read = true;
            return;
        };
        tokio::select! {
            live = sub.recv() => match live {
                Ok(e) => self.buf.push_back(e),
                Err(SubscriptionError::Lagged(_)) => self.read = true,
                Err(SubscriptionError::Closed) => {
                    self.sub = None;
                    self.read = true;
                }
            },
            _ = tokio::time::sleep(self.poll) => self.read = true,
        }
    }

    async fn read_store(&self) -> Result<Vec<RuntimeEvent>, AppError> {
        Ok(self
            .kernel
            .read_events(&EventQuery {
                filter: EventFilter::job(self.job_id),
                after_seq: self.last,
                ..EventQuery::default()
            })
            .await?)
    }

    /// Take in the tokens this process issued, until the one of `action` (if this process created
    /// it). A loop sends a token right after the commit that publishes its `action.requested`
    /// event, so this stream can see the event first: it waits a moment for the token rather than
    /// announce the action without it. An action created by another process has no token here;
    /// its signal comes after that moment.
    async fn await_token(&mut self, action: Uuid) {
        let Some(tokens) = self.tokens.as_mut() else { return };
        let job_id = self.job_id;
        let issued = &mut self.issued;
        let _ = tokio::time::timeout(TOKEN_WAIT, async {
            while !issued.contains_key(&action) {
                match tokens.recv().await {
                    Ok(t) if t.job_id == job_id => {
                        issued.insert(t.action_id, t.token);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
        .await;
    }

    /// The waiting signal for the action `e` announced, if it is still pending.
    async fn waiting(&mut self, e: &RuntimeEvent) -> Result<Option<JobStreamItem>, AppError> {
        let action_id = e.data.field("action_id");
        let Some(id) = action_id
            .as_ref()
            .and_then(|v| v.as_str())
            .and_then(|s| Uuid::parse_str(s).ok())
        else {
            return Ok(None);
        };
        let action = self.kernel.actions().get(&self.scope, id).await?;
        if action.state != ActionState::Pending {
            return Ok(None);
        }
        self.await_token(id).await;
        Ok(Some(JobStreamItem::Waiting {
            token: self.issued.get(&id).cloned(),
            action: Box::new(action),
        }))
    }
}

/// How long a job stream waits for the resume token of an approval its own process created
/// (sent just after the commit that announced it).
const TOKEN_WAIT: Duration = Duration::from_millis(500);

/// Events read from the store at once by [`scope_events`].
const SCOPE_PAGE: u32 = 500;

/// Every event of the caller's scope (only `types`, when not empty) whose store id is above
/// `after_id`, then the live ones, in store-id order, each once (the approvals page follows
/// `action.*` events this way; the HTTP server serves it as SSE with `id:` = the store id).
/// Store ids are global (other scopes' events lie between ours), so every live wake-up and
/// every `poll` re-reads the store after the last id yielded. Ends only when the event bus
/// closes; a read error ends it after yielding the error.
pub async fn scope_events(
    kernel: &Kernel,
    caller: &Caller,
    types: Vec<EventType>,
    after_id: i64,
    poll: Duration,
) -> Result<BoxStream<'static, Result<RuntimeEvent, AppError>>, AppError> {
    caller.require(Role::Read)?;
    let filter = EventFilter::tenant(caller.scope.clone()).with_types(types);
    // Subscribed before the first read: nothing committed from now on is missed.
    let sub = kernel.subscribe(filter.clone());
    let state = ScopeFollower {
        kernel: kernel.clone(),
        filter,
        sub,
        last: after_id,
        poll: poll.max(Duration::from_millis(1)),
        buf: VecDeque::new(),
        read: true,
        done: false,
    };
    Ok(Box::pin(futures::stream::unfold(state, |mut f| async move {
        let item = f.next().await?;
        if item.is_err() {
            f.done = true;
        }
        Some((item, f))
    })))
}

struct ScopeFollower {
    kernel: Kernel,
    filter: EventFilter,
    sub: Subscription,
    last: i64,
    poll: Duration,
    buf: VecDeque<RuntimeEvent>,
    /// Read the store before waiting again.
    read: bool,
    done: bool,
}

impl ScopeFollower {
    async fn next(&mut self) -> Option<Result<RuntimeEvent, AppError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(e) = self.buf.pop_front() {
                if e.id <= self.last {
                    continue;
                }
                self.last = e.id;
                return Some(Ok(e));
            }
            if self.read {
                let query = EventQuery {
                    filter: self.filter.clone(),
                    after_id: self.last,
                    limit: Some(SCOPE_PAGE),
                    ..EventQuery::default()
                };
                let events = match self.kernel.read_events(&query).await {
                    Ok(events) => events,
                    Err(e) => return Some(Err(e.into())),
                };
                // A full page: more may follow at once.
                self.read = events.len() as u32 == SCOPE_PAGE;
                self.buf.extend(events);
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                got = self.sub.recv() => if let Err(SubscriptionError::Closed) = got {
                    return None;
                },
            }
            self.read = true;
        }
    }
}
