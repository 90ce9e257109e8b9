//! Contracts of the message-id node numbers (issue 16 item 5,
//! [`mailgate_store::NodeNumberStore`]): no two live holders share a number, a number is free
//! again at its holder's deadline, and a holder gets its own number back.

use std::collections::BTreeSet;

use mailgate_store::NODE_NUMBERS;

use super::StoreBackend;

const T0: i64 = 1_795_000_000_000;
const LEASE: i64 = 60_000;

/// Two holders leasing on two handles get different numbers; the same holder leasing again
/// (its heartbeat, or a restart with the same node id) gets its own number back, also after
/// its deadline passed while nobody took it.
pub async fn two_holders_get_different_node_numbers_and_a_holder_keeps_its_own<B: StoreBackend>(
    b: &B,
) {
    let (a, c) = (b.store().await, b.store().await);
    let na = a.lease_node_number("node-a", T0, T0 + LEASE).await.unwrap();
    let nb = c.lease_node_number("node-b", T0, T0 + LEASE).await.unwrap();
    let (na, nb) = (na.expect("a number"), nb.expect("a number"));
    assert_ne!(na, nb);
    assert!(na < NODE_NUMBERS && nb < NODE_NUMBERS);
    // Renewed by its heartbeat, from either handle.
    for t in [T0 + 2_000, T0 + 4_000] {
        assert_eq!(
            c.lease_node_number("node-a", t, t + LEASE).await.unwrap(),
            Some(na)
        );
    }
    // Started again long after its deadline, nobody took it: its own number.
    let late = T0 + 10 * LEASE;
    assert_eq!(
        a.lease_node_number("node-a", late, late + LEASE)
            .await
            .unwrap(),
        Some(na)
    );
}

/// All 64 numbers held: the next holder gets none, until one holder's deadline passes; then it
/// gets exactly that number, and the holder that lost it gets another (none while all are held).
pub async fn node_numbers_run_out_and_a_passed_deadline_frees_one<B: StoreBackend>(b: &B) {
    let (a, c) = (b.store().await, b.store().await);
    let mut held = BTreeSet::new();
    for i in 0..NODE_NUMBERS {
        // Node 5's deadline is earlier than the others'.
        let until = if i == 5 { T0 + 1_000 } else { T0 + LEASE };
        let store = if i % 2 == 0 { &a } else { &c };
        let n = store
            .lease_node_number(&format!("node-{i}"), T0, until)
            .await
            .unwrap()
            .expect("a free number");
        assert!(held.insert(n), "number {n} leased twice");
    }
    assert_eq!(held.len(), usize::from(NODE_NUMBERS));
    assert_eq!(
        a.lease_node_number("late", T0 + 500, T0 + LEASE)
            .await
            .unwrap(),
        None,
        "all 64 held"
    );
    let five = c
        .lease_node_number("node-5", T0 + 500, T0 + 1_000)
        .await
        .unwrap()
        .expect("its own");
    // Past node 5's deadline: its number is free for another holder.
    assert_eq!(
        a.lease_node_number("late", T0 + 1_001, T0 + LEASE)
            .await
            .unwrap(),
        Some(five)
    );
    // Node 5 comes back: its number is gone and every other is held.
    assert_eq!(
        c.lease_node_number("node-5", T0 + 1_002, T0 + LEASE)
            .await
            .unwrap(),
        None
    );
}

/// Holders leasing at the same moment on two handles never share a number.
pub async fn concurrent_leases_on_two_nodes_never_share_a_number<B: StoreBackend>(b: &B) {
    let (a, c) = (b.store().await, b.store().await);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = if i % 2 == 0 { a.clone() } else { c.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .lease_node_number(&format!("racer-{i}"), T0, T0 + LEASE)
                .await
        }));
    }
    let mut seen = BTreeSet::new();
    for t in tasks {
        let n = t.await.unwrap().unwrap().expect("32 of 64 are free");
        assert!(seen.insert(n), "number {n} leased to two racers");
    }
    assert_eq!(seen.len(), 32);
}
