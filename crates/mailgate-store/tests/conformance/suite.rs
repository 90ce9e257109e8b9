//! The contracts. Each function takes a [`Backend`] holding one fresh, empty database and checks
//! one promise through the store traits only (what a caller can see), so a backend passes by
//! keeping the promise, whatever its schema. Times are explicit Unix milliseconds: no contract
//! waits on the clock, and every loop is bounded.

use std::collections::BTreeSet;
use std::sync::Arc;

use mailgate_core::directory::{Directory, Domain, Kind, User, UserStatus};
use mailgate_store::{
    AttemptReport, AuditAction, CAPTURED_HEAD_BYTES, Changeset, FaultStore, LeasedMessage,
    MessageState, NewMessage, NodeState, Purged, QueueFilter, RecipientOutcome, RecipientState,
    Recorded, RetryOutcome, SimulatedFault, Store, StoreError, StoredDecision, StoredVerdict,
    Stores, TokenKind, TokenRecord, TokenStore, UsageEntry, lease_owner,
};

/// A backend under test: one fresh, empty database (a temporary directory, a schema of its own),
/// kept until the value is dropped, that implements every store trait.
pub trait Backend: Send + Sync + 'static {
    /// A new handle on this database, as another process or node would open it: every handle
    /// sees the same data. The first finds the database empty.
    fn open(&self) -> impl Future<Output = Stores> + Send;
}

// A backend that implements only some of the traits so far (one being built, a trait at a time)
// runs the contracts of those: each contract asks for the least it needs. A [`Backend`] has them
// all.

/// A backend's [`FaultStore`] (a new handle per call, as [`Backend::open`]).
pub trait FaultBackend: Send + Sync + 'static {
    fn faults(&self) -> impl Future<Output = Arc<dyn FaultStore>> + Send;
}

/// A backend's [`TokenStore`] (a new handle per call).
pub trait TokenBackend: Send + Sync + 'static {
    fn tokens(&self) -> impl Future<Output = Arc<dyn TokenStore>> + Send;
}

/// A backend's [`Store`] (a new handle per call).
pub trait StoreBackend: Send + Sync + 'static {
    fn store(&self) -> impl Future<Output = Arc<dyn Store>> + Send;
}

impl<B: Backend> FaultBackend for B {
    async fn faults(&self) -> Arc<dyn FaultStore> {
        self.open().await.directory
    }
}

impl<B: Backend> TokenBackend for B {
    async fn tokens(&self) -> Arc<dyn TokenStore> {
        self.open().await.tokens
    }
}

impl<B: Backend> StoreBackend for B {
    async fn store(&self) -> Arc<dyn Store> {
        self.open().await.directory
    }
}

/// Makes one `#[tokio::test]` per contract for a backend. `$fresh` is an `async fn() -> B` called
/// once per test. Every contract is listed here, in the group of the traits it needs: adding one
/// adds it to every backend that runs its group.
///
/// - `conformance!(fresh)`: every group; B is a [`Backend`].
/// - `conformance!(faults: fresh)`: B is a [`FaultBackend`]; `tokens:` a [`TokenBackend`];
///   `store:` a [`StoreBackend`] (the directory, decisions, usage, acceptance, nodes, admin
///   tokens); `queue:` a [`Backend`] (delivery needs `Store` to accept messages, and retention
///   needs finished ones).
macro_rules! conformance {
    ($fresh:path) => {
        $crate::suite::conformance!(faults: $fresh);
        $crate::suite::conformance!(tokens: $fresh);
        $crate::suite::conformance!(store: $fresh);
        $crate::suite::conformance!(queue: $fresh);
        $crate::suite::conformance!(shared: $fresh);
    };
    (shared: $fresh:path) => {
        $crate::suite::conformance!(@tests $fresh;
            failures_counted_on_two_nodes_add_up_and_lock_on_both,
            concurrent_failures_on_two_nodes_are_each_counted_once,
            a_quiet_key_is_forgotten_and_a_lock_never_shortens,
            the_table_is_bounded_and_never_forgets_an_active_lock,
            an_upload_opened_on_one_node_is_taken_once_on_another,
            upload_caps_hold_across_nodes,
            a_periodic_job_runs_on_one_node_at_a_time,
            two_holders_get_different_node_numbers_and_a_holder_keeps_its_own,
            node_numbers_run_out_and_a_passed_deadline_frees_one,
            concurrent_leases_on_two_nodes_never_share_a_number,
        );
    };
    (counters: $fresh:path) => {
        $crate::suite::conformance!(@tests $fresh;
            concurrent_admissions_on_two_nodes_admit_exactly_the_daily_limit,
            send_slots_count_until_released_or_expired,
            an_admitted_message_frees_its_slot_and_a_failed_one_is_refunded,
            the_rate_is_one_schedule_for_every_node,
            a_held_decision_stands_only_while_the_numbers_hold_it,
            an_abandoned_message_write_refunds_its_send,
            the_days_numbers_match_the_sends_in_the_window_through_expiry_refunds_and_purges,
        );
    };
    (faults: $fresh:path) => {
        $crate::suite::conformance!(@tests $fresh;
            injected_faults_are_set_replaced_expire_and_clear,
        );
    };
    (tokens: $fresh:path) => {
        $crate::suite::conformance!(@tests $fresh;
            a_token_is_found_by_its_hash,
            a_token_is_used_once,
            revoking_a_family_revokes_every_token_of_it_and_no_other,
            refresh_rotation_keeps_the_family_and_a_replay_is_detected,
            an_assertion_is_exchanged_once_until_it_expires,
        );
    };
    (store: $fresh:path) => {
        $crate::suite::conformance!(@tests $fresh;
            a_failed_acceptance_stores_neither_message_nor_usage,
            a_failing_acceptance_fails_alone,
            usage_replay_keeps_recent_sends_and_the_latest_rate_state,
            a_committed_directory_reads_back_equal_on_every_handle,
            each_commit_moves_the_generation_by_one,
            a_commit_against_a_stale_generation_is_a_conflict_and_changes_nothing,
            of_two_concurrent_commits_on_one_generation_exactly_one_wins,
            a_snapshot_is_one_generation_whole,
            every_committed_change_leaves_an_audit_row,
            a_decision_reads_back_equal_by_id,
            an_enqueued_decision_is_found_at_once_and_durable_after_flush,
            decisions_at_volume_are_all_kept_and_found_by_id,
            recent_refusals_are_the_newest_denials_first,
            admin_tokens_are_found_by_hash_and_replaced_by_name,
            node_rows_are_written_replaced_and_deleted,
            directory_and_fault_changes_are_announced_and_sends_are_not,
        );
    };
    (queue: $fresh:path) => {
        $crate::suite::conformance!(@tests $fresh;
            an_accepted_message_reads_back_with_its_usage,
            an_acceptance_is_durable_when_it_returns,
            a_queued_decision_is_durable_with_the_message_naming_it,
            a_failed_acceptance_keeps_its_queued_decision,
            a_lease_excludes_other_leasers,
            concurrent_leasers_never_hold_the_same_message,
            an_expired_lease_can_be_taken_again,
            only_due_messages_are_leased_oldest_first_up_to_the_limit,
            a_write_back_with_a_lost_lease_changes_nothing,
            a_write_back_without_a_lease_changes_nothing,
            a_recorded_attempt_ends_the_lease,
            a_batch_of_write_backs_loses_only_the_lost_leases,
            a_nodes_reclaim_releases_its_own_leases_and_no_other,
            leases_are_counted_per_node_while_unexpired,
            a_write_back_under_an_earlier_lease_changes_nothing_even_for_the_same_owner,
            a_lease_is_extended_only_while_it_is_held,
            a_delivery_after_a_lease_ended_without_an_outcome_is_a_possible_duplicate,
            another_nodes_announcement_wakes_the_listener_and_its_own_does_not,
            message_state_follows_its_recipients,
            held_messages_are_released_at_hold_until,
            next_due_is_the_earliest_time_something_becomes_due,
            captured_messages_are_listed_apart_and_read_whole,
            a_retried_message_is_due_now_with_failed_recipients_pending,
            a_deleted_message_is_gone_with_its_history,
            the_queue_lists_newest_first_by_state_and_limit,
            retention_deletes_old_finished_messages_and_unreferenced_decisions_only,
        );
    };
    (@tests $fresh:path; $($name:ident,)+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = $fresh().await;
                $crate::suite::$name(&backend).await;
            }
        )+
    };
}
pub(crate) use conformance;

// Usage counters shared by several nodes (issue 16 item 3): only backends that share them run the
// `counters:` group.
mod counters;
pub use counters::*;

// What several nodes share besides the directory and the queue (issue 16 item 5).
mod shared;
pub use shared::*;

// Message-id node numbers leased by the nodes (issue 16 item 5).
mod node_numbers;
pub use node_numbers::*;

// Directory and fault changes announced to every node (issue 16 item 5).
mod changes;
pub use changes::*;

// The queue shared by several nodes: fencing by the lease, extension, possible duplicates
// (issue 16 item 4).
mod fencing;
pub use fencing::*;

// ---------------------------------------------------------------------------------------------
// Fixtures.

pub(crate) const ALICE: &str = "alice@example.com";

pub(crate) fn message(id: &str, accepted_at_ms: i64, recipients: &[&str]) -> NewMessage {
    NewMessage {
        id: id.to_owned(),
        decision_id: format!("d-{id}"),
        accepted_at_ms,
        door: "gmail".into(),
        principal: ALICE.into(),
        envelope_from: ALICE.into(),
        recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        raw: format!("Subject: {id}\r\n\r\nbody of {id}\r\n").into_bytes(),
        state: MessageState::Queued,
        hold_until_ms: None,
    }
}

fn usage(at_ms: i64, recipients: i64) -> UsageEntry {
    UsageEntry { at_ms, recipients }
}

fn outcome(recipient: &str, state: RecipientState, reply: &str) -> RecipientOutcome {
    RecipientOutcome {
        recipient: recipient.to_owned(),
        state,
        code: match state {
            RecipientState::Failed => Some("upstream.refused".into()),
            RecipientState::Deferred => Some("upstream.deferred".into()),
            _ => None,
        },
        reply: Some(reply.to_owned()),
    }
}

/// The lease token of `id` among `leased` (-1, no lease, when it is not there).
fn lease_of(leased: &[LeasedMessage], id: &str) -> i64 {
    leased.iter().find(|m| m.id == id).map_or(-1, |m| m.lease)
}

/// An attempt on `id` at `at_ms` with one outcome per `(recipient, state)`, under its lease
/// among `leased`.
pub(crate) fn report(
    leased: &[LeasedMessage],
    id: &str,
    at_ms: i64,
    outcomes: &[(&str, RecipientState)],
) -> AttemptReport {
    AttemptReport {
        message_id: id.to_owned(),
        lease: lease_of(leased, id),
        at_ms,
        smarthost: Some("upstream".into()),
        outcomes: outcomes
            .iter()
            .map(|(r, s)| outcome(r, *s, &format!("{} for {r}", s.as_str())))
            .collect(),
        next_attempt_ms: Some(at_ms + 10_000),
        dsn: None,
    }
}

/// The bounce Mailgate queues with an outcome: from the null sender, to the original sender.
fn dsn(id: &str, at_ms: i64) -> NewMessage {
    NewMessage {
        door: "dsn".into(),
        envelope_from: String::new(),
        ..message(id, at_ms, &[ALICE])
    }
}

fn decision(id: &str, at_ms: i64, verdict: StoredVerdict) -> StoredDecision {
    StoredDecision {
        id: id.to_owned(),
        at_ms,
        door: "smtp".into(),
        principal: ALICE.into(),
        verdict,
        code: (verdict == StoredVerdict::Denied).then(|| "sender.not_owned".into()),
        body: serde_json::json!({"id": id, "checks": [{"check": "sender", "ok": false}]}).into(),
    }
}

fn token(sha: &str, kind: TokenKind, family: &str) -> TokenRecord {
    TokenRecord {
        token_sha256: sha.to_owned(),
        kind,
        grant: serde_json::json!({"user": ALICE, "client_id": "c1"}),
        scopes: vec!["https://mail.google.com/".into(), "openid".into()],
        family: family.to_owned(),
        created_at_ms: 1_000,
        expires_at_ms: 3_601_000,
        revoked: false,
        used: false,
    }
}

fn organisation() -> Directory {
    let mut d = Directory::default();
    d.domains.push(Domain {
        name: "example.com".into(),
        verified: true,
        verification_token: None,
    });
    d.users.push(User::new(ALICE));
    d
}

/// Commits `to` over whatever the store holds; returns the new generation.
async fn commit_directory(store: &dyn Store, to: &Directory, actor: &str) -> i64 {
    let snap = store.snapshot().await.unwrap();
    store
        .commit(
            snap.generation,
            &Changeset::between(&snap.directory, to),
            actor,
        )
        .await
        .unwrap()
}

/// Accepts `m` with no usage.
async fn accept(s: &dyn Store, m: &NewMessage) {
    s.accept_message(m, None).await.unwrap();
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| id(i).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// Acceptance and usage (the gateway's `accept`, `load_counters`).

/// What an acceptance stored reads back: the summary, the body (as the worker leases it), and
/// the usage it consumed with the principal's rate state.
pub async fn an_accepted_message_reads_back_with_its_usage(b: &impl Backend) {
    let s = b.open().await;
    let m = message("m1", 1_000, &["x@a.test", "y@b.test"]);
    s.directory
        .accept_message(&m, Some((usage(1_000, 2), Some(7_000))))
        .await
        .unwrap();
    let got = s.directory.message("m1").await.unwrap().unwrap();
    assert_eq!(got.id, "m1");
    assert_eq!(got.decision_id, "d-m1");
    assert_eq!(got.state, MessageState::Queued);
    assert_eq!(got.envelope_from, ALICE);
    assert_eq!(got.recipients, m.recipients);
    assert_eq!(got.size, m.raw.len() as i64);
    assert_eq!(got.accepted_at_ms, 1_000);
    assert_eq!(s.directory.message("nope").await.unwrap(), None);

    let replay = s.directory.usage_since(0).await.unwrap();
    assert_eq!(replay.sends, vec![(ALICE.to_owned(), usage(1_000, 2))]);
    assert_eq!(replay.rate_tat_ms, vec![(ALICE.to_owned(), 7_000)]);

    let leased = s.queue.lease_due("w", 2_000, 60_000, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].raw, m.raw, "the body reads back byte for byte");
    assert_eq!(leased[0].door, "gmail");
    assert_eq!(leased[0].decision_id, "d-m1");
    assert_eq!(leased[0].envelope_from, ALICE);
    assert_eq!(
        leased[0].accepted_at_ms, 1_000,
        "the maximum age counts from acceptance"
    );
    assert_eq!(
        leased[0].recipients,
        vec![
            ("x@a.test".to_owned(), RecipientState::Pending),
            ("y@b.test".to_owned(), RecipientState::Pending),
        ],
        "every envelope recipient, in order"
    );

    // Without usage (an unlimited sender), nothing is counted.
    accept(&*s.directory, &message("m2", 1_500, &["x@a.test"])).await;
    assert_eq!(s.directory.usage_since(0).await.unwrap().sends.len(), 1);
}

/// Acceptance is atomic with its usage: an acceptance that fails (here: a message id already
/// stored) stores no usage and no rate state, and leaves the first message as it was.
pub async fn a_failed_acceptance_stores_neither_message_nor_usage(b: &impl StoreBackend) {
    let s = b.store().await;
    let first = message("m1", 1_000, &["x@a.test"]);
    s.accept_message(&first, Some((usage(1_000, 1), Some(5_000))))
        .await
        .unwrap();
    let mut again = message("m1", 2_000, &["other@a.test", "more@a.test"]);
    again.decision_id = "d-second".into();
    let refused = s
        .accept_message(&again, Some((usage(2_000, 2), Some(9_000))))
        .await;
    assert!(
        refused.is_err(),
        "a second message under one id: {refused:?}"
    );
    let replay = s.usage_since(0).await.unwrap();
    assert_eq!(
        replay.sends,
        vec![(ALICE.to_owned(), usage(1_000, 1))],
        "the failed acceptance's usage was stored"
    );
    assert_eq!(replay.rate_tat_ms, vec![(ALICE.to_owned(), 5_000)]);
    let kept = s.message("m1").await.unwrap().unwrap();
    assert_eq!(kept.decision_id, "d-m1");
    assert_eq!(kept.recipients, vec!["x@a.test".to_owned()]);
}

/// Concurrent acceptances (which a store may commit together, on one handle or several) each
/// get their own outcome: one failing does not fail the others, and exactly the stored ones are
/// counted.
pub async fn a_failing_acceptance_fails_alone(b: &impl StoreBackend) {
    let s = b.store().await;
    let handles = [s.clone(), b.store().await];
    accept(&*s, &message("dup", 1_000, &["x@a.test"])).await;
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let s = handles[i as usize % handles.len()].clone();
            let id = if i == 12 {
                "dup".to_owned()
            } else {
                format!("ok{i:02}")
            };
            tokio::spawn(async move {
                let r = s
                    .accept_message(
                        &message(&id, 2_000 + i, &["x@a.test"]),
                        Some((usage(2_000 + i, 1), None)),
                    )
                    .await;
                (id, r)
            })
        })
        .collect();
    for t in tasks {
        let (id, r) = t.await.unwrap();
        assert_eq!(r.is_err(), id == "dup", "{id}: {r:?}");
    }
    for i in (0..24).filter(|i| *i != 12) {
        assert!(s.message(&format!("ok{i:02}")).await.unwrap().is_some());
    }
    assert_eq!(s.usage_since(0).await.unwrap().sends.len(), 23);
}

/// When `accept_message` (or `record_decision`, which `explain` waits on) returns, what it
/// stored is durable: a handle opened afterwards (another process, a restart) finds the message,
/// its body, its usage and the decision.
pub async fn an_acceptance_is_durable_when_it_returns(b: &impl Backend) {
    let m = message("m1", 1_000, &["x@a.test"]);
    let d = decision("d-m1", 1_000, StoredVerdict::Allowed);
    {
        let s = b.open().await;
        s.directory.record_decision(&d).await.unwrap();
        s.directory
            .accept_message(&m, Some((usage(1_000, 1), Some(3_000))))
            .await
            .unwrap();
    }
    let later = b.open().await;
    assert_eq!(later.directory.decision("d-m1").await.unwrap(), Some(d));
    assert_eq!(
        later.directory.message("m1").await.unwrap().unwrap().state,
        MessageState::Queued
    );
    let replay = later.directory.usage_since(0).await.unwrap();
    assert_eq!(replay.sends, vec![(ALICE.to_owned(), usage(1_000, 1))]);
    let leased = later.queue.lease_due("w", 2_000, 1_000, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].raw, m.raw);
}

/// The replay at start: the sends since the cut-off, oldest first (older ones are gone for
/// good), and per principal the rate state, which only moves forward.
pub async fn usage_replay_keeps_recent_sends_and_the_latest_rate_state(b: &impl StoreBackend) {
    let s = b.store().await;
    s.record_usage("a", usage(100, 2), Some(1_000))
        .await
        .unwrap();
    s.record_usage("a", usage(200, 3), Some(900)).await.unwrap();
    s.record_usage("b", usage(300, 1), None).await.unwrap();
    s.accept_message(
        &NewMessage {
            principal: "b".into(),
            ..message("m", 400, &["x@a.test"])
        },
        Some((usage(400, 1), Some(2_000))),
    )
    .await
    .unwrap();
    let r = s.usage_since(150).await.unwrap();
    assert_eq!(
        r.sends,
        vec![
            ("a".to_owned(), usage(200, 3)),
            ("b".to_owned(), usage(300, 1)),
            ("b".to_owned(), usage(400, 1)),
        ]
    );
    let mut rates = r.rate_tat_ms.clone();
    rates.sort();
    assert_eq!(
        rates,
        vec![("a".to_owned(), 1_000), ("b".to_owned(), 2_000)],
        "a rate state never moves back"
    );
    // Sends before the cut-off no longer count for any limit: they are not replayed again.
    assert_eq!(s.usage_since(0).await.unwrap().sends.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Leases (the delivery worker; with several nodes, several workers on one database).

/// While a lease runs, no other leaser (on this handle or another) gets the message.
pub async fn a_lease_excludes_other_leasers(b: &impl Backend) {
    let s = b.open().await;
    let other = b.open().await;
    accept(&*s.directory, &message("m1", 1_000, &["x@a.test"])).await;
    let a = s.queue.lease_due("w1", 2_000, 1_000, 10).await.unwrap();
    assert_eq!(ids(&a, |m| &m.id), ["m1"]);
    assert_eq!(a[0].lease_until_ms, 3_000);
    assert_eq!(
        a[0].recipients,
        vec![("x@a.test".to_owned(), RecipientState::Pending)]
    );
    assert_eq!(a[0].attempts, 0);
    for (q, owner, at) in [
        (&s.queue, "w1", 2_000),
        (&s.queue, "w2", 2_500),
        (&other.queue, "w3", 2_999),
    ] {
        assert!(
            q.lease_due(owner, at, 1_000, 10).await.unwrap().is_empty(),
            "{owner} leased m1 at {at} while w1's lease held"
        );
    }
    let status = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(status.lease_owner.as_deref(), Some("w1"));
    assert_eq!(status.lease_until_ms, Some(3_000));
}

/// Workers on several handles leasing at once never hold the same message, and between them
/// lease every due message.
pub async fn concurrent_leasers_never_hold_the_same_message(b: &impl Backend) {
    let s = b.open().await;
    let n = 40;
    for i in 0..n {
        accept(
            &*s.directory,
            &message(&format!("m{i:02}"), 1_000 + i, &["x@a.test"]),
        )
        .await;
    }
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(b.open().await);
    }
    let tasks: Vec<_> = (0..6)
        .map(|w| {
            let h = handles[w % handles.len()].clone();
            tokio::spawn(async move {
                let owner = format!("w{w}");
                let mut got = Vec::new();
                // Bounded: 40 messages, at least one per round while any is left.
                for _ in 0..n {
                    let batch = h.queue.lease_due(&owner, 2_000, 60_000, 3).await.unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    got.extend(batch.into_iter().map(|m| (m.id, owner.clone())));
                    tokio::task::yield_now().await;
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: BTreeSet<&String> = all.iter().map(|(id, _)| id).collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "a message was leased twice: {all:?}"
    );
    assert_eq!(unique.len(), n as usize, "every due message was leased");
    // The store agrees on who holds each.
    for (id, owner) in &all {
        let st = s.queue.message_status(id).await.unwrap().unwrap();
        assert_eq!(st.lease_owner.as_deref(), Some(owner.as_str()), "{id}");
    }
}

/// A lease runs until `lease_until_ms`; from then on the message is due again (its worker
/// crashed) and another worker takes it, recipients as they were.
pub async fn an_expired_lease_can_be_taken_again(b: &impl Backend) {
    let s = b.open().await;
    accept(&*s.directory, &message("m1", 1_000, &["x@a.test"])).await;
    let a = s.queue.lease_due("w1", 2_000, 1_000, 10).await.unwrap();
    assert_eq!(a[0].lease_until_ms, 3_000);
    let other = b.open().await;
    let taken = other.queue.lease_due("w2", 3_000, 1_000, 10).await.unwrap();
    assert_eq!(ids(&taken, |m| &m.id), ["m1"]);
    assert_eq!(taken[0].lease_until_ms, 4_000);
    assert_eq!(
        taken[0].recipients,
        vec![("x@a.test".to_owned(), RecipientState::Pending)]
    );
    assert_eq!(taken[0].raw, a[0].raw);
    let st = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.lease_owner.as_deref(), Some("w2"));
    // And the new lease excludes the old owner in turn.
    assert!(
        s.queue
            .lease_due("w1", 3_500, 1_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Only due messages are leased (queued, or deferred whose next attempt has come; not held, not
/// final), oldest first, at most `limit`.
pub async fn only_due_messages_are_leased_oldest_first_up_to_the_limit(b: &impl Backend) {
    let s = b.open().await;
    accept(&*s.directory, &message("old", 1_000, &["x@a.test"])).await;
    accept(&*s.directory, &message("later", 1_200, &["x@a.test"])).await;
    accept(&*s.directory, &message("latest", 1_400, &["x@a.test"])).await;
    let held = NewMessage {
        state: MessageState::Held,
        hold_until_ms: Some(50_000),
        ..message("held", 900, &["x@a.test"])
    };
    accept(&*s.directory, &held).await;
    let l = s.queue.lease_due("w", 2_000, 100_000, 2).await.unwrap();
    assert_eq!(ids(&l, |m| &m.id), ["old", "later"]);
    // `old` is deferred to 20_000, `later` delivered.
    let recorded = s
        .queue
        .record_attempts(
            "w",
            &[
                AttemptReport {
                    next_attempt_ms: Some(20_000),
                    ..report(&l, "old", 2_100, &[("x@a.test", RecipientState::Deferred)])
                },
                report(
                    &l,
                    "later",
                    2_100,
                    &[("x@a.test", RecipientState::Delivered)],
                ),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        recorded,
        [
            Recorded::State(MessageState::Deferred),
            Recorded::State(MessageState::Delivered)
        ]
    );
    let l = s.queue.lease_due("w", 3_000, 100_000, 10).await.unwrap();
    assert_eq!(
        ids(&l, |m| &m.id),
        ["latest"],
        "deferred, delivered and held messages are not due"
    );
    s.queue
        .record_attempt(
            "w",
            &report(&l, "latest", 3_100, &[("x@a.test", RecipientState::Failed)]),
        )
        .await
        .unwrap();
    assert!(
        s.queue
            .lease_due("w", 19_999, 100_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let due = s.queue.lease_due("w", 20_000, 100_000, 10).await.unwrap();
    assert_eq!(ids(&due, |m| &m.id), ["old"]);
    assert_eq!(due[0].attempts, 1);
}

// ---------------------------------------------------------------------------------------------
// Write-backs under the lease.

/// A worker whose lease was taken over (it was paused or slow past its lease) writes nothing
/// back: its attempt, its DSN and its capture mark are refused and the message is exactly as
/// the new holder has it.
pub async fn a_write_back_with_a_lost_lease_changes_nothing(b: &impl Backend) {
    let s = b.open().await;
    accept(
        &*s.directory,
        &message("m1", 1_000, &["x@a.test", "y@a.test"]),
    )
    .await;
    let l = s.queue.lease_due("w1", 2_000, 1_000, 10).await.unwrap();
    let other = b.open().await;
    let taken = other
        .queue
        .lease_due("w2", 3_000, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    let before = s.queue.message_status("m1").await.unwrap().unwrap();
    let late = AttemptReport {
        dsn: Some(dsn("bounce", 3_100)),
        ..report(
            &l,
            "m1",
            3_100,
            &[
                ("x@a.test", RecipientState::Delivered),
                ("y@a.test", RecipientState::Failed),
            ],
        )
    };
    assert_eq!(
        s.queue.record_attempt("w1", &late).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue
            .record_attempts("w1", std::slice::from_ref(&late))
            .await
            .unwrap(),
        [Recorded::LeaseLost]
    );
    assert_eq!(
        s.queue
            .mark_captured("w1", "m1", lease_of(&l, "m1"), 3_200)
            .await
            .unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue
            .extend_lease("w1", &[("m1".into(), lease_of(&l, "m1"))], 3_200, 60_000)
            .await
            .unwrap(),
        [Recorded::LeaseLost]
    );
    // The holder's name does not make the old lease its own.
    assert_eq!(
        s.queue.record_attempt("w2", &late).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue.message_status("m1").await.unwrap().unwrap(),
        before,
        "a write-back without the lease changed the message"
    );
    assert_eq!(
        s.directory.message("bounce").await.unwrap(),
        None,
        "its DSN was queued"
    );
    assert!(s.queue.list_captured(10).await.unwrap().is_empty());
    // The holder's write-back counts.
    let late = AttemptReport {
        lease: lease_of(&taken, "m1"),
        ..late
    };
    assert_eq!(
        other.queue.record_attempt("w2", &late).await.unwrap(),
        Recorded::State(MessageState::Failed)
    );
    assert!(s.directory.message("bounce").await.unwrap().is_some());
}

/// Nobody writes back to a message they never leased, nor to one deleted or unknown.
pub async fn a_write_back_without_a_lease_changes_nothing(b: &impl Backend) {
    let s = b.open().await;
    accept(&*s.directory, &message("never", 1_000, &["x@a.test"])).await;
    let before = s.queue.message_status("never").await.unwrap().unwrap();
    let r = report(
        &[],
        "never",
        2_000,
        &[("x@a.test", RecipientState::Delivered)],
    );
    assert_eq!(
        s.queue.record_attempt("w", &r).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue.mark_captured("w", "never", 0, 2_000).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue.message_status("never").await.unwrap().unwrap(),
        before
    );
    // Leased, then deleted by an operator while the worker delivered it.
    accept(&*s.directory, &message("gone", 1_000, &["x@a.test"])).await;
    let l = s.queue.lease_due("w", 2_000, 60_000, 10).await.unwrap();
    assert!(s.queue.delete_message("gone").await.unwrap());
    let r = report(
        &l,
        "gone",
        2_100,
        &[("x@a.test", RecipientState::Delivered)],
    );
    assert_eq!(
        s.queue.record_attempt("w", &r).await.unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue
            .mark_captured("w", "gone", lease_of(&l, "gone"), 2_100)
            .await
            .unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(s.queue.message_status("gone").await.unwrap(), None);
    let r = report(
        &l,
        "unknown",
        2_100,
        &[("x@a.test", RecipientState::Delivered)],
    );
    assert_eq!(
        s.queue.record_attempt("w", &r).await.unwrap(),
        Recorded::LeaseLost
    );
}

/// Recording an attempt ends the lease: one lease, one write-back, and a deferred message is due
/// to any worker at its next attempt even while the old lease would still run.
pub async fn a_recorded_attempt_ends_the_lease(b: &impl Backend) {
    let s = b.open().await;
    accept(&*s.directory, &message("m1", 1_000, &["x@a.test"])).await;
    let l = s.queue.lease_due("w1", 2_000, 600_000, 10).await.unwrap();
    let r = AttemptReport {
        next_attempt_ms: Some(10_000),
        ..report(&l, "m1", 2_100, &[("x@a.test", RecipientState::Deferred)])
    };
    assert_eq!(
        s.queue.record_attempt("w1", &r).await.unwrap(),
        Recorded::State(MessageState::Deferred)
    );
    let st = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.lease_owner, None);
    assert_eq!(st.entry.next_attempt_ms, Some(10_000));
    assert_eq!(
        s.queue.record_attempt("w1", &r).await.unwrap(),
        Recorded::LeaseLost,
        "a second write-back on one lease"
    );
    assert_eq!(
        s.queue
            .message_status("m1")
            .await
            .unwrap()
            .unwrap()
            .history
            .len(),
        1
    );
    let other = b.open().await;
    let again = other
        .queue
        .lease_due("w2", 10_000, 1_000, 10)
        .await
        .unwrap();
    assert_eq!(ids(&again, |m| &m.id), ["m1"]);
    assert_eq!(again[0].attempts, 1);
}

/// A batch of write-backs is recorded together, and a lost lease loses only its own report; a
/// message named twice is recorded once (its second report finds the lease ended, as it would
/// one after the other).
pub async fn a_batch_of_write_backs_loses_only_the_lost_leases(b: &impl Backend) {
    let s = b.open().await;
    for id in ["m1", "m2", "m3"] {
        accept(&*s.directory, &message(id, 1_000, &["x@a.test"])).await;
    }
    let l = s.queue.lease_due("w1", 2_000, 1_000, 10).await.unwrap();
    assert_eq!(l.len(), 3);
    assert!(s.queue.delete_message("m2").await.unwrap());
    let got = s
        .queue
        .record_attempts(
            "w1",
            &[
                report(&l, "m1", 2_100, &[("x@a.test", RecipientState::Delivered)]),
                report(&l, "m2", 2_100, &[("x@a.test", RecipientState::Delivered)]),
                report(&l, "m3", 2_100, &[("x@a.test", RecipientState::Deferred)]),
                report(&l, "m1", 2_200, &[("x@a.test", RecipientState::Failed)]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            Recorded::State(MessageState::Delivered),
            Recorded::LeaseLost,
            Recorded::State(MessageState::Deferred),
            Recorded::LeaseLost,
        ]
    );
    let m1 = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(m1.entry.state, MessageState::Delivered);
    assert_eq!(m1.history.len(), 1, "{:?}", m1.history);
    let m3 = s.queue.message_status("m3").await.unwrap().unwrap();
    assert_eq!(m3.entry.state, MessageState::Deferred);
    assert_eq!(m3.history.len(), 1);
    assert_eq!(s.directory.message("m2").await.unwrap(), None);
    assert!(s.queue.record_attempts("w1", &[]).await.unwrap().is_empty());
}

/// `mailgate status` counts the leases each node holds: unexpired ones only, per node whatever
/// the run or worker (`<node>/<run>/<worker>`), on every handle; a lease that expires or that
/// the node takes back is no longer counted.
pub async fn leases_are_counted_per_node_while_unexpired(b: &impl Backend) {
    let s = b.open().await;
    let leases = [
        (lease_owner("n1", "r1", 0), 60_000),
        (lease_owner("n1", "r1", 1), 60_000),
        (lease_owner("n1", "r2", 0), 60_000),
        (lease_owner("n10", "r1", 0), 500),
    ];
    for (i, (owner, lease_ms)) in leases.iter().enumerate() {
        let id = format!("m{i}");
        accept(
            &*s.directory,
            &message(&id, 1_000 + i as i64, &["x@a.test"]),
        )
        .await;
        let got = s.queue.lease_due(owner, 2_000, *lease_ms, 1).await.unwrap();
        assert_eq!(ids(&got, |m| &m.id), [id]);
    }
    accept(&*s.directory, &message("free", 1_100, &["x@a.test"])).await;
    let counted = |at| {
        let s = s.clone();
        async move {
            s.queue
                .leases_by_node(at)
                .await
                .unwrap()
                .into_iter()
                .map(|n| (n.node, n.leases))
                .collect::<Vec<_>>()
        }
    };
    let other = b.open().await;
    assert_eq!(
        other.queue.leases_by_node(2_100).await.unwrap(),
        [
            mailgate_store::NodeLeases {
                node: "n1".into(),
                leases: 3
            },
            mailgate_store::NodeLeases {
                node: "n10".into(),
                leases: 1
            },
        ]
    );
    assert_eq!(
        counted(2_500).await,
        [("n1".to_owned(), 3)],
        "n10's lease expired"
    );
    s.queue.reclaim_leases("n1", 3_000).await.unwrap();
    assert_eq!(counted(3_000).await, []);
}

/// A node that starts again takes back its own leases (owners `<node>/...`): its messages are due
/// at once, not when the leases expire; a write-back by the run before, whether or not the
/// message was leased again since, changes nothing; other nodes' leases are untouched, however
/// alike their names (`n10` is not `n1`; `_` and `%` are not patterns).
pub async fn a_nodes_reclaim_releases_its_own_leases_and_no_other(b: &impl Backend) {
    let s = b.open().await;
    let old = [
        lease_owner("n1", "r1", 0),
        lease_owner("n1", "r1", 1),
        lease_owner("n10", "r1", 0),
        lease_owner("n2", "r1", 0),
    ];
    let mut l = Vec::new();
    for (i, owner) in old.iter().enumerate() {
        let id = format!("m{}", i + 1);
        accept(
            &*s.directory,
            &message(&id, 1_000 + i as i64, &["x@a.test"]),
        )
        .await;
        let got = s.queue.lease_due(owner, 2_000, 600_000, 1).await.unwrap();
        assert_eq!(ids(&got, |m| &m.id), [id], "leased to {owner}");
        l.extend(got);
    }
    for node in ["n_", "n%", "n", ""] {
        assert_eq!(
            s.queue.reclaim_leases(node, 2_500).await.unwrap(),
            0,
            "`{node}` took back another node's leases"
        );
    }

    // n1 starts again (a new handle, as a new process opens the store).
    let restarted = b.open().await;
    assert_eq!(
        restarted.queue.reclaim_leases("n1", 3_000).await.unwrap(),
        2
    );
    let owner_of = |st: &mailgate_store::MessageStatus| (st.lease_owner.clone(), st.lease_until_ms);
    let mut after = Vec::new();
    for id in ["m1", "m2", "m3", "m4"] {
        after.push(s.queue.message_status(id).await.unwrap().unwrap());
    }
    assert_eq!(owner_of(&after[0]), (None, None));
    assert_eq!(owner_of(&after[1]), (None, None));
    assert_eq!(owner_of(&after[2]), (Some(old[2].clone()), Some(602_000)));
    assert_eq!(owner_of(&after[3]), (Some(old[3].clone()), Some(602_000)));

    // The run before writes back after the reclaim: nothing changes.
    let delivered = |leased: &[LeasedMessage], id: &str| {
        report(
            leased,
            id,
            3_100,
            &[("x@a.test", RecipientState::Delivered)],
        )
    };
    assert_eq!(
        s.queue
            .record_attempt(&old[0], &delivered(&l, "m1"))
            .await
            .unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue.message_status("m1").await.unwrap().unwrap(),
        after[0]
    );

    // Due at once for the node's new run, long before the old leases would have expired.
    let new_owner = lease_owner("n1", "r2", 0);
    let again = restarted
        .queue
        .lease_due(&new_owner, 3_000, 600_000, 10)
        .await
        .unwrap();
    assert_eq!(ids(&again, |m| &m.id), ["m1", "m2"]);
    let leased_again = [
        s.queue.message_status("m1").await.unwrap().unwrap(),
        s.queue.message_status("m2").await.unwrap().unwrap(),
    ];
    // ... and the run before still writes nothing, now that another lease holds them.
    assert_eq!(
        s.queue
            .record_attempts(&old[1], &[delivered(&l, "m2")])
            .await
            .unwrap(),
        [Recorded::LeaseLost]
    );
    assert_eq!(
        s.queue
            .mark_captured(&old[0], "m1", lease_of(&l, "m1"), 3_200)
            .await
            .unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(
        s.queue.message_status("m1").await.unwrap().unwrap(),
        leased_again[0]
    );
    assert_eq!(
        s.queue.message_status("m2").await.unwrap().unwrap(),
        leased_again[1]
    );
    assert!(s.queue.list_captured(10).await.unwrap().is_empty());

    // The new run's write-back counts, and so does the other node's under its own lease.
    assert_eq!(
        restarted
            .queue
            .record_attempt(&new_owner, &delivered(&again, "m1"))
            .await
            .unwrap(),
        Recorded::State(MessageState::Delivered)
    );
    assert_eq!(
        s.queue
            .record_attempt(&old[2], &delivered(&l, "m3"))
            .await
            .unwrap(),
        Recorded::State(MessageState::Delivered)
    );
    assert_eq!(
        s.queue.message_status("m4").await.unwrap().unwrap(),
        after[3],
        "another node's lease was touched"
    );
}

/// Per-recipient outcomes: the message is deferred while any recipient waits, else failed if
/// any failed, else delivered; only recipients not final are handed out again; every attempt is
/// in the history; a DSN queued with the outcome is a message of its own from the null sender.
pub async fn message_state_follows_its_recipients(b: &impl Backend) {
    let s = b.open().await;
    accept(
        &*s.directory,
        &message("m1", 1_000, &["ok@a.test", "no@a.test", "later@a.test"]),
    )
    .await;
    let leased = s.queue.lease_due("w", 2_000, 60_000, 10).await.unwrap();
    assert_eq!(leased[0].recipients.len(), 3);
    let r = AttemptReport {
        dsn: Some(dsn("dsn1", 2_100)),
        next_attempt_ms: Some(10_000),
        ..report(
            &leased,
            "m1",
            2_100,
            &[
                ("ok@a.test", RecipientState::Delivered),
                ("no@a.test", RecipientState::Failed),
                ("later@a.test", RecipientState::Deferred),
            ],
        )
    };
    assert_eq!(
        s.queue.record_attempt("w", &r).await.unwrap(),
        Recorded::State(MessageState::Deferred)
    );
    let st = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.entry.state, MessageState::Deferred);
    assert_eq!(st.entry.attempts, 1);
    assert_eq!(st.done_at_ms, None);
    assert_eq!(st.history.len(), 3);
    let no = st
        .recipient_status
        .iter()
        .find(|r| r.recipient == "no@a.test")
        .unwrap();
    assert_eq!(no.state, RecipientState::Failed);
    assert_eq!(no.code.as_deref(), Some("upstream.refused"));
    assert_eq!(no.last_reply.as_deref(), Some("failed for no@a.test"));
    assert_eq!(no.smarthost.as_deref(), Some("upstream"));
    let later = st
        .history
        .iter()
        .find(|h| h.recipient == "later@a.test")
        .unwrap();
    assert_eq!(later.outcome, RecipientState::Deferred);
    assert_eq!(later.next_attempt_ms, Some(10_000));
    assert_eq!(later.reply.as_deref(), Some("deferred for later@a.test"));

    let bounce = s.queue.message_status("dsn1").await.unwrap().unwrap();
    assert_eq!(bounce.door, "dsn");
    assert_eq!(bounce.entry.envelope_from, "");
    assert_eq!(bounce.entry.state, MessageState::Queued);

    // At the next attempt only the deferred recipient is left (the DSN is due too).
    let again = s.queue.lease_due("w", 10_000, 60_000, 10).await.unwrap();
    let m1 = again.iter().find(|m| m.id == "m1").unwrap();
    assert_eq!(
        m1.recipients,
        vec![("later@a.test".to_owned(), RecipientState::Deferred)]
    );
    assert_eq!(
        s.queue
            .record_attempt(
                "w",
                &report(
                    &again,
                    "m1",
                    10_100,
                    &[("later@a.test", RecipientState::Delivered)]
                )
            )
            .await
            .unwrap(),
        Recorded::State(MessageState::Failed),
        "one recipient failed for good"
    );
    let st = s.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.done_at_ms, Some(10_100));
    assert_eq!(st.entry.next_attempt_ms, None);
    assert_eq!(st.entry.attempts, 2);
    assert_eq!(st.history.len(), 4);
    assert_eq!(
        s.queue
            .record_attempt(
                "w",
                &report(
                    &again,
                    "dsn1",
                    10_100,
                    &[(ALICE, RecipientState::Delivered)]
                )
            )
            .await
            .unwrap(),
        Recorded::State(MessageState::Delivered)
    );
}

/// A held message (a limit with `exceed_action: hold`) is not due before `hold_until_ms`, and
/// is released at it.
pub async fn held_messages_are_released_at_hold_until(b: &impl Backend) {
    let s = b.open().await;
    let held = NewMessage {
        state: MessageState::Held,
        hold_until_ms: Some(5_000),
        ..message("h", 1_000, &["x@a.test"])
    };
    accept(&*s.directory, &held).await;
    assert_eq!(
        s.directory.message("h").await.unwrap().unwrap().state,
        MessageState::Held
    );
    assert_eq!(s.queue.release_held(4_999).await.unwrap(), 0);
    assert!(
        s.queue
            .lease_due("w", 4_999, 10, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.queue.release_held(5_000).await.unwrap(), 1);
    assert_eq!(s.queue.release_held(5_000).await.unwrap(), 0);
    assert_eq!(
        s.directory.message("h").await.unwrap().unwrap().state,
        MessageState::Queued
    );
    assert_eq!(
        ids(&s.queue.lease_due("w", 5_000, 10, 10).await.unwrap(), |m| {
            &m.id
        }),
        ["h"]
    );
}

/// What a sleeping worker waits for: nothing when the queue is empty; a held message's release;
/// a deferred message's next attempt; a leased message's lease expiry; a queued one at once.
pub async fn next_due_is_the_earliest_time_something_becomes_due(b: &impl Backend) {
    let s = b.open().await;
    assert_eq!(s.queue.next_due_ms().await.unwrap(), None);
    accept(
        &*s.directory,
        &NewMessage {
            state: MessageState::Held,
            hold_until_ms: Some(50_000),
            ..message("h", 1_000, &["x@a.test"])
        },
    )
    .await;
    assert_eq!(s.queue.next_due_ms().await.unwrap(), Some(50_000));
    accept(&*s.directory, &message("m", 1_000, &["x@a.test"])).await;
    let now_due = s.queue.next_due_ms().await.unwrap().unwrap();
    assert!(now_due <= 1_000, "a queued message is due now: {now_due}");
    let l = s.queue.lease_due("w", 2_000, 30_000, 10).await.unwrap();
    assert_eq!(
        s.queue.next_due_ms().await.unwrap(),
        Some(32_000),
        "a leased message is due when its lease expires"
    );
    s.queue
        .record_attempt(
            "w",
            &AttemptReport {
                next_attempt_ms: Some(20_000),
                ..report(&l, "m", 2_100, &[("x@a.test", RecipientState::Deferred)])
            },
        )
        .await
        .unwrap();
    assert_eq!(s.queue.next_due_ms().await.unwrap(), Some(20_000));
    let l = s.queue.lease_due("w", 20_000, 1_000, 10).await.unwrap();
    s.queue
        .record_attempt(
            "w",
            &report(&l, "m", 20_100, &[("x@a.test", RecipientState::Delivered)]),
        )
        .await
        .unwrap();
    assert_eq!(
        s.queue.next_due_ms().await.unwrap(),
        Some(50_000),
        "final messages are never due"
    );
}

/// Capture mode: a captured message is final, listed by `list_captured` (newest first, the head
/// of each) and not by the default queue listing, and read whole by id.
pub async fn captured_messages_are_listed_apart_and_read_whole(b: &impl Backend) {
    let s = b.open().await;
    let big = NewMessage {
        raw: {
            let mut raw = b"Subject: big\r\n\r\n".to_vec();
            raw.resize(CAPTURED_HEAD_BYTES as usize + 1_000, b'x');
            raw
        },
        ..message("big", 1_000, &["x@a.test"])
    };
    accept(&*s.directory, &big).await;
    accept(&*s.directory, &message("small", 1_100, &["y@a.test"])).await;
    accept(&*s.directory, &message("relayed", 1_200, &["z@a.test"])).await;
    let l = s.queue.lease_due("w", 2_000, 60_000, 10).await.unwrap();
    for (id, at) in [("big", 2_000), ("small", 2_500)] {
        assert_eq!(
            s.queue
                .mark_captured("w", id, lease_of(&l, id), at)
                .await
                .unwrap(),
            Recorded::State(MessageState::Captured)
        );
    }
    assert_eq!(
        s.queue
            .mark_captured("w", "big", lease_of(&l, "big"), 2_600)
            .await
            .unwrap(),
        Recorded::LeaseLost,
        "a captured message has no lease left"
    );
    let listed = s.queue.list_captured(10).await.unwrap();
    assert_eq!(ids(&listed, |c| &c.id), ["small", "big"]);
    assert_eq!(listed[1].captured_at_ms, Some(2_000));
    assert_eq!(listed[1].size, big.raw.len() as i64);
    assert_eq!(listed[1].raw, &big.raw[..CAPTURED_HEAD_BYTES as usize]);
    assert_eq!(listed[0].raw, message("small", 0, &[]).raw);
    assert_eq!(listed[0].recipients, vec!["y@a.test".to_owned()]);
    assert_eq!(
        ids(&s.queue.list_captured(1).await.unwrap(), |c| &c.id),
        ["small"]
    );
    let whole = s.queue.captured_message("big").await.unwrap().unwrap();
    assert_eq!(whole.raw, big.raw);
    assert_eq!(whole.decision_id, "d-big");
    assert_eq!(s.queue.captured_message("relayed").await.unwrap(), None);
    assert_eq!(s.queue.captured_message("nope").await.unwrap(), None);
    let queue = s.queue.list_queue(&QueueFilter::default()).await.unwrap();
    assert_eq!(ids(&queue, |e| &e.id), ["relayed"]);
    let only = s
        .queue
        .list_queue(&QueueFilter {
            state: Some(MessageState::Captured),
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(ids(&only, |e| &e.id), ["small", "big"]);
    assert!(
        s.queue
            .lease_due("w", 999_999, 1_000, 10)
            .await
            .unwrap()
            .iter()
            .all(|m| m.id == "relayed"),
        "captured messages are never leased again"
    );
}

/// `queue retry`: a deferred, held or failed message is due now, its failed recipients pending
/// again; a delivered or captured one is final (and says which); an unknown one is not found.
pub async fn a_retried_message_is_due_now_with_failed_recipients_pending(b: &impl Backend) {
    let s = b.open().await;
    accept(
        &*s.directory,
        &message("f", 1_000, &["no@a.test", "ok@a.test"]),
    )
    .await;
    accept(&*s.directory, &message("d", 1_000, &["x@a.test"])).await;
    accept(&*s.directory, &message("c", 1_000, &["x@a.test"])).await;
    accept(
        &*s.directory,
        &NewMessage {
            state: MessageState::Held,
            hold_until_ms: Some(900_000),
            ..message("h", 1_000, &["x@a.test"])
        },
    )
    .await;
    let l = s.queue.lease_due("w", 2_000, 60_000, 10).await.unwrap();
    s.queue
        .record_attempts(
            "w",
            &[
                report(
                    &l,
                    "f",
                    2_100,
                    &[
                        ("no@a.test", RecipientState::Failed),
                        ("ok@a.test", RecipientState::Delivered),
                    ],
                ),
                report(&l, "d", 2_100, &[("x@a.test", RecipientState::Delivered)]),
            ],
        )
        .await
        .unwrap();
    s.queue
        .mark_captured("w", "c", lease_of(&l, "c"), 2_100)
        .await
        .unwrap();

    assert_eq!(
        s.queue.retry_message("d", 3_000).await.unwrap(),
        RetryOutcome::Final(MessageState::Delivered)
    );
    assert_eq!(
        s.queue.retry_message("c", 3_000).await.unwrap(),
        RetryOutcome::Final(MessageState::Captured)
    );
    assert_eq!(
        s.queue.retry_message("nope", 3_000).await.unwrap(),
        RetryOutcome::NotFound
    );
    for id in ["f", "h"] {
        assert_eq!(
            s.queue.retry_message(id, 3_000).await.unwrap(),
            RetryOutcome::Requeued,
            "{id}"
        );
        assert_eq!(
            s.directory.message(id).await.unwrap().unwrap().state,
            MessageState::Queued
        );
    }
    let again = s.queue.lease_due("w", 3_000, 60_000, 10).await.unwrap();
    let mut got = ids(&again, |m| &m.id);
    got.sort();
    assert_eq!(got, ["f", "h"]);
    let f = again.iter().find(|m| m.id == "f").unwrap();
    assert_eq!(
        f.recipients,
        vec![("no@a.test".to_owned(), RecipientState::Pending)],
        "only the failed recipient is tried again"
    );
    // Delivered and captured messages kept their state.
    assert_eq!(
        s.directory.message("d").await.unwrap().unwrap().state,
        MessageState::Delivered
    );
    assert_eq!(
        s.directory.message("c").await.unwrap().unwrap().state,
        MessageState::Captured
    );
}

/// `queue delete`: the message goes with its body, recipients and history; deleting again (or
/// an unknown id) says there was none; other messages stay.
pub async fn a_deleted_message_is_gone_with_its_history(b: &impl Backend) {
    let s = b.open().await;
    accept(&*s.directory, &message("m1", 1_000, &["x@a.test"])).await;
    accept(&*s.directory, &message("m2", 1_000, &["x@a.test"])).await;
    let l = s.queue.lease_due("w", 2_000, 60_000, 10).await.unwrap();
    s.queue
        .record_attempt(
            "w",
            &report(&l, "m1", 2_100, &[("x@a.test", RecipientState::Deferred)]),
        )
        .await
        .unwrap();
    assert!(s.queue.delete_message("m1").await.unwrap());
    assert!(!s.queue.delete_message("m1").await.unwrap());
    assert!(!s.queue.delete_message("nope").await.unwrap());
    assert_eq!(s.directory.message("m1").await.unwrap(), None);
    assert_eq!(s.queue.message_status("m1").await.unwrap(), None);
    assert_eq!(
        s.queue.retry_message("m1", 3_000).await.unwrap(),
        RetryOutcome::NotFound
    );
    assert!(
        s.queue
            .lease_due("w2", 999_999, 1_000, 10)
            .await
            .unwrap()
            .iter()
            .all(|m| m.id != "m1")
    );
    assert!(s.directory.message("m2").await.unwrap().is_some());
    // The id is free again: nothing of the old message is left to collide with.
    accept(&*s.directory, &message("m1", 5_000, &["new@a.test"])).await;
    let st = s.queue.message_status("m1").await.unwrap().unwrap();
    assert!(st.history.is_empty());
    assert_eq!(st.recipient_status.len(), 1);
    assert_eq!(st.recipient_status[0].recipient, "new@a.test");
    assert_eq!(st.recipient_status[0].state, RecipientState::Pending);
}

/// `queue list`: newest first, by state when asked, at most `limit` (0 means 100); the entry
/// carries what the CLI prints.
pub async fn the_queue_lists_newest_first_by_state_and_limit(b: &impl Backend) {
    let s = b.open().await;
    for i in 0..5 {
        accept(
            &*s.directory,
            &message(&format!("m{i}"), 1_000 + i, &["x@a.test"]),
        )
        .await;
    }
    accept(
        &*s.directory,
        &NewMessage {
            state: MessageState::Held,
            hold_until_ms: Some(900_000),
            ..message("h", 500, &["x@a.test"])
        },
    )
    .await;
    let all = s.queue.list_queue(&QueueFilter::default()).await.unwrap();
    assert_eq!(ids(&all, |e| &e.id), ["m4", "m3", "m2", "m1", "m0", "h"]);
    let m4 = &all[0];
    assert_eq!(m4.state, MessageState::Queued);
    assert_eq!(m4.decision_id, "d-m4");
    assert_eq!(m4.envelope_from, ALICE);
    assert_eq!(m4.recipients, vec!["x@a.test".to_owned()]);
    assert_eq!(m4.size, message("m4", 0, &[]).raw.len() as i64);
    assert_eq!(m4.attempts, 0);
    let two = s
        .queue
        .list_queue(&QueueFilter {
            state: None,
            limit: 2,
        })
        .await
        .unwrap();
    assert_eq!(ids(&two, |e| &e.id), ["m4", "m3"]);
    let held = s
        .queue
        .list_queue(&QueueFilter {
            state: Some(MessageState::Held),
            limit: 0,
        })
        .await
        .unwrap();
    assert_eq!(ids(&held, |e| &e.id), ["h"]);
    let delivered = s
        .queue
        .list_queue(&QueueFilter {
            state: Some(MessageState::Delivered),
            limit: 0,
        })
        .await
        .unwrap();
    assert!(delivered.is_empty());
    for i in 0..101 {
        accept(
            &*s.directory,
            &message(&format!("n{i:03}"), 10_000 + i, &["x@a.test"]),
        )
        .await;
    }
    let page = s.queue.list_queue(&QueueFilter::default()).await.unwrap();
    assert_eq!(page.len(), 100, "limit 0 means 100");
    assert_eq!(page[0].id, "n100");
}

// ---------------------------------------------------------------------------------------------
// Retention (`serve` applies `[retention]` hourly).

/// Retention by age: finished messages (delivered, failed, captured) that finished before the
/// cut-off go with their history; queued, deferred and held ones stay whatever their age, as do
/// messages that finished after it. Decisions before the cut-off go unless a remaining message
/// names them. `None` keeps that kind.
pub async fn retention_deletes_old_finished_messages_and_unreferenced_decisions_only(
    b: &impl Backend,
) {
    let s = b.open().await;
    let cut = 50_000;
    let old = [
        "delivered",
        "failed",
        "captured",
        "queued",
        "deferred",
        "late",
    ];
    for id in old {
        s.directory
            .record_decision(&decision(&format!("d-{id}"), 1_000, StoredVerdict::Allowed))
            .await
            .unwrap();
        accept(&*s.directory, &message(id, 1_000, &["x@a.test"])).await;
    }
    s.directory
        .record_decision(&decision("d-held", 1_000, StoredVerdict::Held))
        .await
        .unwrap();
    accept(
        &*s.directory,
        &NewMessage {
            state: MessageState::Held,
            hold_until_ms: Some(900_000),
            ..message("held", 1_000, &["x@a.test"])
        },
    )
    .await;
    s.directory
        .record_decision(&decision("d-old-refusal", 1_000, StoredVerdict::Denied))
        .await
        .unwrap();
    s.directory
        .record_decision(&decision("d-new-refusal", 90_000, StoredVerdict::Denied))
        .await
        .unwrap();
    let leased = s.queue.lease_due("w", 2_000, 100_000, 10).await.unwrap();
    assert_eq!(leased.len(), 6, "every message but the held one");
    s.queue
        .record_attempts(
            "w",
            &[
                report(
                    &leased,
                    "delivered",
                    2_100,
                    &[("x@a.test", RecipientState::Delivered)],
                ),
                report(
                    &leased,
                    "failed",
                    2_100,
                    &[("x@a.test", RecipientState::Failed)],
                ),
                report(
                    &leased,
                    "deferred",
                    2_100,
                    &[("x@a.test", RecipientState::Deferred)],
                ),
                // Accepted long ago, finished after the cut-off.
                report(
                    &leased,
                    "late",
                    cut + 10_000,
                    &[("x@a.test", RecipientState::Delivered)],
                ),
            ],
        )
        .await
        .unwrap();
    s.queue
        .mark_captured("w", "captured", lease_of(&leased, "captured"), 2_100)
        .await
        .unwrap();
    s.queue
        .record_attempt(
            "w",
            &report(
                &leased,
                "queued",
                2_100,
                &[("x@a.test", RecipientState::Deferred)],
            ),
        )
        .await
        .unwrap();
    s.queue.retry_message("queued", 2_200).await.unwrap();

    assert_eq!(
        s.directory.purge(None, None).await.unwrap(),
        Purged::default(),
        "keeping everything deletes nothing"
    );
    // Decisions only: every old decision is still named by a message, but the refusal.
    assert_eq!(
        s.directory.purge(Some(cut), None).await.unwrap(),
        Purged {
            decisions: 1,
            messages: 0
        }
    );
    assert_eq!(s.directory.decision("d-old-refusal").await.unwrap(), None);
    // Messages only.
    assert_eq!(
        s.directory.purge(None, Some(cut)).await.unwrap(),
        Purged {
            decisions: 0,
            messages: 3
        }
    );
    for gone in ["delivered", "failed", "captured"] {
        assert_eq!(s.directory.message(gone).await.unwrap(), None, "{gone}");
        assert_eq!(s.queue.message_status(gone).await.unwrap(), None, "{gone}");
        assert!(
            s.directory
                .decision(&format!("d-{gone}"))
                .await
                .unwrap()
                .is_some()
        );
    }
    assert_eq!(s.queue.captured_message("captured").await.unwrap(), None);
    for kept in ["queued", "deferred", "held", "late"] {
        assert!(s.directory.message(kept).await.unwrap().is_some(), "{kept}");
    }
    // Now the deleted messages' decisions are no longer named by anything.
    assert_eq!(
        s.directory.purge(Some(cut), Some(cut)).await.unwrap(),
        Purged {
            decisions: 3,
            messages: 0
        }
    );
    for gone in ["delivered", "failed", "captured"] {
        assert_eq!(
            s.directory.decision(&format!("d-{gone}")).await.unwrap(),
            None
        );
    }
    for kept in [
        "d-queued",
        "d-deferred",
        "d-held",
        "d-late",
        "d-new-refusal",
    ] {
        assert!(
            s.directory.decision(kept).await.unwrap().is_some(),
            "{kept}"
        );
    }
    let deferred = s.queue.message_status("deferred").await.unwrap().unwrap();
    assert_eq!(
        deferred.history.len(),
        1,
        "kept messages keep their history"
    );
    assert_eq!(
        s.directory.purge(Some(cut), Some(cut)).await.unwrap(),
        Purged::default()
    );
}

// ---------------------------------------------------------------------------------------------
// The directory (optimistic concurrency; `edit_directory`, `apply`, the reload loop).

/// What is committed reads back equal, with its generation, on this handle and on every other
/// (another process, another node). An empty store is generation 0 with an empty directory.
pub async fn a_committed_directory_reads_back_equal_on_every_handle(b: &impl StoreBackend) {
    let s = b.store().await;
    let empty = s.snapshot().await.unwrap();
    assert_eq!(empty.generation, 0);
    assert_eq!(empty.directory, Directory::default());
    assert_eq!(s.generation().await.unwrap(), 0);
    let other = b.store().await;
    let g = commit_directory(&*s, &organisation(), "t").await;
    assert_eq!(g, 1);
    for h in [&s, &other] {
        let snap = h.snapshot().await.unwrap();
        assert_eq!(snap.directory, organisation());
        assert_eq!(snap.generation, 1);
        assert_eq!(h.generation().await.unwrap(), 1);
    }
    // A later handle too.
    let later = b.store().await;
    assert_eq!(later.snapshot().await.unwrap().directory, organisation());
}

/// Each commit with changes moves the generation by exactly one and returns it; a commit with no
/// change commits nothing and keeps the generation (`apply` of the same file is idempotent).
pub async fn each_commit_moves_the_generation_by_one(b: &impl StoreBackend) {
    let s = b.store().await;
    let mut d = organisation();
    assert_eq!(commit_directory(&*s, &d, "t").await, 1);
    d.users[0].status = UserStatus::Suspended;
    assert_eq!(commit_directory(&*s, &d, "t").await, 2);
    d.users.push(User::new("bob@example.com"));
    assert_eq!(commit_directory(&*s, &d, "t").await, 3);
    assert_eq!(s.generation().await.unwrap(), 3);
    assert_eq!(
        s.commit(3, &Changeset::default(), "t").await.unwrap(),
        3,
        "an empty change is no commit"
    );
    assert_eq!(s.generation().await.unwrap(), 3);
    assert_eq!(s.snapshot().await.unwrap().directory, d);
    d.users.retain(|u| u.email != "bob@example.com");
    assert_eq!(commit_directory(&*s, &d, "t").await, 4, "a delete");
    assert_eq!(s.snapshot().await.unwrap().directory, d);
}

/// A change against a generation that is no longer current is refused with the conflict error
/// naming both generations, and changes nothing.
pub async fn a_commit_against_a_stale_generation_is_a_conflict_and_changes_nothing(
    b: &impl StoreBackend,
) {
    let s = b.store().await;
    commit_directory(&*s, &organisation(), "first").await;
    let mut changed = organisation();
    changed.users[0].status = UserStatus::Suspended;
    changed.users.push(User::new("bob@example.com"));
    let stale = Changeset::between(&organisation(), &changed);
    let err = s.commit(0, &stale, "stale").await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict {
            expected: 0,
            found: 1
        }
    );
    let err = s.commit(7, &stale, "ahead").await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict {
            expected: 7,
            found: 1
        }
    );
    let snap = s.snapshot().await.unwrap();
    assert_eq!(snap.generation, 1);
    assert_eq!(snap.directory, organisation());
    assert_eq!(s.commit(1, &stale, "fresh").await.unwrap(), 2);
    assert_eq!(s.snapshot().await.unwrap().directory, changed);
}

/// Two admins (two handles, as two processes or nodes) committing against the same generation
/// at once: one wins, the other gets the conflict error, and the directory is the winner's.
pub async fn of_two_concurrent_commits_on_one_generation_exactly_one_wins(b: &impl StoreBackend) {
    let s = b.store().await;
    commit_directory(&*s, &organisation(), "t").await;
    let mut one = organisation();
    one.users.push(User::new("one@example.com"));
    let mut two = organisation();
    two.users[0].status = UserStatus::Suspended;
    let a = b.store().await;
    let c = b.store().await;
    let cs_one = Changeset::between(&organisation(), &one);
    let cs_two = Changeset::between(&organisation(), &two);
    let (ra, rc) = tokio::join!(
        tokio::spawn(async move { a.commit(1, &cs_one, "one").await }),
        tokio::spawn(async move { c.commit(1, &cs_two, "two").await }),
    );
    let (ra, rc) = (ra.unwrap(), rc.unwrap());
    let winner = match (&ra, &rc) {
        (
            Ok(2),
            Err(StoreError::Conflict {
                expected: 1,
                found: 2,
            }),
        ) => one,
        (
            Err(StoreError::Conflict {
                expected: 1,
                found: 2,
            }),
            Ok(2),
        ) => two,
        other => panic!("not exactly one winner: {other:?}"),
    };
    let snap = s.snapshot().await.unwrap();
    assert_eq!(snap.generation, 2);
    assert_eq!(snap.directory, winner);
}

/// A snapshot is one committed directory whole, with the generation it was committed at, even
/// while another handle commits: a reloading gateway never sees half a change, nor a directory
/// with another change's generation.
pub async fn a_snapshot_is_one_generation_whole(b: &impl StoreBackend) {
    let s = b.store().await;
    // Generation g holds g users (and g - 1 of them suspended after g = 1).
    commit_directory(&*s, &organisation(), "t").await;
    let writer = b.store().await;
    let commits = 30;
    let write = tokio::spawn(async move {
        let mut d = organisation();
        for g in 2..=commits {
            d.users[0].status = if g % 2 == 0 {
                UserStatus::Suspended
            } else {
                UserStatus::Active
            };
            d.users.push(User::new(format!("u{g}@example.com")));
            assert_eq!(commit_directory(&*writer, &d, "t").await, g);
        }
    });
    let reader = b.store().await;
    let mut seen = BTreeSet::new();
    // Bounded: stops when the writer is done (or after this many reads).
    for _ in 0..5_000 {
        let snap = reader.snapshot().await.unwrap();
        let g = snap.generation;
        assert_eq!(snap.directory.users.len() as i64, g, "generation {g}");
        let suspended = snap.directory.users[0].status == UserStatus::Suspended;
        assert_eq!(suspended, g > 1 && g % 2 == 0, "generation {g}");
        seen.insert(g);
        if g == commits {
            break;
        }
        tokio::task::yield_now().await;
    }
    write.await.unwrap();
    assert!(
        seen.contains(&commits),
        "the last commit was seen: {seen:?}"
    );
}

/// Every object a commit creates, updates or deletes leaves one audit entry naming the actor,
/// the action and the generation, read back newest change first on every handle (the order of
/// the entries of one change is not pinned); a refused commit leaves none.
pub async fn every_committed_change_leaves_an_audit_row(b: &impl StoreBackend) {
    let s = b.store().await;
    let before = now_secs();
    commit_directory(&*s, &organisation(), "cli:root").await;
    let mut d = organisation();
    d.users[0].status = UserStatus::Suspended;
    d.users.push(User::new("bob@example.com"));
    commit_directory(&*s, &d, "admin-api:ops").await;
    // Refused: stale.
    let refused = s
        .commit(0, &Changeset::between(&d, &Directory::default()), "stale")
        .await;
    assert!(refused.is_err());
    d.users.retain(|u| u.email != ALICE);
    commit_directory(&*s, &d, "cli:root").await;
    let after = now_secs();
    let other = b.store().await;
    let got = other.audit_log(100).await.unwrap();
    assert!(
        got.iter().all(|e| (before..=after).contains(&e.at_secs)),
        "committed now: {got:?}"
    );
    let generations: Vec<i64> = got.iter().map(|e| e.generation).collect();
    assert!(
        generations.windows(2).all(|w| w[0] >= w[1]),
        "newest change first: {generations:?}"
    );
    let mut got: Vec<_> = got
        .into_iter()
        .map(|e| (e.generation, e.actor, e.action, e.kind, e.id))
        .collect();
    // Within one change, in any order.
    got.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| (&x.3, &x.4).cmp(&(&y.3, &y.4))));
    let row = |generation, actor: &str, action, kind, id: &str| {
        (generation, actor.to_owned(), action, kind, id.to_owned())
    };
    assert_eq!(
        got,
        vec![
            row(3, "cli:root", AuditAction::Delete, Kind::User, ALICE),
            row(2, "admin-api:ops", AuditAction::Update, Kind::User, ALICE),
            row(
                2,
                "admin-api:ops",
                AuditAction::Create,
                Kind::User,
                "bob@example.com"
            ),
            row(
                1,
                "cli:root",
                AuditAction::Create,
                Kind::Domain,
                "example.com"
            ),
            row(1, "cli:root", AuditAction::Create, Kind::User, ALICE),
        ]
    );
    assert_eq!(
        s.audit_log(2).await.unwrap().len(),
        2,
        "at most the limit, newest first"
    );
    assert_eq!(s.audit_log(2).await.unwrap()[1].generation, 2);
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// OAuth tokens (the Gmail door's authorization server; the gateway's bearer lookup).

/// A token is found by the SHA-256 of its value, exactly as stored; an unknown hash finds none.
pub async fn a_token_is_found_by_its_hash(b: &impl TokenBackend) {
    let s = b.tokens().await;
    for (sha, kind) in [
        ("sha-code", TokenKind::Code),
        ("sha-access", TokenKind::Access),
        ("sha-refresh", TokenKind::Refresh),
    ] {
        s.insert_token(&token(sha, kind, "f1")).await.unwrap();
    }
    let other = b.tokens().await;
    for (sha, kind) in [
        ("sha-code", TokenKind::Code),
        ("sha-access", TokenKind::Access),
        ("sha-refresh", TokenKind::Refresh),
    ] {
        assert_eq!(
            other.token(sha).await.unwrap(),
            Some(token(sha, kind, "f1"))
        );
    }
    assert_eq!(s.token("sha-unknown").await.unwrap(), None);
    assert_eq!(s.token("SHA-CODE").await.unwrap(), None, "exact match");
}

/// A code (or a rotating refresh token) is used once: the first use wins, every later one,
/// including one racing it from another handle, is told it is a replay.
pub async fn a_token_is_used_once(b: &impl TokenBackend) {
    let s = b.tokens().await;
    s.insert_token(&token("c1", TokenKind::Code, "f"))
        .await
        .unwrap();
    assert!(s.use_token("c1").await.unwrap());
    assert!(!s.use_token("c1").await.unwrap(), "a replay");
    assert!(s.token("c1").await.unwrap().unwrap().used);
    assert!(!s.use_token("unknown").await.unwrap());
    // Racing uses from several handles: exactly one wins.
    s.insert_token(&token("c2", TokenKind::Code, "f"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let h = b.tokens().await;
        tasks.push(tokio::spawn(
            async move { h.use_token("c2").await.unwrap() },
        ));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

/// Revoking a family (`/revoke`, a replayed code or refresh token) revokes every token of it,
/// says how many, and touches no other family.
pub async fn revoking_a_family_revokes_every_token_of_it_and_no_other(b: &impl TokenBackend) {
    let s = b.tokens().await;
    for (sha, kind, family) in [
        ("a1", TokenKind::Access, "f1"),
        ("r1", TokenKind::Refresh, "f1"),
        ("c1", TokenKind::Code, "f1"),
        ("a2", TokenKind::Access, "f2"),
        ("r2", TokenKind::Refresh, "f2"),
    ] {
        s.insert_token(&token(sha, kind, family)).await.unwrap();
    }
    assert_eq!(s.revoke_family("f1").await.unwrap(), 3);
    for sha in ["a1", "r1", "c1"] {
        assert!(s.token(sha).await.unwrap().unwrap().revoked, "{sha}");
    }
    for sha in ["a2", "r2"] {
        let t = s.token(sha).await.unwrap().unwrap();
        assert!(!t.revoked, "{sha} of another family");
        assert!(!t.used);
    }
    assert_eq!(s.revoke_family("nobody").await.unwrap(), 0);
}

/// Refresh-token rotation: each refresh uses the presented token and issues the next one in the
/// same family; presenting a used one is a replay, and revoking the family then reaches every
/// token minted from the authorization, the newest included.
pub async fn refresh_rotation_keeps_the_family_and_a_replay_is_detected(b: &impl TokenBackend) {
    let s = b.tokens().await;
    s.insert_token(&token("code", TokenKind::Code, "fam"))
        .await
        .unwrap();
    assert!(s.use_token("code").await.unwrap());
    s.insert_token(&token("r1", TokenKind::Refresh, "fam"))
        .await
        .unwrap();
    s.insert_token(&token("a1", TokenKind::Access, "fam"))
        .await
        .unwrap();
    // Rotation: r1 -> r2 (+ a2).
    assert!(s.use_token("r1").await.unwrap());
    s.insert_token(&token("r2", TokenKind::Refresh, "fam"))
        .await
        .unwrap();
    s.insert_token(&token("a2", TokenKind::Access, "fam"))
        .await
        .unwrap();
    assert_eq!(s.token("r2").await.unwrap().unwrap().family, "fam");
    assert!(!s.token("r2").await.unwrap().unwrap().used);
    // A stolen r1 presented again: a replay; the door revokes the family.
    assert!(!s.use_token("r1").await.unwrap());
    assert_eq!(s.revoke_family("fam").await.unwrap(), 5);
    for sha in ["code", "r1", "a1", "r2", "a2"] {
        assert!(s.token(sha).await.unwrap().unwrap().revoked, "{sha}");
    }
}

/// A JWT-bearer assertion is exchanged once until it expires; after its expiry its key may be
/// used again (the endpoint refuses expired assertions anyway).
pub async fn an_assertion_is_exchanged_once_until_it_expires(b: &impl TokenBackend) {
    let s = b.tokens().await;
    assert!(s.use_assertion("iss/jti", 1_000, 0).await.unwrap());
    assert!(!s.use_assertion("iss/jti", 1_000, 500).await.unwrap());
    let other = b.tokens().await;
    assert!(
        !other.use_assertion("iss/jti", 1_000, 1_000).await.unwrap(),
        "a replay until its expiry, on every handle"
    );
    assert!(s.use_assertion("iss/other", 1_000, 500).await.unwrap());
    assert!(s.use_assertion("iss/jti", 5_000, 1_001).await.unwrap());
    assert!(!s.use_assertion("iss/jti", 5_000, 2_000).await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// Decisions by id (`/mailgate/v1/decisions/{id}`, `why`, support bundles).

/// A decision reads back equal by id, whichever way it was kept and whatever its verdict; an
/// unknown id finds none.
pub async fn a_decision_reads_back_equal_by_id(b: &impl StoreBackend) {
    let s = b.store().await;
    let mut kept = Vec::new();
    for (i, verdict) in StoredVerdict::ALL.iter().enumerate() {
        let d = decision(&format!("01REC{i}"), 10 + i as i64, *verdict);
        s.record_decision(&d).await.unwrap();
        kept.push(d);
        let e = decision(&format!("01ENQ{i}"), 20 + i as i64, *verdict);
        s.enqueue_decision(e.clone()).await.unwrap();
        kept.push(e);
    }
    // A large trace too (they compress; nothing is cut).
    let mut big = decision("01BIG", 99, StoredVerdict::Denied);
    big.body =
        serde_json::json!({"checks": (0..2_000).map(|i| format!("check {i}")).collect::<Vec<_>>()})
            .into();
    s.record_decision(&big).await.unwrap();
    kept.push(big);
    for d in &kept {
        assert_eq!(s.decision(&d.id).await.unwrap().as_ref(), Some(d));
    }
    let back = s.decision("01BIG").await.unwrap().unwrap();
    assert_eq!(
        back.body.parse().unwrap(),
        kept.last().unwrap().body.parse().unwrap()
    );
    assert_eq!(s.decision("01NOPE").await.unwrap(), None);
    assert_eq!(s.decision("").await.unwrap(), None);
}

/// An enqueued decision (the hot path does not wait for it) is found at once by its id, and is
/// durable for every other handle after `flush`.
pub async fn an_enqueued_decision_is_found_at_once_and_durable_after_flush(b: &impl StoreBackend) {
    let d = decision("01QUEUED", 5, StoredVerdict::Denied);
    {
        let s = b.store().await;
        s.enqueue_decision(d.clone()).await.unwrap();
        assert_eq!(s.decision("01QUEUED").await.unwrap(), Some(d.clone()));
        s.flush().await.unwrap();
    }
    let later = b.store().await;
    assert_eq!(later.decision("01QUEUED").await.unwrap(), Some(d));
}

/// A decision id as the gateway makes them (`mailgate_gateway::new_decision_id`): 26 Crockford
/// base-32 digits, the first 10 the Unix milliseconds, the rest from `tail`.
fn decision_id(ms: i64, tail: u64) -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let v = (u128::from(ms as u64 & 0xFFFF_FFFF_FFFF) << 80) | u128::from(tail);
    (0..26)
        .map(|i| DIGITS[((v >> (5 * (25 - i))) & 0x1F) as usize] as char)
        .collect()
}

/// An accepted message's decision, queued moments before it (as every send's is), is durable
/// when the acceptance returns: a handle that was open all along finds it at once, before any
/// flush or batch delay. Many sends at once too.
pub async fn a_queued_decision_is_durable_with_the_message_naming_it(b: &impl Backend) {
    let s = b.open().await;
    let other = b.open().await;
    let now = 1_800_000_000_000;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let s = s.directory.clone();
            tokio::spawn(async move {
                let d = decision(
                    &decision_id(now + i, i as u64),
                    now + i,
                    StoredVerdict::Allowed,
                );
                let mut m = message(&format!("m{i:02}"), now + i, &["x@a.test"]);
                m.decision_id = d.id.clone();
                s.enqueue_decision(d.clone()).await.unwrap();
                s.accept_message(&m, Some((usage(now + i, 1), None)))
                    .await
                    .unwrap();
                d
            })
        })
        .collect();
    for t in tasks {
        let d = t.await.unwrap();
        assert_eq!(
            other.directory.decision(&d.id).await.unwrap(),
            Some(d),
            "the message is stored, its decision must be too"
        );
    }
}

/// An acceptance that fails does not lose the decision it would have carried: the decision is
/// still kept (durable after `flush`, as any queued one).
pub async fn a_failed_acceptance_keeps_its_queued_decision(b: &impl Backend) {
    let s = b.open().await;
    accept(
        s.directory.as_ref(),
        &message("taken", 1_000, &["x@a.test"]),
    )
    .await;
    let d = decision(&decision_id(2_000, 7), 2_000, StoredVerdict::Allowed);
    let mut m = message("taken", 2_000, &["x@a.test"]); // the same message id: refused
    m.decision_id = d.id.clone();
    s.directory.enqueue_decision(d.clone()).await.unwrap();
    assert!(s.directory.accept_message(&m, None).await.is_err());
    assert_eq!(s.directory.decision(&d.id).await.unwrap(), Some(d.clone()));
    s.directory.flush().await.unwrap();
    let other = b.open().await;
    assert_eq!(other.directory.decision(&d.id).await.unwrap(), Some(d));
}

/// Decisions at volume: more than any batch and than the queue holds at once are all kept (the
/// queue makes senders wait for room, it never drops), each found by id at once and, after
/// `flush`, by another handle; ids made days apart and ids whose time is not their `at_ms` are
/// found too.
pub async fn decisions_at_volume_are_all_kept_and_found_by_id(b: &impl StoreBackend) {
    const DAY: i64 = 86_400_000;
    let s = b.store().await;
    let now = 1_800_000_000_000;
    let mut kept = Vec::new();
    for i in 0..6_000i64 {
        // Three days, and every 1000th kept under a time far from its id's.
        let at = now + (i % 3) * DAY + i;
        let id_time = if i % 1000 == 0 { at - 40 * DAY } else { at };
        let verdict = if i % 2 == 0 {
            StoredVerdict::Denied
        } else {
            StoredVerdict::Allowed
        };
        let d = decision(&decision_id(id_time, i as u64), at, verdict);
        s.enqueue_decision(d.clone()).await.unwrap();
        kept.push(d);
    }
    for d in kept.iter().step_by(97) {
        assert_eq!(s.decision(&d.id).await.unwrap().as_ref(), Some(d));
    }
    s.flush().await.unwrap();
    let other = b.store().await;
    for d in kept.iter().step_by(7).chain(kept.iter().step_by(1000)) {
        assert_eq!(other.decision(&d.id).await.unwrap().as_ref(), Some(d));
    }
    assert_eq!(
        other.decision(&decision_id(now, 99_999)).await.unwrap(),
        None
    );
}

/// The support bundle's list: the newest refusals first, at most `limit`, summaries only;
/// refusals still queued included.
pub async fn recent_refusals_are_the_newest_denials_first(b: &impl StoreBackend) {
    let s = b.store().await;
    for (i, verdict) in [
        StoredVerdict::Denied,
        StoredVerdict::Allowed,
        StoredVerdict::Denied,
        StoredVerdict::Held,
        StoredVerdict::Denied,
    ]
    .into_iter()
    .enumerate()
    {
        s.enqueue_decision(decision(&format!("01D{i}"), 10 + i as i64, verdict))
            .await
            .unwrap();
    }
    let two = s.recent_refusals(2).await.unwrap();
    assert_eq!(ids(&two, |d| &d.id), ["01D4", "01D2"]);
    let all = s.recent_refusals(10).await.unwrap();
    assert_eq!(ids(&all, |d| &d.id), ["01D4", "01D2", "01D0"]);
    assert_eq!(all[2].code.as_deref(), Some("sender.not_owned"));
    assert_eq!(all[2].at_ms, 10);
    assert_eq!(all[2].door, "smtp");
    assert_eq!(all[2].principal, ALICE);
}

// ---------------------------------------------------------------------------------------------
// Admin tokens, nodes, injected faults.

/// Admin API tokens are found by their SHA-256; creating one under a name already used replaces
/// it (the old secret stops working).
pub async fn admin_tokens_are_found_by_hash_and_replaced_by_name(b: &impl StoreBackend) {
    let s = b.store().await;
    s.add_admin_token("ops", "sha-1").await.unwrap();
    s.add_admin_token("ci", "sha-2").await.unwrap();
    assert_eq!(
        s.admin_token("sha-1").await.unwrap().as_deref(),
        Some("ops")
    );
    assert_eq!(s.admin_token("sha-2").await.unwrap().as_deref(), Some("ci"));
    assert_eq!(s.admin_token("sha-none").await.unwrap(), None);
    s.add_admin_token("ops", "sha-3").await.unwrap();
    let other = b.store().await;
    assert_eq!(other.admin_token("sha-1").await.unwrap(), None);
    assert_eq!(
        other.admin_token("sha-3").await.unwrap().as_deref(),
        Some("ops")
    );
}

/// Node rows (what a writer waits on for a change to be live): written, replaced by id, listed
/// on every handle, deleted.
pub async fn node_rows_are_written_replaced_and_deleted(b: &impl StoreBackend) {
    let s = b.store().await;
    let node = |id: &str, generation| NodeState {
        id: id.into(),
        host: "host-a".into(),
        pid: 4242,
        generation,
        seen_ms: 1_000 + generation,
        interval_ms: 250,
    };
    assert!(s.nodes().await.unwrap().is_empty());
    s.node_seen(&node("n1", 1)).await.unwrap();
    s.node_seen(&node("n2", 1)).await.unwrap();
    s.node_seen(&node("n1", 2)).await.unwrap();
    let other = b.store().await;
    let mut rows = other.nodes().await.unwrap();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(rows, vec![node("n1", 2), node("n2", 1)]);
    other.node_gone("n1").await.unwrap();
    other.node_gone("never-there").await.unwrap();
    assert_eq!(s.nodes().await.unwrap(), vec![node("n2", 1)]);
}

/// `mailgate simulate`: one fault per principal (case-insensitive, stored lower-cased), a new
/// one replaces it, it is active until `until_ms` (exclusive), and clearing says whether there
/// was one.
pub async fn injected_faults_are_set_replaced_expire_and_clear(b: &impl FaultBackend) {
    let s = b.faults().await;
    let fault = |principal: &str, code: &str, until_ms| SimulatedFault {
        principal: principal.into(),
        code: code.into(),
        until_ms,
        created_at_ms: 1,
        actor: "cli:root".into(),
    };
    s.set_fault(&fault("Alice@Example.com", "limit.rate", 100))
        .await
        .unwrap();
    s.set_fault(&fault("alice@example.com", "limit.daily_messages", 200))
        .await
        .unwrap();
    s.set_fault(&fault("bob@example.com", "auth.revoked", 150))
        .await
        .unwrap();
    let other = b.faults().await;
    let active = other.active_faults(120).await.unwrap();
    assert_eq!(
        active,
        vec![
            fault("alice@example.com", "limit.daily_messages", 200),
            fault("bob@example.com", "auth.revoked", 150),
        ]
    );
    assert_eq!(
        ids(&s.active_faults(150).await.unwrap(), |f| &f.principal),
        ["alice@example.com"]
    );
    assert!(s.active_faults(200).await.unwrap().is_empty());
    assert!(s.clear_fault("ALICE@example.com").await.unwrap());
    assert!(!s.clear_fault("alice@example.com").await.unwrap());
    assert_eq!(
        ids(&s.active_faults(120).await.unwrap(), |f| &f.principal),
        ["bob@example.com"]
    );
}
