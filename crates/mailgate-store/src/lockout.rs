//! Failed-authentication counters shared by every node (issue 16 item 5): the gateway's lockout
//! (`mailgate_gateway::lockout`) counts each failure here too, so an attacker cannot spread
//! guesses over several nodes. Unauthenticated clients cause these writes, so the table is
//! bounded by construction:
//!
//! * one row per key (an upsert), a key being a short fixed-shape string the gateway makes (a
//!   hash of the login and the client network, or the network): never a secret, never a login
//!   in clear, never longer than [`MAX_KEY_LEN`];
//! * a row that is not locked is forgotten `forget_after_ms` after its last failure or the end of
//!   its last lock, whichever is later (its count starts again), and swept when room is needed;
//! * at most [`LockoutRule::max_rows`] rows: a new key finds the table full of active locks and
//!   gets [`Counted::Full`] (the gateway then fails closed for that network), never a row.
//!
//! The write rate is the gateway's to bound (docs/security.md: failures are counted after a
//! password check, which the argon2 pool paces, and within a per-node budget).

use async_trait::async_trait;

use crate::StoreError;

/// Longest key a store accepts (longer ones are refused as [`StoreError::Other`]).
pub const MAX_KEY_LEN: usize = 96;

/// How one kind of key counts: the gateway's policy for it, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutRule {
    /// Failures before the first lock (at least 1).
    pub threshold: u32,
    /// First lock; each further failure doubles it.
    pub base_lock_ms: i64,
    /// Longest lock.
    pub max_lock_ms: i64,
    /// How long a row that is not locked is remembered.
    pub forget_after_ms: i64,
    /// Most rows the table keeps.
    pub max_rows: u64,
}

impl LockoutRule {
    /// The lock after `failures` failures (`None` below the threshold): `base_lock_ms` at the
    /// threshold, doubling with each further failure, at most `max_lock_ms`.
    pub fn lock_ms(&self, failures: u32) -> Option<i64> {
        let threshold = self.threshold.max(1);
        if failures < threshold {
            return None;
        }
        let doublings = failures - threshold;
        let base = self.base_lock_ms.max(0);
        let lock = if doublings >= 62 {
            self.max_lock_ms
        } else {
            base.checked_mul(1i64 << doublings)
                .unwrap_or(self.max_lock_ms)
        };
        Some(lock.min(self.max_lock_ms.max(base)))
    }
}

/// What counting one failure found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Counted: the key's failures so far (within its memory) and the end of its lock, if any
    /// (Unix ms; the latest of every node's).
    Counted {
        failures: u32,
        locked_until_ms: Option<i64>,
    },
    /// Not counted: the key is new and the table is full of rows that cannot be forgotten yet.
    Full,
}

/// Where failed-authentication counts are kept, shared by every node of one store.
#[async_trait]
pub trait LockoutStore: Send + Sync {
    /// Counts one failure of `key` at `now_ms` under `rule`, atomically however many nodes count
    /// at once: a forgotten row starts again at 1; a lock reaching past the one stored replaces
    /// it (a lock never shortens).
    async fn count_failure(
        &self,
        key: &str,
        rule: &LockoutRule,
        now_ms: i64,
    ) -> Result<Counted, StoreError>;

    /// The latest lock in force at `now_ms` among `keys` (Unix ms), if any.
    async fn locked_until(&self, keys: &[&str], now_ms: i64) -> Result<Option<i64>, StoreError>;

    /// Forgets `key` (a success resets its count).
    async fn clear_failures(&self, key: &str) -> Result<(), StoreError>;

    /// Whether several gateway nodes may count here at once, so that a gateway should (true for
    /// PostgreSQL). SQLite serves one node per file: that node's own table is exact, and counting
    /// here too would only add durable writes beside the acceptances.
    fn counts_for_several_nodes(&self) -> bool {
        true
    }
}

/// Refuses a key the gateway did not make.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(StoreError::Other(format!(
            "a lockout key is 1 to {MAX_KEY_LEN} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_starts_at_the_threshold_doubles_and_caps() {
        let r = LockoutRule {
            threshold: 5,
            base_lock_ms: 1_000,
            max_lock_ms: 900_000,
            forget_after_ms: 900_000,
            max_rows: 10,
        };
        assert_eq!(r.lock_ms(4), None);
        assert_eq!(r.lock_ms(5), Some(1_000));
        assert_eq!(r.lock_ms(6), Some(2_000));
        assert_eq!(r.lock_ms(14), Some(512_000));
        assert_eq!(r.lock_ms(15), Some(900_000));
        assert_eq!(r.lock_ms(u32::MAX), Some(900_000));
    }
}
