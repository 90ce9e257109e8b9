//! Contracts of the queue shared by several nodes (issue 16 item 4): write-backs fenced by the
//! lease itself (not only its owner's name), leases extended while a delivery runs, and a
//! delivery after a lease that ended without an outcome marked `possible_duplicate`.

use mailgate_store::{AttemptReport, MessageState, RecipientState, Recorded, lease_owner};

use super::{Backend, accept, ids, lease_of, message, report};

/// A node that restarts takes back its leases, and its new run may use the same owner name as
/// the run before (the fence must not rest on the name): a write-back, capture or extension under
/// the earlier lease changes nothing, the new lease's counts. The same holds for a lease that
/// expired and was taken again by the same owner name.
pub async fn a_write_back_under_an_earlier_lease_changes_nothing_even_for_the_same_owner(
    b: &impl Backend,
) {
    let s = b.open().await;
    let owner = lease_owner("n1", "r", 0);
    for id in ["m1", "m2"] {
        accept(&*s.directory, &message(id, 1_000, &["x@a.test"])).await;
    }
    let first = s.queue.lease_due(&owner, 2_000, 600_000, 10).await.unwrap();
    assert_eq!(ids(&first, |m| &m.id), ["m1", "m2"]);
    assert_eq!(s.queue.reclaim_leases("n1", 2_500).await.unwrap(), 2);
    let second = s.queue.lease_due(&owner, 3_000, 1_000, 10).await.unwrap();
    assert_eq!(ids(&second, |m| &m.id), ["m1", "m2"]);
    for m in &second {
        assert_ne!(m.lease, lease_of(&first, &m.id), "a new lease, a new token");
    }
    let before = s.queue.message_status("m1").await.unwrap().unwrap();
    let late = report(
        &first,
        "m1",
        3_100,
        &[("x@a.test", RecipientState::Delivered)],
    );
    assert_eq!(
        s.queue.record_attempt(&owner, &late).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue
            .mark_captured(&owner, "m2", lease_of(&first, "m2"), 3_100)
            .await
            .unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue
            .extend_lease(
                &owner,
                &[("m1".into(), lease_of(&first, "m1"))],
                3_100,
                60_000
            )
            .await
            .unwrap(),
        [Recorded::LeaseLost]
    );
    assert_eq!(
        s.queue.message_status("m1").await.unwrap().unwrap(),
        before,
        "a write-back under an earlier lease changed the message"
    );
    assert!(s.queue.list_captured(10).await.unwrap().is_empty());

    // The second lease expires (at 4_000) and the same owner name leases again.
    let third = s.queue.lease_due(&owner, 4_000, 1_000, 10).await.unwrap();
    assert_eq!(ids(&third, |m| &m.id), ["m1", "m2"]);
    let stale = report(
        &second,
        "m1",
        4_100,
        &[("x@a.test", RecipientState::Delivered)],
    );
    assert_eq!(
        s.queue.record_attempts(&owner, &[stale]).await.unwrap(),
        [Recorded::LeaseLost]
    );
    assert_eq!(
        s.queue
            .record_attempt(
                &owner,
                &report(
                    &third,
                    "m1",
                    4_100,
                    &[("x@a.test", RecipientState::Delivered)]
                )
            )
            .await
            .unwrap(),
        Recorded::State(MessageState::Delivered)
    );
    assert_eq!(
        s.queue
            .mark_captured(&owner, "m2", lease_of(&third, "m2"), 4_100)
            .await
            .unwrap(),
        Recorded::State(MessageState::Captured)
    );
    let st = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.history.len(), 1, "one delivery recorded");
}

/// A worker whose delivery runs long extends its leases: an extended lease keeps other leasers
/// out past its first expiry, and its holder's write-back still counts; a lease already lost is
/// not extended (and stays lost), and one message's lost lease does not stop the others'
/// extension.
pub async fn a_lease_is_extended_only_while_it_is_held(b: &impl Backend) {
    let s = b.open().await;
    for id in ["m1", "m2"] {
        accept(&*s.directory, &message(id, 1_000, &["x@a.test"])).await;
    }
    let l = s.queue.lease_due("w1", 2_000, 1_000, 10).await.unwrap();
    assert_eq!(l.len(), 2);
    let both = [
        ("m1".to_owned(), lease_of(&l, "m1")),
        ("m2".to_owned(), lease_of(&l, "m2")),
    ];
    assert_eq!(
        s.queue
            .extend_lease("w1", &both, 2_600, 1_000)
            .await
            .unwrap(),
        [
            Recorded::State(MessageState::Queued),
            Recorded::State(MessageState::Queued)
        ]
    );
    let st = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.lease_until_ms, Some(3_600));
    // Past the first expiry (3_000), before the extended one: nobody else takes them.
    let other = b.open().await;
    assert!(
        other
            .queue
            .lease_due("w2", 3_300, 1_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "an extended lease was taken"
    );
    // Someone else's name, or another lease's token, extends nothing.
    assert_eq!(
        other
            .queue
            .extend_lease("w2", &both[..1], 3_300, 60_000)
            .await
            .unwrap(),
        [Recorded::LeaseLost]
    );
    assert_eq!(
        s.queue
            .extend_lease(
                "w1",
                &[("m1".into(), lease_of(&l, "m1") + 1_000)],
                3_300,
                60_000
            )
            .await
            .unwrap(),
        [Recorded::LeaseLost]
    );
    assert_eq!(
        s.queue
            .message_status("m1")
            .await
            .unwrap()
            .unwrap()
            .lease_until_ms,
        Some(3_600)
    );
    // m2's extension stops; once it expired another worker takes it: m2 is lost to w1, m1 not.
    assert_eq!(
        s.queue
            .extend_lease("w1", &both[..1], 3_500, 1_000)
            .await
            .unwrap(),
        [Recorded::State(MessageState::Queued)]
    );
    let taken = other
        .queue
        .lease_due("w2", 3_700, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(ids(&taken, |m| &m.id), ["m2"]);
    assert_eq!(
        s.queue
            .extend_lease("w1", &both, 3_800, 1_000)
            .await
            .unwrap(),
        [Recorded::State(MessageState::Queued), Recorded::LeaseLost]
    );
    assert_eq!(
        s.queue
            .message_status("m2")
            .await
            .unwrap()
            .unwrap()
            .lease_owner
            .as_deref(),
        Some("w2"),
        "a lost lease was extended over its new holder's"
    );
    assert_eq!(
        s.queue
            .record_attempt(
                "w1",
                &report(&l, "m1", 4_000, &[("x@a.test", RecipientState::Delivered)])
            )
            .await
            .unwrap(),
        Recorded::State(MessageState::Delivered)
    );
    // A recorded message has no lease to extend.
    assert_eq!(
        s.queue
            .extend_lease("w1", &both[..1], 4_100, 1_000)
            .await
            .unwrap(),
        [Recorded::LeaseLost]
    );
    assert!(
        s.queue
            .extend_lease("w1", &[], 4_100, 1_000)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A lease that ended without a recorded outcome (expired with its holder still owning it, or
/// taken back by its node at start) may hide a delivery: the holder may have been killed after
/// the smarthost's final 250 but before recording it. The next lease says so
/// (`possible_duplicate`), and the attempt recorded under it is marked so in the history and
/// in the message's status. A lease after a recorded outcome is not marked, nor is a first one.
pub async fn a_delivery_after_a_lease_ended_without_an_outcome_is_a_possible_duplicate(
    b: &impl Backend,
) {
    let s = b.open().await;
    for id in ["expired", "reclaimed", "clean"] {
        accept(&*s.directory, &message(id, 1_000, &["x@a.test"])).await;
    }
    let first = s.queue.lease_due("n1/r1/0", 2_000, 1_000, 2).await.unwrap();
    assert_eq!(ids(&first, |m| &m.id), ["clean", "expired"]);
    let r2 = s
        .queue
        .lease_due("n2/r1/0", 2_000, 600_000, 1)
        .await
        .unwrap();
    assert_eq!(ids(&r2, |m| &m.id), ["reclaimed"]);
    assert!(first.iter().chain(&r2).all(|m| !m.possible_duplicate));
    // `clean` is deferred under its first lease: its next lease is no duplicate.
    assert_eq!(
        s.queue
            .record_attempt(
                "n1/r1/0",
                &AttemptReport {
                    next_attempt_ms: Some(2_500),
                    ..report(
                        &first,
                        "clean",
                        2_100,
                        &[("x@a.test", RecipientState::Deferred)]
                    )
                }
            )
            .await
            .unwrap(),
        Recorded::State(MessageState::Deferred)
    );
    // n1 dies holding `expired`; n2 restarts and takes back `reclaimed`.
    assert_eq!(s.queue.reclaim_leases("n2", 2_600).await.unwrap(), 1);
    let other = b.open().await;
    let again = other
        .queue
        .lease_due("n3/r1/0", 3_000, 600_000, 10)
        .await
        .unwrap();
    let mut got: Vec<(String, bool)> = again
        .iter()
        .map(|m| (m.id.clone(), m.possible_duplicate))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("clean".to_owned(), false),
            ("expired".to_owned(), true),
            ("reclaimed".to_owned(), true)
        ]
    );
    let delivered = |id: &str| {
        report(
            &again,
            id,
            3_100,
            &[("x@a.test", RecipientState::Delivered)],
        )
    };
    let recorded = other
        .queue
        .record_attempts(
            "n3/r1/0",
            &[
                delivered("clean"),
                delivered("expired"),
                delivered("reclaimed"),
            ],
        )
        .await
        .unwrap();
    assert!(
        recorded
            .iter()
            .all(|r| *r == Recorded::State(MessageState::Delivered)),
        "{recorded:?}"
    );
    for (id, marked) in [("clean", false), ("expired", true), ("reclaimed", true)] {
        let st = s.queue.message_status(id).await.unwrap().unwrap();
        assert_eq!(st.possible_duplicate, marked, "{id}");
        let last = st.history.last().unwrap();
        assert_eq!(last.possible_duplicate, marked, "{id}: {:?}", st.history);
        assert!(
            st.history[..st.history.len() - 1]
                .iter()
                .all(|h| !h.possible_duplicate),
            "{id}: only the attempt after the interrupted lease is marked"
        );
    }
}

/// Acceptance on one node wakes delivery on the others: a store shared by several nodes
/// (PostgreSQL) runs a listener that is woken by another node's announcement and not by its
/// own node's. A store with no other nodes (SQLite) has no listener, and announcing is harmless.
pub async fn another_nodes_announcement_wakes_the_listener_and_its_own_does_not(b: &impl Backend) {
    use std::sync::Arc;
    use std::time::Duration;
    let one = b.open().await;
    let two = b.open().await;
    let wake = Arc::new(tokio::sync::Notify::new());
    let Some(listener) = two.queue.spawn_wakeup_listener("n2", wake.clone()) else {
        one.queue.wake_others("n1").await.unwrap();
        return;
    };
    // Woken by n1 (announced until the listener, which starts listening on its own, hears it).
    let woken = async |from: &dyn mailgate_store::QueueStore, node: &str| {
        for _ in 0..50 {
            from.wake_others(node).await.unwrap();
            if tokio::time::timeout(Duration::from_millis(100), wake.notified())
                .await
                .is_ok()
            {
                return true;
            }
        }
        false
    };
    assert!(woken(&*one.queue, "n1").await, "not woken by another node");
    // Let any announcement still in flight arrive, and forget it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tokio::time::timeout(Duration::from_millis(10), wake.notified()).await;
    // Its own node's announcements (from any handle) do not wake it.
    for _ in 0..3 {
        two.queue.wake_others("n2").await.unwrap();
        one.queue.wake_others("n2").await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), wake.notified())
            .await
            .is_err(),
        "woken by its own node"
    );
    assert!(woken(&*one.queue, "n1").await, "not woken again");
    listener.abort();
}
