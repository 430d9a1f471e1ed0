//! The table of live sessions (see [`crate::config::SessionConfig`]): instances kept between the
//! calls that name the same `session_id`.
//!
//! A session id is the caller's claim, so it is never a key on its own: the key also holds the
//! plugin (component hash and installed name) and the call's scope and principal, so another
//! scope or principal that names the same id gets a session of its own, never this one.
//!
//! Each session is a slot behind an async mutex: calls of one session run one after the other,
//! and a session in use (its slot held by a call) is never expired or evicted under that call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::SessionConfig;

/// Who owns a session, and which.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    /// `sha256/name` of the plugin.
    pub plugin: String,
    /// The call's tenant scope.
    pub scope: String,
    /// The call's principal.
    pub principal: Option<String>,
    /// The id the caller chose.
    pub id: String,
}

/// A session's state; `None` between its creation and its first call's end, or after a call
/// left the instance unusable.
pub(crate) type Slot<T> = Arc<tokio::sync::Mutex<Option<T>>>;

struct Entry<T> {
    slot: Slot<T>,
    last_used: Instant,
}

impl<T> Entry<T> {
    /// Held by a call right now (the table holds one reference, a call another).
    fn busy(&self) -> bool {
        Arc::strong_count(&self.slot) > 1
    }
}

/// Live sessions.
pub(crate) struct Sessions<T> {
    entries: HashMap<SessionKey, Entry<T>>,
    config: SessionConfig,
}

impl<T> Sessions<T> {
    pub(crate) fn new(config: SessionConfig) -> Self {
        Self {
            entries: HashMap::new(),
            config,
        }
    }

    /// The slot of `key`, created when new. Idle sessions past their TTL are dropped first; when
    /// the table is full, the least recently used idle session is dropped to make room.
    pub(crate) fn slot(&mut self, key: &SessionKey, now: Instant) -> Result<Slot<T>, String> {
        self.expire(now);
        if let Some(entry) = self.entries.get_mut(key) {
            entry.last_used = now;
            return Ok(entry.slot.clone());
        }
        if self.entries.len() >= self.config.max_live {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| !e.busy())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(victim) => {
                    tracing::debug!(session = ?victim.id, "session evicted (least recently used)");
                    self.entries.remove(&victim);
                }
                None => {
                    return Err(format!(
                        "all {} live sessions are running calls; the limit is {} live sessions",
                        self.entries.len(),
                        self.config.max_live
                    ));
                }
            }
        }
        let slot: Slot<T> = Arc::default();
        self.entries.insert(
            key.clone(),
            Entry {
                slot: slot.clone(),
                last_used: now,
            },
        );
        Ok(slot)
    }

    /// A call of `key` ended at `now`: its idle time starts again.
    pub(crate) fn touch(&mut self, key: &SessionKey, now: Instant) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.last_used = now;
        }
    }

    /// Drop the session `key` if `slot` is still its slot (the call that found it unusable).
    pub(crate) fn remove(&mut self, key: &SessionKey, slot: &Slot<T>) {
        if self.entries.get(key).is_some_and(|e| Arc::ptr_eq(&e.slot, slot)) {
            self.entries.remove(key);
        }
    }

    /// Drop the idle sessions whose TTL has passed.
    pub(crate) fn expire(&mut self, now: Instant) {
        let ttl = self.config.ttl;
        self.entries
            .retain(|_, e| e.busy() || now.saturating_duration_since(e.last_used) < ttl);
    }

    /// How many sessions are live.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(scope: &str, id: &str) -> SessionKey {
        SessionKey {
            plugin: "sha/p".into(),
            scope: scope.into(),
            principal: None,
            id: id.into(),
        }
    }

    #[test]
    fn scoped_expiring_and_bounded() {
        let config = SessionConfig {
            ttl: Duration::from_secs(10),
            max_live: 2,
            max_id_bytes: 16,
        };
        let mut table: Sessions<u32> = Sessions::new(config);
        let t0 = Instant::now();
        let a = table.slot(&key("s1", "x"), t0).unwrap();
        *a.try_lock().unwrap() = Some(1);
        // Another scope naming the same id gets another slot.
        let b = table.slot(&key("s2", "x"), t0 + Duration::from_secs(1)).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&a, &table.slot(&key("s1", "x"), t0).unwrap()));
        drop((a, b));
        // Full: the least recently used idle one (s2, used at t0+1 < the s1 touch at t0+2) goes.
        table.touch(&key("s1", "x"), t0 + Duration::from_secs(2));
        let c = table.slot(&key("s3", "x"), t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(table.len(), 2);
        let again = table.slot(&key("s1", "x"), t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(*again.try_lock().unwrap(), Some(1));
        // Both busy (held): no room, a clear refusal.
        assert!(table.slot(&key("s4", "x"), t0 + Duration::from_secs(3)).is_err());
        drop((c, again));
        // Idle past the TTL: gone.
        table.expire(t0 + Duration::from_secs(30));
        assert_eq!(table.len(), 0);
    }
}
