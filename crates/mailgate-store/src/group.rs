//! Group commit: the hot writes of a send (its decision, and the accepted message with its usage)
//! go through one writer task that commits whatever has queued up in one transaction, so
//! concurrent acceptances share one fsync instead of paying one each (and instead of sleeping in
//! SQLite's busy handler while another connection holds the write lock).
//!
//! Invariants:
//! - A caller of [`GroupCommit::submit`] hears `Ok` only after the transaction holding its write
//!   is committed (with `synchronous=FULL`, on disk).
//! - Jobs are committed in the order they were queued: a decision queued with
//!   [`GroupCommit::enqueue`] before a message is durable no later than that message.
//! - One failing write never fails its neighbours: when a batch fails, it is rolled back and its
//!   jobs are run again one transaction each, so each caller gets its own outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::{NewMessage, StoreError, StoredDecision, UsageEntry};

/// Most jobs committed in one transaction.
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

struct Job {
    op: Op,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// How much sharing group commit achieved (for tests and `docs/performance.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Transactions committed by the writer task.
    pub transactions: u64,
    /// Writes (decisions, acceptances) they carried.
    pub writes: u64,
}

#[derive(Debug, Default)]
struct Counts {
    transactions: AtomicU64,
    writes: AtomicU64,
}

/// The handle to the writer task.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    jobs: mpsc::Sender<Job>,
    counts: Arc<Counts>,
}

impl GroupCommit {
    /// Starts the writer task on `writer` (a pool whose connections do the writing). With
    /// `checkpointer` (a pool of other connections to the same file), the write-ahead log is
    /// checkpointed there, off the commit path (the writer connection's own automatic checkpoint
    /// should then be a high backstop).
    pub(crate) fn start(writer: SqlitePool, checkpointer: Option<SqlitePool>) -> GroupCommit {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let counts = Arc::new(Counts::default());
        let dirty = checkpointer.map(|pool| {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(checkpoint(pool, rx));
            tx
        });
        tokio::spawn(run(writer, rx, counts.clone(), dirty));
        GroupCommit { jobs, counts }
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
            .send(Job {
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
            .send(Job { op, done: None })
            .await
            .map_err(|_| stopped())
    }
}

fn stopped() -> StoreError {
    StoreError::Database(sqlx::Error::WorkerCrashed)
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
const CHECKPOINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

async fn run(
    writer: SqlitePool,
    mut rx: mpsc::Receiver<Job>,
    counts: Arc<Counts>,
    dirty: Option<mpsc::Sender<()>>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return; // every handle is gone
        }
        let outcome = match writer.acquire().await {
            Ok(mut conn) => commit_batch(&mut conn, &batch).await,
            Err(e) => Err(StoreError::from(e)),
        };
        match outcome {
            Ok(()) => {
                let writes = batch.iter().filter(|j| !matches!(j.op, Op::Flush)).count();
                if writes > 0 {
                    counts.transactions.fetch_add(1, Ordering::Relaxed);
                    counts.writes.fetch_add(writes as u64, Ordering::Relaxed);
                    if let Some(d) = &dirty {
                        let _ = d.try_send(()); // full: a checkpoint is due anyway
                    }
                }
                for job in batch.drain(..) {
                    if let Some(done) = job.done {
                        let _ = done.send(Ok(()));
                    }
                }
            }
            Err(e) if batch.len() == 1 => {
                log_unwaited(&batch, &e);
                if let Some(done) = batch.pop().and_then(|j| j.done) {
                    let _ = done.send(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = batch.len(), "group commit failed; committing its writes one by one");
                for job in batch.drain(..) {
                    let one = std::slice::from_ref(&job);
                    let r = match writer.acquire().await {
                        Ok(mut conn) => commit_batch(&mut conn, one).await,
                        Err(e) => Err(StoreError::from(e)),
                    };
                    if let Err(e) = &r {
                        log_unwaited(one, e);
                    }
                    if let Some(done) = job.done {
                        let _ = done.send(r);
                    }
                }
            }
        }
    }
}

/// A write nobody waits for can only be reported in the log.
fn log_unwaited(jobs: &[Job], e: &StoreError) {
    for job in jobs.iter().filter(|j| j.done.is_none()) {
        if let Op::Decision(d) = &job.op {
            tracing::error!(decision_id = %d.id, error = %e, "could not keep a decision");
        }
    }
}

async fn commit_batch(conn: &mut SqliteConnection, jobs: &[Job]) -> Result<(), StoreError> {
    if jobs.iter().all(|j| matches!(j.op, Op::Flush)) {
        return Ok(()); // everything before a flush was committed by earlier batches
    }
    let mut decisions: Vec<&StoredDecision> = Vec::new();
    let mut messages: Vec<&NewMessage> = Vec::new();
    let mut usage: Vec<(&str, UsageEntry)> = Vec::new();
    let mut rates: Vec<(&str, i64)> = Vec::new();
    for job in jobs {
        match &job.op {
            Op::Decision(d) => decisions.push(d),
            Op::Accept { message, usage: u } => {
                messages.push(message);
                if let Some((entry, tat)) = u {
                    usage.push((&message.principal, *entry));
                    if let Some(t) = tat {
                        rates.push((&message.principal, *t));
                    }
                }
            }
            Op::Flush => {}
        }
    }
    let decisions = decision_rows(&decisions);
    let messages = message_rows(&messages)?;
    // The whole transaction is one multi-statement query: one round trip to SQLite's thread
    // instead of one per statement (each costs two context switches or more).
    let mut q = QueryBuilder::<Sqlite>::new("BEGIN IMMEDIATE; ");
    push_decisions(&mut q, &decisions);
    push_messages(&mut q, &messages);
    push_usage(&mut q, &usage, &rates);
    q.push("COMMIT");
    run_transaction(conn, q).await
}

/// Runs `q`, a multi-statement transaction (`BEGIN ...; ...; COMMIT`), in one round trip; when a
/// statement fails, the transaction is rolled back (SQLite leaves it open) and the error returned.
pub(crate) async fn run_transaction(
    conn: &mut SqliteConnection,
    mut q: QueryBuilder<Sqlite>,
) -> Result<(), StoreError> {
    match q.build().execute(&mut *conn).await {
        Ok(_) => Ok(()),
        Err(e) => {
            rollback(conn).await;
            Err(e.into())
        }
    }
}

/// Rolls back whatever transaction a failed multi-statement query left open (none is fine).
pub(crate) async fn rollback(conn: &mut SqliteConnection) {
    if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
        tracing::debug!(error = %e, "nothing to roll back");
    }
}

/// Splits `n` rows into chunks of 64, 16, 4 and 1, so that a batch of any size is written with a
/// few multi-row statements whose text (and so prepared statement) is one of four per table.
fn chunk_sizes(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let size = [64, 16, 4, 1].into_iter().find(|s| *s <= n)?;
        n -= size;
        Some(size)
    })
}

/// Cuts `rows` into [`chunk_sizes`] slices.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    chunk_sizes(rows.len()).map(move |size| {
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        chunk
    })
}

/// Decisions with their traces packed (the rows [`push_decisions`] binds).
fn decision_rows<'a>(decisions: &[&'a StoredDecision]) -> Vec<(&'a StoredDecision, Vec<u8>)> {
    decisions
        .iter()
        .map(|d| (*d, crate::packed::pack(&d.body)))
        .collect()
}

/// Appends one multi-row `INSERT` per chunk of `rows` to `q`.
fn push_decisions<'a>(q: &mut QueryBuilder<Sqlite>, rows: &'a [(&'a StoredDecision, Vec<u8>)]) {
    for chunk in chunks(rows) {
        q.push("INSERT INTO decisions (id, at_ms, door, principal, verdict, code, body) ");
        q.push_values(chunk, |mut b, (d, body)| {
            b.push_bind(&d.id)
                .push_bind(d.at_ms)
                .push_bind(&d.door)
                .push_bind(&d.principal)
                .push_bind(&d.verdict)
                .push_bind(&d.code)
                .push_bind(body);
        });
        q.push("; ");
    }
}

/// Messages with their recipient lists rendered as JSON (the rows [`push_messages`] binds).
pub(crate) fn message_rows<'a>(
    messages: &[&'a NewMessage],
) -> Result<Vec<(&'a NewMessage, String)>, StoreError> {
    messages
        .iter()
        .map(|m| {
            serde_json::to_string(&m.recipients)
                .map(|r| (*m, r))
                .map_err(|e| StoreError::Database(sqlx::Error::Encode(Box::new(e))))
        })
        .collect()
}

/// Appends the `INSERT`s of messages with their bodies (acceptances, and DSNs the delivery
/// worker makes) to `q`.
pub(crate) fn push_messages<'a>(
    q: &mut QueryBuilder<Sqlite>,
    rows: &'a [(&'a NewMessage, String)],
) {
    for chunk in chunks(rows) {
        q.push("INSERT INTO messages (id, decision_id, accepted_at_ms, door, principal, envelope_from, recipients, size, state, hold_until_ms) ");
        q.push_values(chunk, |mut b, (m, recipients)| {
            b.push_bind(&m.id)
                .push_bind(&m.decision_id)
                .push_bind(m.accepted_at_ms)
                .push_bind(&m.door)
                .push_bind(&m.principal)
                .push_bind(&m.envelope_from)
                .push_bind(recipients)
                .push_bind(m.raw.len() as i64)
                .push_bind(&m.state)
                .push_bind(m.hold_until_ms);
        });
        q.push("; INSERT INTO message_bodies (message_id, raw) ");
        q.push_values(chunk, |mut b, (m, _)| {
            b.push_bind(&m.id).push_bind(&m.raw);
        });
        q.push("; ");
    }
}

/// Appends sends to the usage log and moves rate states forward (never back).
pub(crate) fn push_usage<'a>(
    q: &mut QueryBuilder<Sqlite>,
    usage: &'a [(&'a str, UsageEntry)],
    rates: &'a [(&'a str, i64)],
) {
    for chunk in chunks(usage) {
        q.push("INSERT INTO usage_log (principal, at_ms, recipients) ");
        q.push_values(chunk, |mut b, (principal, e)| {
            b.push_bind(*principal)
                .push_bind(e.at_ms)
                .push_bind(e.recipients);
        });
        q.push("; ");
    }
    for chunk in chunks(rates) {
        q.push("INSERT INTO rate_state (principal, tat_ms) ");
        q.push_values(chunk, |mut b, (principal, tat)| {
            b.push_bind(*principal).push_bind(*tat);
        });
        q.push(" ON CONFLICT (principal) DO UPDATE SET tat_ms = MAX(tat_ms, excluded.tat_ms); ");
    }
}

#[cfg(test)]
mod tests {
    use crate::{NewMessage, QueueFilter, QueueStore, SqliteStore, Store, UsageEntry};
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
            state: "queued".into(),
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
        // Many rate states of one principal in one statement: the latest (largest) wins.
        assert_eq!(
            replay.rate_tat_ms,
            vec![("a@example.com".to_owned(), n as i64 - 1)]
        );
    }

    #[test]
    fn batches_are_cut_into_few_statement_shapes() {
        let cut = |n| super::chunk_sizes(n).collect::<Vec<_>>();
        assert_eq!(cut(0), Vec::<usize>::new());
        assert_eq!(cut(1), vec![1]);
        assert_eq!(cut(7), vec![4, 1, 1, 1]);
        assert_eq!(cut(85), vec![64, 16, 4, 1]);
        assert_eq!(cut(256).iter().sum::<usize>(), 256);
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

    #[tokio::test]
    async fn an_enqueued_decision_is_found_at_once_and_durable_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let d = crate::StoredDecision {
            id: "01TEST".into(),
            at_ms: 1,
            door: "smtp".into(),
            principal: "a@example.com".into(),
            verdict: "denied".into(),
            code: Some("user.suspended".into()),
            body: serde_json::json!({"x": 1}),
        };
        store.enqueue_decision(d.clone()).await.unwrap();
        assert_eq!(store.decision("01TEST").await.unwrap(), Some(d.clone()));
        store.flush().await.unwrap();
        drop(store);
        let again = SqliteStore::open(&path).await.unwrap();
        assert_eq!(again.decision("01TEST").await.unwrap(), Some(d));
    }
}
