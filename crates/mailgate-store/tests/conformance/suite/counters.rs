//! Contracts of usage counters shared by several nodes ([`CounterStore`], issue 16 item 3): one
//! atomic admission per send, re-checked with the engine's own arithmetic, nothing recorded when
//! refused, slots that free themselves. Run by the backends that share counters (PostgreSQL); a
//! one-node store (SQLite) has none and its counters are the engine's `MemoryCounters`, tested in
//! `mailgate-core`.

use std::sync::Arc;

use mailgate_core::directory::{ExceedAction, LimitName, SEND_COST_UNITS};
use mailgate_core::engine::{Charge, Usage};
use mailgate_core::gcra::Gcra;
use mailgate_store::{Admitted, CounterStore, MessageState, SendSlot, Store};

use super::{StoreBackend, message};

const T0: u64 = 1_795_000_000_000;
const DAY: u64 = 24 * 60 * 60 * 1000;

/// A charge that rejects past each limit (also the PostgreSQL-only tests' charge).
pub(crate) fn charge(
    principal: &str,
    per_day: u64,
    concurrent: u64,
    rate_per_minute: u64,
) -> Charge {
    Charge {
        principal: principal.to_owned(),
        rate: Gcra::per_minute(rate_per_minute * SEND_COST_UNITS, SEND_COST_UNITS),
        recipients: 1,
        messages_per_day: per_day,
        recipients_per_day: 1_000_000,
        concurrent_sends: concurrent,
        actions: [
            (LimitName::Rate, ExceedAction::Reject),
            (LimitName::DailyMessages, ExceedAction::Reject),
            (LimitName::DailyRecipients, ExceedAction::Reject),
            (LimitName::Concurrency, ExceedAction::Reject),
        ],
    }
}

async fn shared(b: &impl StoreBackend) -> Arc<dyn Store> {
    let s = b.store().await;
    assert!(
        s.shared_counters().is_some(),
        "this backend runs the shared-counter contracts, so it must share its counters"
    );
    s
}

fn counters(s: &Arc<dyn Store>) -> &dyn CounterStore {
    s.shared_counters().unwrap()
}

async fn admit(s: &Arc<dyn Store>, c: &Charge, now: u64) -> Admitted {
    counters(s)
        .admit(c, &[], now, "node-a/run1", now + 60_000)
        .await
        .unwrap()
}

fn slot(a: &Admitted) -> SendSlot {
    match a {
        Admitted::Recorded(s, _) => *s,
        Admitted::Changed(u) => panic!("refused with {u:?}"),
    }
}

/// frank's 3 messages a day, 24 concurrent admissions through two nodes' handles: exactly 3 are
/// recorded, every other is refused with the numbers that refuse it, and refusals record nothing.
pub async fn concurrent_admissions_on_two_nodes_admit_exactly_the_daily_limit(
    b: &impl StoreBackend,
) {
    let (a, bb) = (shared(b).await, shared(b).await);
    let c = charge("frank@example.com", 3, 1000, 600);
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let s = if i % 2 == 0 { a.clone() } else { bb.clone() };
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let got = admit(&s, &c, T0 + i).await;
            if let Admitted::Recorded(slot, _) = got {
                counters(&s).release(slot, false).await.unwrap();
            }
            got
        }));
    }
    let mut recorded = 0;
    let mut seen_after = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Admitted::Recorded(_, after) => {
                recorded += 1;
                // The usage a recorded send reports counts it in, with its slot held.
                assert!(after.in_flight >= 1, "{after:?}");
                seen_after.push(after.messages_24h);
            }
            Admitted::Changed(u) => assert_eq!(u.messages_24h, 3, "refused with {u:?}"),
        }
    }
    assert_eq!(recorded, 3);
    seen_after.sort_unstable();
    assert_eq!(seen_after, [1, 2, 3], "each admission's own count");
    let u = counters(&a)
        .usage("frank@example.com", T0 + 100)
        .await
        .unwrap();
    assert_eq!((u.messages_24h, u.recipients_24h, u.in_flight), (3, 3, 0));
    // The day resets when the oldest of the three leaves the window.
    let oldest = u.oldest_expires_ms.unwrap();
    assert!((T0 + DAY..T0 + DAY + 24).contains(&oldest), "{oldest}");
    // A day later the window is empty again.
    let later = counters(&bb)
        .usage("frank@example.com", T0 + DAY + 100)
        .await
        .unwrap();
    assert_eq!(later.messages_24h, 0);
    assert!(matches!(
        admit(&bb, &c, T0 + DAY + 100).await,
        Admitted::Recorded(..)
    ));
}

/// A concurrent-send slot counts until it is released, refunded or past its deadline (a node
/// that died), and a node starting again frees only its own.
pub async fn send_slots_count_until_released_or_expired(b: &impl StoreBackend) {
    let s = shared(b).await;
    let c = charge("carol@example.com", 1000, 2, 600);
    let one = slot(&admit(&s, &c, T0).await);
    let two = slot(
        &counters(&s)
            .admit(&c, &[], T0 + 1, "node-b/run9", T0 + 1_000)
            .await
            .unwrap(),
    );
    match admit(&s, &c, T0 + 2).await {
        Admitted::Changed(u) => assert_eq!(u.in_flight, 2),
        other => panic!("a third concurrent send was admitted: {other:?}"),
    }
    counters(&s).release(one, false).await.unwrap();
    let three = slot(&admit(&s, &c, T0 + 3).await);
    // node-b's slot passes its deadline: it no longer counts.
    let u = counters(&s)
        .usage("carol@example.com", T0 + 1_001)
        .await
        .unwrap();
    assert_eq!(u.in_flight, 1);
    let _ = two;
    // node-a starts again: its slot (three) is freed, nobody else's.
    let four = slot(
        &counters(&s)
            .admit(&c, &[], T0 + 1_500, "node-a0/run1", T0 + 60_000)
            .await
            .unwrap(),
    );
    assert_eq!(counters(&s).release_node("node-a").await.unwrap(), 1);
    let u = counters(&s)
        .usage("carol@example.com", T0 + 1_501)
        .await
        .unwrap();
    assert_eq!(u.in_flight, 1, "node-a0's remains");
    let _ = (three, four);
    // Released sends still count for the day.
    assert_eq!(u.messages_24h, 4);
}

/// A send whose message could not be stored is refunded (the day's counts); a stored one frees its
/// slot and keeps its count, and the message is there.
pub async fn an_admitted_message_frees_its_slot_and_a_failed_one_is_refunded(
    b: &impl StoreBackend,
) {
    let s = shared(b).await;
    let c = charge(super::ALICE, 1000, 5, 600);
    let kept = slot(&admit(&s, &c, T0).await);
    let m = message("00000000000000c1", T0 as i64, &["bob@example.org"]);
    s.accept_admitted(&m, kept).await.unwrap();
    assert_eq!(
        s.message(&m.id).await.unwrap().map(|m| m.state),
        Some(MessageState::Queued)
    );
    let refunded = slot(&admit(&s, &c, T0 + 1).await);
    // The same id again: the message cannot be stored.
    assert!(s.accept_admitted(&m, refunded).await.is_err());
    let u = counters(&s).usage(super::ALICE, T0 + 2).await.unwrap();
    assert_eq!((u.messages_24h, u.in_flight), (1, 0), "{u:?}");
}

/// A message write abandoned midway (the future storing it dropped: an HTTP client that hung up,
/// a request timeout) leaves no charge without a message: either the message was stored and counts,
/// or the send is refunded and its slot freed at once, not held until its deadline.
pub async fn an_abandoned_message_write_refunds_its_send(b: &impl StoreBackend) {
    let s = shared(b).await;
    let c = charge("gina@example.com", 1000, 1, 600);
    let sl = slot(&admit(&s, &c, T0).await);
    let m = message("00000000000000c3", T0 as i64, &["bob@example.org"]);
    // Polled once (the write is under way), then dropped.
    let _ = tokio::time::timeout(std::time::Duration::ZERO, s.accept_admitted(&m, sl)).await;
    let mut last = None;
    for _ in 0..100 {
        let stored = s.message(&m.id).await.unwrap().is_some();
        let u = counters(&s)
            .usage("gina@example.com", T0 + 1)
            .await
            .unwrap();
        if (u.messages_24h, u.in_flight) == (u64::from(stored), 0) {
            return;
        }
        last = Some((stored, u));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("an abandoned write left its charge (stored, usage): {last:?}");
}

/// The rate (GCRA) is re-checked on the shared schedule: a burst of a minute's allowance, then
/// one send per emission interval, whichever node admits.
pub async fn the_rate_is_one_schedule_for_every_node(b: &impl StoreBackend) {
    let (a, bb) = (shared(b).await, shared(b).await);
    // 60 sends a minute: one a second, a burst of 60.
    let c = charge("dave@example.com", 1_000_000, 1000, 60);
    let mut admitted = 0;
    for i in 0..100u64 {
        let s = if i % 2 == 0 { &a } else { &bb };
        if let Admitted::Recorded(sl, _) = admit(s, &c, T0).await {
            counters(s).release(sl, false).await.unwrap();
            admitted += 1;
        }
    }
    assert_eq!(admitted, 60, "a minute's allowance at once");
    match admit(&a, &c, T0 + 10).await {
        Admitted::Changed(u) => assert!(u.rate_tat_ms.unwrap() > T0 + 59_000, "{u:?}"),
        other => panic!("over the rate: {other:?}"),
    }
    // One emission interval later, exactly one more fits.
    assert!(matches!(
        admit(&bb, &c, T0 + 1_000).await,
        Admitted::Recorded(..)
    ));
    assert!(matches!(
        admit(&a, &c, T0 + 1_000).await,
        Admitted::Changed(_)
    ));
}

/// A decision that held a send (a `hold` limit exceeded) is admitted while the numbers still hold
/// it; when they no longer do (or hold it for another limit), the admission records nothing and
/// returns them.
pub async fn a_held_decision_stands_only_while_the_numbers_hold_it(b: &impl StoreBackend) {
    let s = shared(b).await;
    let mut c = charge("erin@example.com", 1, 1000, 600);
    c.actions[1] = (LimitName::DailyMessages, ExceedAction::Hold);
    let first = slot(&admit(&s, &c, T0).await);
    counters(&s).release(first, false).await.unwrap();
    // Decided "allowed" with stale numbers: the store's hold it now.
    match counters(&s)
        .admit(&c, &[], T0 + 1, "n/r", T0 + 60_000)
        .await
        .unwrap()
    {
        Admitted::Changed(u) => assert_eq!(u.messages_24h, 1),
        other => panic!("{other:?}"),
    }
    // Decided "held for the daily limit": stands.
    let held = counters(&s)
        .admit(&c, &[LimitName::DailyMessages], T0 + 2, "n/r", T0 + 60_000)
        .await
        .unwrap();
    assert!(matches!(held, Admitted::Recorded(..)), "{held:?}");
    let u: Usage = counters(&s)
        .usage("erin@example.com", T0 + 3)
        .await
        .unwrap();
    assert_eq!(u.messages_24h, 2);
}

/// The day's numbers stay exact as sends leave the window, are refunded, or are purged by the
/// counters' replay (`usage_since`), whichever node reads them: checked against a model (the
/// sends still in the last 24 h, counted one by one) over 40 sends an hour apart. Regression: the
/// day's usage is read from running totals since the full count of a day's rows became the
/// admission's main cost (`migrations/postgres/0008_usage_totals.sql`).
pub async fn the_days_numbers_match_the_sends_in_the_window_through_expiry_refunds_and_purges(
    b: &impl StoreBackend,
) {
    const HOUR: u64 = 60 * 60 * 1000;
    let (a, bb) = (shared(b).await, shared(b).await);
    let who = "hank@example.com";
    // (at, recipients) of each send that counts.
    let mut model: Vec<(u64, u64)> = Vec::new();
    let check = |model: &Vec<(u64, u64)>, u: Usage, now: u64, what: &str| {
        let live: Vec<&(u64, u64)> = model.iter().filter(|(at, _)| *at + DAY > now).collect();
        let want = (
            live.len() as u64,
            live.iter().map(|(_, r)| r).sum::<u64>(),
            live.iter().map(|(at, _)| at + DAY).min(),
        );
        assert_eq!(
            (u.messages_24h, u.recipients_24h, u.oldest_expires_ms),
            want,
            "{what} at +{} h",
            (now - T0) / HOUR
        );
    };
    for k in 0..40u64 {
        let now = T0 + k * HOUR;
        let s = if k % 2 == 0 { &a } else { &bb };
        let mut c = charge(who, 1000, 1000, 600);
        c.recipients = k % 3 + 1;
        let sl = slot(&admit(s, &c, now).await);
        // Every fifth send is refunded (its message could not be stored).
        let refunded = k % 5 == 4;
        counters(s).release(sl, refunded).await.unwrap();
        if !refunded {
            model.push((now, c.recipients));
        }
        let other = if k % 2 == 0 { &bb } else { &a };
        let u = counters(other).usage(who, now + 1).await.unwrap();
        check(&model, u, now + 1, "after a send");
        // Half an hour later, read without any send (the expired rows are not deleted yet).
        let u = counters(other).usage(who, now + HOUR / 2).await.unwrap();
        check(&model, u, now + HOUR / 2, "between sends");
    }
    // The replay at a node's start purges what is older than its window.
    let since = (T0 + 39 * HOUR - DAY) as i64;
    a.usage_since(since).await.unwrap();
    model.retain(|(at, _)| *at as i64 >= since);
    let now = T0 + 39 * HOUR + 2;
    check(
        &model,
        counters(&bb).usage(who, now).await.unwrap(),
        now,
        "after a purge",
    );
    // Two days later nothing counts, and the next send counts alone.
    let now = T0 + 39 * HOUR + 2 * DAY;
    check(
        &model,
        counters(&a).usage(who, now).await.unwrap(),
        now,
        "two days later",
    );
    let sl = slot(&admit(&a, &charge(who, 1000, 1000, 600), now).await);
    counters(&a).release(sl, false).await.unwrap();
    model.push((now, 1));
    check(
        &model,
        counters(&bb).usage(who, now).await.unwrap(),
        now,
        "a send after two days",
    );
}
