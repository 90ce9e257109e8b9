//! Injected faults (`mailgate simulate`) reach a running gateway through its reload loop: the
//! store keeps them, every gateway reads the ones in force when it opens and when it reloads.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use mailgate_core::catalogue::Reason;
use mailgate_gateway::{Gateway, now_ms};
use mailgate_store::SimulatedFault;

fn fault(principal: &str, code: &str, for_ms: i64) -> SimulatedFault {
    let now = now_ms() as i64;
    SimulatedFault {
        principal: principal.into(),
        code: code.into(),
        until_ms: now + for_ms,
        created_at_ms: now,
        actor: "test".into(),
    }
}

fn in_force(gw: &Gateway) -> Vec<(String, Reason)> {
    let mut v: Vec<_> = gw
        .injected_faults()
        .iter()
        .map(|f| (f.principal.clone(), f.code))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

async fn eventually(mut ok: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn faults_in_the_store_are_in_force_at_open_and_follow_the_store_on_reload() {
    let (stores, _db) = mailgate_store::testing::fresh_store().await;
    let store = stores.directory.clone();
    store
        .set_fault(&fault("a@example.com", "limit.daily_messages", 600_000))
        .await
        .unwrap();
    // Expired, and a code this binary does not know: neither is in force.
    store
        .set_fault(&fault("old@example.com", "limit.rate", -1))
        .await
        .unwrap();
    store
        .set_fault(&fault("z@example.com", "no.such_code", 600_000))
        .await
        .unwrap();
    let gw = Gateway::open(store.clone()).await.unwrap();
    assert_eq!(
        in_force(&gw),
        vec![("a@example.com".to_owned(), Reason::LimitDailyMessages)]
    );

    // Another node (or the CLI) injects and clears: the reload loop follows.
    let reloader = gw.spawn_reloader(Duration::from_millis(20));
    store
        .set_fault(&fault("b@example.com", "account.suspended", 600_000))
        .await
        .unwrap();
    assert!(
        eventually(|| in_force(&gw).len() == 2).await,
        "{:?}",
        in_force(&gw)
    );
    assert_eq!(in_force(&gw)[1].1, Reason::AccountSuspended);
    assert!(store.clear_fault("a@example.com").await.unwrap());
    assert!(
        eventually(|| in_force(&gw).len() == 1).await,
        "{:?}",
        in_force(&gw)
    );
    assert_eq!(gw.reload_faults().await.unwrap(), 1);
    reloader.abort();
}
