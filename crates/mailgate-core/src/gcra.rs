//! GCRA (generic cell rate algorithm) in Gmail-style quota units, as pure arithmetic.
//!
//! A principal has `units_per_minute` quota units; one send costs `cost` units (Gmail: 100 of
//! 15,000). GCRA keeps one number per principal, the theoretical arrival time (TAT), so any store
//! can hold it (a map entry, one SQLite row). The burst tolerance is one minute's worth of sends,
//! which reproduces Google's "15,000 units per user per minute" with short bursts allowed.
//!
//! All times are Unix milliseconds.

/// Rate parameters derived from a per-minute unit budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Gcra {
    /// Time one send "occupies": `60 s × cost / units_per_minute`, rounded up.
    pub emission_ms: u64,
    /// How far ahead of `now` the TAT may run: one minute minus one emission interval, so that
    /// `units_per_minute / cost` sends fit into an idle minute.
    pub tolerance_ms: u64,
}

/// The result of asking whether one more send fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcraOutcome {
    /// Fits; store `new_tat` if the send is accepted.
    Allowed {
        /// The TAT after this send.
        new_tat: u64,
    },
    /// Does not fit before `retry_at`.
    Limited {
        /// The earliest time the send would fit.
        retry_at: u64,
    },
}

const MINUTE_MS: u64 = 60_000;

impl Gcra {
    /// Parameters for `units_per_minute` with sends costing `cost` units. `None` when the budget
    /// is zero: nothing is ever admitted.
    pub fn per_minute(units_per_minute: u64, cost: u64) -> Option<Gcra> {
        if units_per_minute == 0 {
            return None;
        }
        let emission_ms = (MINUTE_MS.saturating_mul(cost))
            .div_ceil(units_per_minute)
            .max(1);
        Some(Gcra {
            emission_ms,
            tolerance_ms: MINUTE_MS.saturating_sub(emission_ms),
        })
    }

    /// Whether one more send fits at `now`, given the stored TAT (`None`: never sent).
    pub fn check(&self, tat: Option<u64>, now: u64) -> GcraOutcome {
        let tat = tat.unwrap_or(0).max(now);
        if tat - now <= self.tolerance_ms {
            GcraOutcome::Allowed {
                new_tat: tat.saturating_add(self.emission_ms),
            }
        } else {
            GcraOutcome::Limited {
                retry_at: tat - self.tolerance_ms,
            }
        }
    }

    /// Sends "in the bucket" at `now` (how many emission intervals the TAT is ahead), for
    /// reporting the current count.
    pub fn in_use(&self, tat: Option<u64>, now: u64) -> u64 {
        tat.unwrap_or(0)
            .saturating_sub(now)
            .div_ceil(self.emission_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gmail_defaults_allow_150_sends_per_idle_minute() {
        let g = Gcra::per_minute(15_000, 100).unwrap();
        assert_eq!(g.emission_ms, 400);
        let now = 1_000_000;
        let mut tat = None;
        let mut sent = 0;
        while let GcraOutcome::Allowed { new_tat } = g.check(tat, now) {
            tat = Some(new_tat);
            sent += 1;
        }
        assert_eq!(sent, 150);
        match g.check(tat, now) {
            GcraOutcome::Limited { retry_at } => assert_eq!(retry_at, now + 400),
            GcraOutcome::Allowed { .. } => panic!("should be limited"),
        }
        assert_eq!(g.in_use(tat, now), 150);
    }

    #[test]
    fn zero_budget_admits_nothing() {
        assert!(Gcra::per_minute(0, 100).is_none());
    }

    proptest! {
        /// Over any window of length `w`, admitted sends never exceed `w / T + burst`.
        #[test]
        fn never_more_than_rate_plus_burst(units in 100u64..50_000, gaps in proptest::collection::vec(0u64..2_000, 1..400)) {
            let g = Gcra::per_minute(units, 100).unwrap();
            let start = 10_000_000u64;
            let mut now = start;
            let mut tat = None;
            let mut admitted = 0u64;
            for gap in gaps {
                now += gap;
                if let GcraOutcome::Allowed { new_tat } = g.check(tat, now) {
                    tat = Some(new_tat);
                    admitted += 1;
                }
            }
            let bound = (now - start + g.tolerance_ms) / g.emission_ms + 1;
            prop_assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
        }

        /// After `retry_at`, the send fits.
        #[test]
        fn retry_at_is_honest(units in 100u64..50_000, tat_ahead in 0u64..200_000) {
            let g = Gcra::per_minute(units, 100).unwrap();
            let now = 5_000_000u64;
            let tat = Some(now + tat_ahead);
            if let GcraOutcome::Limited { retry_at } = g.check(tat, now) {
                prop_assert!(retry_at > now);
                let ok = matches!(g.check(tat, retry_at), GcraOutcome::Allowed { .. });
                prop_assert!(ok);
            }
        }
    }
}
