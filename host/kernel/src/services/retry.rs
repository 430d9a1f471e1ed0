//! The one retry helper for store writes: optimistic-concurrency retries (re-read and re-check
//! after a lost version race) and busy retries (the same write again, with exponential backoff,
//! after the database was only locked). Every manager and the agent loop retry through these, so
//! the bounds and the classification of "retryable" live in one place.

use std::future::Future;
use std::time::Duration;

use crate::error::{KernelError, KernelResult};
use crate::store::{StoreError, StoreResult};

/// What one attempt of an optimistic read-check-write decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt<T> {
    /// Finished (written, or nothing to write): stop with this value.
    Done(T),
    /// Lost a race (another writer won): re-read and try again.
    Retry,
}

impl<T> Attempt<T> {
    /// The same decision with the finished value mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Attempt::Done(v) => Attempt::Done(f(v)),
            Attempt::Retry => Attempt::Retry,
        }
    }
}

/// A lost optimistic-concurrency race on a job or action row: re-read and retry. (A `lease` or
/// `journal` conflict from an agent-loop batch is final: retrying cannot succeed.)
pub fn is_conflict(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Conflict {
            entity: "job" | "action",
            ..
        }
    )
}

/// Classify a commit's result for [`optimistic`]: success is `Done`, a lost race on a job or
/// action row ([`is_conflict`]) is `Retry`, anything else is an error.
pub fn on_conflict<T>(result: StoreResult<T>) -> KernelResult<Attempt<T>> {
    match result {
        Ok(v) => Ok(Attempt::Done(v)),
        Err(e) if is_conflict(&e) => Ok(Attempt::Retry),
        Err(e) => Err(e.into()),
    }
}

/// Run `attempt` (read, check, write) until it is `Done` or fails, at most `max_attempts` times
/// (at least once); after that many lost races, fail with `exhausted()` (the managers use
/// [`KernelError::Contention`]). Nothing is ever silently overwritten: each attempt re-reads.
///
/// `attempt` returns a fresh future per call (`|| async move { .. }` over borrowed state), not an
/// `async` closure: the future of an `AsyncFnMut` call cannot yet be proven `Send` for every
/// borrow of the closure, and the managers' futures must be `Send`.
pub async fn optimistic<T, E, F, Fut>(max_attempts: u32, mut attempt: F, exhausted: impl FnOnce() -> E) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Attempt<T>, E>>,
{
    for _ in 0..max_attempts.max(1) {
        if let Attempt::Done(v) = attempt().await? {
            return Ok(v);
        }
    }
    Err(exhausted())
}

/// An error that may go away if the same call is simply repeated (the database was busy).
pub trait Transient {
    /// Whether repeating the same call may succeed.
    fn is_transient(&self) -> bool;
}

impl Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

impl Transient for KernelError {
    fn is_transient(&self) -> bool {
        matches!(self, KernelError::Store(e) if e.is_transient())
    }
}

/// How often and how patiently to repeat a call that failed only because the database was busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Calls in all (the first included).
    pub attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub first_wait: Duration,
}

/// The default for busy writes: 6 calls, waiting 50, 100, 200, 400 and 800 ms between them
/// (another process held the SQLite lock past its busy timeout).
pub const BUSY: Backoff = Backoff {
    attempts: 6,
    first_wait: Duration::from_millis(50),
};

/// Run `call` until it succeeds or fails with a non-[`Transient`] error, at most
/// `backoff.attempts` times, sleeping with exponential backoff between attempts. The call must be
/// safe to repeat: a transient failure applied nothing.
pub async fn retry_transient<T, E, F, Fut>(backoff: Backoff, mut call: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut wait = backoff.first_wait;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.is_transient() && attempt < backoff.attempts => {
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn optimistic_retries_lost_races_then_gives_up() {
        let mut calls = 0;
        let done: Result<u32, KernelError> = optimistic(
            5,
            || {
                calls += 1;
                let n = calls;
                async move { Ok(if n < 3 { Attempt::Retry } else { Attempt::Done(n) }) }
            },
            || KernelError::Contention("x".into()),
        )
        .await;
        assert_eq!(done.unwrap(), 3);

        let mut calls = 0;
        let exhausted: Result<(), KernelError> = optimistic(
            4,
            || {
                calls += 1;
                async { Ok(Attempt::Retry) }
            },
            || KernelError::Contention("x".into()),
        )
        .await;
        assert!(matches!(exhausted, Err(KernelError::Contention(_))));
        assert_eq!(calls, 4);
    }

    #[test]
    fn only_job_and_action_conflicts_are_retried() {
        let conflict = |entity| StoreError::Conflict { entity, id: "1".into() };
        assert_eq!(on_conflict::<()>(Err(conflict("job"))).unwrap(), Attempt::Retry);
        assert_eq!(on_conflict::<()>(Err(conflict("action"))).unwrap(), Attempt::Retry);
        assert!(on_conflict::<()>(Err(conflict("lease"))).is_err());
        assert!(on_conflict::<()>(Err(StoreError::Busy("locked".into()))).is_err());
        assert_eq!(on_conflict(Ok(7)).unwrap(), Attempt::Done(7));
    }

    #[tokio::test]
    async fn transient_errors_are_retried_with_backoff_up_to_the_bound() {
        let quick = Backoff {
            attempts: 6,
            first_wait: Duration::from_millis(1),
        };
        let start = std::time::Instant::now();
        let mut calls = 0;
        let r: StoreResult<()> = retry_transient(quick, || {
            calls += 1;
            async { Err(StoreError::Busy("locked".into())) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 6);
        assert!(
            start.elapsed() >= Duration::from_millis(1 + 2 + 4 + 8 + 16),
            "it backs off"
        );

        let mut calls = 0;
        let r: KernelResult<()> = retry_transient(quick, || {
            calls += 1;
            async { Err(KernelError::Invalid("no".into())) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "a non-transient error is final");
    }
}
