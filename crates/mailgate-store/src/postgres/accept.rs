//! Group commit of acceptances on PostgreSQL (issue 16, the benchmark's floor): admissions and
//! message writes are each gathered by a writer task per node and done for a whole batch in one
//! transaction, as the SQLite write thread does for one node (`sqlite/group.rs`).
//!
//! A send no limit holds, whose message is at hand and of batch size, is admitted and stored in
//! ONE step ([`AcceptQueues::admit_and_store`], its own writer): one statement per batch,
//! `mailgate_admit_and_store` (`migrations/postgres/0013_admit_and_store_at_once.sql`), which
//! admits the batch as `mailgate_admit_within` does (step 1 below, under the batch's ceiling)
//! and, in the same transaction, writes the messages as step 2's statement does, then commits
//! durably, the principals' locks held until then. A batch that does not fit under its ceiling
//! records and writes nothing and is given back: each send then takes two steps
//! (`counters.rs` says why two are needed then):
//!
//! 1. **Admission** ([`AcceptQueues::admit`]). A batch that no limit holds (the usual case) is
//!    one statement: the node asks the engine for each principal's *ceiling*
//!    (`mailgate_core::engine::ceiling`: the largest numbers on which all the principal's sends
//!    of the batch, in arrival order, are admitted with no limit exceeded) and calls
//!    `mailgate_admit_within`, which takes the principals' transaction advisory locks (one fixed
//!    order, so two nodes' batches never deadlock), reads their numbers, and records the batch
//!    (usage rows, rate schedules, concurrent-send slots) if each principal's are at or below its
//!    ceiling; it returns the numbers it read either way. Exact because every limit's check is
//!    monotone, so the engine would admit each send on those numbers too; and whatever other
//!    nodes admitted meanwhile, the batch is recorded as long as it still fits
//!    (`migrations/postgres/0012_admission_under_a_ceiling.sql`). A batch that does not fit is
//!    re-checked *in arrival order* on the numbers returned (`mailgate_core::engine::recheck`,
//!    each admitted send added to its principal's numbers before the next is checked, exactly as
//!    if they had come one at a time) and its admitted sends recorded through `mailgate_admit`,
//!    which records nothing if an admission of one of its principals came in since that reading
//!    (a version moved): the batch is then read again (`mailgate_usage_of`, no lock) and
//!    re-checked, and after [`OPTIMISTIC_TRIES`] misses admitted with the locks held over its
//!    reading (`migrations/postgres/0009_optimistic_admission.sql` says why a version is
//!    enough). A batch some limit holds (action `hold`: the hold stands only while the same
//!    limits are exceeded, which no ceiling can say) takes that second way from its reading. The
//!    records commit with `synchronous_commit` off (the message's durable commit flushes the WAL
//!    past them; see `counters.rs`). The numbers an admitted send's caller gets back are those
//!    read under the locks with the sends before it counted, never a ceiling.
//! 2. **The message** ([`AcceptQueues::store`]): one statement per batch (its own implicit
//!    transaction, one round trip) writes the batch's pending decisions, messages and bodies
//!    (one `UNNEST` insert each) and frees their slots, and commits durably: every message of the
//!    batch is acknowledged after one WAL flush.
//!
//! Invariants:
//! - A batch is what queued up while the previous one was being written (the writer never waits
//!   to gather more): one send alone is written at once, and under load each flush carries many.
//! - A batch that fails as a whole (a duplicate message id, a constraint) is not the others'
//!   problem: each of its messages is then written alone (`accept_admitted_message`), so only the
//!   bad one fails, and is refunded.
//! - A send whose caller went away before its message was written (the request's future dropped)
//!   is refunded by the writer instead of written: no charge without a message. Once its
//!   transaction started, it is stored and counts (as a send acknowledged too late). A caller
//!   gone during its admission likewise: skipped if it went before its batch was taken, refunded
//!   (slot freed, usage removed) if its answer found it gone.
//! - Messages larger than [`BATCH_BODY_MAX`] are written alone by their caller (no copy of a big
//!   body into the queue).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use mailgate_core::directory::LimitName;
use mailgate_core::engine::counters::DAY_MS;
use mailgate_core::engine::{Charge, Recheck, TatShift, Usage, ceiling, recheck};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::OrStore;
use super::decisions::{Claim, DecisionQueue};
use super::handoff::{Handoff, Room};
use crate::queue::LeasedMessage;
use crate::{
    AdmitStored, Admitted, MessageState, NewMessage, RecipientState, SendSlot, StoreError,
    StoredDecision,
};

/// First key of the two-key advisory locks that serialize one principal's admissions ("MGCT");
/// the second is `hashtext(principal)`. A collision of two principals' hashes only makes them
/// wait for each other.
pub(crate) const COUNTER_LOCK_CLASS: i32 = 0x4D47_4354;

/// Most sends in one admission or one message transaction.
const MAX_BATCH: usize = 128;

/// Sends that may wait for a writer before callers wait for room.
const QUEUE_DEPTH: usize = 1024;

/// Messages up to this size are written in batches; larger ones alone, by their caller.
pub(crate) const BATCH_BODY_MAX: usize = 256 * 1024;

/// What admitting one send needs ([`AcceptQueues::admit`]'s arguments).
struct Ask {
    charge: Charge,
    held: Vec<LimitName>,
    now_ms: u64,
    holder: String,
    slot_until_ms: u64,
}

struct AdmitJob {
    ask: Ask,
    reply: oneshot::Sender<Result<Admitted, StoreError>>,
}

/// A send admitted and stored at once ([`AcceptQueues::admit_and_store`]).
struct AcceptJob {
    ask: Ask,
    message: NewMessage,
    reply: oneshot::Sender<Result<AdmitStored, StoreError>>,
}

struct StoreJob {
    message: NewMessage,
    slot: SendSlot,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The two writer tasks of a store, and how to reach them.
#[derive(Debug, Clone)]
pub(crate) struct AcceptQueues {
    admissions: mpsc::Sender<AdmitJob>,
    messages: mpsc::Sender<StoreJob>,
    at_once: mpsc::Sender<AcceptJob>,
    admission: Arc<AdmissionCounts>,
}

/// How admission batches were recorded so far (tests, `docs/performance.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Batches recorded by `mailgate_admit` on a reading taken without the locks.
    pub optimistic: u64,
    /// Records that found a version moved since their reading (nothing recorded; read again).
    pub missed: u64,
    /// Batches recorded with the locks held over their reading, after the misses allowed.
    pub locked: u64,
    /// Batches recorded under their ceiling: the store found each principal's numbers at or
    /// below the largest on which the whole batch fits.
    pub within: u64,
    /// Batches admitted under their ceiling and their messages stored in the same transaction.
    pub at_once: u64,
    /// Batches that did not fit under their ceiling when admitted and stored at once (nothing
    /// recorded; each send then took the two steps).
    pub at_once_missed: u64,
}

#[derive(Debug)]
struct AdmissionCounts {
    tries: AtomicUsize,
    optimistic: AtomicU64,
    missed: AtomicU64,
    locked: AtomicU64,
    within: AtomicU64,
    at_once: AtomicU64,
    at_once_missed: AtomicU64,
}

impl std::fmt::Debug for AdmitJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmitJob")
            .field("principal", &self.ask.charge.principal)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for StoreJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreJob")
            .field("message", &self.message.id)
            .finish_non_exhaustive()
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the acceptance writer has stopped".into())
}

/// Queues the job `job` makes with its reply channel for the writer behind `queue`, and waits
/// for the writer's answer.
async fn ask_writer<J, R>(
    queue: &mpsc::Sender<J>,
    job: impl FnOnce(oneshot::Sender<Result<R, StoreError>>) -> J,
) -> Result<R, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue.send(job(reply)).await.map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}

impl AcceptQueues {
    /// Starts the writer tasks on `pool` (needs a tokio runtime). They end when the last handle
    /// is dropped.
    pub(crate) fn start(
        pool: PgPool,
        decisions: DecisionQueue,
        handoff: Arc<Handoff>,
    ) -> AcceptQueues {
        let (admissions, admit_rx) = mpsc::channel(QUEUE_DEPTH);
        let (messages, store_rx) = mpsc::channel(QUEUE_DEPTH);
        let (at_once, at_once_rx) = mpsc::channel(QUEUE_DEPTH);
        let admission = Arc::new(AdmissionCounts {
            tries: AtomicUsize::new(OPTIMISTIC_TRIES),
            optimistic: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            locked: AtomicU64::new(0),
            within: AtomicU64::new(0),
            at_once: AtomicU64::new(0),
            at_once_missed: AtomicU64::new(0),
        });
        tokio::spawn(run_admissions(pool.clone(), admission.clone(), admit_rx));
        tokio::spawn(run_at_once(
            pool.clone(),
            admission.clone(),
            decisions.clone(),
            handoff.clone(),
            at_once_rx,
        ));
        tokio::spawn(run_messages(pool, decisions, handoff, store_rx));
        AcceptQueues {
            admissions,
            messages,
            at_once,
            admission,
        }
    }

    /// How admission batches were recorded so far.
    pub(crate) fn admission_stats(&self) -> AdmissionStats {
        let c = &self.admission;
        AdmissionStats {
            optimistic: c.optimistic.load(Ordering::Relaxed),
            missed: c.missed.load(Ordering::Relaxed),
            locked: c.locked.load(Ordering::Relaxed),
            within: c.within.load(Ordering::Relaxed),
            at_once: c.at_once.load(Ordering::Relaxed),
            at_once_missed: c.at_once_missed.load(Ordering::Relaxed),
        }
    }

    /// Reads without the locks before the locked way (tests: 0 admits every batch locked).
    pub(crate) fn set_optimistic_tries(&self, tries: usize) {
        self.admission.tries.store(tries, Ordering::Relaxed);
    }

    /// Admits one send in the next admission batch (see the module documentation).
    pub(crate) async fn admit(
        &self,
        charge: &Charge,
        held: &[LimitName],
        now_ms: u64,
        holder: &str,
        slot_until_ms: u64,
    ) -> Result<Admitted, StoreError> {
        let ask = Ask {
            charge: charge.clone(),
            held: held.to_vec(),
            now_ms,
            holder: holder.to_owned(),
            slot_until_ms,
        };
        ask_writer(&self.admissions, |reply| AdmitJob { ask, reply }).await
    }

    /// Admits one send no limit holds and stores its message, in the next batch of the writer
    /// that does both at once (see the module documentation).
    pub(crate) async fn admit_and_store(
        &self,
        charge: &Charge,
        now_ms: u64,
        holder: &str,
        message: NewMessage,
    ) -> Result<AdmitStored, StoreError> {
        let ask = Ask {
            charge: charge.clone(),
            held: Vec::new(),
            now_ms,
            holder: holder.to_owned(),
            // Taken and freed inside the one transaction: never seen by another.
            slot_until_ms: now_ms.saturating_add(DAY_MS),
        };
        ask_writer(&self.at_once, |reply| AcceptJob {
            ask,
            message,
            reply,
        })
        .await
    }

    /// Stores one admitted message in the next message batch (see the module documentation).
    pub(crate) async fn store(
        &self,
        message: &NewMessage,
        slot: SendSlot,
    ) -> Result<(), StoreError> {
        let message = message.clone();
        ask_writer(&self.messages, |reply| StoreJob {
            message,
            slot,
            reply,
        })
        .await
    }
}

/// How long a writer lets a batch gather once sends come concurrently (its previous batch held
/// more than one): fewer, larger transactions when the machine is busy (bench/postgres.sh, two
/// nodes at 16 sessions: batches of under 2 sends otherwise), and no wait for a send alone.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// Takes the first job and whatever else has queued up behind it, up to [`MAX_BATCH`]; after a
/// batch of several (`last`), waits [`GATHER`] first for more to come.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, last: &mut usize) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    if *last > 1 && rx.len() + 1 < MAX_BATCH {
        tokio::time::sleep(GATHER).await;
    }
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    *last = batch.len();
    Some(batch)
}

async fn run_admissions(
    pool: PgPool,
    counts: Arc<AdmissionCounts>,
    mut rx: mpsc::Receiver<AdmitJob>,
) {
    let mut last = 0;
    while let Some(batch) = next_batch(&mut rx, &mut last).await {
        // Callers gone before their send was admitted (a client that hung up): nothing to do.
        let batch: Vec<AdmitJob> = batch.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if batch.is_empty() {
            continue;
        }
        let asks: Vec<&Ask> = batch.iter().map(|j| &j.ask).collect();
        match admit_batch(&pool, &counts, &asks).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    // A caller gone while its send was admitted: no message will come, so the
                    // send is refunded and its slot freed now, not at the slot's deadline.
                    if let Err(Ok(Admitted::Recorded(slot, _))) = job.reply.send(Ok(outcome))
                        && let Err(e) = super::counters::release_slot(&pool, slot, true).await
                    {
                        tracing::warn!(error = %e, slot = slot.0, "could not refund a send whose caller went away during its admission: its slot expires by itself");
                    }
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The usage of several principals, read as `counters.rs`'s `USAGE` reads one's, with the version
/// of each principal's admissions (`migrations/postgres/0009_optimistic_admission.sql`), by a
/// function whose plan is made once per connection (`0011_generic_plans.sql`).
const USAGE_OF_MANY: &str = "SELECT principal, tat, n, r, oldest, in_flight, version
    FROM mailgate_usage_of($1, $2, $3)";

/// Records a batch's admitted sends if no admission of its principals happened since their
/// versions were read (see the migration).
const ADMIT: &str = "SELECT admitted_ord, slot_id
    FROM mailgate_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Records a batch that no limit holds if, under the principals' locks, each one's numbers are
/// at or below the batch's ceiling for it; returns the numbers it read either way
/// (`migrations/postgres/0012_admission_under_a_ceiling.sql`).
const ADMIT_WITHIN: &str = "SELECT admitted_ord, slot_id, principal, tat, n, r, oldest, in_flight,
           version
    FROM mailgate_admit_within($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                               $16)";

/// A number for the database (limits and schedules beyond `i64` compare as its largest).
fn db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What `mailgate_admit_within` needs of a batch: each principal's ceiling (in the order of the
/// batch's sorted principals) and how the batch moves each rate schedule.
struct Within<'a> {
    tat: Vec<i64>,
    messages: Vec<i64>,
    recipients: Vec<i64>,
    in_flight: Vec<i64>,
    shift_who: Vec<&'a str>,
    shift_add: Vec<i64>,
    shift_floor: Vec<i64>,
}

/// The ceilings of `batch` (`mailgate_core::engine::ceiling`: per principal, the largest numbers
/// on which all its sends, in arrival order, are admitted with no limit exceeded), when no limit
/// holds any of its sends (a hold stands only while the same limits are exceeded, which no
/// ceiling can say) and every principal's sends fit on some numbers.
fn within<'a>(batch: &[&'a Ask], principals: &[&'a str]) -> Option<Within<'a>> {
    if batch.iter().any(|j| !j.held.is_empty()) {
        return None;
    }
    let mut w = Within {
        tat: Vec::with_capacity(principals.len()),
        messages: Vec::with_capacity(principals.len()),
        recipients: Vec::with_capacity(principals.len()),
        in_flight: Vec::with_capacity(principals.len()),
        shift_who: Vec::new(),
        shift_add: Vec::new(),
        shift_floor: Vec::new(),
    };
    for p in principals {
        let sends = || {
            batch
                .iter()
                .filter(|j| j.charge.principal == *p)
                .map(|j| (&j.charge, j.now_ms))
        };
        let top = ceiling(sends())?;
        w.tat.push(db(top.rate_tat_ms.unwrap_or(0)));
        w.messages.push(db(top.messages_24h));
        w.recipients.push(db(top.recipients_24h));
        w.in_flight.push(db(top.in_flight));
        if let Some(shift) = TatShift::of(sends()) {
            w.shift_who.push(p);
            w.shift_add.push(db(shift.add_ms));
            w.shift_floor.push(db(shift.floor_ms));
        }
    }
    Some(w)
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds `mailgate_admit_within`'s arguments for `batch` (its first 16; `mailgate_admit_and_store`
/// takes the same first).
fn bind_admission<'q>(
    q: PgQuery<'q>,
    batch: &[&'q Ask],
    principals: &'q [&'q str],
    w: &'q Within<'q>,
    now: u64,
) -> PgQuery<'q> {
    q.bind(COUNTER_LOCK_CLASS)
        .bind(principals)
        .bind(&w.tat)
        .bind(&w.messages)
        .bind(&w.recipients)
        .bind(&w.in_flight)
        .bind(
            batch
                .iter()
                .map(|j| j.charge.principal.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|j| j.now_ms as i64).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|j| j.charge.recipients as i64)
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|j| j.holder.as_str()).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|j| j.slot_until_ms as i64)
                .collect::<Vec<_>>(),
        )
        .bind(&w.shift_who)
        .bind(&w.shift_add)
        .bind(&w.shift_floor)
        .bind(now as i64 - DAY_MS as i64)
        .bind(now as i64)
}

/// Calls `mailgate_admit_within` for all of `batch`: the rows of the numbers it read, and the
/// rows of the sends it recorded (none when the batch did not fit).
async fn record_within(
    pool: &PgPool,
    batch: &[&Ask],
    principals: &[&str],
    w: &Within<'_>,
    now: u64,
) -> Result<(Vec<sqlx::postgres::PgRow>, Vec<sqlx::postgres::PgRow>), StoreError> {
    let rows = bind_admission(sqlx::query(ADMIT_WITHIN), batch, principals, w, now)
        .fetch_all(pool)
        .await
        .or_store()?;
    let mut read = Vec::with_capacity(principals.len());
    let mut recorded = Vec::with_capacity(batch.len());
    for row in rows {
        if row
            .try_get::<Option<i64>, _>("admitted_ord")
            .or_store()?
            .is_some()
        {
            recorded.push(row);
        } else {
            read.push(row);
        }
    }
    Ok((read, recorded))
}

/// Reads and re-checks without the principals' locks held before the locked way (see
/// [`admit_batch`]).
const OPTIMISTIC_TRIES: usize = 3;

/// The usage and admission version of each of `principals` at `now`.
async fn read_many<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    principals: &[&str],
    now: u64,
) -> Result<(HashMap<String, Usage>, Vec<i64>), StoreError> {
    let rows = sqlx::query(USAGE_OF_MANY)
        .bind(principals)
        .bind(now as i64 - DAY_MS as i64)
        .bind(now as i64)
        .fetch_all(executor)
        .await
        .or_store()?;
    usage_of_rows(&rows, principals)
}

/// Rows of `mailgate_usage_of`'s columns as each of `principals`' usage, and their versions in
/// the order of `principals` (0 for one without a row).
fn usage_of_rows(
    rows: &[sqlx::postgres::PgRow],
    principals: &[&str],
) -> Result<(HashMap<String, Usage>, Vec<i64>), StoreError> {
    let mut usage: HashMap<String, Usage> = HashMap::with_capacity(rows.len());
    let mut versions: HashMap<String, i64> = HashMap::with_capacity(rows.len());
    for row in rows {
        let principal: String = row.try_get("principal").or_store()?;
        usage.insert(principal.clone(), super::counters::usage_of_row(row)?);
        versions.insert(principal, row.try_get("version").or_store()?);
    }
    let versions = principals
        .iter()
        .map(|p| versions.get(*p).copied().unwrap_or(0))
        .collect();
    Ok((usage, versions))
}

/// What re-checking a batch on one reading of its principals' usage concluded.
struct Plan {
    /// Per job: refused with these numbers, or `None` (admitted).
    outcomes: Vec<Option<Admitted>>,
    /// The admitted jobs' positions, in order.
    admitted: Vec<usize>,
    /// Each admitted job's principal's usage with it counted.
    after: Vec<Usage>,
    /// The rate schedule each principal moves to.
    tats: HashMap<String, u64>,
}

/// Each send in arrival order, on its principal's numbers as the sends before it left them.
fn plan(batch: &[&Ask], mut usage: HashMap<String, Usage>) -> Plan {
    let mut p = Plan {
        outcomes: Vec::with_capacity(batch.len()),
        admitted: Vec::new(),
        after: Vec::new(),
        tats: HashMap::new(),
    };
    for (i, job) in batch.iter().enumerate() {
        let u = usage.entry(job.charge.principal.clone()).or_default();
        match recheck(u, &job.charge, &job.held, job.now_ms) {
            Recheck::Changed => p.outcomes.push(Some(Admitted::Changed(*u))),
            Recheck::Admit { rate_tat_ms } => {
                u.rate_tat_ms = rate_tat_ms;
                u.messages_24h = u.messages_24h.saturating_add(1);
                u.recipients_24h = u.recipients_24h.saturating_add(job.charge.recipients);
                u.in_flight = u.in_flight.saturating_add(1);
                if u.oldest_expires_ms.is_none() {
                    u.oldest_expires_ms = Some(job.now_ms.saturating_add(DAY_MS));
                }
                if let Some(t) = rate_tat_ms {
                    let e = p.tats.entry(job.charge.principal.clone()).or_insert(t);
                    *e = (*e).max(t);
                }
                p.outcomes.push(None);
                p.admitted.push(i);
                p.after.push(*u);
            }
        }
    }
    p
}

/// Calls `mailgate_admit` for `plan`'s admitted sends; no rows: a version had moved.
async fn record<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    batch: &[&Ask],
    principals: &[&str],
    versions: &[i64],
    plan: &Plan,
    now: u64,
) -> Result<Vec<sqlx::postgres::PgRow>, StoreError> {
    let jobs: Vec<&Ask> = plan.admitted.iter().map(|&i| batch[i]).collect();
    let (tat_principals, tat_values): (Vec<&str>, Vec<i64>) = plan
        .tats
        .iter()
        .map(|(p, t)| (p.as_str(), *t as i64))
        .unzip();
    sqlx::query(ADMIT)
        .bind(COUNTER_LOCK_CLASS)
        .bind(principals)
        .bind(versions)
        .bind(
            jobs.iter()
                .map(|j| j.charge.principal.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.now_ms as i64).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.charge.recipients as i64)
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.holder.as_str()).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.slot_until_ms as i64)
                .collect::<Vec<_>>(),
        )
        .bind(tat_principals)
        .bind(tat_values)
        .bind(now as i64 - DAY_MS as i64)
        .bind(now as i64)
        .fetch_all(executor)
        .await
        .or_store()
}

/// The outcome of each job once `recorded` (the rows of `mailgate_admit`) gave the admitted ones
/// their slots.
fn finish(plan: Plan, recorded: &[sqlx::postgres::PgRow]) -> Result<Vec<Admitted>, StoreError> {
    let Plan {
        mut outcomes,
        admitted,
        after,
        ..
    } = plan;
    for row in recorded {
        let ord: i64 = row.try_get("admitted_ord").or_store()?;
        let id: i64 = row.try_get("slot_id").or_store()?;
        let (at, usage) = usize::try_from(ord - 1)
            .ok()
            .and_then(|k| Some((*admitted.get(k)?, *after.get(k)?)))
            .ok_or_else(|| StoreError::Other(format!("admission row {ord} out of range")))?;
        if let Some(slot) = outcomes.get_mut(at) {
            *slot = Some(Admitted::Recorded(SendSlot(id), usage));
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Other("an admitted send got no slot".into())))
        .collect()
}

/// Admits `batch`: the outcome of each job, in order.
///
/// First without holding the principals' locks over the network: read the usage (one
/// statement), re-check, and record with `mailgate_admit` (one statement, its own transaction),
/// which records nothing when another admission of these principals came in between; then read
/// and re-check again. After [`OPTIMISTIC_TRIES`] such misses (a principal sent to through many
/// nodes at once), the locks are taken before the read and held until the record commits, which
/// always ends. Refusals need no write: a batch that admits nothing ends at its read.
async fn admit_batch(
    pool: &PgPool,
    counts: &AdmissionCounts,
    batch: &[&Ask],
) -> Result<Vec<Admitted>, StoreError> {
    let mut principals: Vec<&str> = batch.iter().map(|j| j.charge.principal.as_str()).collect();
    principals.sort_unstable();
    principals.dedup();
    // The earliest clock of the batch reads the most usage (nothing has left the day's window
    // yet): never fewer than any of its sends' own reading would have counted.
    let now = batch.iter().map(|j| j.now_ms).min().unwrap_or(0);
    let tries = counts.tries.load(Ordering::Relaxed);
    // First under the batch's ceiling: one statement whatever other nodes admitted meanwhile, as
    // long as the whole batch still fits.
    // A batch that no longer fits is re-checked on the numbers read under the locks, as on a
    // reading of its own (some of it is refused, or recorded if those numbers still stand).
    let mut reading = None;
    if let Some(w) = within(batch, &principals).filter(|_| tries > 0) {
        let (read, recorded) = record_within(pool, batch, &principals, &w, now).await?;
        let (usage, versions) = usage_of_rows(&read, &principals)?;
        if !recorded.is_empty() {
            let plan = plan(batch, usage);
            if plan.admitted.len() != batch.len() {
                return Err(StoreError::Other(
                    "a batch recorded under its ceiling does not fit the numbers read under it"
                        .into(),
                ));
            }
            return done(&counts.within, plan, &recorded);
        }
        counts.missed.fetch_add(1, Ordering::Relaxed);
        reading = Some((usage, versions));
    }
    for _ in 0..tries {
        let (usage, versions) = match reading.take() {
            Some(read) => read,
            None => read_many(pool, &principals, now).await?,
        };
        let plan = plan(batch, usage);
        if plan.admitted.is_empty() {
            return finish(plan, &[]);
        }
        let recorded = record(pool, batch, &principals, &versions, &plan, now).await?;
        if !recorded.is_empty() {
            let way = &counts.optimistic;
            return done(way, plan, &recorded);
        }
        counts.missed.fetch_add(1, Ordering::Relaxed);
    }
    // READ COMMITTED whatever the server's default: each statement after the locks must see the
    // previous holders' commits (see `counters.rs`).
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await
        .or_store()?;
    // The locks in one fixed order (by key), as `mailgate_admit` takes them (it takes them again
    // below: they are this transaction's already).
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, h)
         FROM (SELECT DISTINCT hashtext(p) AS h FROM unnest($2::text[]) AS p ORDER BY 1) keys",
    )
    .bind(COUNTER_LOCK_CLASS)
    .bind(&principals)
    .execute(&mut *tx)
    .await
    .or_store()?;
    let (usage, versions) = read_many(&mut *tx, &principals, now).await?;
    let plan = plan(batch, usage);
    if plan.admitted.is_empty() {
        // Nothing written: the rollback only ends the locks.
        tx.rollback().await.or_store()?;
        return finish(plan, &[]);
    }
    let recorded = record(&mut *tx, batch, &principals, &versions, &plan, now).await?;
    tx.commit().await.or_store()?;
    if recorded.is_empty() {
        return Err(StoreError::Other(
            "an admission with its principals locked found their versions moved".into(),
        ));
    }
    done(&counts.locked, plan, &recorded)
}

/// A batch recorded (`recorded`: the rows of `mailgate_admit`), the way `way` counts: its
/// outcomes.
fn done(
    way: &AtomicU64,
    plan: Plan,
    recorded: &[sqlx::postgres::PgRow],
) -> Result<Vec<Admitted>, StoreError> {
    way.fetch_add(1, Ordering::Relaxed);
    finish(plan, recorded)
}

/// Admits and stores at once (`mailgate_admit_and_store`, one statement and one durable commit
/// per batch). A batch that does not fit under its ceiling records and writes nothing: each of
/// its sends is given back to take the two steps.
async fn run_at_once(
    pool: PgPool,
    counts: Arc<AdmissionCounts>,
    decisions: DecisionQueue,
    handoff: Arc<Handoff>,
    mut rx: mpsc::Receiver<AcceptJob>,
) {
    let mut last = 0;
    while let Some(batch) = next_batch(&mut rx, &mut last).await {
        // Callers gone before their send was taken: nothing to do, nothing charged.
        let batch: Vec<AcceptJob> = batch.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if batch.is_empty() {
            continue;
        }
        match admit_and_store(&pool, &decisions, &handoff, &batch).await {
            Ok(Some((usage, epochs, room))) => {
                counts.at_once.fetch_add(1, Ordering::Relaxed);
                let mut given = Vec::with_capacity(epochs.len());
                let mut replies = Vec::with_capacity(batch.len());
                for (job, usage) in batch.into_iter().zip(usage) {
                    let epoch = epochs.get(&job.message.id).copied();
                    if let (Some(epoch), Some(room)) = (epoch, room.as_ref()) {
                        given.push(leased(job.message, epoch, room.lease_ms));
                    }
                    replies.push((job.reply, usage));
                }
                // Handed to the workers before the callers hear "stored" (as `run_messages`).
                if let Some(room) = room {
                    handoff.give(&room.owner, given);
                }
                for (reply, usage) in replies {
                    let _ = reply.send(Ok(AdmitStored::Stored(usage)));
                }
            }
            given_back => {
                // Past the ceiling (`Ok(None)`), or rolled back as a whole (a duplicate id, the
                // database gone): nothing recorded or written either way. The two steps write
                // each alone and answer each its own error.
                match given_back {
                    Err(e) => {
                        tracing::debug!(error = %e, sends = batch.len(), "a batch admitted and stored at once failed; each send takes the two steps");
                    }
                    Ok(_) => {
                        counts.at_once_missed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for job in batch {
                    let _ = job
                        .reply
                        .send(Ok(AdmitStored::TwoSteps(Box::new(job.message))));
                }
            }
        }
    }
}

const ADMIT_AND_STORE: &str = "SELECT principal, tat, n, r, oldest, in_flight, version, message_id,
           lease_epoch
    FROM mailgate_admit_and_store($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                                  $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26,
                                  $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37)";

/// What a batch admitted and stored at once gives back: each send's usage as it left its
/// principal's numbers, the lease epochs of the messages handed off, and the room they were
/// handed to.
type AtOnce = (Vec<Usage>, HashMap<String, i64>, Option<Room>);

/// One call of `mailgate_admit_and_store` for `batch`: `None` when it did not fit under its
/// ceiling (nothing recorded or written).
async fn admit_and_store(
    pool: &PgPool,
    decisions: &DecisionQueue,
    handoff: &Handoff,
    batch: &[AcceptJob],
) -> Result<Option<AtOnce>, StoreError> {
    let asks: Vec<&Ask> = batch.iter().map(|j| &j.ask).collect();
    let mut principals: Vec<&str> = asks.iter().map(|j| j.charge.principal.as_str()).collect();
    principals.sort_unstable();
    principals.dedup();
    let Some(w) = within(&asks, &principals) else {
        return Ok(None);
    };
    // As `admit_batch`: the earliest clock of the batch reads the most usage.
    let now = asks.iter().map(|j| j.now_ms).min().unwrap_or(0);
    let claims: Vec<Claim> = batch
        .iter()
        .map(|j| decisions.claim(&j.message.decision_id))
        .collect();
    let pending = pending_decisions(&claims);
    let room = handoff.room();
    let messages: Vec<&NewMessage> = batch.iter().map(|j| &j.message).collect();
    let handed = handed_off(&messages, room.as_ref());
    let q = bind_admission(sqlx::query(ADMIT_AND_STORE), &asks, &principals, &w, now);
    let rows = bind_handoff(
        bind_messages(q, &messages, &pending),
        room.as_ref(),
        &handed,
    )
    .fetch_all(pool)
    .await
    .or_store()?;
    let (read, stored): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| {
        r.try_get::<Option<String>, _>("message_id")
            .ok()
            .flatten()
            .is_none()
    });
    if stored.is_empty() {
        // Nothing written: the decisions claimed go back to their queue.
        return Ok(None);
    }
    for c in claims {
        c.committed();
    }
    let (usage, _) = usage_of_rows(&read, &principals)?;
    let plan = plan(&asks, usage);
    if plan.admitted.len() != batch.len() {
        return Err(StoreError::Other(
            "a batch stored under its ceiling does not fit the numbers read under it".into(),
        ));
    }
    // Stored already: unlike a send admitted in two steps, none of them is still in flight.
    let mut after = plan.after;
    let mut counted: HashMap<&str, u64> = HashMap::new();
    for (u, ask) in after.iter_mut().zip(&asks) {
        let n = counted.entry(ask.charge.principal.as_str()).or_default();
        *n += 1;
        u.in_flight = u.in_flight.saturating_sub(*n);
    }
    Ok(Some((after, epochs(&stored)?, room)))
}

async fn run_messages(
    pool: PgPool,
    decisions: DecisionQueue,
    handoff: Arc<Handoff>,
    mut rx: mpsc::Receiver<StoreJob>,
) {
    let mut last = 0;
    while let Some(batch) = next_batch(&mut rx, &mut last).await {
        // Callers gone before their message was written: refunded, not written.
        let (live, gone): (Vec<StoreJob>, Vec<StoreJob>) =
            batch.into_iter().partition(|j| !j.reply.is_closed());
        for job in gone {
            if let Err(e) = super::counters::release_slot(&pool, job.slot, true).await {
                tracing::warn!(error = %e, slot = job.slot.0, "could not refund a send whose message write was abandoned: its slot expires by itself");
            }
        }
        if live.is_empty() {
            continue;
        }
        {
            let claims: Vec<Claim> = live
                .iter()
                .map(|j| decisions.claim(&j.message.decision_id))
                .collect();
            let room = handoff.room();
            let messages: Vec<&NewMessage> = live.iter().map(|j| &j.message).collect();
            let handed = handed_off(&messages, room.as_ref());
            match store_batch(&pool, &live, &claims, room.as_ref(), &handed).await {
                Ok(epochs) => {
                    for c in claims {
                        c.committed();
                    }
                    // Handed to the workers before the callers hear "stored": the acceptance
                    // signal that follows must find the messages waiting.
                    let mut given = Vec::with_capacity(epochs.len());
                    let mut replies = Vec::with_capacity(live.len());
                    for job in live {
                        let epoch = epochs.get(&job.message.id).copied();
                        if let (Some(epoch), Some(room)) = (epoch, room.as_ref()) {
                            given.push(leased(job.message, epoch, room.lease_ms));
                        }
                        replies.push(job.reply);
                    }
                    if let Some(room) = room {
                        handoff.give(&room.owner, given);
                    }
                    for reply in replies {
                        let _ = reply.send(Ok(()));
                    }
                    continue;
                }
                Err(e) => {
                    drop(claims);
                    // Alone again (one message: its refund on failure is `store_alone`'s).
                    tracing::debug!(error = %e, messages = live.len(), "a batch of messages failed; writing each alone");
                }
            }
        }
        for job in live {
            let stored =
                super::counters::store_alone(&pool, &decisions, &job.message, job.slot).await;
            let _ = job.reply.send(stored);
        }
    }
}

/// One durable transaction for a batch of admitted messages: their pending decisions, the
/// messages, their bodies, and their slots freed, in ONE statement outside any explicit
/// transaction (its own implicit one, committed as the statement ends): one round trip per
/// batch where `BEGIN`, four statements and `COMMIT` took six (bench/postgres.sh). The statement
/// is `mailgate_store_messages` (`migrations/postgres/0013_admit_and_store_at_once.sql`), which
/// [`admit_and_store`] runs too.
async fn store_batch(
    pool: &PgPool,
    jobs: &[StoreJob],
    claims: &[Claim],
    room: Option<&Room>,
    handed: &[bool],
) -> Result<HashMap<String, i64>, StoreError> {
    let pending = pending_decisions(claims);
    let messages: Vec<&NewMessage> = jobs.iter().map(|j| &j.message).collect();
    let q = bind_messages(sqlx::query(STORE), &messages, &pending)
        .bind(jobs.iter().map(|j| j.slot.0).collect::<Vec<_>>());
    let rows = bind_handoff(q, room, handed)
        .fetch_all(pool)
        .await
        .or_store()?;
    epochs(&rows)
}

const STORE: &str = "SELECT message_id, lease_epoch
    FROM mailgate_store_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                                 $16, $17, $18, $19, $20, $21, $22)";

/// The decisions `claims` took from the decision queue (those not written yet).
fn pending_decisions(claims: &[Claim]) -> Vec<Arc<StoredDecision>> {
    claims
        .iter()
        .filter_map(|c| c.decision().cloned())
        .collect()
}

/// Binds the messages' arguments of `mailgate_store_messages` and their decisions' (its first
/// 18).
fn bind_messages<'q>(
    q: PgQuery<'q>,
    messages: &[&'q NewMessage],
    pending: &'q [Arc<StoredDecision>],
) -> PgQuery<'q> {
    let d = |f: fn(&StoredDecision) -> &str| pending.iter().map(|x| f(x)).collect::<Vec<_>>();
    let m = |f: fn(&NewMessage) -> &str| messages.iter().map(|x| f(x)).collect::<Vec<_>>();
    // Recipients as one JSON array per message (arrays of arrays must be rectangular).
    let recipients: Vec<String> = messages
        .iter()
        .map(|x| serde_json::to_string(&x.recipients).unwrap_or_else(|_| "[]".into()))
        .collect();
    q.bind(m(|x| &x.id))
        .bind(m(|x| &x.decision_id))
        .bind(
            messages
                .iter()
                .map(|x| x.accepted_at_ms)
                .collect::<Vec<_>>(),
        )
        .bind(m(|x| &x.door))
        .bind(m(|x| &x.principal))
        .bind(m(|x| &x.envelope_from))
        .bind(recipients)
        .bind(
            messages
                .iter()
                .map(|x| x.raw.len() as i64)
                .collect::<Vec<_>>(),
        )
        .bind(m(|x| x.state.as_str()))
        .bind(messages.iter().map(|x| x.hold_until_ms).collect::<Vec<_>>())
        .bind(
            messages
                .iter()
                .map(|x| x.raw.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(d(|x| &x.id))
        .bind(pending.iter().map(|x| x.at_ms).collect::<Vec<_>>())
        .bind(d(|x| &x.door))
        .bind(d(|x| &x.principal))
        .bind(d(|x| x.verdict.as_str()))
        .bind(
            pending
                .iter()
                .map(|x| x.code.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            pending
                .iter()
                .map(|x| x.body.as_bytes())
                .collect::<Vec<_>>(),
        )
}

/// Binds the hand-off's arguments of `mailgate_store_messages` (its last three).
fn bind_handoff<'q>(q: PgQuery<'q>, room: Option<&'q Room>, handed: &'q [bool]) -> PgQuery<'q> {
    q.bind(room.map(|r| r.owner.as_str()))
        .bind(room.map_or(0, |r| r.lease_ms))
        .bind(handed)
}

/// The lease epochs of the messages handed off, from the rows of `mailgate_store_messages`.
fn epochs(rows: &[sqlx::postgres::PgRow]) -> Result<HashMap<String, i64>, StoreError> {
    let mut epochs = HashMap::with_capacity(rows.len());
    for row in rows {
        if let Some(epoch) = row.try_get::<Option<i64>, _>("lease_epoch").or_store()? {
            epochs.insert(row.try_get::<String, _>("message_id").or_store()?, epoch);
        }
    }
    Ok(epochs)
}

/// Which messages of a batch are handed off to `room` (see `handoff.rs`): queued ones (not held),
/// oldest first, while the room lasts.
fn handed_off(batch: &[&NewMessage], room: Option<&Room>) -> Vec<bool> {
    let Some(room) = room else {
        return vec![false; batch.len()];
    };
    let (mut messages, mut bytes) = (room.messages, room.bytes);
    batch
        .iter()
        .map(|m| {
            let size = m.raw.len();
            let hand = m.state == MessageState::Queued
                && m.hold_until_ms.is_none()
                && messages > 0
                && size <= bytes;
            if hand {
                messages -= 1;
                bytes -= size;
            }
            hand
        })
        .collect()
}

/// A handed-off message as its first lease would return it: every recipient pending, once each,
/// in envelope order; no attempt yet; the lease running `lease_ms` from its acceptance.
fn leased(message: NewMessage, epoch: i64, lease_ms: i64) -> LeasedMessage {
    let mut seen = std::collections::HashSet::with_capacity(message.recipients.len());
    let recipients: Vec<(String, RecipientState)> = message
        .recipients
        .into_iter()
        .filter(|r| seen.insert(r.clone()))
        .map(|r| (r, RecipientState::Pending))
        .collect();
    LeasedMessage {
        id: message.id,
        decision_id: message.decision_id,
        door: message.door,
        accepted_at_ms: message.accepted_at_ms,
        envelope_from: message.envelope_from,
        recipients,
        attempts: 0,
        raw: message.raw,
        lease_until_ms: message.accepted_at_ms.saturating_add(lease_ms),
        lease: epoch,
        possible_duplicate: false,
    }
}
