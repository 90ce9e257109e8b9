//! [`CounterStore`] on PostgreSQL: limits exact across nodes (`migrations/postgres/0002_shared_counters.sql`).
//!
//! An admission is one transaction: lock the principal (a transaction advisory lock on a hash of
//! its counter key, so sends of other principals never wait), read its live usage in one
//! statement, let the engine's arithmetic re-check the decision
//! (`mailgate_core::engine::recheck`), and record the send in one more statement (usage row,
//! rate TAT, concurrent-send slot, and the principal's expired rows deleted on the way, which
//! keeps its rows bounded by its own limits). Under READ COMMITTED each statement after the lock
//! sees every earlier holder's commit, so two nodes cannot both take the last unit of a limit.

use async_trait::async_trait;
use mailgate_core::directory::LimitName;
use mailgate_core::engine::counters::DAY_MS;
use mailgate_core::engine::{Charge, Recheck, Usage, recheck};
use sqlx::{PgPool, Row};

use super::{OrStore, PgStore};
use crate::{Admitted, CounterStore, NewMessage, SendSlot, StoreError};

/// First key of the two-key advisory locks that serialize one principal's admissions ("MGCT");
/// the second is `hashtext(principal)`. A collision of two principals' hashes only makes them
/// wait for each other.
const COUNTER_LOCK_CLASS: i32 = 0x4D47_4354;

const USAGE: &str = "
    SELECT (SELECT tat_ms FROM rate_state WHERE principal = $1) AS tat,
           u.n, u.r, u.oldest,
           (SELECT count(*) FROM send_slots WHERE principal = $1 AND until_ms > $3) AS in_flight
    FROM (SELECT count(*) AS n, COALESCE(sum(recipients), 0)::BIGINT AS r, min(at_ms) AS oldest
          FROM usage_log WHERE principal = $1 AND at_ms > $2) u";

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

async fn release_slot(pool: &PgPool, slot: SendSlot, refund: bool) -> Result<(), StoreError> {
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
/// [`PgStore::accept_admitted_message`]); disarmed by taking `pool` once the outcome is known.
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

impl PgStore {
    /// Stores an admitted message and frees its slot in one transaction; when the message cannot
    /// be stored, the slot is freed and its send refunded.
    pub(crate) async fn accept_admitted_message(
        &self,
        m: &NewMessage,
        slot: SendSlot,
    ) -> Result<(), StoreError> {
        // Dropped before the write's outcome is known (the request's future cancelled: a client
        // that hung up, a timeout), the guard refunds in a task of its own. Safe whichever way
        // the write went: the slot is deleted in the message's own transaction, so a refund
        // that finds it gone (stored) changes nothing, and one that races the commit waits for
        // that row's lock first.
        let mut guard = RefundOnDrop {
            pool: Some(self.pool.clone()),
            slot,
        };
        let stored = async {
            let mut tx = self.pool.begin().await.or_store()?;
            let decision = self.flush_decisions(&mut tx, &m.decision_id).await?;
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
            if let Err(again) = self.release(slot, true).await {
                tracing::warn!(error = %again, slot = slot.0, "could not refund a send whose message was not stored: its slot expires by itself");
            }
            tracing::debug!(error = %e, "message not stored; its send refunded");
        }
        stored
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
        // READ COMMITTED whatever the server's default: each statement after the lock must see
        // the previous holder's commit (under REPEATABLE READ the snapshot predates the lock, and
        // a principal's racing sends fail with serialization errors).
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .or_store()?;
        // The lock is held until the commit, so the commit does not wait for the disk
        // (`synchronous_commit` off for this transaction only): the admission is durable with the
        // message's own synchronous commit, which flushes the WAL up to it, and an admission lost
        // in a crash belonged to a send that was never acknowledged. Holding the principal's lock
        // through an fsync made one principal's sends one fsync each, whatever the nodes
        // (docs/performance.md).
        sqlx::query(
            "SELECT set_config('synchronous_commit', 'off', true), \
             pg_advisory_xact_lock($1, hashtext($2))",
        )
        .bind(COUNTER_LOCK_CLASS)
        .bind(&charge.principal)
        .execute(&mut *tx)
        .await
        .or_store()?;
        let usage = read_usage(&mut tx, &charge.principal, now_ms).await?;
        let tat = match recheck(&usage, charge, held, now_ms) {
            Recheck::Changed => {
                // Nothing written: the rollback only ends the lock.
                tx.rollback().await.or_store()?;
                return Ok(Admitted::Changed(usage));
            }
            Recheck::Admit { rate_tat_ms } => rate_tat_ms,
        };
        let now = now_ms as i64;
        let row = sqlx::query(
            "WITH gone AS (DELETE FROM usage_log WHERE principal = $1 AND at_ms <= $6),
                  ended AS (DELETE FROM send_slots WHERE principal = $1 AND until_ms <= $2),
                  rate AS (INSERT INTO rate_state (principal, tat_ms)
                           SELECT $1, $4::BIGINT WHERE $4::BIGINT IS NOT NULL
                           ON CONFLICT (principal) DO UPDATE
                               SET tat_ms = GREATEST(rate_state.tat_ms, excluded.tat_ms)),
                  used AS (INSERT INTO usage_log (principal, at_ms, recipients)
                           VALUES ($1, $2, $3) RETURNING seq)
             INSERT INTO send_slots (principal, holder, until_ms, usage_seq)
             SELECT $1, $5, $7, seq FROM used RETURNING id",
        )
        .bind(&charge.principal)
        .bind(now)
        .bind(charge.recipients as i64)
        .bind(tat.map(|t| t as i64))
        .bind(holder)
        .bind(now - DAY_MS as i64)
        .bind(slot_until_ms as i64)
        .fetch_one(&mut *tx)
        .await
        .or_store()?;
        let slot: i64 = row.try_get("id").or_store()?;
        tx.commit().await.or_store()?;
        Ok(Admitted::Recorded(SendSlot(slot)))
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
