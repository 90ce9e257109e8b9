//! The whole suite on the PostgreSQL store: one database of its own per test, created on the
//! server at `MAILGATE_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`, the
//! machines' trust-auth server that `scripts/test` starts when it is down) and dropped when the
//! test ends, passed or panicked. Each handle is `mailgate_store::open` on that database's URL, as
//! another node would open it (its own pool; migrations already applied are skipped). Below the
//! suite: what only PostgreSQL has (how it opens, decision partitions, SKIP LOCKED leases).

use std::sync::Arc;

use mailgate_store::postgres::PgStore;
use mailgate_store::testing::{TestDb, postgres_server};
use mailgate_store::{NewMessage, Store, Stores};
use sqlx::{Connection, PgConnection};

use crate::suite::{Backend, conformance, message};

/// A fresh database, dropped with this value (a guard: also when the test panics): the one
/// helper every crate's tests use (`mailgate_store::testing`).
pub type Postgres = TestDb;

async fn fresh() -> Postgres {
    TestDb::create().await
}

/// A handle on the database as the PostgreSQL store itself (for what only it has).
async fn handle(db: &Postgres) -> PgStore {
    PgStore::open(db.url()).await.unwrap()
}

impl Backend for Postgres {
    /// Through the factory `serve` and the admin verbs use, as for SQLite.
    async fn open(&self) -> Stores {
        TestDb::open(self).await
    }
}

conformance!(fresh);
// Only PostgreSQL shares usage counters between nodes (SQLite serves one node).
conformance!(counters: fresh);

/// Whether the test server has a database `name`.
async fn exists(name: &str) -> bool {
    let mut admin = PgConnection::connect(&postgres_server()).await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

/// The guard drops its database, also when the test using it panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_database_is_dropped_even_after_a_panic() {
    let db = fresh().await;
    let name = db.name().to_owned();
    let _store = handle(&db).await;
    assert!(exists(&name).await);
    let panicked = tokio::spawn(async move {
        let _db = db;
        panic!("a failing test");
    })
    .await;
    assert!(panicked.is_err());
    assert!(!exists(&name).await, "{name} is still there");
}

/// A database a killed test process left behind (no destructor ran) is dropped by a later
/// test's create once it is older than `STALE_SECS`; a recent one is left to the test using it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_databases_left_behind_are_dropped_once_stale() {
    use mailgate_store::testing::STALE_SECS;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = |age: u64| format!("mailgate_test_{}_{:016x}", now - age, fastrand::u64(..));
    let (stale, recent) = (left(STALE_SECS + 60), left(60));
    let mut admin = PgConnection::connect(&postgres_server()).await.unwrap();
    for name in [&stale, &recent] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let _db = fresh().await;
    assert!(!exists(&stale).await, "{stale} is still there");
    assert!(exists(&recent).await, "{recent} was dropped while in use");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE \"{recent}\"")))
        .execute(&mut admin)
        .await
        .unwrap();
}

// What the suite cannot state through the traits: how a PostgreSQL store opens.

/// Nodes starting at once on an empty database all open it, and each migration is applied once
/// (the advisory lock): none fails on a table another created a moment before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_opening_one_database_at_once_migrate_it_once() {
    let db = fresh().await;
    let url = Arc::new(db.url().to_owned());
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::open(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().unwrap());
    }
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(stores[0].pool())
            .await
            .unwrap();
    let versions: Vec<i64> = applied.iter().map(|(v, _)| *v).collect();
    let mut unique = versions.clone();
    unique.dedup();
    assert_eq!(versions, unique, "each migration once");
    assert!(!applied.is_empty() && applied.iter().all(|(_, ok)| *ok));
}

/// A database a newer Mailgate migrated (a migration this binary does not have) is refused as
/// `SchemaTooNew`: not temporary, and it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_binary_is_refused_as_such() {
    let db = fresh().await;
    let s = handle(&db).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99990101000000, 'from the future', true, '\\x00', 0)",
    )
    .execute(s.pool())
    .await
    .unwrap();
    let e = PgStore::open(db.url()).await.unwrap_err();
    assert!(
        matches!(e, mailgate_store::StoreError::SchemaTooNew(_)),
        "{e:?}"
    );
    assert!(!e.is_temporary());
    assert!(e.to_string().contains("newer"), "{e}");
    // The refused open left the migration lock free: a later open still gets to the check.
    let again = tokio::time::timeout(std::time::Duration::from_secs(10), PgStore::open(db.url()))
        .await
        .expect("the migration lock was left held");
    assert!(again.is_err());
}

/// An open makes today's decision partition and the next days' ahead; a decision of a day with
/// no partition (here: 1970) still has a place, the default partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_creates_decision_partitions_ahead() {
    let db = fresh().await;
    let s = handle(&db).await;
    let days: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'decisions'::regclass AND c.relname <> 'decisions_default'
         ORDER BY 1",
    )
    .fetch_all(s.pool())
    .await
    .unwrap();
    let today: String =
        sqlx::query_scalar("SELECT 'decisions_d' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")
            .fetch_one(s.pool())
            .await
            .unwrap();
    assert!(days.contains(&today), "{today} in {days:?}");
    assert_eq!(days.len(), 8, "today and 7 days ahead: {days:?}");
    sqlx::query(
        "INSERT INTO decisions (id, at_ms, door, principal, verdict, body)
         VALUES ('01OLD', 5, 'smtp', 'a@example.com', 'denied', '\\x7b7d')",
    )
    .execute(s.pool())
    .await
    .unwrap();
    let place: String =
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM decisions WHERE id = '01OLD'")
            .fetch_one(s.pool())
            .await
            .unwrap();
    assert_eq!(place, "decisions_default");
}

/// Retention drops a whole day partition when no remaining message names a decision in it, and
/// empties row by row a partition some queued message still names (that decision stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_day_partitions_and_keeps_named_decisions() {
    use mailgate_store::{NewMessage, StoredDecision, StoredVerdict};
    const DAY: i64 = 86_400_000;
    let day = 19_675 * DAY; // 2023-11-14 UTC
    let db = fresh().await;
    let s = handle(&db).await;
    sqlx::query("SELECT mailgate_decision_partitions($1, 1)")
        .bind(day)
        .execute(s.pool())
        .await
        .unwrap();
    let decision = |id: &str, at_ms| StoredDecision {
        id: id.into(),
        at_ms,
        door: "smtp".into(),
        principal: "a@example.com".into(),
        verdict: StoredVerdict::Allowed,
        code: None,
        body: serde_json::json!({"id": id}).into(),
    };
    s.record_decision(&decision("a", day + 1_000))
        .await
        .unwrap();
    s.record_decision(&decision("b", day + DAY + 5))
        .await
        .unwrap();
    s.record_decision(&decision("m", day + DAY + 6))
        .await
        .unwrap();
    s.accept_message(
        &NewMessage {
            decision_id: "m".into(),
            ..message("m1", day + DAY + 6, &["b@example.org"])
        },
        None,
    )
    .await
    .unwrap();
    let partitions = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'decisions'::regclass AND c.relname LIKE 'decisions_d2023%'
             ORDER BY 1",
        )
        .fetch_all(s.pool())
        .await
        .unwrap()
    };
    assert_eq!(
        partitions().await,
        ["decisions_d20231114", "decisions_d20231115"]
    );
    let purged = s.purge(Some(day + 2 * DAY), None).await.unwrap();
    assert_eq!(purged.decisions, 2);
    assert_eq!(
        partitions().await,
        ["decisions_d20231115"],
        "the first day dropped whole"
    );
    assert_eq!(s.decision("a").await.unwrap(), None);
    assert_eq!(s.decision("b").await.unwrap(), None);
    assert_eq!(
        s.decision("m").await.unwrap(),
        Some(decision("m", day + DAY + 6)),
        "named by a queued message"
    );
}

/// Leasing skips rows another node has locked (`FOR UPDATE SKIP LOCKED`) instead of waiting for
/// them: while one node's transaction holds a message's row, another leases the rest at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_skips_rows_another_node_holds_instead_of_waiting() {
    use mailgate_store::{NewMessage, QueueStore};
    let db = fresh().await;
    let a = handle(&db).await;
    let b = handle(&db).await;
    for id in ["m1", "m2"] {
        a.accept_message(
            &NewMessage {
                decision_id: format!("d-{id}"),
                ..message(id, 1_000, &["b@example.org"])
            },
            None,
        )
        .await
        .unwrap();
    }
    let mut holder = a.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM messages WHERE id = 'm1' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let leased = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        b.lease_due("node-b", 2_000, 60_000, 10),
    )
    .await
    .expect("the lease waited for a locked row")
    .unwrap();
    assert_eq!(
        leased.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m2"]
    );
    holder.rollback().await.unwrap();
    let rest = b.lease_due("node-b", 2_000, 60_000, 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m1"]
    );
}

/// A decision id holds the time it was made: the lookup by id reads only the day partition(s)
/// that time can be in. Proven by a lock: while another transaction holds every other day's
/// partition (ACCESS EXCLUSIVE, as a retention DROP would), the lookup still answers at once; a
/// lookup probing every partition would wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_is_looked_up_in_its_own_day_partition_only() {
    use mailgate_store::{StoredDecision, StoredVerdict};
    const DAY: i64 = 86_400_000;
    let day = 19_675 * DAY; // 2023-11-14 UTC
    let db = fresh().await;
    let s = handle(&db).await;
    sqlx::query("SELECT mailgate_decision_partitions($1, 2)")
        .bind(day)
        .execute(s.pool())
        .await
        .unwrap();
    // 01HF7... : an id made at day + 12 h (as `new_decision_id` makes them).
    let at = day + DAY / 2;
    let id = {
        const DIGITS: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let v = (at as u128) << 80 | 0x1234;
        (0..26)
            .map(|i| DIGITS[((v >> (5 * (25 - i))) & 0x1F) as usize] as char)
            .collect::<String>()
    };
    let d = StoredDecision {
        id: id.clone(),
        at_ms: at,
        door: "smtp".into(),
        principal: "a@example.com".into(),
        verdict: StoredVerdict::Denied,
        code: Some("user.suspended".into()),
        body: serde_json::json!({"id": id}).into(),
    };
    s.record_decision(&d).await.unwrap();
    let mut holder = s.pool().begin().await.unwrap();
    sqlx::raw_sql(
        "LOCK TABLE decisions_d20231115, decisions_d20231116, decisions_default
         IN ACCESS EXCLUSIVE MODE",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let found = tokio::time::timeout(std::time::Duration::from_secs(5), s.decision(&id))
        .await
        .expect("the lookup by id waited for another day's partition")
        .unwrap();
    assert_eq!(found, Some(d));
    holder.rollback().await.unwrap();
}

/// Queued decisions are written in batches (one statement each), and a send's decision queued
/// just before its message is written by the acceptance's own transaction (the writer skips it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_decisions_are_written_in_batches_and_a_sends_by_its_acceptance() {
    use mailgate_store::{NewMessage, StoredDecision, StoredVerdict};
    let db = fresh().await;
    let s = handle(&db).await;
    let decision = |id: String| StoredDecision {
        id,
        at_ms: 1_000,
        door: "smtp".into(),
        principal: "a@example.com".into(),
        verdict: StoredVerdict::Denied,
        code: Some("user.suspended".into()),
        body: serde_json::json!({}).into(),
    };
    for i in 0..2_000 {
        s.enqueue_decision(decision(format!("01R{i}")))
            .await
            .unwrap();
    }
    s.flush().await.unwrap();
    let batches = s.decision_batches();
    assert_eq!(batches.decisions, 2_000);
    assert!(
        batches.statements <= 20,
        "2,000 queued decisions took {} statements",
        batches.statements
    );
    s.enqueue_decision(decision("01SEND".into())).await.unwrap();
    s.accept_message(
        &NewMessage {
            decision_id: "01SEND".into(),
            ..message("m1", 1_000, &["b@example.org"])
        },
        None,
    )
    .await
    .unwrap();
    s.flush().await.unwrap();
    let after = s.decision_batches();
    assert_eq!(after.claimed, 1, "{after:?}");
    assert_eq!(after.decisions, 2_000, "the writer did not write it again");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions WHERE id = '01SEND'")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

/// Regression (issue 16, run 5 of docs/performance.md): the writer took most sends' decisions
/// before their acceptance could claim them (an admission under load takes longer than the
/// writer's 10 ms gathering), and the acceptance's insert of the same row then waited for the
/// writer's durable commit. A decision that lets a message in now waits for its acceptance for a
/// second; one nobody claims (its sender went away) is written when that second is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sends_decision_waits_for_its_acceptance_and_is_written_if_none_comes() {
    use mailgate_store::{NewMessage, StoredDecision, StoredVerdict};
    let db = fresh().await;
    let s = handle(&db).await;
    let decision = |id: &str| StoredDecision {
        id: id.into(),
        at_ms: 1_000,
        door: "gmail".into(),
        principal: "a@example.com".into(),
        verdict: StoredVerdict::Allowed,
        code: None,
        body: serde_json::json!({}).into(),
    };
    let rows = |id: &'static str| {
        let pool = s.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM decisions WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    s.enqueue_decision(decision("01LATE")).await.unwrap();
    s.enqueue_decision(decision("01GONE")).await.unwrap();
    // Well past the writer's gathering: before, the writer had written both by now.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert_eq!(rows("01LATE").await, 0, "the writer did not wait");
    s.accept_message(
        &NewMessage {
            decision_id: "01LATE".into(),
            ..message("m-late", 1_000, &["b@example.org"])
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        s.decision_batches().claimed,
        1,
        "{:?}",
        s.decision_batches()
    );
    assert_eq!(rows("01LATE").await, 1, "durable with its message");
    // The unclaimed one is written within its window plus one write, with no flush.
    let t0 = std::time::Instant::now();
    while rows("01GONE").await == 0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "an unclaimed decision was never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.decision_batches().decisions,
        1,
        "{:?}",
        s.decision_batches()
    );
    // A refusal is not left waiting: written within the gathering.
    let mut denied = decision("01DENY");
    denied.verdict = StoredVerdict::Denied;
    s.enqueue_decision(denied).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(rows("01DENY").await, 1, "a refusal waited for a claim");
}

/// Retention makes the coming days' decision partitions too (a node serving for weeks without
/// a restart never writes into the default partition for want of one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_makes_the_coming_days_partitions() {
    let db = fresh().await;
    let s = handle(&db).await;
    let days = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'decisions'::regclass AND c.relname <> 'decisions_default'",
        )
        .fetch_one(s.pool())
        .await
        .unwrap()
    };
    assert_eq!(days().await, 8);
    let last: String = sqlx::query_scalar(
        "SELECT max(c.relname::text) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'decisions'::regclass AND c.relname <> 'decisions_default'",
    )
    .fetch_one(s.pool())
    .await
    .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE \"{last}\"")))
        .execute(s.pool())
        .await
        .unwrap();
    assert_eq!(days().await, 7);
    s.purge(Some(0), None).await.unwrap();
    assert_eq!(days().await, 8);
}

/// Not a contract: the measurement behind docs/performance.md ("Decisions on PostgreSQL"). Writers
/// keep decisions at once (`tasks` of them, `each` decisions apiece): one durable INSERT per
/// decision (`record_decision`, which is what `enqueue_decision` was before the writer task),
/// against `enqueue_decision` and one `flush` at the end (the writer's batches). Prints both rates;
/// fails if batching is not faster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand: --run-ignored only -E 'test(/measure_decision/)' --no-capture"]
async fn measure_decision_writes_one_by_one_against_batched() {
    use mailgate_store::{StoredDecision, StoredVerdict};
    let db = fresh().await;
    let s = Arc::new(handle(&db).await);
    // A refusal's trace is ~5 KB of JSON.
    let body = serde_json::json!({"checks": (0..60).map(|i| format!("check {i}: a detail of about seventy bytes, as real ones")).collect::<Vec<_>>()});
    let decision = move |id: String| StoredDecision {
        id,
        at_ms: now_ms(),
        door: "smtp".into(),
        principal: "a@example.com".into(),
        verdict: StoredVerdict::Denied,
        code: Some("user.suspended".into()),
        body: body.clone().into(),
    };
    for (tasks, each) in [(1usize, 1_000usize), (16, 500), (64, 125)] {
        let mut rates = Vec::new();
        for batched in [false, true] {
            let started = std::time::Instant::now();
            let handles: Vec<_> = (0..tasks)
                .map(|t| {
                    let s = s.clone();
                    let decision = decision.clone();
                    tokio::spawn(async move {
                        for i in 0..each {
                            let d = decision(format!("{batched}-{tasks}-{t}-{i}"));
                            if batched {
                                s.enqueue_decision(d).await.unwrap();
                            } else {
                                s.record_decision(&d).await.unwrap();
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.await.unwrap();
            }
            s.flush().await.unwrap();
            let rate = (tasks * each) as f64 / started.elapsed().as_secs_f64();
            rates.push(rate);
        }
        println!(
            "{tasks} writers: one INSERT each {:.0}/s, batched {:.0}/s ({:.1}x); batches so far {:?}",
            rates[0],
            rates[1],
            rates[1] / rates[0],
            s.decision_batches()
        );
        assert!(rates[1] > rates[0], "{rates:?}");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The admission's exactness rests on READ COMMITTED (each statement after the principal's lock
/// sees the previous holder's commit), so it must not depend on the server's default: on a
/// database whose `default_transaction_isolation` is `repeatable read` (an operator's choice),
/// 24 racing admissions of frank's 3 a day still admit exactly 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_stays_exact_on_a_database_defaulting_to_repeatable_read() {
    use mailgate_store::{Admitted, CounterStore};

    let db = fresh().await;
    let mut admin = PgConnection::connect(db.url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" SET default_transaction_isolation = 'repeatable read'",
        db.name()
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let _ = admin.close().await;
    let (a, b) = (Arc::new(handle(&db).await), Arc::new(handle(&db).await));
    let charge = crate::suite::charge("frank@example.com", 3, 1_000, 600);
    let t0 = 1_795_000_000_000u64;
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let c = charge.clone();
        tasks.push(tokio::spawn(async move {
            s.admit(&c, &[], t0 + i, "n/r", t0 + 60_000).await
        }));
    }
    let mut recorded = 0;
    for t in tasks {
        if let Admitted::Recorded(..) = t.await.unwrap().unwrap() {
            recorded += 1;
        }
    }
    assert_eq!(recorded, 3);
}

/// Admissions are read and re-checked without the principals' locks and recorded only if no other
/// admission came in between (`migrations/postgres/0009_optimistic_admission.sql`): frank's 10 a
/// day through three nodes racing 60 sends admits exactly 10, whether batches are recorded that
/// way, or (tries set to 0) always with the locks held over their reading; and a record whose
/// reading is stale (a version moved) records nothing, not even a usage row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_is_exact_read_without_locks_or_with_and_a_stale_record_writes_nothing() {
    use mailgate_core::engine::Charge;
    use mailgate_store::{Admitted, CounterStore};

    let db = fresh().await;
    let nodes = [
        Arc::new(handle(&db).await),
        Arc::new(handle(&db).await),
        Arc::new(handle(&db).await),
    ];
    let t0 = 1_795_000_000_000u64;
    let charge = |principal: &str| crate::suite::charge(principal, 10, 1_000, 6_000);
    async fn race(nodes: &[Arc<PgStore>; 3], c: Charge, t0: u64) -> (u64, Vec<u64>) {
        let mut tasks = Vec::new();
        for i in 0..60u64 {
            let s = nodes[(i % 3) as usize].clone();
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                s.admit(&c, &[], t0 + i, "n/r", t0 + 60_000).await
            }));
        }
        let mut recorded = 0;
        let mut counts = Vec::new();
        for t in tasks {
            match t.await.unwrap().unwrap() {
                Admitted::Recorded(_, after) => {
                    recorded += 1;
                    counts.push(after.messages_24h);
                }
                Admitted::Changed(u) => assert_eq!(u.messages_24h, 10, "refused with {u:?}"),
            }
        }
        counts.sort_unstable();
        (recorded, counts)
    }
    let (recorded, counts) = race(&nodes, charge("frank@example.com"), t0).await;
    assert_eq!(recorded, 10);
    assert_eq!(
        counts,
        (1..=10).collect::<Vec<_>>(),
        "each admission's own count"
    );
    let stats: Vec<_> = nodes.iter().map(|n| n.admission_stats()).collect();
    assert!(
        stats.iter().map(|s| s.optimistic + s.within).sum::<u64>() > 0,
        "recorded without the locks: {stats:?}"
    );

    for n in &nodes {
        n.set_optimistic_admission_tries(0);
    }
    let before: u64 = nodes.iter().map(|n| n.admission_stats().locked).sum();
    let (recorded, _) = race(&nodes, charge("gina@example.com"), t0).await;
    assert_eq!(recorded, 10);
    let after: u64 = nodes.iter().map(|n| n.admission_stats().locked).sum();
    assert!(after > before, "recorded with the locks held");

    // A record on a stale reading: frank's version has moved past 0, so it records nothing.
    let pool = nodes[0].pool();
    let usage_rows = |p: &'static str| {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM usage_log WHERE principal = $1")
            .bind(p)
            .fetch_one(pool)
    };
    let rows_before = usage_rows("frank@example.com").await.unwrap();
    let recorded: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT admitted_ord, slot_id FROM mailgate_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                                                          $11, $12)",
    )
    .bind(0x4D47_4354i32)
    .bind(vec!["frank@example.com"])
    .bind(vec![0i64])
    .bind(vec!["frank@example.com"])
    .bind(vec![(t0 + 100) as i64])
    .bind(vec![1i64])
    .bind(vec!["n/r"])
    .bind(vec![(t0 + 60_000) as i64])
    .bind(Vec::<String>::new())
    .bind(Vec::<i64>::new())
    .bind(0i64)
    .bind((t0 + 100) as i64)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(recorded.is_empty(), "a stale reading recorded {recorded:?}");
    assert_eq!(usage_rows("frank@example.com").await.unwrap(), rows_before);
    let u = nodes[1].usage("frank@example.com", t0 + 100).await.unwrap();
    assert_eq!(u.messages_24h, 10);
}

/// Bodies and decision traces are compressed with LZ4, not pglz
/// (`migrations/postgres/0010_lz4_bodies.sql`): the partitions made at open and later take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_decisions_are_stored_lz4_compressed() {
    use mailgate_store::{NewMessage, StoredDecision, StoredVerdict};
    let db = fresh().await;
    let s = handle(&db).await;
    // Over the 2 KB at which PostgreSQL compresses a value, and compressible.
    let big = "x".repeat(10_000);
    let now = now_ms();
    s.enqueue_decision(StoredDecision {
        id: "01LZ4".into(),
        at_ms: now,
        door: "gmail".into(),
        principal: "a@example.com".into(),
        verdict: StoredVerdict::Allowed,
        code: None,
        body: serde_json::json!({ "detail": big }).into(),
    })
    .await
    .unwrap();
    s.accept_message(
        &NewMessage {
            decision_id: "01LZ4".into(),
            raw: format!("Subject: lz4\r\n\r\n{big}\r\n").into_bytes(),
            ..message("m-lz4", now, &["b@example.org"])
        },
        None,
    )
    .await
    .unwrap();
    s.flush().await.unwrap();
    let methods: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT (SELECT pg_column_compression(raw) FROM message_bodies WHERE message_id = 'm-lz4'),
                (SELECT pg_column_compression(body) FROM decisions WHERE id = '01LZ4')",
    )
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!(methods, (Some("lz4".to_owned()), Some("lz4".to_owned())));
    let raw: Vec<u8> =
        sqlx::query_scalar("SELECT raw FROM message_bodies WHERE message_id = 'm-lz4'")
            .fetch_one(s.pool())
            .await
            .unwrap();
    assert!(raw.ends_with(format!("{big}\r\n").as_bytes()));
}

/// A batch that no limit holds is admitted in one statement under its ceiling
/// (`migrations/postgres/0012_admission_under_a_ceiling.sql`), whatever another node admitted in
/// between, and stays exact: a send that no longer fits the numbers read under the lock is
/// refused with those numbers (no reading of its own), stored messages' slots count out at once,
/// and the day's limit of 7 holds over both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_admit_in_turn_under_the_ceiling_and_stay_exact() {
    use mailgate_store::{Admitted, CounterStore, SendSlot};

    let db = fresh().await;
    let (a, b) = (handle(&db).await, handle(&db).await);
    let c = crate::suite::charge("rita@example.com", 7, 2, 6_000);
    let t0 = now_ms() as u64;
    let c = &c;
    let admit =
        async |s: &PgStore, i: u64| s.admit(c, &[], t0 + i, "n/r", t0 + 60_000).await.unwrap();
    let recorded = |a: Admitted| match a {
        Admitted::Recorded(slot, usage) => (slot, usage),
        Admitted::Changed(u) => panic!("refused with {u:?}"),
    };
    let store = async |s: &PgStore, id: String, slot: SendSlot| {
        let m = message(&id, t0 as i64, &["x@example.org"]);
        s.accept_admitted(&m, slot).await.unwrap()
    };
    // In turn on two nodes: each sees the other's send, and neither misses.
    let (s1, u1) = recorded(admit(&a, 0).await);
    let (s2, u2) = recorded(admit(&b, 1).await);
    assert_eq!((u1.messages_24h, u1.in_flight), (1, 1));
    assert_eq!((u2.messages_24h, u2.in_flight), (2, 2));
    for n in [&a, &b] {
        let stats = n.admission_stats();
        assert_eq!((stats.within, stats.missed), (1, 0), "{stats:?}");
    }
    // Two sends in flight (the limit): the third does not fit, and is refused with the numbers
    // read under the lock, without another statement.
    match admit(&a, 2).await {
        Admitted::Changed(u) => assert_eq!((u.messages_24h, u.in_flight), (2, 2)),
        other => panic!("admitted past the concurrency limit: {other:?}"),
    }
    let stats = a.admission_stats();
    assert_eq!(
        (stats.within, stats.missed, stats.optimistic, stats.locked),
        (1, 1, 0, 0),
        "{stats:?}"
    );
    // Both stored: their slots are freed, and the next sends fit again, up to the day's 7.
    store(&a, "m-r1".into(), s1).await;
    store(&b, "m-r2".into(), s2).await;
    for (i, n) in [&b, &a, &b, &a, &b].into_iter().enumerate() {
        let (slot, u) = recorded(admit(n, 3 + i as u64).await);
        assert_eq!((u.messages_24h, u.in_flight), (3 + i as u64, 1));
        store(n, format!("m-r{}", 3 + i), slot).await;
    }
    for (n, i) in [(&a, 8), (&b, 9)] {
        match admit(n, i).await {
            Admitted::Changed(u) => assert_eq!((u.messages_24h, u.in_flight), (7, 0)),
            other => panic!("admitted past the daily limit: {other:?}"),
        }
    }
    assert_eq!(a.admission_stats().within + b.admission_stats().within, 7);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_log WHERE principal = 'rita@example.com'")
            .fetch_one(a.pool())
            .await
            .unwrap();
    assert_eq!(rows, 7);
}

/// A rate limit stays exact when three nodes race one principal's sends under the ceiling: 10
/// sends a minute with a burst of 10 admits exactly 10 of 60 sent at once, and the schedule the
/// store keeps is the one the engine gives for those 10 (`TatShift`, moved from whatever each
/// batch found).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_raced_on_three_nodes_admits_exactly_its_burst() {
    use mailgate_store::{Admitted, CounterStore};

    let db = fresh().await;
    let nodes = [
        Arc::new(handle(&db).await),
        Arc::new(handle(&db).await),
        Arc::new(handle(&db).await),
    ];
    let c = crate::suite::charge("sam@example.com", 1_000, 1_000, 10);
    let gcra = c.rate.expect("a rate");
    let t0 = now_ms() as u64;
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let (s, c) = (nodes[(i % 3) as usize].clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            s.admit(&c, &[], t0, "n/r", t0 + 60_000).await.unwrap()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        if let Admitted::Recorded(..) = t.await.unwrap() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
    let u = nodes[0].usage("sam@example.com", t0).await.unwrap();
    assert_eq!(u.messages_24h, 10);
    assert_eq!(u.rate_tat_ms, Some(t0 + 10 * gcra.emission_ms));
    let within: u64 = nodes.iter().map(|n| n.admission_stats().within).sum();
    assert!(within > 0, "no batch was admitted under its ceiling");
}

/// Sends admitted and stored at once (`migrations/postgres/0013_admit_and_store_at_once.sql`)
/// stay exact when two nodes race one principal: of 30 sends at once against a day's limit of 7,
/// exactly 7 messages are stored and counted, whichever way each went (at once, or given back
/// and then admitted in two steps as the gateway does); every refused send left nothing behind,
/// and no slot is left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_admitted_and_stored_at_once_stay_exact_across_two_nodes() {
    use mailgate_store::{AdmitStored, Admitted, CounterStore};

    let db = fresh().await;
    let nodes = [Arc::new(handle(&db).await), Arc::new(handle(&db).await)];
    let c = crate::suite::charge(crate::suite::ALICE, 7, 1_000, 60_000);
    let t0 = now_ms();
    let mut tasks = Vec::new();
    for i in 0..30i64 {
        let (s, c) = (nodes[(i % 2) as usize].clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let m = message(&format!("m-{i}"), t0 + i, &["x@example.org"]);
            let at = m.accepted_at_ms as u64;
            match s.admit_and_store(&c, at, "n/r", m).await.unwrap() {
                AdmitStored::Stored(u) => Some(u.messages_24h),
                AdmitStored::TwoSteps(m) => {
                    match s.admit(&c, &[], at, "n/r", at + 60_000).await.unwrap() {
                        Admitted::Recorded(slot, u) => {
                            s.accept_admitted(&m, slot).await.unwrap();
                            Some(u.messages_24h)
                        }
                        Admitted::Changed(u) => {
                            assert_eq!(u.messages_24h, 7, "refused below the limit: {u:?}");
                            None
                        }
                    }
                }
            }
        }));
    }
    let mut counted = Vec::new();
    for t in tasks {
        counted.extend(t.await.unwrap());
    }
    counted.sort_unstable();
    // Each stored send saw its own place in the day's count: 1 to 7, once each.
    assert_eq!(counted, (1..=7).collect::<Vec<_>>());
    let count = async |sql: &'static str| -> i64 {
        sqlx::query_scalar(sql)
            .bind(crate::suite::ALICE)
            .fetch_one(nodes[0].pool())
            .await
            .unwrap()
    };
    assert_eq!(
        count("SELECT count(*) FROM messages WHERE principal = $1").await,
        7
    );
    assert_eq!(
        count("SELECT count(*) FROM usage_log WHERE principal = $1").await,
        7
    );
    assert_eq!(
        count("SELECT count(*) FROM send_slots WHERE principal = $1").await,
        0
    );
    let at_once: u64 = nodes.iter().map(|n| n.admission_stats().at_once).sum();
    assert!(at_once > 0, "no batch was admitted and stored at once");
}

/// A send admitted and stored at once whose message cannot be written (its id is taken) is
/// rolled back whole: given back for the two steps, nothing counted; and a send past its
/// principal's limit is given back without anything recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_stored_at_once_charges_nothing_when_its_message_is_not_written() {
    use mailgate_store::{AdmitStored, CounterStore};

    let db = fresh().await;
    let s = handle(&db).await;
    let c = crate::suite::charge(crate::suite::ALICE, 2, 10, 60_000);
    let t0 = now_ms();
    let at_once = async |id: &str, at: i64| {
        let m = message(id, at, &["x@example.org"]);
        s.admit_and_store(&c, at as u64, "n/r", m).await.unwrap()
    };
    match at_once("m-1", t0).await {
        AdmitStored::Stored(u) => assert_eq!((u.messages_24h, u.in_flight), (1, 0)),
        AdmitStored::TwoSteps(_) => panic!("a first send was not stored at once"),
    }
    let usage = async || s.usage(crate::suite::ALICE, t0 as u64 + 2).await.unwrap();
    assert_eq!(usage().await.messages_24h, 1);
    // The same id again: the message is not written, so neither is its admission.
    match at_once("m-1", t0 + 1).await {
        AdmitStored::TwoSteps(m) => assert_eq!(m.id, "m-1"),
        AdmitStored::Stored(u) => panic!("a duplicate id was stored: {u:?}"),
    }
    assert_eq!(usage().await.messages_24h, 1);
    assert!(matches!(
        at_once("m-2", t0 + 1).await,
        AdmitStored::Stored(_)
    ));
    // At the day's limit of 2: given back, nothing recorded (the two steps refuse it).
    assert!(matches!(
        at_once("m-3", t0 + 2).await,
        AdmitStored::TwoSteps(_)
    ));
    let u = usage().await;
    assert_eq!((u.messages_24h, u.in_flight), (2, 0));
    let stats = s.admission_stats();
    assert_eq!((stats.at_once, stats.at_once_missed), (2, 1), "{stats:?}");
}

/// Admits `m`'s send on node `s` (slots held as `a/r1`) and stores the message, as the gateway
/// does for a send on a shared-counter store.
async fn admit_and_store(s: &PgStore, c: &mailgate_core::engine::Charge, m: &NewMessage) {
    use mailgate_store::{Admitted, CounterStore};
    let at = m.accepted_at_ms as u64;
    let slot = match s.admit(c, &[], at, "a/r1", at + 60_000).await.unwrap() {
        Admitted::Recorded(slot, _) => slot,
        Admitted::Changed(u) => panic!("refused with {u:?}"),
    };
    s.accept_admitted(m, slot).await.unwrap();
}

/// A node whose delivery workers asked for work is handed the messages it accepts
/// (`postgres/handoff.rs`): each is stored already leased to the node's run (owner
/// `<node>/<run>/accepted`, its recipient rows made), any worker of that run gets it from memory
/// with its body and its recipients pending once each (another node finds nothing to lease), and
/// the worker's write-back under its own owner records it. A message handed off but not taken
/// before its lease expired is leased by another node as after any lease that ended without an
/// outcome (`possible_duplicate`), and the first node's worker then drops it instead of
/// delivering it a second time; one released by a node shutting down is due at once, unmarked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_delivers_what_it_accepted_from_memory_leased_to_it_at_acceptance() {
    use mailgate_store::{MessageState, QueueStore, RecipientState, Recorded};

    let db = fresh().await;
    let (a, b) = (handle(&db).await, handle(&db).await);
    let c = crate::suite::charge("rita@example.com", 100, 10, 60_000);
    let t0 = now_ms();
    let accept = async |id: &str, at: i64| {
        let m = message(id, at, &["x@example.org", "y@example.org", "x@example.org"]);
        admit_and_store(&a, &c, &m).await;
        m
    };
    // Before any worker of node a asked for work, nothing is handed off.
    accept("m-shared", t0).await;
    let lease_of = async |id: &str| -> (Option<String>, Option<i64>) {
        sqlx::query_as("SELECT lease_owner, lease_until_ms FROM messages WHERE id = $1")
            .bind(id)
            .fetch_one(a.pool())
            .await
            .unwrap()
    };
    assert_eq!(lease_of("m-shared").await, (None, None));
    let shared = a.lease_due("a/r1/0", t0, 2_000, 32).await.unwrap();
    assert_eq!(shared.len(), 1);
    let delivered = |m: &mailgate_store::LeasedMessage| {
        crate::suite::report(
            std::slice::from_ref(m),
            &m.id,
            t0 + 20,
            &[
                ("x@example.org", RecipientState::Delivered),
                ("y@example.org", RecipientState::Delivered),
            ],
        )
    };
    a.record_attempts("a/r1/0", &[delivered(&shared[0])])
        .await
        .unwrap();

    // Now node a's workers have asked: its next acceptance is leased to its run at once.
    let m = accept("m-handed", t0 + 10).await;
    assert_eq!(
        lease_of("m-handed").await,
        (Some("a/r1/accepted".to_owned()), Some(t0 + 10 + 2_000))
    );
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT recipient, state FROM message_recipients WHERE message_id = 'm-handed'
         ORDER BY position",
    )
    .fetch_all(a.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("x@example.org".to_owned(), "pending".to_owned()),
            ("y@example.org".to_owned(), "pending".to_owned())
        ]
    );
    // Another node has nothing to lease; another worker of a's run gets it from memory.
    assert!(
        b.lease_due("b/r2/0", t0 + 20, 2_000, 32)
            .await
            .unwrap()
            .is_empty()
    );
    let got = a.lease_due("a/r1/3", t0 + 20, 2_000, 32).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    let h = &got[0];
    assert_eq!(h.id, "m-handed");
    assert_eq!(h.raw, m.raw);
    assert_eq!(
        h.recipients,
        [
            ("x@example.org".to_owned(), RecipientState::Pending),
            ("y@example.org".to_owned(), RecipientState::Pending)
        ]
    );
    assert!(!h.possible_duplicate && h.attempts == 0);
    assert_eq!(
        a.record_attempts("a/r1/3", &[delivered(h)]).await.unwrap(),
        [Recorded::State(MessageState::Delivered)]
    );
    let st = a.message_status("m-handed").await.unwrap().unwrap();
    assert_eq!(st.entry.state, MessageState::Delivered);
    assert!(!st.possible_duplicate);

    // A node shutting down releases what it was handed and no worker took: due at once for
    // the others, and not a possible duplicate (nobody attempted it).
    accept("m-released", t0 + 25).await;
    assert_eq!(a.release_handed_off(t0 + 26).await.unwrap(), 1);
    assert_eq!(a.release_handed_off(t0 + 26).await.unwrap(), 0);
    let taken = b.lease_due("b/r2/0", t0 + 27, 2_000, 32).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert!(taken[0].id == "m-released" && !taken[0].possible_duplicate);
    b.record_attempts("b/r2/0", &[delivered(&taken[0])])
        .await
        .unwrap();

    // Handed off and not taken before its lease expired: node b leases it, and a's worker
    // drops it.
    accept("m-late", t0 + 30).await;
    let taken = b
        .lease_due("b/r2/0", t0 + 30 + 2_000, 2_000, 32)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert!(taken[0].id == "m-late" && taken[0].possible_duplicate);
    let mine = a
        .lease_due("a/r1/0", t0 + 30 + 2_001, 2_000, 32)
        .await
        .unwrap();
    assert!(mine.is_empty(), "{mine:?}");
    assert_eq!(
        b.record_attempts("b/r2/0", &[delivered(&taken[0])])
            .await
            .unwrap(),
        [Recorded::State(MessageState::Delivered)]
    );
}

/// A client that hangs up while its send waits for admission is charged nothing: its admission,
/// recorded by the node's admission writer after the caller went away (held up here by another
/// transaction holding the principal's admission lock), is refunded at once (slot freed, usage
/// removed) instead of counting until the slot's deadline a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_caller_went_away_during_admission_is_refunded_at_once() {
    use mailgate_store::CounterStore;

    let db = fresh().await;
    let s = Arc::new(handle(&db).await);
    let principal = "rita@example.com";
    let c = crate::suite::charge(principal, 7, 2, 6_000);
    let t0 = now_ms() as u64;
    // Another transaction holds rita's admission lock (class "MGCT", `postgres/accept.rs`).
    let mut blocker = PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(0x4D47_4354_i32)
        .bind(principal)
        .execute(&mut blocker)
        .await
        .unwrap();
    let caller = {
        let (s, c) = (s.clone(), c.clone());
        tokio::spawn(async move { s.admit(&c, &[], t0, "n/r", t0 + 60_000).await })
    };
    // The send waits in the admission writer, behind the lock; then its caller goes away.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!caller.is_finished(), "admitted while the lock was held");
    caller.abort();
    let _ = caller.await;
    let before = s.admission_stats();
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    // The writer records the admission once the lock is free, finds the caller gone, refunds.
    for _ in 0..100 {
        if s.admission_stats() != before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_ne!(
        s.admission_stats(),
        before,
        "the admission was never recorded"
    );
    let mut usage = s.usage(principal, t0 + 1).await.unwrap();
    for _ in 0..50 {
        if usage.in_flight == 0 && usage.messages_24h == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        usage = s.usage(principal, t0 + 1).await.unwrap();
    }
    assert_eq!(
        (usage.messages_24h, usage.in_flight),
        (0, 0),
        "the abandoned send still counts: {usage:?}"
    );
    // And the principal's next sends are admitted on the numbers the store has.
    for i in 0..2 {
        match s
            .admit(&c, &[], t0 + 2 + i, "n/r", t0 + 60_000)
            .await
            .unwrap()
        {
            mailgate_store::Admitted::Recorded(_, u) => assert_eq!(u.in_flight, i + 1),
            other => panic!("refused: {other:?}"),
        }
    }
}

/// A message handed to a node whose workers then stay busy (here: never ask again) goes back to
/// the shared queue after about two seconds (`postgres/handoff.rs`, `STALE`): another node's
/// worker leases it long before the hand-off lease (a minute) would have expired, and it is not
/// a possible duplicate (nobody attempted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_off_message_no_worker_takes_goes_back_to_the_shared_queue() {
    use mailgate_store::QueueStore;

    let db = fresh().await;
    let (a, b) = (handle(&db).await, handle(&db).await);
    let c = crate::suite::charge("rita@example.com", 100, 10, 60_000);
    let t0 = now_ms();
    assert!(
        a.lease_due("a/r1/0", t0, 60_000, 32)
            .await
            .unwrap()
            .is_empty()
    );
    admit_and_store(&a, &c, &message("m-stuck", t0, &["x@example.org"])).await;
    let leased_to: Option<String> =
        sqlx::query_scalar("SELECT lease_owner FROM messages WHERE id = 'm-stuck'")
            .fetch_one(a.pool())
            .await
            .unwrap();
    assert_eq!(leased_to.as_deref(), Some("a/r1/accepted"));
    let started = std::time::Instant::now();
    let mut taken = Vec::new();
    while taken.is_empty() && started.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        taken = b.lease_due("b/r2/0", now_ms(), 60_000, 32).await.unwrap();
    }
    let waited = started.elapsed();
    assert_eq!(taken.len(), 1, "never returned to the shared queue");
    assert!(taken[0].id == "m-stuck" && !taken[0].possible_duplicate);
    assert!(
        waited >= std::time::Duration::from_millis(1_500)
            && waited < std::time::Duration::from_secs(5),
        "returned after {waited:?}"
    );
}
