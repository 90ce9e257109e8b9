//! The write connection: one dedicated thread owns it (rusqlite), and every hot write goes
//! through it. The hot writes of a send (its decision, and the accepted message with its usage)
//! are group-committed: whatever has queued up is committed in one transaction, so concurrent
//! acceptances share one fsync instead of paying one each. Delivery bookkeeping (leases, attempt
//! records, capture marks) runs on the same thread as [`Writer::call`]s, at
//! `synchronous = NORMAL`.
//!
//! Why a thread of its own rather than sqlx: sqlx runs each SQLite connection on a thread too,
//! but reaches it through a pool and one channel round trip per statement; a serial acceptance
//! cost ~390 µs that way against ~230 µs here, the difference being context switches
//! (docs/performance.md). A caller now costs two thread hand-offs: its job to this thread, the
//! outcome back.
//!
//! Invariants:
//! - A caller of [`Writer::submit`] hears `Ok` only after the transaction holding its write is
//!   committed (with `synchronous=FULL`, on disk).
//! - Jobs run in the order they were queued: a decision queued with [`Writer::enqueue`] before a
//!   message is durable no later than that message.
//! - One failing write never fails its neighbours: when a batch fails, it is rolled back and its
//!   jobs are run again one transaction each, so each caller gets its own outcome.
//! - The connection is back at `synchronous = FULL` after every relaxed call, whatever it did.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};
use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::OrStore;
use crate::{NewMessage, StoreError, StoredDecision, UsageEntry};

/// Most group writes committed in one transaction.
const MAX_BATCH: usize = 256;
/// Jobs that may wait for the writer before senders wait for room (back-pressure).
const QUEUE_DEPTH: usize = 4096;

/// A write the group committer performs.
#[derive(Debug)]
pub(crate) enum Op {
    /// Keep a decision.
    Decision(StoredDecision),
    /// Store an accepted message and the usage it consumes.
    Accept {
        message: NewMessage,
        usage: Option<(UsageEntry, Option<i64>)>,
    },
    /// Nothing: completes once everything queued before it is committed.
    Flush,
}

/// Work on the write connection that is not a group write.
type Call = Box<dyn FnOnce(&mut Connection) + Send>;

/// Where a group write's caller waits for its outcome (`None`: nobody waits).
type Done = Option<oneshot::Sender<Result<(), StoreError>>>;

#[allow(
    clippy::large_enum_variant,
    reason = "group writes are the common job; boxing them would cost an allocation each"
)]
enum Job {
    Group {
        op: Op,
        done: Done,
    },
    /// Runs at `synchronous = NORMAL` when `relaxed`.
    Call {
        f: Call,
        relaxed: bool,
    },
}

/// How much sharing group commit achieved (for tests and `docs/performance.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Transactions committed for group writes.
    pub transactions: u64,
    /// Writes (decisions, acceptances) they carried.
    pub writes: u64,
}

#[derive(Debug, Default)]
struct Counts {
    transactions: AtomicU64,
    writes: AtomicU64,
}

/// The handle to the writer thread. The thread ends when the last handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Job>,
    counts: Arc<Counts>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Group { op, .. } => f.debug_tuple("Group").field(op).finish(),
            Job::Call { relaxed, .. } => f.debug_struct("Call").field("relaxed", relaxed).finish(),
        }
    }
}

/// Opens the write connection to the database file `path` (its schema already migrated).
fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .or_store()?;
    conn.busy_timeout(Duration::from_secs(10)).or_store()?;
    // WAL is a property of the file (set when it was created); the rest is per connection.
    // Checkpoints run on a reader connection, off the commit path (see `checkpoint`); this
    // connection's own (which blocks commits) is a backstop for a log that the background
    // checkpoints cannot finish under sustained load: by then it has little left to copy.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 4000;",
    )
    .or_store()?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl Writer {
    /// Starts the writer thread on the database file `path`. With `checkpointer` (a pool of other
    /// connections to the same file), the write-ahead log is checkpointed there, off the commit
    /// path. `remove_on_exit`: files to delete when the thread ends (a private temporary store).
    pub(crate) fn start(
        path: &Path,
        checkpointer: Option<SqlitePool>,
        remove_on_exit: Vec<PathBuf>,
    ) -> Result<Writer, StoreError> {
        let conn = open_connection(path)?;
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let counts = Arc::new(Counts::default());
        let dirty = checkpointer.map(|pool| {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(checkpoint(pool, rx));
            tx
        });
        let c = counts.clone();
        std::thread::Builder::new()
            .name("mailgate-writer".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(conn, rx, &c, dirty)
                }));
                if ran.is_err() {
                    // A bug, not an I/O error (those are answered to each caller). Every write
                    // from now on fails, so every door refuses temporarily: say why, loudly.
                    tracing::error!(
                        alert = "operator",
                        "OPERATOR ALERT: the database write thread stopped after a panic; nothing can be accepted until Mailgate restarts"
                    );
                }
                for f in remove_on_exit {
                    let _ = std::fs::remove_file(f);
                }
            })
            .map_err(super::thread_gone)?;
        Ok(Writer { jobs, counts })
    }

    pub(crate) fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            transactions: self.counts.transactions.load(Ordering::Relaxed),
            writes: self.counts.writes.load(Ordering::Relaxed),
        }
    }

    /// Queues `op` and waits until it is committed.
    pub(crate) async fn submit(&self, op: Op) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.jobs
            .send(Job::Group {
                op,
                done: Some(done),
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Queues `op` without waiting for it to be committed (only for room in the queue). It is
    /// committed before, or together with, anything queued after it.
    pub(crate) async fn enqueue(&self, op: Op) -> Result<(), StoreError> {
        self.jobs
            .send(Job::Group { op, done: None })
            .await
            .map_err(|_| stopped())
    }

    /// Runs `f` on the write connection, in queue order, and returns what it returned. `f` makes
    /// its own transaction. `relaxed`: it runs at `synchronous = NORMAL` (bookkeeping that must
    /// survive a crash of the process but not necessarily a power cut: losing a lease or an
    /// attempt record to a power cut means a second delivery, never a loss).
    pub(crate) async fn call<T: Send + 'static>(
        &self,
        relaxed: bool,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, rx) = oneshot::channel();
        let f: Call = Box::new(move |conn| {
            let _ = done.send(f(conn));
        });
        self.jobs
            .send(Job::Call { f, relaxed })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    super::thread_gone("the database write thread has stopped")
}

/// Copies committed log frames into the database file a few times a second while writes go on.
/// A PASSIVE checkpoint never blocks the writer; once the log is fully copied and unused, the
/// writer starts it over from the beginning, so it stays small.
async fn checkpoint(pool: SqlitePool, mut dirty: mpsc::Receiver<()>) {
    while dirty.recv().await.is_some() {
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed; will try again");
        }
        tokio::time::sleep(CHECKPOINT_PAUSE).await;
    }
}

/// Shortest pause between two checkpoints.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(250);

/// How long writes that nobody waits for (enforcement decisions) may wait for one that somebody
/// does. A send's decision is queued a few tens of microseconds before its message: committed
/// alone at once, it would cost a second fsync per send. A refusal's decision, with no message
/// behind it, is committed after this at the latest (and is found before: `Store::decision`
/// flushes on a miss).
const DEFER_UNWAITED: Duration = Duration::from_millis(10);

/// The writer thread: takes whatever has queued up, commits runs of group writes together and
/// runs calls in between, in order.
fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    counts: &Counts,
    dirty: Option<mpsc::Sender<()>>,
) {
    // Only for timed waits on the queue (the thread is otherwise plain blocking code).
    let timer = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::warn!(error = %e, "writer: no timer; decisions are committed without waiting for their message");
            None
        }
    };
    let mut group: Vec<(Op, Done)> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        loop {
            while let Some(job) = next.take() {
                match job {
                    Job::Group { op, done } => group.push((op, done)),
                    Job::Call { f, relaxed } => {
                        commit_group(&mut conn, &mut group, counts, dirty.as_ref());
                        run_call(&mut conn, f, relaxed);
                    }
                }
                if group.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            let unwaited = !group.is_empty()
                && group.len() < MAX_BATCH
                && group.iter().all(|(_, done)| done.is_none());
            if let (true, Some(rt)) = (unwaited, &timer) {
                // `None` (every handle is gone) or a timeout (nothing came): commit.
                if let Ok(Some(job)) =
                    rt.block_on(async { tokio::time::timeout(DEFER_UNWAITED, rx.recv()).await })
                {
                    next = Some(job);
                    continue;
                }
            }
            break;
        }
        commit_group(&mut conn, &mut group, counts, dirty.as_ref());
    }
}

fn run_call(conn: &mut Connection, f: Call, relaxed: bool) {
    if relaxed && let Err(e) = conn.execute_batch("PRAGMA synchronous = NORMAL") {
        tracing::warn!(error = %e, "could not relax the write connection; running durably");
    }
    f(conn);
    // Whatever the call did (even a failure half-way): no transaction left open, durable again.
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    if relaxed && let Err(e) = conn.execute_batch("PRAGMA synchronous = FULL") {
        tracing::error!(error = %e, "could not restore synchronous = FULL on the write connection");
    }
}

/// Commits the queued group writes (if any) and answers their callers.
fn commit_group(
    conn: &mut Connection,
    group: &mut Vec<(Op, Done)>,
    counts: &Counts,
    dirty: Option<&mpsc::Sender<()>>,
) {
    if group.is_empty() {
        return;
    }
    let ops: Vec<&Op> = group.iter().map(|(op, _)| op).collect();
    match commit_batch(conn, &ops) {
        Ok(writes) => {
            if writes > 0 {
                counts.transactions.fetch_add(1, Ordering::Relaxed);
                counts.writes.fetch_add(writes as u64, Ordering::Relaxed);
                if let Some(d) = dirty {
                    let _ = d.try_send(()); // full: a checkpoint is due anyway
                }
            }
            for (_, done) in group.drain(..) {
                if let Some(done) = done {
                    let _ = done.send(Ok(()));
                }
            }
        }
        Err(e) if group.len() == 1 => {
            if let Some((op, done)) = group.pop() {
                answer(&op, done, Err(e));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = group.len(), "group commit failed; committing its writes one by one");
            for (op, done) in group.drain(..) {
                let r = commit_batch(conn, &[&op]).map(|_| ());
                if r.is_ok() {
                    counts.transactions.fetch_add(1, Ordering::Relaxed);
                    counts.writes.fetch_add(1, Ordering::Relaxed);
                }
                answer(&op, done, r);
            }
        }
    }
}

/// Gives a caller its outcome; a write nobody waits for can only be reported in the log.
fn answer(op: &Op, done: Done, r: Result<(), StoreError>) {
    match done {
        Some(done) => {
            let _ = done.send(r);
        }
        None => {
            if let (Op::Decision(d), Err(e)) = (op, &r) {
                tracing::error!(decision_id = %d.id, error = %e, "could not keep a decision");
            }
        }
    }
}

/// Commits `ops` in one transaction; returns how many writes (not flushes) it held. Rolled back
/// on any failure.
fn commit_batch(conn: &mut Connection, ops: &[&Op]) -> Result<usize, StoreError> {
    let writes = ops.iter().filter(|op| !matches!(op, Op::Flush)).count();
    if writes == 0 {
        return Ok(0); // everything before a flush was committed by earlier batches
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .or_store()?;
    for op in ops {
        match op {
            Op::Decision(d) => insert_decision(&tx, d)?,
            Op::Accept { message, usage } => {
                insert_message(&tx, message)?;
                if let Some((entry, tat)) = usage {
                    insert_usage(&tx, &message.principal, *entry, *tat)?;
                }
            }
            Op::Flush => {}
        }
    }
    tx.commit().or_store()?;
    Ok(writes)
}

fn insert_decision(conn: &Connection, d: &StoredDecision) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO decisions (id, at_ms, door, principal, verdict, code, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .or_store()?
    .execute(params![
        d.id,
        d.at_ms,
        d.door,
        d.principal,
        d.verdict.as_str(),
        d.code,
        super::packed::pack(&d.body)
    ])
    .or_store()?;
    Ok(())
}

/// Inserts a message with its body (acceptances, and DSNs the delivery worker makes).
pub(crate) fn insert_message(conn: &Connection, m: &NewMessage) -> Result<(), StoreError> {
    let recipients =
        serde_json::to_string(&m.recipients).map_err(|e| StoreError::Other(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO messages (id, decision_id, accepted_at_ms, door, principal, envelope_from,
                               recipients, size, state, hold_until_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .or_store()?
    .execute(params![
        m.id,
        m.decision_id,
        m.accepted_at_ms,
        m.door,
        m.principal,
        m.envelope_from,
        recipients,
        m.raw.len() as i64,
        m.state.as_str(),
        m.hold_until_ms
    ])
    .or_store()?;
    conn.prepare_cached("INSERT INTO message_bodies (message_id, raw) VALUES (?1, ?2)")
        .or_store()?
        .execute(params![m.id, m.raw])
        .or_store()?;
    Ok(())
}

/// Appends a send to the usage log and moves the rate state forward (never back).
pub(crate) fn insert_usage(
    conn: &Connection,
    principal: &str,
    entry: UsageEntry,
    rate_tat_ms: Option<i64>,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO usage_log (principal, at_ms, recipients) VALUES (?1, ?2, ?3)")
        .or_store()?
        .execute(params![principal, entry.at_ms, entry.recipients])
        .or_store()?;
    if let Some(tat) = rate_tat_ms {
        conn.prepare_cached(
            "INSERT INTO rate_state (principal, tat_ms) VALUES (?1, ?2)
             ON CONFLICT (principal) DO UPDATE SET tat_ms = MAX(tat_ms, excluded.tat_ms)",
        )
        .or_store()?
        .execute(params![principal, tat])
        .or_store()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::sqlite::SqliteStore;
    use crate::{NewMessage, QueueFilter, QueueStore, Store, UsageEntry};
    use std::sync::Arc;

    fn message(id: &str) -> NewMessage {
        NewMessage {
            id: id.to_owned(),
            decision_id: format!("d-{id}"),
            accepted_at_ms: 1,
            door: "gmail".into(),
            principal: "a@example.com".into(),
            envelope_from: "a@example.com".into(),
            recipients: vec!["b@example.org".into()],
            raw: vec![b'x'; 10 * 1024],
            state: crate::MessageState::Queued,
            hold_until_ms: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_acceptances_share_transactions_and_all_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let store = Arc::new(SqliteStore::open(&path).await.unwrap());
        let n = 200;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move {
                    let usage = UsageEntry {
                        at_ms: 1,
                        recipients: 1,
                    };
                    s.accept_message(&message(&format!("m{i:03}")), Some((usage, Some(i as i64))))
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let stats = store.group_commit_stats();
        assert_eq!(stats.writes, n);
        assert!(
            stats.transactions < n,
            "{n} concurrent acceptances took {} transactions: nothing was shared",
            stats.transactions
        );
        drop(store);
        let again = SqliteStore::open(&path).await.unwrap();
        let listed = again
            .list_queue(&QueueFilter {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), n as usize);
        let replay = again.usage_since(0).await.unwrap();
        assert_eq!(replay.sends.len(), n as usize);
        // Many rate states of one principal: the latest (largest) wins.
        assert_eq!(
            replay.rate_tat_ms,
            vec![("a@example.com".to_owned(), n as i64 - 1)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("g.db")).await.unwrap());
        store.accept_message(&message("dup"), None).await.unwrap();
        // The same id again (a primary-key violation) among good writes in flight together.
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let s = store.clone();
                let id = if i == 25 {
                    "dup".to_owned()
                } else {
                    format!("ok{i}")
                };
                tokio::spawn(
                    async move { (id.clone(), s.accept_message(&message(&id), None).await) },
                )
            })
            .collect();
        for t in tasks {
            let (id, r) = t.await.unwrap();
            assert_eq!(r.is_err(), id == "dup", "{id}: {r:?}");
        }
        for i in (0..50).filter(|i| *i != 25) {
            assert!(store.message(&format!("ok{i}")).await.unwrap().is_some());
        }
    }

    /// A refusal's decision, as the gateway keeps it (nobody waits for it to be durable).
    fn refusal(id: &str) -> crate::StoredDecision {
        crate::StoredDecision {
            id: id.into(),
            at_ms: 1,
            door: "smtp".into(),
            principal: "a@example.com".into(),
            verdict: crate::StoredVerdict::Denied,
            code: Some("user.suspended".into()),
            body: serde_json::json!({"x": 1}).into(),
        }
    }

    #[tokio::test]
    async fn an_enqueued_decision_is_found_at_once_and_durable_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let d = refusal("01TEST");
        store.enqueue_decision(d.clone()).await.unwrap();
        assert_eq!(store.decision("01TEST").await.unwrap(), Some(d.clone()));
        store.flush().await.unwrap();
        drop(store);
        let again = SqliteStore::open(&path).await.unwrap();
        assert_eq!(again.decision("01TEST").await.unwrap(), Some(d));
    }

    /// A refusal's decision has no message to ride along with: it is committed by itself within
    /// moments, visible to another process (here: another store on the same file).
    #[tokio::test]
    async fn a_decision_nobody_waits_for_is_committed_within_moments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let other = SqliteStore::open(&path).await.unwrap();
        let d = refusal("01ALONE");
        store.enqueue_decision(d.clone()).await.unwrap();
        for _ in 0..100 {
            if other.decision("01ALONE").await.unwrap().is_some() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the decision was not committed within a second");
    }

    /// A bug that panics on the write thread must not leave callers waiting forever: the job's
    /// caller and every later writer get an error at once (the doors then refuse temporarily).
    #[tokio::test]
    async fn a_panic_on_the_write_thread_fails_writers_instead_of_hanging_them() {
        let store = SqliteStore::in_memory().await.unwrap();
        let crashed = store
            .write_thread()
            .call(false, |_| -> Result<(), crate::StoreError> {
                panic!("simulated bug on the write thread")
            })
            .await;
        assert!(crashed.is_err());
        let later = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.accept_message(&message("after"), None),
        )
        .await
        .expect("a writer waited on a dead thread");
        assert!(later.is_err());
    }

    #[tokio::test]
    async fn a_private_store_leaves_no_file_behind() {
        let store = SqliteStore::in_memory().await.unwrap();
        let path = store.path().to_owned();
        store.accept_message(&message("m"), None).await.unwrap();
        assert!(path.exists());
        drop(store);
        for _ in 0..100 {
            if !path.exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{} is still there", path.display());
    }
}
