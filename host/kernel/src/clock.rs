//! Time source for the kernel.
//!
//! Every decision that depends on time (deadlines, expiry, budget windows) reads a [`Clock`], so
//! tests can drive time explicitly. Timestamps are truncated to microseconds: that is what the
//! durable stores keep, so a value read back equals the value written.

use std::sync::Mutex;

use chrono::{DateTime, Duration, Timelike, Utc};

/// A source of "now".
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time, truncated to microseconds.
    fn now(&self) -> DateTime<Utc>;
}

/// Truncate a timestamp to the microsecond precision the stores keep.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    // Only the fraction of the second changes (never negative in chrono's representation, so
    // this is a floor, like the stores' integer microseconds); cheaper than `duration_trunc`,
    // which divides the whole timestamp, on every `now()`.
    t.with_nanosecond(t.nanosecond() / 1_000 * 1_000).unwrap_or(t)
}

/// The system wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        truncate_micros(Utc::now())
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Mutex::new(truncate_micros(start)),
        }
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Set the clock to `to`.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = truncate_micros(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DurationRound, TimeZone};

    use super::*;

    /// The same instant the stores' integer microseconds give back, before and after the epoch.
    #[test]
    fn truncation_keeps_whole_microseconds() {
        let cases = [
            Utc.timestamp_opt(1_764_000_000, 123_456_789).unwrap(),
            Utc.timestamp_opt(0, 999).unwrap(),
            Utc.timestamp_opt(-1, 999_999_999).unwrap(),
            Utc.timestamp_opt(-86_400 * 400, 1_500).unwrap(),
        ];
        for t in cases {
            let truncated = truncate_micros(t);
            assert_eq!(truncated, t.duration_trunc(Duration::microseconds(1)).unwrap(), "{t}");
            assert_eq!(
                DateTime::from_timestamp_micros(truncated.timestamp_micros()),
                Some(truncated),
                "{t}"
            );
        }
    }
}
