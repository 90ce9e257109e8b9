//! Contracts of what several nodes share besides the directory and the queue (issue 16 item 5):
//! failed-authentication counts ([`mailgate_store::LockoutStore`]) and Gmail resumable-upload
//! sessions ([`mailgate_store::UploadStore`]).

use std::collections::BTreeSet;

use mailgate_store::{Counted, LockoutRule, MAX_LOCKOUT_KEY_LEN, StoreError, UploadOpened};

use super::StoreBackend;

const T0: i64 = 1_795_000_000_000;

fn rule(threshold: u32, max_rows: u64) -> LockoutRule {
    LockoutRule {
        threshold,
        base_lock_ms: 1_000,
        max_lock_ms: 900_000,
        forget_after_ms: 900_000,
        max_rows,
    }
}

fn until(c: Counted) -> Option<i64> {
    match c {
        Counted::Counted {
            locked_until_ms, ..
        } => locked_until_ms,
        Counted::Full => panic!("not counted: the table is full"),
    }
}

fn failures(c: Counted) -> u32 {
    match c {
        Counted::Counted { failures, .. } => failures,
        Counted::Full => panic!("not counted: the table is full"),
    }
}

/// Failures counted on two handles (two nodes) add up: the key locks at the threshold, whichever
/// node counted which failure, every node reads the lock, the lock doubles with each further
/// failure, other keys are untouched and a cleared key starts again.
pub async fn failures_counted_on_two_nodes_add_up_and_lock_on_both<B: StoreBackend>(b: &B) {
    let (a, c) = (b.store().await, b.store().await);
    let r = rule(5, 1_000);
    let key = "l:0123456789abcdef:4:c0000200".to_owned();
    let other = "l:fedcba9876543210:4:c0000200".to_owned();
    for i in 0..4u32 {
        let node = if i % 2 == 0 { &a } else { &c };
        let counted = node.count_failure(&key, &r, T0).await.unwrap();
        assert_eq!(failures(counted), i + 1);
        assert_eq!(until(counted), None, "failure {} locks nothing yet", i + 1);
    }
    assert_eq!(a.locked_until(&[key.as_str()], T0).await.unwrap(), None);
    let fifth = c.count_failure(&key, &r, T0).await.unwrap();
    assert_eq!(failures(fifth), 5);
    assert_eq!(until(fifth), Some(T0 + 1_000));
    for node in [&a, &c] {
        assert_eq!(
            node.locked_until(&[other.as_str(), key.as_str()], T0)
                .await
                .unwrap(),
            Some(T0 + 1_000)
        );
        assert_eq!(
            node.locked_until(&[other.as_str()], T0).await.unwrap(),
            None
        );
        assert_eq!(
            node.locked_until(&[key.as_str()], T0 + 1_000)
                .await
                .unwrap(),
            None,
            "the lock ends"
        );
    }
    assert_eq!(
        until(a.count_failure(&key, &r, T0 + 10).await.unwrap()),
        Some(T0 + 10 + 2_000)
    );
    c.clear_failures(&key).await.unwrap();
    assert_eq!(
        a.locked_until(&[key.as_str()], T0 + 10).await.unwrap(),
        None
    );
    assert_eq!(
        failures(a.count_failure(&key, &r, T0 + 20).await.unwrap()),
        1
    );
}

/// Failures counted at the same moment on two nodes are each counted once: 2 x 20 concurrent
/// counts of one key see 40 distinct counts, 1 to 40.
pub async fn concurrent_failures_on_two_nodes_are_each_counted_once<B: StoreBackend>(b: &B) {
    let (a, c) = (b.store().await, b.store().await);
    let r = rule(1_000, 1_000);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let node = if i % 2 == 0 { a.clone() } else { c.clone() };
        tasks.push(tokio::spawn(async move {
            failures(node.count_failure("n:4:c0000200", &r, T0).await.unwrap())
        }));
    }
    let mut seen = BTreeSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(seen, (1..=40).collect::<BTreeSet<u32>>());
}

/// A key is forgotten `forget_after_ms` after its last failure or the end of its lock (its count
/// starts again), and a lock never shortens: a later count with a shorter lock keeps the longer.
pub async fn a_quiet_key_is_forgotten_and_a_lock_never_shortens<B: StoreBackend>(b: &B) {
    let s = b.store().await;
    let r = rule(2, 1_000);
    let key = "n:6:20010db800000001".to_owned();
    s.count_failure(&key, &r, T0).await.unwrap();
    // Quiet for the whole window: forgotten.
    let again = s.count_failure(&key, &r, T0 + 900_000).await.unwrap();
    assert_eq!(failures(again), 1);
    assert_eq!(until(again), None);
    // 2 failures: 1 s; 10 more: 1,024 s capped at 900 s.
    let t = T0 + 900_000;
    for _ in 0..11 {
        s.count_failure(&key, &r, t).await.unwrap();
    }
    let long = s.locked_until(&[key.as_str()], t).await.unwrap().unwrap();
    assert_eq!(long, t + 900_000);
    // The same count under a gentler rule would lock for less: the stored lock stays.
    let gentle = LockoutRule {
        max_lock_ms: 2_000,
        ..r
    };
    s.count_failure(&key, &gentle, t + 1).await.unwrap();
    assert_eq!(
        s.locked_until(&[key.as_str()], t + 1).await.unwrap(),
        Some(long)
    );
    // Locked: not forgotten while the lock lasts, nor for the window after it ends.
    let counted = s.count_failure(&key, &r, long + 899_999).await.unwrap();
    assert!(failures(counted) > 12, "{counted:?}");
}

/// The table never holds more than `max_rows` rows: room is made from rows that are not locked,
/// never from active locks; when every row is an active lock a new key is not written
/// (`Counted::Full`), and once the locks end there is room again. Keys are bounded in length.
pub async fn the_table_is_bounded_and_never_forgets_an_active_lock<B: StoreBackend>(b: &B) {
    let s = b.store().await;
    let locking = rule(1, 10);
    // 5 quiet rows, then 10 locks: the quiet ones make room.
    for i in 0..5 {
        s.count_failure(&format!("quiet{i}"), &rule(100, 10), T0)
            .await
            .unwrap();
    }
    for i in 0..10 {
        assert!(
            until(
                s.count_failure(&format!("lock{i}"), &locking, T0)
                    .await
                    .unwrap()
            )
            .is_some()
        );
    }
    for i in 0..10 {
        assert_eq!(
            s.locked_until(&[format!("lock{i}").as_str()], T0)
                .await
                .unwrap(),
            Some(T0 + 1_000),
            "lock{i} was forgotten"
        );
    }
    assert_eq!(
        s.count_failure("newcomer", &locking, T0).await.unwrap(),
        Counted::Full
    );
    assert_eq!(s.locked_until(&["newcomer"], T0).await.unwrap(), None);
    // An existing key is still counted when the table is full.
    assert_eq!(
        failures(s.count_failure("lock0", &locking, T0).await.unwrap()),
        2
    );
    // Locks over and forgotten: room again.
    let later = T0 + 2_000 + 900_000;
    assert!(matches!(
        s.count_failure("newcomer", &locking, later).await.unwrap(),
        Counted::Counted { .. }
    ));
    let long = "k".repeat(MAX_LOCKOUT_KEY_LEN + 1);
    assert!(matches!(
        s.count_failure(&long, &locking, later).await,
        Err(StoreError::Other(_))
    ));
}

/// A session opened on one node is taken on another, once, and only by its owner for its
/// `userId` before it expires; another principal's attempt leaves it open.
pub async fn an_upload_opened_on_one_node_is_taken_once_on_another<B: StoreBackend>(b: &B) {
    let (a, c) = (b.store().await, b.store().await);
    let open = |id: &'static str, owner: &'static str, now: i64| {
        let a = a.clone();
        async move {
            a.open_upload(id, owner, "me", now, 3_600_000, 16, 10_000)
                .await
                .unwrap()
        }
    };
    assert_eq!(open("u1", "user:alice", T0).await, UploadOpened::Opened);
    assert!(!c.take_upload("u1", "user:bob", "me", T0).await.unwrap());
    assert!(
        !c.take_upload("u1", "user:alice", "other", T0)
            .await
            .unwrap()
    );
    assert!(
        c.take_upload("u1", "user:alice", "me", T0 + 1)
            .await
            .unwrap()
    );
    assert!(
        !a.take_upload("u1", "user:alice", "me", T0 + 2)
            .await
            .unwrap(),
        "taken once"
    );
    assert_eq!(open("u2", "user:alice", T0).await, UploadOpened::Opened);
    assert!(
        !c.take_upload("u2", "user:alice", "me", T0 + 3_600_000)
            .await
            .unwrap(),
        "expired"
    );
}

/// Opens racing on two nodes never pass a principal's cap, and the total cap holds; a full
/// principal is told when its first session expires, and expired sessions make room.
pub async fn upload_caps_hold_across_nodes<B: StoreBackend>(b: &B) {
    let (a, c) = (b.store().await, b.store().await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let node = if i % 2 == 0 { a.clone() } else { c.clone() };
        tasks.push(tokio::spawn(async move {
            node.open_upload(&format!("s{i}"), "user:alice", "me", T0 + i, 1_000, 4, 100)
                .await
                .unwrap()
        }));
    }
    let mut opened = 0;
    for t in tasks {
        match t.await.unwrap() {
            UploadOpened::Opened => opened += 1,
            UploadOpened::OwnerFull { retry_after_ms } => {
                assert!((1..=1_020).contains(&retry_after_ms), "{retry_after_ms}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(opened, 4, "the per-principal cap");
    // Another principal still opens, up to the total.
    for i in 0..6 {
        assert_eq!(
            c.open_upload(&format!("b{i}"), "user:bob", "me", T0 + 50, 1_000, 100, 10)
                .await
                .unwrap(),
            UploadOpened::Opened
        );
    }
    assert!(matches!(
        a.open_upload("b6", "user:bob", "me", T0 + 50, 1_000, 100, 10)
            .await
            .unwrap(),
        UploadOpened::Full { .. }
    ));
    // Once they expire there is room again.
    assert_eq!(
        a.open_upload("late", "user:alice", "me", T0 + 2_000, 1_000, 4, 10)
            .await
            .unwrap(),
        UploadOpened::Opened
    );
}

/// A periodic job is run by one node at a time: while one handle holds it, another is refused
/// (where the backend serves several nodes); once the guard drops, the other gets it.
pub async fn a_periodic_job_runs_on_one_node_at_a_time<B: StoreBackend>(b: &B) {
    let (a, c) = (b.store().await, b.store().await);
    let held = a.try_job("retention").await.unwrap();
    assert!(held.is_some());
    let other = c.try_job("retention").await.unwrap();
    if c.jobs_exclusive() {
        assert!(other.is_none(), "two nodes hold one job");
        // Another job is free.
        assert!(c.try_job("other").await.unwrap().is_some());
    } else {
        assert!(other.is_some(), "a single-node store always runs the job");
    }
    drop(other);
    drop(held);
    // Released: the other node gets it (the server notices the closed session promptly).
    let mut got = None;
    for _ in 0..100 {
        got = c.try_job("retention").await.unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(got.is_some(), "the job was not released");
}
