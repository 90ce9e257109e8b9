//! Usage counters behind a small trait, so the engine does not know where usage is kept.
//!
//! One node (SQLite): [`MemoryCounters`] are the authority. Limits survive a restart through the
//! store: each acceptance writes its usage (`usage_log`, `rate_state`) in the same transaction as
//! the message, and at start the gateway replays the last 24 h into a fresh `MemoryCounters`
//! (`mailgate_gateway::load_counters`).
//!
//! Several nodes (PostgreSQL): the store is the authority (`mailgate_store::CounterStore`). The
//! gateway reads the principal's live numbers from it and the engine decides with them
//! ([`UsageSnapshot`]); the store admits under a lock with [`recheck`] (the same arithmetic,
//! [`exceeded`]) and, when its numbers change the outcome, records nothing and the gateway
//! decides again with them, so the refusal is the engine's own.
//!
//! The protocol is read, decide, admit:
//! 1. [`decide`](super::decide) reads a [`Usage`] snapshot for the principal and evaluates every
//!    limit against it (pure; nothing is consumed, so `explain` and refused sends cost nothing).
//! 2. When the door accepts the send it calls [`commit`](super::commit), which hands the
//!    decision's [`Charge`] to [`Counters::admit`]. `admit` re-checks the limits whose action is
//!    `reject` and records the send **atomically** (one lock, one transaction). If a concurrent
//!    send took the last slot in between, `admit` consumes nothing and returns
//!    [`Admission::Raced`]; the door then decides again and gets the proper denial.
//! 3. When the send finishes (reply sent), the door calls [`Counters::release`] to free its
//!    concurrency slot.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

use super::index::HashMap;
use crate::directory::{ExceedAction, LimitName};
use crate::gcra::{Gcra, GcraOutcome};

/// The rolling window of the daily limits.
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// One principal's usage at a point in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// GCRA theoretical arrival time (Unix ms); `None` when the principal never sent.
    pub rate_tat_ms: Option<u64>,
    /// Messages accepted in the last 24 h.
    pub messages_24h: u64,
    /// Recipients of the messages accepted in the last 24 h.
    pub recipients_24h: u64,
    /// When the oldest counted send leaves the 24 h window (Unix ms): the daily reset time.
    pub oldest_expires_ms: Option<u64>,
    /// Sends admitted and not yet released.
    pub in_flight: u64,
}

/// What an accepted send consumes, with the limits to re-check at admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// Counter key of the principal (lower-case primary address, `sa:<email>`, `relay:<addr>`).
    pub principal: String,
    /// Rate parameters; `None` when the budget is zero (only reachable with action `hold`).
    pub rate: Option<Gcra>,
    /// Recipients of this send.
    pub recipients: u64,
    /// Messages per 24 h.
    pub messages_per_day: u64,
    /// Recipients per 24 h.
    pub recipients_per_day: u64,
    /// Concurrent sends.
    pub concurrent_sends: u64,
    /// Per limit: re-check (`reject`) or record regardless (`hold`).
    pub actions: [(LimitName, ExceedAction); 4],
}

impl Charge {
    /// The action configured for `limit`.
    pub fn action(&self, limit: LimitName) -> ExceedAction {
        self.actions
            .iter()
            .find(|(l, _)| *l == limit)
            .map(|(_, a)| *a)
            .unwrap_or_default()
    }
}

/// The result of [`Counters::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Admission {
    /// Recorded; the send holds a concurrency slot until [`Counters::release`].
    Admitted,
    /// A concurrent send used the last of this limit since the decision; nothing was recorded.
    Raced(LimitName),
}

/// A counters backend failed. [`MemoryCounters`] never fails; the error is there for a backend
/// that does I/O.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    /// The backing store could not be read or written.
    #[error("usage counters unavailable: {0}")]
    Unavailable(String),
}

/// Usage counters. Object safe and synchronous: the engine is pure and calls only [`usage`];
/// doors call [`admit`] and [`release`].
///
/// Implementations must make `admit` atomic with respect to other `admit` calls for the same
/// principal: check and record under one lock or one transaction.
///
/// [`usage`]: Counters::usage
/// [`admit`]: Counters::admit
/// [`release`]: Counters::release
pub trait Counters: Send + Sync {
    /// The principal's usage at `now_ms` (entries older than 24 h no longer count). Read-only.
    fn usage(&self, principal: &str, now_ms: u64) -> Usage;

    /// Atomically re-checks the `reject` limits of `charge` and, if they all still hold, records
    /// the send: rate TAT advanced, one message and `charge.recipients` recipients added to the
    /// 24 h window at `now_ms`, one concurrency slot taken.
    fn admit(&self, charge: &Charge, now_ms: u64) -> Result<Admission, CountersError>;

    /// Frees the concurrency slot taken by an admitted send of `principal`.
    fn release(&self, principal: &str);
}

/// Every limit `usage` exceeds for `charge` at `now_ms`, whatever its action (`reject` or
/// `hold`), in the engine's check order. The one arithmetic of the limits: the engine's checks,
/// [`MemoryCounters::admit`] and a shared store's [`recheck`] all come here.
pub fn exceeded(usage: &Usage, charge: &Charge, now_ms: u64) -> Vec<LimitName> {
    let mut out = Vec::new();
    let over_rate = match charge.rate {
        None => true,
        Some(g) => matches!(
            g.check(usage.rate_tat_ms, now_ms),
            GcraOutcome::Limited { .. }
        ),
    };
    if over_rate {
        out.push(LimitName::Rate);
    }
    if usage.messages_24h.saturating_add(1) > charge.messages_per_day {
        out.push(LimitName::DailyMessages);
    }
    if usage.recipients_24h.saturating_add(charge.recipients) > charge.recipients_per_day {
        out.push(LimitName::DailyRecipients);
    }
    if usage.in_flight.saturating_add(1) > charge.concurrent_sends {
        out.push(LimitName::Concurrency);
    }
    out
}

/// The first limit exceeded whose action is `reject` (the one that refuses the send).
pub(crate) fn exceeds(usage: &Usage, charge: &Charge, now_ms: u64) -> Option<LimitName> {
    exceeded(usage, charge, now_ms)
        .into_iter()
        .find(|l| charge.action(*l) == ExceedAction::Reject)
}

/// The principal's rate TAT once this send is recorded (a send held over the rate still takes
/// its place in the schedule).
pub fn next_tat(charge: &Charge, tat_ms: Option<u64>, now_ms: u64) -> Option<u64> {
    match charge.rate {
        Some(g) => Some(match g.check(tat_ms, now_ms) {
            GcraOutcome::Allowed { new_tat } => new_tat,
            GcraOutcome::Limited { .. } => tat_ms
                .unwrap_or(now_ms)
                .max(now_ms)
                .saturating_add(g.emission_ms),
        }),
        None => tat_ms,
    }
}

/// The largest usage at which every one of `sends` (one principal's, in arrival order: its
/// charge and its clock) is admitted with **no limit exceeded**, whatever the limit's action,
/// each send counted before the next is checked (as [`recheck`] one at a time would); `None` when
/// some send would exceed a limit even on no usage at all, or there are no sends.
///
/// A store that shares counters between nodes may record all of them without deciding again when
/// it finds the principal's numbers at or below this in every part (messages, recipients and
/// sends in flight; a rate schedule never set counts as 0): every limit's check is monotone
/// (fewer sends, recipients or sends in flight, or an earlier schedule, never exceed a limit
/// more), and a send that no limit holds is admitted by [`recheck`] exactly when nothing is
/// exceeded. The comparison is all the store does: the arithmetic stays here, beside
/// [`exceeded`], which this inverts (`a_ceiling_admits_exactly_the_usage_every_send_fits_on`).
pub fn ceiling<'a>(sends: impl IntoIterator<Item = (&'a Charge, u64)>) -> Option<Usage> {
    let mut top = Usage {
        rate_tat_ms: Some(u64::MAX),
        messages_24h: u64::MAX,
        recipients_24h: u64::MAX,
        oldest_expires_ms: None,
        in_flight: u64::MAX,
    };
    // Counted so far: sends, their recipients, their emission intervals; and the schedule the
    // sends so far leave when the principal's was 0 (`floor`; `TatShift` says why that and the
    // sum of intervals give the schedule from any start).
    let (mut sends_before, mut recipients_before, mut add, mut floor) = (0u64, 0u64, 0u64, 0u64);
    let mut any = false;
    for (charge, now) in sends {
        any = true;
        let this = sends_before.checked_add(1)?;
        top.messages_24h = top
            .messages_24h
            .min(charge.messages_per_day.checked_sub(this)?);
        let recipients = recipients_before.checked_add(charge.recipients)?;
        top.recipients_24h = top
            .recipients_24h
            .min(charge.recipients_per_day.checked_sub(recipients)?);
        top.in_flight = top
            .in_flight
            .min(charge.concurrent_sends.checked_sub(this)?);
        // The schedule this send is checked on is max(T + add, floor, now) for a start T: within
        // the tolerance iff both T + add and floor are (now itself always is).
        let gcra = charge.rate?;
        let latest = now.checked_add(gcra.tolerance_ms)?;
        if floor > latest {
            return None;
        }
        let t = latest.checked_sub(add)?;
        top.rate_tat_ms = top.rate_tat_ms.map(|m| m.min(t));
        floor = floor.max(now).checked_add(gcra.emission_ms)?;
        add = add.checked_add(gcra.emission_ms)?;
        sends_before = this;
        recipients_before = recipients;
    }
    any.then_some(top)
}

/// How a run of one principal's sends moves its rate schedule, whatever the schedule was: from
/// `tat` (never set counts as 0) to `max(tat + add_ms, floor_ms)`, which is what [`next_tat`]
/// gives send by send (each send maps t to max(t, now) + e; two such maps compose to one of the
/// same form). A store records a batch admitted under a [`ceiling`] with this, on the schedule it
/// finds, without knowing the rate's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TatShift {
    /// Added to the schedule found.
    pub add_ms: u64,
    /// The least the schedule becomes.
    pub floor_ms: u64,
}

impl TatShift {
    /// What `sends` (charge, clock; in arrival order) do to the schedule; `None` when none has a
    /// rate (nothing moves).
    pub fn of<'a>(sends: impl IntoIterator<Item = (&'a Charge, u64)>) -> Option<TatShift> {
        let mut shift: Option<TatShift> = None;
        for (charge, now) in sends {
            let Some(gcra) = charge.rate else { continue };
            let s = shift.get_or_insert(TatShift {
                add_ms: 0,
                floor_ms: 0,
            });
            s.floor_ms = s.floor_ms.max(now).saturating_add(gcra.emission_ms);
            s.add_ms = s.add_ms.saturating_add(gcra.emission_ms);
        }
        shift
    }

    /// The schedule `tat` becomes.
    pub fn apply(&self, tat: Option<u64>) -> u64 {
        tat.unwrap_or(0)
            .saturating_add(self.add_ms)
            .max(self.floor_ms)
    }
}

/// What a store that shares counters between nodes concludes, under its lock, from the numbers
/// it read ([`recheck`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Recheck {
    /// The decision stands with these numbers: record the send; the principal's rate TAT
    /// becomes `rate_tat_ms`.
    Admit {
        /// The new theoretical arrival time.
        rate_tat_ms: Option<u64>,
    },
    /// These numbers change the outcome: a `reject` limit is exceeded now, or the `hold` limits
    /// exceeded are not the ones the decision held for. Record nothing; the gateway decides again
    /// with these numbers (the engine writes the denial, or the hold, itself).
    Changed,
}

/// Re-checks a decision's charge against the usage a shared store read under its lock. `held`
/// are the limits the decision held the send for ([`super::Decision::holds`]).
pub fn recheck(usage: &Usage, charge: &Charge, held: &[LimitName], now_ms: u64) -> Recheck {
    let over = exceeded(usage, charge, now_ms);
    let rejected = over
        .iter()
        .any(|l| charge.action(*l) == ExceedAction::Reject);
    let holds_now = over
        .iter()
        .filter(|l| charge.action(**l) == ExceedAction::Hold);
    let same_holds =
        holds_now.clone().count() == held.len() && holds_now.into_iter().all(|l| held.contains(l));
    if rejected || !same_holds {
        return Recheck::Changed;
    }
    Recheck::Admit {
        rate_tat_ms: next_tat(charge, usage.rate_tat_ms, now_ms),
    }
}

/// One principal's usage as a store read it, for deciding with: [`Counters::usage`] answers
/// these numbers for that principal and nothing for any other. Read-only (`admit` refuses).
#[derive(Debug, Clone)]
pub struct UsageSnapshot {
    /// Counter key.
    pub principal: String,
    /// Its usage.
    pub usage: Usage,
}

impl Counters for UsageSnapshot {
    fn usage(&self, principal: &str, _now_ms: u64) -> Usage {
        if principal == self.principal {
            self.usage
        } else {
            Usage::default()
        }
    }

    fn admit(&self, _charge: &Charge, _now_ms: u64) -> Result<Admission, CountersError> {
        Err(CountersError::Unavailable(
            "a usage snapshot is read-only: the store admits".into(),
        ))
    }

    fn release(&self, _principal: &str) {}
}

#[derive(Debug, Default)]
struct Slot {
    tat_ms: Option<u64>,
    /// (accepted at, recipients), oldest first.
    window: VecDeque<(u64, u64)>,
    recipients: u64,
    in_flight: u64,
}

impl Slot {
    fn prune(&mut self, now_ms: u64) {
        while let Some(&(at, n)) = self.window.front() {
            if at.saturating_add(DAY_MS) <= now_ms {
                self.window.pop_front();
                self.recipients = self.recipients.saturating_sub(n);
            } else {
                break;
            }
        }
    }

    /// O(1): callers prune first.
    fn usage(&self) -> Usage {
        Usage {
            rate_tat_ms: self.tat_ms,
            messages_24h: self.window.len() as u64,
            recipients_24h: self.recipients,
            oldest_expires_ms: self.window.front().map(|(at, _)| at.saturating_add(DAY_MS)),
            in_flight: self.in_flight,
        }
    }
}

/// In-memory counters for a single node and for tests. One mutex over a map: admission is a
/// few arithmetic operations, so contention stays negligible at gateway rates.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    slots: Mutex<HashMap<String, Slot>>,
}

impl MemoryCounters {
    /// Empty counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Test and fault-injection helper: records `messages` past sends of `recipients_each`
    /// recipients at `at_ms` without any limit check ("make alice's daily limit exhausted").
    pub fn preload(&self, principal: &str, at_ms: u64, messages: u64, recipients_each: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(principal.to_owned()).or_default();
        for _ in 0..messages {
            slot.window.push_back((at_ms, recipients_each));
            slot.recipients += recipients_each;
        }
        // Keep the window ordered by time whatever order preloads came in.
        slot.window.make_contiguous().sort_by_key(|(at, _)| *at);
    }

    /// Test and fault-injection helper: sets the rate TAT and the in-flight count directly.
    pub fn set_rate_and_in_flight(&self, principal: &str, tat_ms: Option<u64>, in_flight: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(principal.to_owned()).or_default();
        slot.tat_ms = tat_ms;
        slot.in_flight = in_flight;
    }
}

impl Counters for MemoryCounters {
    fn usage(&self, principal: &str, now_ms: u64) -> Usage {
        // Pruning expired entries changes nothing observable, so this stays a read.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get_mut(principal) {
            Some(slot) => {
                slot.prune(now_ms);
                slot.usage()
            }
            None => Usage::default(),
        }
    }

    fn admit(&self, charge: &Charge, now_ms: u64) -> Result<Admission, CountersError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(charge.principal.clone()).or_default();
        slot.prune(now_ms);
        let usage = slot.usage();
        if let Some(limit) = exceeds(&usage, charge, now_ms) {
            return Ok(Admission::Raced(limit));
        }
        slot.tat_ms = next_tat(charge, slot.tat_ms, now_ms);
        slot.window.push_back((now_ms, charge.recipients));
        slot.recipients += charge.recipients;
        slot.in_flight += 1;
        Ok(Admission::Admitted)
    }

    fn release(&self, principal: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get_mut(principal) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::SEND_COST_UNITS;
    use proptest::prelude::*;

    const T0: u64 = 1_795_000_000_000;

    fn charge(hold_daily: bool) -> Charge {
        let daily = if hold_daily {
            ExceedAction::Hold
        } else {
            ExceedAction::Reject
        };
        Charge {
            principal: "frank@example.com".into(),
            rate: Gcra::per_minute(600 * SEND_COST_UNITS, SEND_COST_UNITS),
            recipients: 2,
            messages_per_day: 3,
            recipients_per_day: 100,
            concurrent_sends: 2,
            actions: [
                (LimitName::Rate, ExceedAction::Reject),
                (LimitName::DailyMessages, daily),
                (LimitName::DailyRecipients, ExceedAction::Reject),
                (LimitName::Concurrency, ExceedAction::Reject),
            ],
        }
    }

    fn usage(messages: u64, in_flight: u64) -> Usage {
        Usage {
            messages_24h: messages,
            recipients_24h: messages * 2,
            oldest_expires_ms: (messages > 0).then_some(T0 + DAY_MS),
            in_flight,
            ..Usage::default()
        }
    }

    #[test]
    fn recheck_admits_what_memory_counters_admit_and_advances_the_same_schedule() {
        let c = charge(false);
        for (messages, in_flight) in [(0, 0), (2, 1), (3, 0), (0, 2), (5, 5)] {
            let u = usage(messages, in_flight);
            let memory = MemoryCounters::new();
            memory.preload(&c.principal, T0 - 1_000, messages, 2);
            memory.set_rate_and_in_flight(&c.principal, None, in_flight);
            let admitted = memory.admit(&c, T0).unwrap() == Admission::Admitted;
            match recheck(&u, &c, &[], T0) {
                Recheck::Admit { rate_tat_ms } => {
                    assert!(admitted, "{u:?}");
                    assert_eq!(rate_tat_ms, memory.usage(&c.principal, T0).rate_tat_ms);
                }
                Recheck::Changed => assert!(!admitted, "{u:?}"),
            }
        }
    }

    #[test]
    fn a_hold_decision_stands_only_while_the_same_limits_hold_it() {
        let c = charge(true);
        // Allowed with old numbers, but the live ones exceed the held daily limit.
        assert_eq!(recheck(&usage(3, 0), &c, &[], T0), Recheck::Changed);
        // Held for it, and still exceeded: stands.
        assert!(matches!(
            recheck(&usage(3, 0), &c, &[LimitName::DailyMessages], T0),
            Recheck::Admit { .. }
        ));
        // Held for it, but it no longer is exceeded (the window moved): decide again.
        assert_eq!(
            recheck(&usage(1, 0), &c, &[LimitName::DailyMessages], T0),
            Recheck::Changed
        );
        // A reject limit exceeded refuses whatever is held.
        assert_eq!(
            recheck(&usage(3, 2), &c, &[LimitName::DailyMessages], T0),
            Recheck::Changed
        );
    }

    /// The reference for [`ceiling`]: each send checked with [`exceeded`] on the numbers the
    /// sends before it left, then counted as a recorded send is.
    fn every_send_fits(mut u: Usage, sends: &[(Charge, u64)]) -> bool {
        for (c, now) in sends {
            if !exceeded(&u, c, *now).is_empty() {
                return false;
            }
            u.rate_tat_ms = next_tat(c, u.rate_tat_ms, *now);
            u.messages_24h += 1;
            u.recipients_24h += c.recipients;
            u.in_flight += 1;
        }
        true
    }

    fn arb_send() -> impl Strategy<Value = (Charge, u64)> {
        (
            prop::option::weighted(0.95, 1u64..3_000),
            0u64..4,
            (0u64..8, 0u64..20, 0u64..6),
            0u64..5_000,
        )
            .prop_map(|(units, recipients, (messages, rcpt, conc), at)| {
                let mut c = charge(false);
                c.rate = units.and_then(|u| Gcra::per_minute(u, SEND_COST_UNITS));
                c.recipients = recipients;
                c.messages_per_day = messages;
                c.recipients_per_day = rcpt;
                c.concurrent_sends = conc;
                (c, T0 + at)
            })
    }

    fn arb_usage() -> impl Strategy<Value = Usage> {
        (
            prop::option::of(T0 - 10_000..T0 + 130_000),
            0u64..8,
            0u64..20,
            0u64..6,
        )
            .prop_map(|(tat, messages, recipients, in_flight)| Usage {
                rate_tat_ms: tat,
                messages_24h: messages,
                recipients_24h: recipients,
                oldest_expires_ms: None,
                in_flight,
            })
    }

    fn at_or_below(u: &Usage, top: &Usage) -> bool {
        u.rate_tat_ms.unwrap_or(0) <= top.rate_tat_ms.unwrap_or(0)
            && u.messages_24h <= top.messages_24h
            && u.recipients_24h <= top.recipients_24h
            && u.in_flight <= top.in_flight
    }

    proptest::proptest! {
        #[test]
        fn a_ceiling_admits_exactly_the_usage_every_send_fits_on(
            sends in prop::collection::vec(arb_send(), 1..6),
            u in arb_usage(),
        ) {
            let top = ceiling(sends.iter().map(|(c, now)| (c, *now)));
            let fits = every_send_fits(u, &sends);
            proptest::prop_assert_eq!(
                fits,
                top.is_some_and(|t| at_or_below(&u, &t)),
                "usage {:?}, ceiling {:?}", u, top
            );
            // The largest: the ceiling itself fits, and one more of anything does not.
            if let Some(t) = top {
                proptest::prop_assert!(every_send_fits(t, &sends));
                let bumps: [fn(&mut Usage); 4] = [
                    |u| u.messages_24h += 1,
                    |u| u.recipients_24h += 1,
                    |u| u.in_flight += 1,
                    |u| u.rate_tat_ms = u.rate_tat_ms.map(|t| t + 1),
                ];
                for bump in bumps {
                    let mut over = t;
                    bump(&mut over);
                    proptest::prop_assert!(!every_send_fits(over, &sends), "{:?}", over);
                }
            }
        }

        #[test]
        fn a_tat_shift_moves_any_schedule_as_the_sends_one_by_one_do(
            sends in prop::collection::vec(arb_send(), 1..6),
            tat in prop::option::of(0u64..T0 + 200_000),
        ) {
            let one_by_one = sends
                .iter()
                .fold(tat, |t, (c, now)| next_tat(c, t, *now));
            match TatShift::of(sends.iter().map(|(c, now)| (c, *now))) {
                Some(shift) => proptest::prop_assert_eq!(Some(shift.apply(tat)), one_by_one),
                None => proptest::prop_assert_eq!(tat, one_by_one),
            }
        }
    }

    #[test]
    fn a_usage_snapshot_answers_for_its_principal_only_and_admits_nothing() {
        let snap = UsageSnapshot {
            principal: "frank@example.com".into(),
            usage: usage(3, 1),
        };
        assert_eq!(snap.usage("frank@example.com", T0), usage(3, 1));
        assert_eq!(snap.usage("alice@example.com", T0), Usage::default());
        assert!(snap.admit(&charge(false), T0).is_err());
    }
}
