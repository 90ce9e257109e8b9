//! What this node last learned of principals' shared usage (a store whose counters every node
//! shares: PostgreSQL).
//!
//! There the numbers a send is decided with are the store's, and reading them before every
//! decision costs a round trip and a query per decision: one per Gmail or SendGrid send, three
//! per SMTP message (MAIL, RCPT and the end of DATA are each decided). Measured, those reads were
//! the largest share of PostgreSQL's time on the SMTP relay listener (`docs/performance.md`,
//! run 5). So a send is first decided with the numbers this node last saw for its principal (a
//! live read, or the usage its last admission left, which [`mailgate_store::Admitted`] carries)
//! when they are at most [`FRESH`] old, and:
//!
//! - an `Allowed` decision is kept as made: the admission re-checks it atomically against the
//!   live numbers anyway (`mailgate_core::engine::recheck`) and, when those change the outcome,
//!   the engine decides again with them (the refusal is written with the live numbers);
//! - any other outcome (a refusal, a hold) is decided again with live numbers before it is
//!   answered or kept: no refusal and no hold ever rests on numbers a node remembered;
//! - `explain` and dry runs always read the live numbers.
//!
//! An allowed decision's trace may therefore show numbers up to [`FRESH`] old (another node's
//! sends in that time are not in them); the limits themselves stay exact because the admission
//! is the one that counts.

use std::collections::HashMap;
use std::sync::Mutex;

use mailgate_core::engine::Usage;

/// How long numbers seen in the store are used to decide a send before they are read again.
pub const FRESH_MS: u64 = 1_000;

/// Principals remembered at most; past that the stale ones are forgotten, and if none is stale,
/// all are (a node with more principals sending within a second than this reads live numbers).
const CAPACITY: usize = 4_096;

/// Usage by principal, with when it was seen.
#[derive(Debug, Default)]
pub(crate) struct SeenUsage {
    by_principal: Mutex<HashMap<String, (Usage, u64)>>,
}

impl SeenUsage {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Usage, u64)>> {
        self.by_principal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The numbers seen for `principal` within [`FRESH_MS`] before `now_ms`.
    pub(crate) fn get(&self, principal: &str, now_ms: u64) -> Option<Usage> {
        let map = self.map();
        let (usage, at) = map.get(principal)?;
        (now_ms.saturating_sub(*at) <= FRESH_MS && *at <= now_ms).then_some(*usage)
    }

    /// Remembers `usage` as `principal`'s at `now_ms` (a newer sighting replaces an older one,
    /// never the other way round).
    pub(crate) fn put(&self, principal: &str, usage: Usage, now_ms: u64) {
        let mut map = self.map();
        if let Some((u, at)) = map.get_mut(principal) {
            if *at <= now_ms {
                *u = usage;
                *at = now_ms;
            }
            return;
        }
        if map.len() >= CAPACITY {
            map.retain(|_, (_, at)| now_ms.saturating_sub(*at) <= FRESH_MS);
            if map.len() >= CAPACITY {
                map.clear();
            }
        }
        map.insert(principal.to_owned(), (usage, now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(n: u64) -> Usage {
        Usage {
            messages_24h: n,
            ..Usage::default()
        }
    }

    #[test]
    fn numbers_are_used_for_a_second_and_then_read_again() {
        let seen = SeenUsage::default();
        seen.put("a@example.com", usage(3), 10_000);
        assert_eq!(seen.get("a@example.com", 10_000), Some(usage(3)));
        assert_eq!(seen.get("a@example.com", 10_000 + FRESH_MS), Some(usage(3)));
        assert_eq!(seen.get("a@example.com", 10_001 + FRESH_MS), None);
        assert_eq!(seen.get("b@example.com", 10_000), None);
        // A clock that went back does not make old numbers fresh.
        assert_eq!(seen.get("a@example.com", 9_000), None);
    }

    #[test]
    fn an_older_sighting_never_replaces_a_newer_one() {
        let seen = SeenUsage::default();
        seen.put("a@example.com", usage(5), 20_000);
        seen.put("a@example.com", usage(4), 19_500);
        assert_eq!(seen.get("a@example.com", 20_000), Some(usage(5)));
        seen.put("a@example.com", usage(6), 20_100);
        assert_eq!(seen.get("a@example.com", 20_100), Some(usage(6)));
    }

    #[test]
    fn memory_is_bounded_by_the_capacity() {
        let seen = SeenUsage::default();
        for i in 0..CAPACITY as u64 * 3 {
            seen.put(&format!("p{i}@example.com"), usage(i), 1_000 + i);
            assert!(seen.map().len() <= CAPACITY);
        }
        // The newest are still there.
        let last = CAPACITY as u64 * 3 - 1;
        assert_eq!(
            seen.get(&format!("p{last}@example.com"), 1_000 + last),
            Some(usage(last))
        );
    }
}
