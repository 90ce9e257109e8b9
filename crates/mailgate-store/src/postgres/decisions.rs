//! Decisions at volume (issue 16 item 6): group commit of the decisions the hot path does not
//! wait for, as `sqlite/group.rs` does on SQLite, in one round trip per batch.
//!
//! [`Store::enqueue_decision`](crate::Store::enqueue_decision) puts the decision in a pending map
//! (so [`Store::decision`](crate::Store::decision) finds it at once) and on a bounded queue; one
//! writer task per store takes whatever has queued up (at most [`MAX_BATCH`], gathering for at
//! most [`GATHER`] when nobody waits) and writes it with one `INSERT ... SELECT FROM UNNEST(...)`:
//! one statement, one round trip, one commit for the whole batch. A decision that lets a message
//! in is left for [`CLAIM_WINDOW`] to the acceptance that writes it with its message.
//!
//! Invariants:
//! - An accepted message's decision is durable no later than the message: the acceptance's
//!   transaction writes its own decision when it is still pending ([`DecisionQueue::claim`]),
//!   and the writer skips a decision an acceptance has claimed. If the acceptance fails, the
//!   claim goes back to the writer (dropping a [`Claim`] without [`Claim::committed`]).
//! - [`DecisionQueue::flush`] returns once every decision queued before it is committed (or
//!   claimed by an acceptance, which commits it with its message or gives it back).
//! - Memory is bounded: the queue holds at most [`QUEUE_DEPTH`] decisions; past that,
//!   `enqueue_decision` waits for room (back-pressure on the doors); at most [`QUEUE_DEPTH`] more
//!   wait for their acceptance (past that they are written as any other), and the pending map
//!   holds no more than those, the batch being written and the acceptances in flight.
//! - A decision nobody claims is durable within [`CLAIM_WINDOW`] plus one write (a refusal
//!   within [`GATHER`] plus one write); a flush writes every one still waiting.
//! - Inserts are `ON CONFLICT DO NOTHING`: a decision written twice (the writer and an
//!   acceptance racing for it) is one row, and neither fails.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::OrStore;
use crate::{StoreError, StoredDecision, StoredVerdict};

/// Most decisions written by one statement.
pub(crate) const MAX_BATCH: usize = 512;
/// Decisions that may wait for the writer before `enqueue_decision` waits for room.
pub(crate) const QUEUE_DEPTH: usize = 4096;
/// How long the writer gathers decisions nobody waits for before writing them. A send's decision
/// is queued moments before its message: within this window its acceptance writes it (in the
/// message's transaction) and the writer has nothing to do; a refusal's decision is committed
/// within it.
pub(crate) const GATHER: Duration = Duration::from_millis(10);
/// How long the writer leaves a decision that lets a message in (allowed or held) for the
/// acceptance that will write it with its message ([`DecisionQueue::claim`]). Without it the
/// writer takes most of them first (a send's admission takes longer than [`GATHER`] under load),
/// and the acceptance's insert of the same row then waits for the writer's durable commit: two
/// disk flushes per acceptance instead of one. Measured (`docs/performance.md`, run 5): that
/// wait was the most frequent wait in PostgreSQL at 16 sessions. One not claimed by then (its
/// sender went away, the limits changed at admission) is written then.
pub(crate) const CLAIM_WINDOW: Duration = Duration::from_millis(1000);
/// A failed batch is tried again once after this (the database restarting, a dropped connection);
/// then its decisions are logged as lost.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Inserts `decisions` in one statement (one round trip). Already stored ids are left alone.
pub(crate) async fn insert_decisions<'e, E>(
    executor: E,
    decisions: &[Arc<StoredDecision>],
) -> Result<(), StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
    if decisions.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = decisions.iter().map(|d| d.id.as_str()).collect();
    let at: Vec<i64> = decisions.iter().map(|d| d.at_ms).collect();
    let doors: Vec<&str> = decisions.iter().map(|d| d.door.as_str()).collect();
    let principals: Vec<&str> = decisions.iter().map(|d| d.principal.as_str()).collect();
    let verdicts: Vec<&str> = decisions.iter().map(|d| d.verdict.as_str()).collect();
    let codes: Vec<Option<&str>> = decisions.iter().map(|d| d.code.as_deref()).collect();
    let bodies: Vec<&[u8]> = decisions.iter().map(|d| d.body.as_bytes()).collect();
    sqlx::query(
        "INSERT INTO decisions (id, at_ms, door, principal, verdict, code, body)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::bytea[])
         ON CONFLICT DO NOTHING",
    )
    .bind(ids)
    .bind(at)
    .bind(doors)
    .bind(principals)
    .bind(verdicts)
    .bind(codes)
    .bind(bodies)
    .execute(executor)
    .await
    .or_store()?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// On the queue; the writer will write it.
    Queued,
    /// In the batch the writer is writing.
    Writing,
    /// An acceptance's transaction is writing it (with its message).
    Claimed,
}

#[derive(Debug)]
struct Pending {
    decision: Arc<StoredDecision>,
    state: State,
}

type PendingMap = Arc<Mutex<HashMap<String, Pending>>>;

fn lock(map: &PendingMap) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
enum Job {
    Decision(Arc<StoredDecision>),
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// How much sharing the writer achieved (tests, `docs/performance.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecisionBatches {
    /// Statements the writer ran (one round trip and one commit each).
    pub statements: u64,
    /// Decisions they carried.
    pub decisions: u64,
    /// Decisions acceptances wrote in their own transaction (the writer skipped them).
    pub claimed: u64,
}

#[derive(Debug, Default)]
struct Counts {
    statements: AtomicU64,
    decisions: AtomicU64,
    claimed: AtomicU64,
}

/// The queue of decisions waiting to be written, and the handle of its writer task (which ends
/// when the last handle is dropped, after writing what was queued).
#[derive(Debug, Clone)]
pub(crate) struct DecisionQueue {
    jobs: mpsc::Sender<Job>,
    pending: PendingMap,
    counts: Arc<Counts>,
}

impl DecisionQueue {
    /// Starts the writer task on `pool` (needs a tokio runtime).
    pub(crate) fn start(pool: PgPool) -> DecisionQueue {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let pending = PendingMap::default();
        let counts = Arc::new(Counts::default());
        tokio::spawn(run(pool, rx, pending.clone(), counts.clone()));
        DecisionQueue {
            jobs,
            pending,
            counts,
        }
    }

    pub(crate) fn stats(&self) -> DecisionBatches {
        DecisionBatches {
            statements: self.counts.statements.load(Ordering::Relaxed),
            decisions: self.counts.decisions.load(Ordering::Relaxed),
            claimed: self.counts.claimed.load(Ordering::Relaxed),
        }
    }

    /// Queues `d`: found by [`DecisionQueue::get`] at once, written within [`GATHER`] (or by the
    /// acceptance that claims it). Waits only for room in the queue.
    pub(crate) async fn enqueue(&self, d: StoredDecision) -> Result<(), StoreError> {
        let d = Arc::new(d);
        // Room first, then the map: the map never holds what the queue could not take.
        let permit = self.jobs.reserve().await.map_err(|_| stopped())?;
        lock(&self.pending).insert(
            d.id.clone(),
            Pending {
                decision: d.clone(),
                state: State::Queued,
            },
        );
        permit.send(Job::Decision(d));
        Ok(())
    }

    /// A decision not yet written by the writer.
    pub(crate) fn get(&self, id: &str) -> Option<StoredDecision> {
        lock(&self.pending)
            .get(id)
            .map(|p| StoredDecision::clone(&p.decision))
    }

    /// Waits until every decision queued before this call is committed.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.jobs
            .send(Job::Flush(done))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// For an acceptance: the pending decision `id`, if any, for its transaction to write. A
    /// queued one is claimed (the writer skips it); one the writer is writing is returned too
    /// (the acceptance's `ON CONFLICT DO NOTHING` insert waits for the writer's row, so it is
    /// durable before the message either way).
    pub(crate) fn claim(&self, id: &str) -> Claim {
        let mut map = lock(&self.pending);
        let found = map.get_mut(id).map(|p| {
            let owned = p.state == State::Queued;
            if owned {
                p.state = State::Claimed;
            }
            (p.decision.clone(), owned)
        });
        drop(map);
        match found {
            Some((decision, owned)) => Claim {
                queue: self.clone(),
                decision: Some(decision),
                owned,
                committed: false,
            },
            None => Claim {
                queue: self.clone(),
                decision: None,
                owned: false,
                committed: false,
            },
        }
    }
}

/// A pending decision an acceptance writes in its own transaction. Call
/// [`Claim::committed`] after the transaction committed; dropped otherwise, the decision goes
/// back to the writer.
#[derive(Debug)]
#[must_use = "call `committed` once the transaction holding the decision committed"]
pub(crate) struct Claim {
    queue: DecisionQueue,
    decision: Option<Arc<StoredDecision>>,
    owned: bool,
    committed: bool,
}

impl Claim {
    /// The decision to write in the acceptance's transaction (none: nothing pending).
    pub(crate) fn decision(&self) -> Option<&Arc<StoredDecision>> {
        self.decision.as_ref()
    }

    /// The transaction holding the decision committed: it is durable, no longer pending.
    pub(crate) fn committed(mut self) {
        self.committed = true;
        if let (true, Some(d)) = (self.owned, &self.decision) {
            let mut map = lock(&self.queue.pending);
            if map
                .get(&d.id)
                .is_some_and(|p| p.state == State::Claimed && Arc::ptr_eq(&p.decision, d))
            {
                map.remove(&d.id);
            }
            drop(map);
            self.queue.counts.claimed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.committed || !self.owned {
            return;
        }
        let Some(d) = self.decision.take() else {
            return;
        };
        // The acceptance failed: the writer writes the decision after all.
        if let Some(p) = lock(&self.queue.pending).get_mut(&d.id)
            && Arc::ptr_eq(&p.decision, &d)
        {
            p.state = State::Queued;
        }
        match self.queue.jobs.try_send(Job::Decision(d)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                let jobs = self.queue.jobs.clone();
                tokio::spawn(async move {
                    let _ = jobs.send(job).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the decision writer has stopped".into())
}

/// Whether an acceptance may claim `d`: a send's decision that lets the message in (allowed or
/// held). The writer leaves those for [`CLAIM_WINDOW`] (see there).
fn claimable(d: &StoredDecision) -> bool {
    matches!(d.verdict, StoredVerdict::Allowed | StoredVerdict::Held)
}

/// Takes one job off the queue: a claimable decision waits for its acceptance (while fewer than
/// [`QUEUE_DEPTH`] do), any other goes into the batch; a flush takes every waiting decision into
/// the batch and waits for it.
fn take(
    job: Job,
    batch: &mut Vec<Arc<StoredDecision>>,
    deferred: &mut VecDeque<(Instant, Arc<StoredDecision>)>,
    waiters: &mut Vec<oneshot::Sender<()>>,
) {
    match job {
        Job::Decision(d) if claimable(&d) && deferred.len() < QUEUE_DEPTH => {
            deferred.push_back((Instant::now() + CLAIM_WINDOW, d));
        }
        Job::Decision(d) => batch.push(d),
        Job::Flush(done) => {
            batch.extend(deferred.drain(..).map(|(_, d)| d));
            waiters.push(done);
        }
    }
}

/// The writer task: writes what has queued up in one statement once it has gathered for
/// [`GATHER`] (at once when someone flushes or the batch is full), and the decisions left for
/// their acceptance once their [`CLAIM_WINDOW`] closed unclaimed. Ends when the queue closes,
/// after writing everything.
async fn run(pool: PgPool, mut rx: mpsc::Receiver<Job>, pending: PendingMap, counts: Arc<Counts>) {
    let mut batch: Vec<Arc<StoredDecision>> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut deferred: VecDeque<(Instant, Arc<StoredDecision>)> = VecDeque::new();
    let mut gather_until: Option<Instant> = None;
    let mut open = true;
    loop {
        let now = Instant::now();
        while deferred.front().is_some_and(|(until, _)| *until <= now) {
            if let Some((_, d)) = deferred.pop_front() {
                batch.push(d);
            }
        }
        if !open {
            batch.extend(deferred.drain(..).map(|(_, d)| d));
        }
        if !batch.is_empty() || !waiters.is_empty() {
            let due = batch.len() >= MAX_BATCH
                || !waiters.is_empty()
                || !open
                || gather_until.is_some_and(|g| g <= now);
            if due {
                write(&pool, &pending, &mut batch, &counts).await;
                for done in waiters.drain(..) {
                    let _ = done.send(());
                }
                gather_until = None;
                continue;
            }
            gather_until.get_or_insert(now + GATHER);
        }
        if !open {
            break;
        }
        let wake = [gather_until, deferred.front().map(|(until, _)| *until)]
            .into_iter()
            .flatten()
            .min();
        let received = match wake {
            // `None` when a gathering or a claim window ended first.
            Some(at) => tokio::time::timeout_at(at, rx.recv()).await.ok(),
            None => Some(rx.recv().await),
        };
        match received {
            None => {}
            Some(None) => open = false,
            Some(Some(job)) => {
                take(job, &mut batch, &mut deferred, &mut waiters);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => take(job, &mut batch, &mut deferred, &mut waiters),
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

/// Writes the batch's decisions that are still the writer's to write, then forgets them.
async fn write(
    pool: &PgPool,
    pending: &PendingMap,
    batch: &mut Vec<Arc<StoredDecision>>,
    counts: &Counts,
) {
    let mut rows = Vec::with_capacity(batch.len());
    {
        let mut map = lock(pending);
        for d in batch.drain(..) {
            if let Some(p) = map.get_mut(&d.id)
                && Arc::ptr_eq(&p.decision, &d)
                && p.state == State::Queued
            {
                p.state = State::Writing;
                rows.push(d);
            }
            // Otherwise an acceptance claimed it (its transaction writes it), or a later
            // enqueue of the same id replaced it (that one is written instead).
        }
    }
    if rows.is_empty() {
        return;
    }
    let mut written = insert_decisions(pool, &rows).await;
    if let Err(e) = &written {
        tracing::warn!(error = %e, decisions = rows.len(), "could not write decisions; trying once more");
        tokio::time::sleep(RETRY_AFTER).await;
        written = insert_decisions(pool, &rows).await;
    }
    match written {
        Ok(()) => {
            counts.statements.fetch_add(1, Ordering::Relaxed);
            counts
                .decisions
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
        }
        Err(e) => {
            for d in &rows {
                tracing::error!(decision_id = %d.id, error = %e, "could not keep a decision");
            }
        }
    }
    let mut map = lock(pending);
    for d in rows {
        if map
            .get(&d.id)
            .is_some_and(|p| p.state == State::Writing && Arc::ptr_eq(&p.decision, &d))
        {
            map.remove(&d.id);
        }
    }
}
