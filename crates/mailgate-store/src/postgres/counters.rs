//! [`CounterStore`] on PostgreSQL: limits exact across nodes (`migrations/postgres/0002_shared_counters.sql`).
//!
//! An admission is atomic per principal: the principal's usage is read, the engine's arithmetic
//! re-checks the decision (`mailgate_core::engine::recheck`), and the send is recorded (usage row,
//! rate TAT, concurrent-send slot, and the principal's expired rows deleted on the way, which
//! keeps its rows bounded by its own limits) only if no other admission of that principal came in
//! between: the record takes the principal's transaction advisory lock (a hash of its counter
//! key, so sends of other principals never wait) and compares the principal's admission version
//! with the one read, or, after a few misses, the lock is taken before the read. Under READ
//! COMMITTED each statement after the lock sees every earlier holder's commit, so two nodes
//! cannot both take the last unit of a limit. The sends that queue up meanwhile are admitted
//! together, and their messages written together (`accept.rs`).
//!
//! Usually both steps are one: a send that no limit holds, whose message is at hand, is admitted
//! and stored in one durable transaction (`accept.rs`, `mailgate_admit_and_store`), its
//! principal locked until the commit, so no other node sees it in flight. The two steps remain
//! for everything else (a batch past its ceiling, a hold, a big message, a lock wait).
//!
//! Why two steps (admission, then the message): the concurrent-send slot is taken when the engine
//! allows the send and held while the door receives and stores its message (an SMTP body arrives
//! after the decision), and a send whose message is never stored is refunded. Why the admission
//! commits with `synchronous_commit` off: the WAL is one sequence, so the message's durable
//! commit (after the admission's) flushes the admission too; a crash can lose only admissions
//! whose messages were not acknowledged, which is the refund they would have had.

use async_trait::async_trait;
use mailgate_core::directory::LimitName;
use mailgate_core::engine::counters::DAY_MS;
use mailgate_core::engine::{Charge, Usage};
use sqlx::{PgPool, Row};

use super::decisions::DecisionQueue;
use super::{OrStore, PgStore};
use crate::{AdmitStored, Admitted, CounterStore, NewMessage, SendSlot, StoreError};

/// One principal's usage: the day's messages and recipients are its running totals
/// (`usage_totals`, `migrations/postgres/0008_usage_totals.sql`) less its rows that have left the
/// window and are not deleted yet, so the read costs the same whatever the day's volume.
const USAGE: &str = "
    SELECT (SELECT tat_ms FROM rate_state WHERE principal = $1) AS tat,
           COALESCE(t.messages, 0) - x.n AS n,
           (COALESCE(t.recipients, 0) - x.r)::BIGINT AS r,
           (SELECT min(at_ms) FROM usage_log WHERE principal = $1 AND at_ms > $2) AS oldest,
           (SELECT count(*) FROM send_slots WHERE principal = $1 AND until_ms > $3) AS in_flight
    FROM (SELECT count(*) AS n, COALESCE(sum(recipients), 0) AS r
          FROM usage_log WHERE principal = $1 AND at_ms <= $2) x
    LEFT JOIN usage_totals t ON t.principal = $1";

async fn read_usage(
    conn: &mut sqlx::PgConnection,
    principal: &str,
    now_ms: u64,
) -> Result<Usage, StoreError> {
    let now = now_ms as i64;
    let row = sqlx::query(USAGE)
        .bind(principal)
        .bind(now - DAY_MS as i64)
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .or_store()?;
    usage_of_row(&row)
}

/// A principal's [`Usage`] from a row with the columns `tat`, `n`, `r`, `oldest` and
/// `in_flight` (this module's `USAGE`, and the batch read of `accept.rs`).
pub(crate) fn usage_of_row(row: &sqlx::postgres::PgRow) -> Result<Usage, StoreError> {
    let tat: Option<i64> = row.try_get("tat").or_store()?;
    let n: i64 = row.try_get("n").or_store()?;
    let r: i64 = row.try_get("r").or_store()?;
    let oldest: Option<i64> = row.try_get("oldest").or_store()?;
    let in_flight: i64 = row.try_get("in_flight").or_store()?;
    Ok(Usage {
        rate_tat_ms: tat.map(|t| t.max(0) as u64),
        messages_24h: n.max(0) as u64,
        recipients_24h: r.max(0) as u64,
        oldest_expires_ms: oldest.map(|o| (o.max(0) as u64).saturating_add(DAY_MS)),
        in_flight: in_flight.max(0) as u64,
    })
}

pub(crate) async fn release_slot(
    pool: &PgPool,
    slot: SendSlot,
    refund: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH s AS (DELETE FROM send_slots WHERE id = $1 RETURNING usage_seq)
         DELETE FROM usage_log WHERE $2 AND seq IN (SELECT usage_seq FROM s)",
    )
    .bind(slot.0)
    .bind(refund)
    .execute(pool)
    .await
    .or_store()?;
    Ok(())
}

/// Refunds an admitted send whose message write was abandoned midway (see
/// [`store_alone`]); disarmed by taking `pool` once the outcome is known.
struct RefundOnDrop {
    pool: Option<PgPool>,
    slot: SendSlot,
}

impl Drop for RefundOnDrop {
    fn drop(&mut self) {
        let (Some(pool), Ok(rt)) = (self.pool.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let slot = self.slot;
        rt.spawn(async move {
            if let Err(e) = release_slot(&pool, slot, true).await {
                tracing::warn!(error = %e, slot = slot.0, "could not refund a send whose message write was abandoned: its slot expires by itself");
            }
        });
    }
}

/// Stores an admitted message and frees its slot in one transaction of its own (a message too
/// big to batch, or one of a batch that failed as a whole); when the message cannot be stored,
/// the slot is freed and its send refunded.
pub(crate) async fn store_alone(
    pool: &PgPool,
    decisions: &DecisionQueue,
    m: &NewMessage,
    slot: SendSlot,
) -> Result<(), StoreError> {
    // Dropped before the write's outcome is known (the request's future cancelled: a client
    // that hung up, a timeout), the guard refunds in a task of its own. Safe whichever way
    // the write went: the slot is deleted in the message's own transaction, so a refund
    // that finds it gone (stored) changes nothing, and one that races the commit waits for
    // that row's lock first.
    let mut guard = RefundOnDrop {
        pool: Some(pool.clone()),
        slot,
    };
    let stored = async {
        let mut tx = pool.begin().await.or_store()?;
        let decision = decisions.claim(&m.decision_id);
        if let Some(d) = decision.decision() {
            super::decisions::insert_decisions(&mut *tx, std::slice::from_ref(d)).await?;
        }
        super::directory::insert_message(&mut tx, m).await?;
        sqlx::query("DELETE FROM send_slots WHERE id = $1")
            .bind(slot.0)
            .execute(&mut *tx)
            .await
            .or_store()?;
        tx.commit().await.or_store()?;
        decision.committed();
        Ok::<(), StoreError>(())
    }
    .await;
    guard.pool = None;
    if let Err(e) = &stored {
        if let Err(again) = release_slot(pool, slot, true).await {
            tracing::warn!(error = %again, slot = slot.0, "could not refund a send whose message was not stored: its slot expires by itself");
        }
        tracing::debug!(error = %e, "message not stored; its send refunded");
    }
    stored
}

impl PgStore {
    /// Stores an admitted message and frees its slot: small ones in the next batch of the
    /// message writer (`accept.rs`), big ones alone.
    pub(crate) async fn accept_admitted_message(
        &self,
        m: &NewMessage,
        slot: SendSlot,
    ) -> Result<(), StoreError> {
        if m.raw.len() > super::accept::BATCH_BODY_MAX {
            return store_alone(&self.pool, &self.decisions, m, slot).await;
        }
        // A caller that goes away before the writer took its message is refunded by the writer.
        self.accepts.store(m, slot).await
    }
}

#[async_trait]
impl CounterStore for PgStore {
    async fn usage(&self, principal: &str, now_ms: u64) -> Result<Usage, StoreError> {
        let mut conn = self.pool.acquire().await.or_store()?;
        read_usage(&mut conn, principal, now_ms).await
    }

    async fn admit(
        &self,
        charge: &Charge,
        held: &[LimitName],
        now_ms: u64,
        holder: &str,
        slot_until_ms: u64,
    ) -> Result<Admitted, StoreError> {
        // In the next admission batch (`accept.rs`): the principals locked, their usage read and
        // each send re-checked in arrival order, in one transaction.
        self.accepts
            .admit(charge, held, now_ms, holder, slot_until_ms)
            .await
    }

    async fn admit_and_store(
        &self,
        charge: &Charge,
        now_ms: u64,
        holder: &str,
        message: NewMessage,
    ) -> Result<AdmitStored, StoreError> {
        // Big messages are written alone, by their caller (no copy of a big body into a batch).
        if message.raw.len() > super::accept::BATCH_BODY_MAX {
            return Ok(AdmitStored::TwoSteps(Box::new(message)));
        }
        self.accepts
            .admit_and_store(charge, now_ms, holder, message)
            .await
    }

    async fn release(&self, slot: SendSlot, refund: bool) -> Result<(), StoreError> {
        release_slot(&self.pool, slot, refund).await
    }

    async fn release_node(&self, node: &str) -> Result<u64, StoreError> {
        let n =
            sqlx::query("DELETE FROM send_slots WHERE left(holder, length($1) + 1) = $1 || '/'")
                .bind(node)
                .execute(&self.pool)
                .await
                .or_store()?
                .rows_affected();
        Ok(n)
    }
}
