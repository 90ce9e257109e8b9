//! [`QueueStore`] on PostgreSQL: the queue shared by every node. A lease is one statement,
//! `UPDATE .. FROM (SELECT .. FOR UPDATE SKIP LOCKED)`, so two nodes leasing at once take
//! different messages and never wait for each other, and no row lock outlives the lease's
//! transaction. Every lease takes a new `lease_epoch`; a write-back locks the message row only if
//! the writer still holds its lease, and its final UPDATE is conditioned on that epoch: a worker
//! whose lease was lost (expired and taken by another, taken back by its node, or the message
//! deleted) records nothing: every write-back passes the epoch it leased under. A lease taken
//! over from one that ended without an outcome sets `lease_interrupted` in the same UPDATE, and
//! the attempt recorded under it is `possible_duplicate` in the history.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use tokio::sync::Notify;

use super::{OrStore, PgStore};
use crate::queue::{
    AttemptEntry, AttemptReport, CAPTURED_HEAD_BYTES, CapturedMessage, LeasedMessage,
    MessageStatus, QueueEntry, QueueFilter, QueueStore, RecipientStatus, Recorded, RetryOutcome,
};
use crate::{MessageState, RecipientState, StoreError};

/// The channel of [`QueueStore::wake_others`]; the payload is the announcing node's id.
const WAKE_CHANNEL: &str = "mailgate_queue";

/// Listens on [`WAKE_CHANNEL`] for as long as the task runs, notifying `wake` for every other
/// node's announcement. A lost connection is re-established (after a pause when it fails) and
/// then `wake` is notified once: announcements made meanwhile are lost, so the workers look.
async fn listen_for_wakeups(pool: PgPool, node: String, wake: Arc<Notify>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(WAKE_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match listener.await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "queue wake-ups: cannot listen; delivery polls meanwhile");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if n.payload() != node {
                        wake.notify_one();
                    }
                }
                Ok(None) => {
                    // Reconnected: what was announced meanwhile is lost.
                    tracing::info!("queue wake-ups: listening again after a lost connection");
                    wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "queue wake-ups: listener failed; delivery polls meanwhile");
                    break;
                }
            }
        }
        tokio::time::sleep(pause).await;
        wake.notify_one();
    }
}

fn message_state_of(s: &str) -> Result<MessageState, StoreError> {
    MessageState::parse(s)
        .ok_or_else(|| StoreError::corrupt(format!("unknown message state `{s}`")))
}

fn recipient_state_of(s: &str) -> Result<RecipientState, StoreError> {
    RecipientState::parse(s)
        .ok_or_else(|| StoreError::corrupt(format!("unknown recipient state `{s}`")))
}

/// The columns [`entry_of`] reads (a macro so queries stay `&'static str`).
macro_rules! entry_columns {
    () => {
        "id, state, accepted_at_ms, envelope_from, recipients, size, attempts, next_attempt_ms, decision_id"
    };
}

fn entry_of(row: &PgRow) -> Result<QueueEntry, StoreError> {
    Ok(QueueEntry {
        id: row.try_get("id").or_store()?,
        state: message_state_of(&row.try_get::<String, _>("state").or_store()?)?,
        accepted_at_ms: row.try_get("accepted_at_ms").or_store()?,
        envelope_from: row.try_get("envelope_from").or_store()?,
        recipients: row.try_get("recipients").or_store()?,
        size: row.try_get("size").or_store()?,
        attempts: row.try_get("attempts").or_store()?,
        next_attempt_ms: row.try_get("next_attempt_ms").or_store()?,
        decision_id: row.try_get("decision_id").or_store()?,
    })
}

fn captured_of(row: &PgRow) -> Result<CapturedMessage, StoreError> {
    Ok(CapturedMessage {
        id: row.try_get("id").or_store()?,
        decision_id: row.try_get("decision_id").or_store()?,
        accepted_at_ms: row.try_get("accepted_at_ms").or_store()?,
        captured_at_ms: row.try_get("done_at_ms").or_store()?,
        envelope_from: row.try_get("envelope_from").or_store()?,
        recipients: row.try_get("recipients").or_store()?,
        size: row.try_get("size").or_store()?,
        raw: row
            .try_get::<Option<Vec<u8>>, _>("raw")
            .or_store()?
            .unwrap_or_default(),
    })
}

/// A batch of write-backs in one statement (see [`record_batch`]). The reports are `$1`..`$4`
/// (id, lease epoch, when, next attempt; report `k` is position `k` of the arrays), their
/// outcomes `$5`..`$10` (report, recipient, state, code, reply, smarthost), the owners `$11` (the worker's own and its run's hand-off owner, `handoff.rs`).
///
/// - `fenced`: the rows of the messages `owner` still leases under the epoch each report was made
///   under, locked (`FOR UPDATE`, in id order, so two batches never wait for each other in a
///   cycle); `firsts`: each fenced message's first report (a message named twice records once,
///   as the later report would find its lease ended one after the other).
/// - the recipients' outcomes of those reports: each recipient's row updated with the last
///   outcome named for it, every outcome appended to the history in order (marked
///   `possible_duplicate` when the lease followed one that ended without an outcome).
/// - each message's new state from all its recipients' states after the outcomes (the statement
///   sees the rows as they were before it, so an outcome's state wins where there is one), by
///   the rule of `states::message_state`: deferred while any is not final, else failed if any
///   failed, else delivered; the lease ended.
///
/// Returns each recorded report's position and its message's new state.
const RECORD: &str = "
    WITH rep AS (
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
                  WITH ORDINALITY AS r(id, epoch, at_ms, next_attempt_ms, k)),
         fenced AS MATERIALIZED (
             SELECT m.id, m.lease_interrupted, r.k, r.epoch, r.at_ms, r.next_attempt_ms
             FROM messages m JOIN rep r ON m.id = r.id AND m.lease_epoch = r.epoch
             WHERE m.lease_owner = ANY($11) AND m.state IN ('queued', 'deferred')
             ORDER BY m.id
             FOR UPDATE OF m),
         firsts AS MATERIALIZED (
             SELECT DISTINCT ON (id) * FROM fenced ORDER BY id, k),
         o AS MATERIALIZED (
             SELECT f.id AS message_id, x.recipient, x.state, x.code, x.reply,
                    CASE WHEN x.state IN ('delivered', 'failed') THEN NULL
                         ELSE f.next_attempt_ms END AS next_attempt_ms,
                    f.lease_interrupted AS possible_duplicate, f.at_ms, x.smarthost, x.ord
             FROM unnest($5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
                  WITH ORDINALITY AS x(k, recipient, state, code, reply, smarthost, ord)
             JOIN firsts f ON f.k = x.k),
         last AS MATERIALIZED (
             SELECT DISTINCT ON (message_id, recipient) * FROM o
             ORDER BY message_id, recipient, ord DESC),
         upd AS (
             UPDATE message_recipients r
             SET state = last.state, attempts = r.attempts + 1, code = last.code,
                 reply = last.reply, smarthost = last.smarthost, updated_at_ms = last.at_ms
             FROM last WHERE r.message_id = last.message_id AND r.recipient = last.recipient),
         ins AS (
             INSERT INTO delivery_attempts (message_id, at_ms, smarthost, recipient, outcome, code,
                                            reply, next_attempt_ms, possible_duplicate)
             SELECT message_id, at_ms, smarthost, recipient, state, code, reply, next_attempt_ms,
                    possible_duplicate
             FROM o ORDER BY ord),
         states AS (
             SELECT r.message_id,
                    CASE WHEN bool_or(COALESCE(last.state, r.state) NOT IN ('delivered', 'failed'))
                              THEN 'deferred'
                         WHEN bool_or(COALESCE(last.state, r.state) = 'failed') THEN 'failed'
                         ELSE 'delivered' END AS state
             FROM message_recipients r
             JOIN firsts f ON f.id = r.message_id
             LEFT JOIN last ON last.message_id = r.message_id AND last.recipient = r.recipient
             GROUP BY r.message_id),
         fin AS (
             UPDATE messages m
             SET state = COALESCE(s.state, 'delivered'), attempts = m.attempts + 1,
                 next_attempt_ms = CASE WHEN s.state = 'deferred'
                                        THEN COALESCE(f.next_attempt_ms, f.at_ms) END,
                 done_at_ms = CASE WHEN s.state = 'deferred' THEN NULL ELSE f.at_ms END,
                 lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = f.at_ms,
                 lease_interrupted = false
             FROM firsts f LEFT JOIN states s ON s.message_id = f.id
             WHERE m.id = f.id AND m.lease_owner = ANY($11) AND m.lease_epoch = f.epoch
             RETURNING m.id, m.state)
    SELECT f.k, fin.state FROM firsts f LEFT JOIN fin ON fin.id = f.id";

/// Records a batch of attempts (see [`QueueStore::record_attempts`]) with one statement
/// ([`RECORD`]) whatever its size, on `conn` (its own transaction when `conn` is in none; the
/// caller's when DSNs are written with it). A report whose lease was lost records nothing; a
/// message named twice is recorded once.
async fn record_batch(
    conn: &mut sqlx::PgConnection,
    owner: &str,
    reports: &[AttemptReport],
) -> Result<Vec<Recorded>, StoreError> {
    let outcomes: Vec<(i64, &crate::queue::RecipientOutcome)> = reports
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.outcomes.iter().map(move |o| (i as i64 + 1, o)))
        .collect();
    let rows = sqlx::query(RECORD)
        .bind(
            reports
                .iter()
                .map(|r| r.message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(reports.iter().map(|r| r.lease).collect::<Vec<_>>())
        .bind(reports.iter().map(|r| r.at_ms).collect::<Vec<_>>())
        .bind(
            reports
                .iter()
                .map(|r| r.next_attempt_ms)
                .collect::<Vec<_>>(),
        )
        .bind(outcomes.iter().map(|(k, _)| *k).collect::<Vec<_>>())
        .bind(
            outcomes
                .iter()
                .map(|(_, o)| o.recipient.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            outcomes
                .iter()
                .map(|(_, o)| o.state.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            outcomes
                .iter()
                .map(|(_, o)| o.code.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            outcomes
                .iter()
                .map(|(_, o)| o.reply.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            outcomes
                .iter()
                .map(|(k, _)| reports[(*k - 1) as usize].smarthost.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(&super::handoff::fence_owners(owner)[..])
        .fetch_all(&mut *conn)
        .await
        .or_store()?;
    let mut out = vec![Recorded::LeaseLost; reports.len()];
    for row in rows {
        let k: i64 = row.try_get("k").or_store()?;
        let state: Option<String> = row.try_get("state").or_store()?;
        let slot = usize::try_from(k - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| StoreError::Other(format!("write-back row {k} out of range")))?;
        match state {
            Some(state) => *slot = Recorded::State(message_state_of(&state)?),
            // Cannot happen while the row is locked: reported as lost, and logged.
            None => tracing::error!(
                message_id = %reports[(k - 1) as usize].message_id,
                "a fenced write-back changed no message: the lease changed under its row lock"
            ),
        }
    }
    Ok(out)
}

impl PgStore {
    /// Leases up to `limit` due messages from the shared queue (what `lease_due` did before the
    /// hand-off, and still does for everything not handed off).
    async fn lease_shared(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<LeasedMessage>, StoreError> {
        let until = now_ms.saturating_add(lease_ms);
        // One statement (its own transaction, one round trip): lease, make the recipient rows on
        // a first lease (acceptance stays small), and return each message with its body and, on
        // a first attempt, its recipients (all pending, in envelope order, each once).
        let rows = sqlx::query(
            "WITH due AS (
                 SELECT id FROM messages
                 WHERE state IN ('queued', 'deferred')
                   AND COALESCE(next_attempt_ms, 0) <= $3
                   AND (lease_until_ms IS NULL OR lease_until_ms <= $3)
                 ORDER BY COALESCE(next_attempt_ms, accepted_at_ms), id
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED),
             leased AS (
                 UPDATE messages m
                 SET lease_owner = $1, lease_until_ms = $2, updated_at_ms = $3,
                     lease_epoch = nextval('message_lease_epoch'),
                     -- The lease before ended without an outcome: its holder still owns it.
                     lease_interrupted = m.lease_interrupted OR m.lease_owner IS NOT NULL
                 FROM due WHERE m.id = due.id
                 RETURNING m.id, m.decision_id, m.door, m.accepted_at_ms, m.envelope_from,
                           m.attempts, COALESCE(m.next_attempt_ms, m.accepted_at_ms) AS due_at,
                           m.lease_epoch, m.lease_interrupted, m.recipients),
             made AS (
                 INSERT INTO message_recipients (message_id, recipient, position, state,
                                                 updated_at_ms)
                 SELECT l.id, r.recipient, r.position::integer, 'pending', $3
                 FROM leased l, unnest(l.recipients) WITH ORDINALITY AS r(recipient, position)
                 ON CONFLICT (message_id, recipient) DO NOTHING)
             SELECT l.id, l.decision_id, l.door, l.accepted_at_ms, l.envelope_from, l.attempts,
                    l.due_at, l.lease_epoch, l.lease_interrupted, b.raw,
                    ARRAY(SELECT r.recipient
                          FROM unnest(l.recipients) WITH ORDINALITY AS r(recipient, position)
                          GROUP BY r.recipient ORDER BY min(r.position)) AS first_recipients
             FROM leased l LEFT JOIN message_bodies b ON b.message_id = l.id",
        )
        .bind(owner)
        .bind(until)
        .bind(now_ms)
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        let mut leased = Vec::with_capacity(rows.len());
        // Messages attempted before: their recipients' states are read after the lease.
        let mut retried: Vec<String> = Vec::new();
        for r in &rows {
            let due_at: i64 = r.try_get("due_at").or_store()?;
            let attempts: i64 = r.try_get("attempts").or_store()?;
            let id: String = r.try_get("id").or_store()?;
            // No attempt recorded yet (RETURNING gives the row as its last writer left it, so
            // the count is current): every recipient is pending. Otherwise their rows say.
            let recipients = if attempts == 0 {
                r.try_get::<Vec<String>, _>("first_recipients")
                    .or_store()?
                    .into_iter()
                    .map(|rcpt| (rcpt, RecipientState::Pending))
                    .collect()
            } else {
                retried.push(id.clone());
                Vec::new()
            };
            leased.push((
                due_at,
                LeasedMessage {
                    id,
                    decision_id: r.try_get("decision_id").or_store()?,
                    door: r.try_get("door").or_store()?,
                    accepted_at_ms: r.try_get("accepted_at_ms").or_store()?,
                    envelope_from: r.try_get("envelope_from").or_store()?,
                    recipients,
                    attempts,
                    raw: r
                        .try_get::<Option<Vec<u8>>, _>("raw")
                        .or_store()?
                        .unwrap_or_default(),
                    lease_until_ms: until,
                    lease: r.try_get("lease_epoch").or_store()?,
                    possible_duplicate: r.try_get("lease_interrupted").or_store()?,
                },
            ));
        }
        // RETURNING keeps no order: the oldest due first, as selected.
        leased.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        let mut leased: Vec<LeasedMessage> = leased.into_iter().map(|(_, m)| m).collect();
        if retried.is_empty() {
            return Ok(leased);
        }
        // A statement of its own, after the lease committed: it sees the last outcomes recorded
        // (a write-back that committed while the lease was being taken included), and none can
        // come after (every write-back is fenced by the lease this node now holds).
        let mut open: HashMap<String, Vec<(String, RecipientState)>> = HashMap::new();
        for r in sqlx::query(
            "SELECT message_id, recipient, state FROM message_recipients
             WHERE message_id = ANY($1) AND state NOT IN ('delivered', 'failed')
             ORDER BY message_id, position",
        )
        .bind(&retried)
        .fetch_all(&self.pool)
        .await
        .or_store()?
        {
            open.entry(r.try_get("message_id").or_store()?)
                .or_default()
                .push((
                    r.try_get("recipient").or_store()?,
                    recipient_state_of(&r.try_get::<String, _>("state").or_store()?)?,
                ));
        }
        for m in &mut leased {
            if let Some(rcpts) = open.remove(&m.id) {
                m.recipients = rcpts;
            }
        }
        Ok(leased)
    }

    /// Messages taken from the hand-off, kept leased: those with less than half their lease left
    /// are extended first (fenced), and any whose lease is over (another node has it) dropped.
    async fn keep_handed_leases(
        &self,
        owner: &str,
        mut messages: Vec<LeasedMessage>,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<LeasedMessage>, StoreError> {
        let short: Vec<(String, i64)> = messages
            .iter()
            .filter(|m| m.lease_until_ms - now_ms < lease_ms / 2)
            .map(|m| (m.id.clone(), m.lease))
            .collect();
        if short.is_empty() {
            return Ok(messages);
        }
        let outcomes = self.extend_lease(owner, &short, now_ms, lease_ms).await?;
        // Each short lease: extended (kept, with its new end) or over (dropped).
        let extended: HashMap<&str, bool> = short
            .iter()
            .zip(&outcomes)
            .map(|((id, _), o)| (id.as_str(), !matches!(o, Recorded::LeaseLost)))
            .collect();
        messages.retain_mut(|m| match extended.get(m.id.as_str()) {
            Some(true) => {
                m.lease_until_ms = now_ms.saturating_add(lease_ms);
                true
            }
            Some(false) => {
                tracing::info!(message_id = %m.id, lease = m.lease, "a handed-off message's lease ended before a worker took it; the shared queue delivers it");
                false
            }
            None => true,
        });
        Ok(messages)
    }
}

#[async_trait]
impl QueueStore for PgStore {
    async fn release_held(&self, now_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE messages SET state = 'queued', next_attempt_ms = $1, updated_at_ms = $1
             WHERE state = 'held' AND COALESCE(hold_until_ms, 0) <= $1",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .or_store()?
        .rows_affected())
    }

    async fn lease_due(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<LeasedMessage>, StoreError> {
        // Messages this node accepted and leased to itself (`handoff.rs`) first, without a
        // statement; the shared queue as well when the hand-off had none, and every
        // `SHARED_EVERY` while it has.
        let taken = self.handoff.take(owner, lease_ms, limit.max(1) as usize);
        let mut handed = self
            .keep_handed_leases(owner, taken.messages, now_ms, lease_ms)
            .await?;
        let rest = limit.max(1).saturating_sub(handed.len() as u32);
        if !taken.look_shared || rest == 0 {
            return Ok(handed);
        }
        let mut shared = self.lease_shared(owner, now_ms, lease_ms, rest).await?;
        if handed.is_empty() {
            return Ok(shared);
        }
        handed.append(&mut shared);
        Ok(handed)
    }

    async fn reclaim_leases(&self, node: &str, now_ms: i64) -> Result<u64, StoreError> {
        // A prefix compared as a string, not LIKE: `_` and `%` in a node id match themselves.
        // A new epoch, as a new lease takes: the lease taken back is over for every fence. It
        // ended without an outcome: the next attempt may be a second delivery.
        Ok(sqlx::query(
            "UPDATE messages SET lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = $2,
                 lease_epoch = nextval('message_lease_epoch'), lease_interrupted = true
             WHERE state IN ('queued', 'deferred') AND lease_owner IS NOT NULL
               AND left(lease_owner, length($1)) = $1",
        )
        .bind(format!("{node}/"))
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .or_store()?
        .rows_affected())
    }

    async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        // A message handed off and not yet taken is due now (no scan needed to say so).
        if self.handoff.any_waiting() {
            return Ok(Some(super::now_ms()));
        }
        sqlx::query_scalar(
            "SELECT MIN(CASE
                 WHEN state = 'held' THEN COALESCE(hold_until_ms, 0)
                 WHEN lease_until_ms IS NOT NULL
                     THEN GREATEST(lease_until_ms, COALESCE(next_attempt_ms, 0))
                 ELSE COALESCE(next_attempt_ms, 0) END)
             FROM messages WHERE state IN ('queued', 'deferred', 'held')",
        )
        .fetch_one(&self.pool)
        .await
        .or_store()
    }

    async fn record_attempt(
        &self,
        owner: &str,
        report: &AttemptReport,
    ) -> Result<Recorded, StoreError> {
        let mut out = self
            .record_attempts(owner, std::slice::from_ref(report))
            .await?;
        Ok(out.pop().unwrap_or(Recorded::LeaseLost))
    }

    async fn record_attempts(
        &self,
        owner: &str,
        reports: &[AttemptReport],
    ) -> Result<Vec<Recorded>, StoreError> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        if reports.iter().all(|r| r.dsn.is_none()) {
            // One statement, one round trip, its own transaction.
            let mut conn = self.pool.acquire().await.or_store()?;
            return record_batch(&mut conn, owner, reports).await;
        }
        // A bounce is queued in the same transaction as the outcome that made it.
        let mut tx = self.pool.begin().await.or_store()?;
        let out = record_batch(&mut tx, owner, reports).await?;
        for (r, recorded) in reports.iter().zip(&out) {
            if let (Some(dsn), Recorded::State(_)) = (&r.dsn, recorded) {
                super::directory::insert_message(&mut tx, dsn).await?;
            }
        }
        tx.commit().await.or_store()?;
        Ok(out)
    }

    async fn extend_lease(
        &self,
        owner: &str,
        leases: &[(String, i64)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Recorded>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = leases.iter().map(|(id, _)| id.as_str()).collect();
        let epochs: Vec<i64> = leases.iter().map(|(_, e)| *e).collect();
        // One UPDATE for the batch, fenced per row by owner and lease.
        let rows = sqlx::query(
            "UPDATE messages m SET lease_until_ms = $3, updated_at_ms = $4
             FROM unnest($1::text[], $2::bigint[]) AS l(id, epoch)
             WHERE m.id = l.id AND m.lease_epoch = l.epoch AND m.lease_owner = ANY($5)
               AND m.state IN ('queued', 'deferred')
             RETURNING m.id, m.state",
        )
        .bind(&ids)
        .bind(&epochs)
        .bind(now_ms.saturating_add(lease_ms))
        .bind(now_ms)
        .bind(&super::handoff::fence_owners(owner)[..])
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        let mut held: HashMap<String, MessageState> = HashMap::new();
        for r in &rows {
            held.insert(
                r.try_get("id").or_store()?,
                message_state_of(&r.try_get::<String, _>("state").or_store()?)?,
            );
        }
        Ok(leases
            .iter()
            .map(|(id, _)| {
                held.get(id)
                    .map_or(Recorded::LeaseLost, |s| Recorded::State(*s))
            })
            .collect())
    }

    async fn release_handed_off(&self, now_ms: i64) -> Result<u64, StoreError> {
        super::handoff::release(&self.pool, self.handoff.drain(), now_ms).await
    }

    async fn wake_others(&self, from: &str) -> Result<(), StoreError> {
        // Outside any transaction: a NOTIFY at commit takes a lock every committing NOTIFY
        // shares, so it is never part of an acceptance.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(WAKE_CHANNEL)
            .bind(from)
            .execute(&self.pool)
            .await
            .or_store()?;
        Ok(())
    }

    fn spawn_wakeup_listener(
        &self,
        node: &str,
        wake: Arc<Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        Some(tokio::spawn(listen_for_wakeups(
            self.pool.clone(),
            node.to_owned(),
            wake,
        )))
    }

    async fn mark_captured(
        &self,
        owner: &str,
        id: &str,
        lease: i64,
        now_ms: i64,
    ) -> Result<Recorded, StoreError> {
        // One conditional UPDATE: it changes the row only while `owner` holds the lease.
        let n = sqlx::query(
            "UPDATE messages SET state = 'captured', done_at_ms = $1, next_attempt_ms = NULL,
                 lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = $1,
                 lease_interrupted = false
             WHERE id = $2 AND lease_owner = ANY($3) AND lease_epoch = $4
               AND state IN ('queued', 'deferred')",
        )
        .bind(now_ms)
        .bind(id)
        .bind(&super::handoff::fence_owners(owner)[..])
        .bind(lease)
        .execute(&self.pool)
        .await
        .or_store()?
        .rows_affected();
        Ok(if n == 1 {
            Recorded::State(MessageState::Captured)
        } else {
            Recorded::LeaseLost
        })
    }

    async fn list_queue(&self, filter: &QueueFilter) -> Result<Vec<QueueEntry>, StoreError> {
        let limit = i64::from(if filter.limit == 0 { 100 } else { filter.limit });
        let rows = match &filter.state {
            Some(state) => sqlx::query(concat!(
                "SELECT ",
                entry_columns!(),
                " FROM messages WHERE state = $1 ORDER BY accepted_at_ms DESC, id DESC LIMIT $2"
            ))
            .bind(state.as_str())
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .or_store()?,
            None => sqlx::query(concat!(
                "SELECT ",
                entry_columns!(),
                " FROM messages WHERE state <> 'captured'
                  ORDER BY accepted_at_ms DESC, id DESC LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .or_store()?,
        };
        rows.iter().map(entry_of).collect()
    }

    async fn message_status(&self, id: &str) -> Result<Option<MessageStatus>, StoreError> {
        // One REPEATABLE READ transaction: the message, its recipients and its history agree.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .or_store()?;
        let Some(row) = sqlx::query(concat!(
            "SELECT ",
            entry_columns!(),
            ", door, principal, hold_until_ms, lease_owner, lease_until_ms, done_at_ms
             FROM messages WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .or_store()?
        else {
            return Ok(None);
        };
        let entry = entry_of(&row)?;
        let mut recipient_status = Vec::new();
        for r in sqlx::query(
            "SELECT recipient, state, attempts, code, reply, smarthost FROM message_recipients
             WHERE message_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .or_store()?
        {
            recipient_status.push(RecipientStatus {
                recipient: r.try_get("recipient").or_store()?,
                state: recipient_state_of(&r.try_get::<String, _>("state").or_store()?)?,
                attempts: r.try_get("attempts").or_store()?,
                code: r.try_get("code").or_store()?,
                last_reply: r.try_get("reply").or_store()?,
                smarthost: r.try_get("smarthost").or_store()?,
            });
        }
        if recipient_status.is_empty() {
            recipient_status = entry
                .recipients
                .iter()
                .map(|r| RecipientStatus {
                    recipient: r.clone(),
                    state: RecipientState::Pending,
                    attempts: 0,
                    code: None,
                    last_reply: None,
                    smarthost: None,
                })
                .collect();
        }
        let mut history = Vec::new();
        for r in sqlx::query(
            "SELECT at_ms, smarthost, recipient, outcome, code, reply, next_attempt_ms,
                    possible_duplicate
             FROM delivery_attempts WHERE message_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .or_store()?
        {
            history.push(AttemptEntry {
                at_ms: r.try_get("at_ms").or_store()?,
                smarthost: r.try_get("smarthost").or_store()?,
                recipient: r.try_get("recipient").or_store()?,
                outcome: recipient_state_of(&r.try_get::<String, _>("outcome").or_store()?)?,
                code: r.try_get("code").or_store()?,
                reply: r.try_get("reply").or_store()?,
                next_attempt_ms: r.try_get("next_attempt_ms").or_store()?,
                possible_duplicate: r.try_get("possible_duplicate").or_store()?,
            });
        }
        tx.commit().await.or_store()?;
        Ok(Some(MessageStatus {
            entry,
            door: row.try_get("door").or_store()?,
            principal: row.try_get("principal").or_store()?,
            hold_until_ms: row.try_get("hold_until_ms").or_store()?,
            lease_owner: row.try_get("lease_owner").or_store()?,
            lease_until_ms: row.try_get("lease_until_ms").or_store()?,
            done_at_ms: row.try_get("done_at_ms").or_store()?,
            possible_duplicate: history.iter().any(|h| h.possible_duplicate),
            recipient_status,
            history,
        }))
    }

    async fn retry_message(&self, id: &str, now_ms: i64) -> Result<RetryOutcome, StoreError> {
        let mut tx = self.pool.begin().await.or_store()?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM messages WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .or_store()?;
        let Some(state) = state else {
            return Ok(RetryOutcome::NotFound);
        };
        match message_state_of(&state)? {
            MessageState::Queued
            | MessageState::Deferred
            | MessageState::Held
            | MessageState::Failed => {
                sqlx::query(
                    "UPDATE message_recipients SET state = 'pending', updated_at_ms = $1
                     WHERE message_id = $2 AND state = 'failed'",
                )
                .bind(now_ms)
                .bind(id)
                .execute(&mut *tx)
                .await
                .or_store()?;
                sqlx::query(
                    "UPDATE messages SET state = 'queued', next_attempt_ms = $1,
                         hold_until_ms = NULL, done_at_ms = NULL, updated_at_ms = $1
                     WHERE id = $2",
                )
                .bind(now_ms)
                .bind(id)
                .execute(&mut *tx)
                .await
                .or_store()?;
                tx.commit().await.or_store()?;
                Ok(RetryOutcome::Requeued)
            }
            final_state => Ok(RetryOutcome::Final(final_state)),
        }
    }

    async fn delete_message(&self, id: &str) -> Result<bool, StoreError> {
        // Its body, recipients and history go with it (ON DELETE CASCADE).
        let n = sqlx::query("DELETE FROM messages WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .or_store()?
            .rows_affected();
        Ok(n > 0)
    }

    async fn list_captured(&self, limit: u32) -> Result<Vec<CapturedMessage>, StoreError> {
        let limit = i64::from(if limit == 0 { 100 } else { limit });
        let rows = sqlx::query(
            "SELECT id, decision_id, accepted_at_ms, done_at_ms, envelope_from, recipients, size,
                    (SELECT substring(b.raw FROM 1 FOR $1::integer) FROM message_bodies b
                     WHERE b.message_id = messages.id) AS raw
             FROM messages WHERE state = 'captured'
             ORDER BY accepted_at_ms DESC, id DESC LIMIT $2",
        )
        .bind(CAPTURED_HEAD_BYTES)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        rows.iter().map(captured_of).collect()
    }

    async fn captured_message(&self, id: &str) -> Result<Option<CapturedMessage>, StoreError> {
        let row = sqlx::query(
            "SELECT id, decision_id, accepted_at_ms, done_at_ms, envelope_from, recipients, size,
                    (SELECT b.raw FROM message_bodies b WHERE b.message_id = messages.id) AS raw
             FROM messages WHERE state = 'captured' AND id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .or_store()?;
        row.as_ref().map(captured_of).transpose()
    }

    async fn leases_by_node(&self, now_ms: i64) -> Result<Vec<crate::NodeLeases>, StoreError> {
        let per_owner: Vec<(String, i64)> = sqlx::query_as(
            "SELECT lease_owner, count(*) FROM messages
             WHERE lease_owner IS NOT NULL AND lease_until_ms > $1
               AND state IN ('queued', 'deferred')
             GROUP BY lease_owner",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        Ok(crate::queue::leases_per_node(per_owner))
    }
}
