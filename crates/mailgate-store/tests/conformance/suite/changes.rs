//! Directory changes announced to every node (issue 16 item 5): a store several nodes share
//! (PostgreSQL) tells each listening handle when the directory or the injected faults changed,
//! so a node reloads at once instead of at its next re-check; nothing a send writes is announced
//! (an announcement is a lock every announcing commit shares). A store one node uses (SQLite)
//! announces nothing and its node re-checks on its own.

use std::sync::Arc;
use std::time::Duration;

use mailgate_store::{SimulatedFault, StoredVerdict};
use tokio::sync::Notify;

use super::{StoreBackend, accept, commit_directory, decision, message, organisation, usage};

/// Whether `changed` is notified within `within` (a permit already stored counts).
async fn heard(changed: &Notify, within: Duration) -> bool {
    tokio::time::timeout(within, changed.notified())
        .await
        .is_ok()
}

/// Forgets announcements still in flight and any stored permit.
async fn settle(changed: &Notify) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = heard(changed, Duration::from_millis(10)).await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A directory commit, a fault set and a fault cleared through one handle each wake the listener
/// of another handle (another node); it also wakes once when it starts listening (a change made
/// before was not announced to it). An acceptance, a decision, usage, a node's row and a
/// rejected (stale) commit announce nothing.
pub async fn directory_and_fault_changes_are_announced_and_sends_are_not(b: &impl StoreBackend) {
    let one = b.store().await;
    let two = b.store().await;
    let changed = Arc::new(Notify::new());
    let Some(listener) = two.spawn_change_listener(changed.clone()) else {
        // Nothing announced: the node re-checks. Changes still commit.
        assert_eq!(
            commit_directory(&*one, &organisation(), "cli:root").await,
            1
        );
        return;
    };
    let within = Duration::from_secs(5);
    assert!(
        heard(&changed, within).await,
        "not woken when it started listening"
    );
    settle(&changed).await;

    let generation = commit_directory(&*one, &organisation(), "cli:root").await;
    assert!(
        heard(&changed, within).await,
        "a directory commit was not announced"
    );
    settle(&changed).await;

    let fault = SimulatedFault {
        principal: "alice@example.com".into(),
        code: "limit.rate".into(),
        until_ms: now_ms() + 600_000,
        created_at_ms: now_ms(),
        actor: "cli:root".into(),
    };
    one.set_fault(&fault).await.unwrap();
    assert!(
        heard(&changed, within).await,
        "an injected fault was not announced"
    );
    settle(&changed).await;
    assert!(one.clear_fault("alice@example.com").await.unwrap());
    assert!(
        heard(&changed, within).await,
        "a cleared fault was not announced"
    );
    settle(&changed).await;

    // The send path and the rest: nothing announced.
    let at = now_ms();
    one.record_decision(&decision("d-quiet", at, StoredVerdict::Denied))
        .await
        .unwrap();
    accept(&*one, &message("quiet-1", at, &["x@example.org"])).await;
    one.accept_message(
        &message("quiet-2", at, &["x@example.org"]),
        Some((usage(at, 1), Some(at + 1_000))),
    )
    .await
    .unwrap();
    one.record_usage("alice@example.com", usage(at, 1), None)
        .await
        .unwrap();
    one.node_seen(&mailgate_store::NodeState {
        id: "n1".into(),
        host: "h".into(),
        pid: 1,
        generation,
        seen_ms: at,
        interval_ms: 500,
    })
    .await
    .unwrap();
    let stale = one
        .commit(generation - 1, &Default::default(), "cli:root")
        .await;
    assert!(stale.is_err(), "a stale commit is refused: {stale:?}");
    assert!(
        !heard(&changed, Duration::from_millis(700)).await,
        "something that is not a directory or fault change was announced"
    );
    assert_eq!(one.generation().await.unwrap(), generation);
    listener.abort();
}
