//! [`QueueStore`] on SQLite: leases and attempt records on the write thread (`BEGIN IMMEDIATE`
//! holds the write lock, so two workers never lease the same row), listings on the read pool.

use async_trait::async_trait;
use rusqlite::OptionalExtension;
use sqlx::Row;

use super::{OrStore, SqliteStore};
use crate::queue::{
    AttemptEntry, AttemptReport, CAPTURED_HEAD_BYTES, CapturedMessage, LeasedMessage,
    MessageStatus, QueueEntry, QueueFilter, QueueStore, RecipientStatus, Recorded, RetryOutcome,
};
use crate::{MessageState, RecipientState, StoreError, message_state};

fn recipients_of(json: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(json).or_store()
}

/// A stored message state read back.
fn message_state_of(s: &str) -> Result<MessageState, StoreError> {
    MessageState::parse(s)
        .ok_or_else(|| StoreError::corrupt(format!("unknown message state `{s}`")))
}

/// A stored recipient state read back.
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

fn entry_of(row: &sqlx::sqlite::SqliteRow) -> Result<QueueEntry, StoreError> {
    let recipients: String = row.try_get("recipients").or_store()?;
    Ok(QueueEntry {
        id: row.try_get("id").or_store()?,
        state: message_state_of(&row.try_get::<String, _>("state").or_store()?)?,
        accepted_at_ms: row.try_get("accepted_at_ms").or_store()?,
        envelope_from: row.try_get("envelope_from").or_store()?,
        recipients: recipients_of(&recipients)?,
        size: row.try_get("size").or_store()?,
        attempts: row.try_get("attempts").or_store()?,
        next_attempt_ms: row.try_get("next_attempt_ms").or_store()?,
        decision_id: row.try_get("decision_id").or_store()?,
    })
}

fn captured_of(row: &sqlx::sqlite::SqliteRow) -> Result<CapturedMessage, StoreError> {
    let recipients: String = row.try_get("recipients").or_store()?;
    Ok(CapturedMessage {
        id: row.try_get("id").or_store()?,
        decision_id: row.try_get("decision_id").or_store()?,
        accepted_at_ms: row.try_get("accepted_at_ms").or_store()?,
        captured_at_ms: row.try_get("done_at_ms").or_store()?,
        envelope_from: row.try_get("envelope_from").or_store()?,
        recipients: recipients_of(&recipients)?,
        size: row.try_get("size").or_store()?,
        raw: row.try_get("raw").or_store()?,
    })
}

/// The fence: `Some(lease_interrupted)` when `owner` still holds lease `lease` of message `id`
/// (the row has that owner and that epoch), `None` when the lease is over.
fn holds_lease(
    conn: &rusqlite::Connection,
    owner: &str,
    id: &str,
    lease: i64,
) -> Result<Option<bool>, StoreError> {
    conn.prepare_cached(
        "SELECT lease_interrupted FROM messages
         WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3 AND state IN ('queued', 'deferred')",
    )
    .or_store()?
    .query_row(rusqlite::params![id, owner, lease], |r| r.get::<_, bool>(0))
    .optional()
    .or_store()
}

/// Records one attempt inside the caller's transaction (see [`QueueStore::record_attempt`]).
fn record_in(
    conn: &rusqlite::Connection,
    owner: &str,
    report: &AttemptReport,
) -> Result<Recorded, StoreError> {
    let Some(interrupted) = holds_lease(conn, owner, &report.message_id, report.lease)? else {
        return Ok(Recorded::LeaseLost);
    };
    for o in &report.outcomes {
        conn.prepare_cached(
            "UPDATE message_recipients
             SET state = ?1, attempts = attempts + 1, code = ?2, reply = ?3, smarthost = ?4, updated_at_ms = ?5
             WHERE message_id = ?6 AND recipient = ?7",
        ).or_store()?
        .execute(rusqlite::params![
            o.state.as_str(),
            o.code,
            o.reply,
            report.smarthost,
            report.at_ms,
            report.message_id,
            o.recipient
        ]).or_store()?;
        conn.prepare_cached(
            "INSERT INTO delivery_attempts (message_id, at_ms, smarthost, recipient, outcome, code, reply, next_attempt_ms,
                                            possible_duplicate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        ).or_store()?
        .execute(rusqlite::params![
            report.message_id,
            report.at_ms,
            report.smarthost,
            o.recipient,
            o.state.as_str(),
            o.code,
            o.reply,
            if o.state.is_final() {
                None
            } else {
                report.next_attempt_ms
            },
            interrupted
        ]).or_store()?;
    }
    let states = conn
        .prepare_cached("SELECT state FROM message_recipients WHERE message_id = ?1")
        .or_store()?
        .query_map([&report.message_id], |r| r.get::<_, String>(0))
        .or_store()?
        .collect::<Result<Vec<_>, _>>()
        .or_store()?
        .iter()
        .map(|s| recipient_state_of(s))
        .collect::<Result<Vec<_>, _>>()?;
    let state = message_state(&states);
    let (next, done) = if state == MessageState::Deferred {
        (Some(report.next_attempt_ms.unwrap_or(report.at_ms)), None)
    } else {
        (None, Some(report.at_ms))
    };
    conn.prepare_cached(
        "UPDATE messages SET state = ?1, attempts = attempts + 1, next_attempt_ms = ?2, done_at_ms = ?3,
             lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = ?4, lease_interrupted = 0
         WHERE id = ?5",
    ).or_store()?
    .execute(rusqlite::params![
        state.as_str(),
        next,
        done,
        report.at_ms,
        report.message_id
    ]).or_store()?;
    if let Some(dsn) = &report.dsn {
        super::group::insert_message(conn, dsn)?;
    }
    Ok(Recorded::State(state))
}

/// Leases up to `limit` due messages to `owner` (see [`QueueStore::lease_due`]), inside the
/// caller's `BEGIN IMMEDIATE` transaction: it holds the write lock, so two workers cannot lease
/// the same row.
fn lease_in(
    conn: &rusqlite::Connection,
    owner: &str,
    now_ms: i64,
    until: i64,
    limit: u32,
) -> Result<Vec<LeasedMessage>, StoreError> {
    let mut due = conn
        .prepare_cached(&format!(
            // A literal LIMIT: SQLite recompiles a statement whenever a parameter used as a LIMIT
            // is bound again (it may change the plan).
            "SELECT id, decision_id, door, accepted_at_ms, envelope_from, recipients, attempts,
                (SELECT raw FROM message_bodies b WHERE b.message_id = messages.id) AS raw,
                lease_epoch + 1,
                -- The lease before ended without an outcome: its holder still owns it.
                lease_interrupted OR lease_owner IS NOT NULL
         FROM messages
         WHERE state IN ('queued', 'deferred')
           AND COALESCE(next_attempt_ms, 0) <= ?1
           AND (lease_until_ms IS NULL OR lease_until_ms <= ?1)
         ORDER BY COALESCE(next_attempt_ms, accepted_at_ms), id
         LIMIT {}",
            limit.max(1)
        ))
        .or_store()?;
    let rows = due
        .query_map([now_ms], |r| {
            Ok(LeasedMessage {
                id: r.get(0)?,
                decision_id: r.get(1)?,
                door: r.get(2)?,
                accepted_at_ms: r.get(3)?,
                envelope_from: r.get(4)?,
                // The envelope's recipients, until the open ones are read below.
                recipients: vec![(r.get::<_, String>(5)?, RecipientState::Pending)],
                attempts: r.get(6)?,
                raw: r.get::<_, Option<Vec<u8>>>(7)?.unwrap_or_default(),
                lease_until_ms: until,
                lease: r.get(8)?,
                possible_duplicate: r.get(9)?,
            })
        })
        .or_store()?
        .collect::<Result<Vec<_>, _>>()
        .or_store()?;
    let mut out = Vec::with_capacity(rows.len());
    for mut m in rows {
        let envelope = m.recipients.pop().map(|(json, _)| json).unwrap_or_default();
        conn.prepare_cached(
            "UPDATE messages SET lease_owner = ?1, lease_until_ms = ?2, updated_at_ms = ?3, lease_epoch = ?4,
                 lease_interrupted = ?5
             WHERE id = ?6",
        ).or_store()?
        .execute(rusqlite::params![owner, until, now_ms, m.lease, m.possible_duplicate, m.id]).or_store()?;
        // Recipient rows are made on the first lease (acceptance stays small).
        for r in recipients_of(&envelope)? {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO message_recipients (message_id, recipient, state, updated_at_ms)
                 VALUES (?1, ?2, 'pending', ?3)",
            ).or_store()?
            .execute(rusqlite::params![m.id, r, now_ms]).or_store()?;
        }
        m.recipients = conn
            .prepare_cached(
                "SELECT recipient, state FROM message_recipients WHERE message_id = ?1 ORDER BY rowid",
            ).or_store()?
            .query_map([&m.id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).or_store()?
            .collect::<Result<Vec<_>, _>>().or_store()?
            .into_iter()
            .map(|(r, s)| Ok((r, recipient_state_of(&s)?)))
            .filter(|r| r.as_ref().map_or(true, |(_, s): &(String, RecipientState)| !s.is_final()))
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.push(m);
    }
    Ok(out)
}

#[async_trait]
impl QueueStore for SqliteStore {
    async fn release_held(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write_thread()
            .call(true, move |conn| {
                let n = conn
                    .prepare_cached(
                        "UPDATE messages SET state = 'queued', next_attempt_ms = ?1, updated_at_ms = ?1
                         WHERE state = 'held' AND COALESCE(hold_until_ms, 0) <= ?1",
                    ).or_store()?
                    .execute([now_ms]).or_store()?;
                Ok(n as u64)
            })
            .await
    }

    async fn lease_due(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<LeasedMessage>, StoreError> {
        let until = now_ms.saturating_add(lease_ms);
        let owner = owner.to_owned();
        self.write_thread()
            .call(true, move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .or_store()?;
                let out = lease_in(&tx, &owner, now_ms, until, limit)?;
                tx.commit().or_store()?;
                Ok(out)
            })
            .await
    }

    async fn reclaim_leases(&self, node: &str, now_ms: i64) -> Result<u64, StoreError> {
        // A prefix compared as a string, not LIKE: `_` and `%` in a node id match themselves.
        let prefix = format!("{node}/");
        self.write_thread()
            .call(true, move |conn| {
                let n = conn
                    .prepare_cached(
                        // A new epoch: the lease taken back is over for every fence. It ended
                        // without an outcome: the next attempt may be a second delivery.
                        "UPDATE messages SET lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = ?2,
                             lease_epoch = lease_epoch + 1, lease_interrupted = 1
                         WHERE state IN ('queued', 'deferred') AND lease_owner IS NOT NULL
                           AND substr(lease_owner, 1, length(?1)) = ?1",
                    ).or_store()?
                    .execute(rusqlite::params![prefix, now_ms]).or_store()?;
                Ok(n as u64)
            })
            .await
    }

    async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(CASE
                 WHEN state = 'held' THEN COALESCE(hold_until_ms, 0)
                 WHEN lease_until_ms IS NOT NULL THEN MAX(lease_until_ms, COALESCE(next_attempt_ms, 0))
                 ELSE COALESCE(next_attempt_ms, 0) END)
             FROM messages WHERE state IN ('queued', 'deferred', 'held')",
        )
        .fetch_one(self.pool())
        .await.or_store()?)
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
        let owner = owner.to_owned();
        let reports = reports.to_vec();
        self.write_thread()
            .call(true, move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .or_store()?;
                let mut out = Vec::with_capacity(reports.len());
                for report in &reports {
                    out.push(record_in(&tx, &owner, report)?);
                }
                tx.commit().or_store()?;
                Ok(out)
            })
            .await
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
        let owner = owner.to_owned();
        let leases = leases.to_vec();
        let until = now_ms.saturating_add(lease_ms);
        self.write_thread()
            .call(true, move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .or_store()?;
                let mut out = Vec::with_capacity(leases.len());
                for (id, lease) in &leases {
                    // Fenced as every write-back: owner and lease, an unfinished message.
                    let state: Option<String> = tx
                        .prepare_cached(
                            "UPDATE messages SET lease_until_ms = ?1, updated_at_ms = ?2
                             WHERE id = ?3 AND lease_owner = ?4 AND lease_epoch = ?5
                               AND state IN ('queued', 'deferred')
                             RETURNING state",
                        )
                        .or_store()?
                        .query_row(rusqlite::params![until, now_ms, id, owner, lease], |r| {
                            r.get(0)
                        })
                        .optional()
                        .or_store()?;
                    out.push(match state {
                        Some(s) => Recorded::State(message_state_of(&s)?),
                        None => Recorded::LeaseLost,
                    });
                }
                tx.commit().or_store()?;
                Ok(out)
            })
            .await
    }

    async fn mark_captured(
        &self,
        owner: &str,
        id: &str,
        lease: i64,
        now_ms: i64,
    ) -> Result<Recorded, StoreError> {
        let owner = owner.to_owned();
        let id = id.to_owned();
        self.write_thread()
            .call(true, move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).or_store()?;
                if holds_lease(&tx, &owner, &id, lease)?.is_none() {
                    return Ok(Recorded::LeaseLost);
                }
                tx.prepare_cached(
                    "UPDATE messages SET state = 'captured', done_at_ms = ?1, next_attempt_ms = NULL,
                         lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = ?1, lease_interrupted = 0
                     WHERE id = ?2",
                ).or_store()?
                .execute(rusqlite::params![now_ms, id]).or_store()?;
                tx.commit().or_store()?;
                Ok(Recorded::State(MessageState::Captured))
            })
            .await
    }

    async fn list_queue(&self, filter: &QueueFilter) -> Result<Vec<QueueEntry>, StoreError> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let rows = match &filter.state {
            Some(state) => {
                sqlx::query(concat!("SELECT ", entry_columns!(), " FROM messages WHERE state = ? ORDER BY accepted_at_ms DESC, id DESC LIMIT ?"))
                .bind(state.as_str())
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await.or_store()?
            }
            None => {
                sqlx::query(concat!("SELECT ", entry_columns!(), " FROM messages WHERE state <> 'captured' ORDER BY accepted_at_ms DESC, id DESC LIMIT ?"))
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await.or_store()?
            }
        };
        rows.iter().map(entry_of).collect()
    }

    async fn message_status(&self, id: &str) -> Result<Option<MessageStatus>, StoreError> {
        let Some(row) = sqlx::query(concat!(
            "SELECT ",
            entry_columns!(),
            ", door, principal, hold_until_ms, lease_owner, lease_until_ms, done_at_ms
             FROM messages WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .or_store()?
        else {
            return Ok(None);
        };
        let entry = entry_of(&row)?;
        let mut recipient_status = Vec::new();
        for r in sqlx::query(
            "SELECT recipient, state, attempts, code, reply, smarthost FROM message_recipients
             WHERE message_id = ? ORDER BY rowid",
        )
        .bind(id)
        .fetch_all(self.pool())
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
             FROM delivery_attempts WHERE message_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.pool())
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
        let mut tx = self
            .writer()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .or_store()?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM messages WHERE id = ?")
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
                    "UPDATE message_recipients SET state = 'pending', updated_at_ms = ?
                     WHERE message_id = ? AND state = 'failed'",
                )
                .bind(now_ms)
                .bind(id)
                .execute(&mut *tx)
                .await
                .or_store()?;
                sqlx::query(
                    "UPDATE messages SET state = 'queued', next_attempt_ms = ?, hold_until_ms = NULL,
                         done_at_ms = NULL, updated_at_ms = ?
                     WHERE id = ?",
                )
                .bind(now_ms)
                .bind(now_ms)
                .bind(id)
                .execute(&mut *tx)
                .await.or_store()?;
                tx.commit().await.or_store()?;
                Ok(RetryOutcome::Requeued)
            }
            final_state => Ok(RetryOutcome::Final(final_state)),
        }
    }

    async fn delete_message(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self
            .writer()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .or_store()?;
        let n = sqlx::query("DELETE FROM messages WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .or_store()?
            .rows_affected();
        sqlx::query("DELETE FROM message_recipients WHERE message_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .or_store()?;
        sqlx::query("DELETE FROM message_bodies WHERE message_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .or_store()?;
        sqlx::query("DELETE FROM delivery_attempts WHERE message_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .or_store()?;
        tx.commit().await.or_store()?;
        Ok(n > 0)
    }

    async fn list_captured(&self, limit: u32) -> Result<Vec<CapturedMessage>, StoreError> {
        let limit = if limit == 0 { 100 } else { limit };
        let rows = sqlx::query(
            "SELECT id, decision_id, accepted_at_ms, done_at_ms, envelope_from, recipients, size,
                    (SELECT substr(raw, 1, ?) FROM message_bodies b WHERE b.message_id = messages.id) AS raw
             FROM messages WHERE state = 'captured' ORDER BY accepted_at_ms DESC, id DESC LIMIT ?",
        )
        .bind(CAPTURED_HEAD_BYTES)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await.or_store()?;
        rows.iter().map(captured_of).collect()
    }

    async fn captured_message(&self, id: &str) -> Result<Option<CapturedMessage>, StoreError> {
        let row = sqlx::query(
            "SELECT id, decision_id, accepted_at_ms, done_at_ms, envelope_from, recipients, size,
                    (SELECT raw FROM message_bodies b WHERE b.message_id = messages.id) AS raw
             FROM messages WHERE state = 'captured' AND id = ?",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .or_store()?;
        row.as_ref().map(captured_of).transpose()
    }

    async fn leases_by_node(&self, now_ms: i64) -> Result<Vec<crate::NodeLeases>, StoreError> {
        let per_owner: Vec<(String, i64)> = sqlx::query_as(
            "SELECT lease_owner, count(*) FROM messages
             WHERE lease_owner IS NOT NULL AND lease_until_ms > ?
               AND state IN ('queued', 'deferred')
             GROUP BY lease_owner",
        )
        .bind(now_ms)
        .fetch_all(self.pool())
        .await
        .or_store()?;
        Ok(crate::queue::leases_per_node(per_owner))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::queue::RecipientOutcome;
    use crate::{NewMessage, Store};

    fn msg(id: &str, rcpts: &[&str]) -> NewMessage {
        NewMessage {
            id: id.into(),
            decision_id: format!("D{id}"),
            accepted_at_ms: 1_000,
            door: "test".into(),
            principal: "a@example.com".into(),
            envelope_from: "a@example.com".into(),
            recipients: rcpts.iter().map(|s| (*s).to_owned()).collect(),
            raw: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
            state: MessageState::Queued,
            hold_until_ms: None,
        }
    }

    fn outcome(r: &str, state: RecipientState, reply: &str) -> RecipientOutcome {
        RecipientOutcome {
            recipient: r.into(),
            state,
            code: match state {
                RecipientState::Failed => Some("upstream.refused".into()),
                RecipientState::Deferred => Some("upstream.deferred".into()),
                _ => None,
            },
            reply: Some(reply.into()),
        }
    }

    #[tokio::test]
    async fn retention_deletes_old_finished_messages_and_unreferenced_decisions_only() {
        use crate::{Purged, Store, StoredDecision};
        let s = SqliteStore::in_memory().await.unwrap();
        let decision = |id: &str, at_ms| StoredDecision {
            id: id.into(),
            at_ms,
            door: "smtp".into(),
            principal: "a@example.com".into(),
            verdict: crate::StoredVerdict::Denied,
            code: None,
            body: serde_json::json!({}).into(),
        };
        // Old: a refusal, and a delivered message with its decision. Old but still queued: a
        // message (never deleted by age) with its decision. New: a refusal.
        s.record_decision(&decision("d-old-refusal", 1_000))
            .await
            .unwrap();
        s.record_decision(&decision("d-m1", 1_000)).await.unwrap();
        s.record_decision(&decision("d-m2", 1_000)).await.unwrap();
        s.record_decision(&decision("d-new", 90_000)).await.unwrap();
        let mut m1 = msg("m1", &["x@a.test"]);
        m1.decision_id = "d-m1".into();
        let mut m2 = msg("m2", &["x@a.test"]);
        m2.decision_id = "d-m2".into();
        s.accept_message(&m1, None).await.unwrap();
        s.accept_message(&m2, None).await.unwrap();
        let leased = s.lease_due("w", 2_000, 1_000, 1).await.unwrap();
        assert_eq!(leased[0].id, "m1");
        let report = AttemptReport {
            message_id: "m1".into(),
            lease: leased[0].lease,
            at_ms: 2_100,
            smarthost: None,
            outcomes: vec![outcome("x@a.test", RecipientState::Delivered, "250 ok")],
            next_attempt_ms: None,
            dsn: None,
        };
        s.record_attempt("w", &report).await.unwrap();

        // Keeping everything deletes nothing.
        assert_eq!(s.purge(None, None).await.unwrap(), Purged::default());
        let purged = s.purge(Some(50_000), Some(50_000)).await.unwrap();
        assert_eq!(
            purged,
            Purged {
                decisions: 2,
                messages: 1
            }
        );
        assert!(s.message("m1").await.unwrap().is_none());
        assert!(s.message_status("m1").await.unwrap().is_none());
        assert!(
            s.message("m2").await.unwrap().is_some(),
            "queued messages stay"
        );
        assert!(
            s.decision("d-m2").await.unwrap().is_some(),
            "a kept message keeps its decision"
        );
        assert!(s.decision("d-new").await.unwrap().is_some());
        assert!(s.decision("d-old-refusal").await.unwrap().is_none());
        assert!(s.decision("d-m1").await.unwrap().is_none());
        // Its body and history went with it.
        let bodies: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM message_bodies")
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert_eq!(bodies, 1);
        let listed = s
            .list_queue(&QueueFilter {
                state: Some(MessageState::Delivered),
                limit: 10,
            })
            .await
            .unwrap();
        assert!(listed.is_empty());
    }

    #[tokio::test]
    async fn a_batch_of_attempts_is_recorded_together_and_a_lost_lease_only_loses_its_own() {
        let s = SqliteStore::in_memory().await.unwrap();
        for id in ["m1", "m2", "m3"] {
            s.accept_message(&msg(id, &["x@a.test"]), None)
                .await
                .unwrap();
        }
        let leased = s.lease_due("w1", 2_000, 1_000, 10).await.unwrap();
        assert_eq!(leased.len(), 3);
        // m2 was deleted meanwhile (an operator's `mailgate queue delete`).
        assert!(s.delete_message("m2").await.unwrap());
        let report = |id: &str, state, reply| AttemptReport {
            message_id: id.into(),
            lease: leased.iter().find(|m| m.id == id).unwrap().lease,
            at_ms: 2_100,
            smarthost: Some("sink".into()),
            outcomes: vec![outcome("x@a.test", state, reply)],
            next_attempt_ms: Some(60_000),
            dsn: None,
        };
        let got = s
            .record_attempts(
                "w1",
                &[
                    report("m1", RecipientState::Delivered, "250 ok"),
                    report("m2", RecipientState::Delivered, "250 ok"),
                    report("m3", RecipientState::Deferred, "451 later"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                Recorded::State(MessageState::Delivered),
                Recorded::LeaseLost,
                Recorded::State(MessageState::Deferred),
            ]
        );
        let m3 = s.message_status("m3").await.unwrap().unwrap();
        assert_eq!(m3.history.len(), 1);
        assert_eq!(m3.history[0].reply.as_deref(), Some("451 later"));
    }

    #[tokio::test]
    async fn a_lease_is_exclusive_until_it_expires() {
        let s = SqliteStore::in_memory().await.unwrap();
        s.accept_message(&msg("m1", &["x@a.test"]), None)
            .await
            .unwrap();
        let a = s.lease_due("w1", 2_000, 1_000, 10).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(
            a[0].recipients,
            vec![("x@a.test".to_owned(), RecipientState::Pending)]
        );
        // Another worker finds nothing while the lease runs...
        assert!(
            s.lease_due("w2", 2_500, 1_000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        // ...and takes it over once the first worker's lease expired (it crashed).
        let b = s.lease_due("w2", 3_000, 1_000, 10).await.unwrap();
        assert_eq!(b.len(), 1);
        // The crashed worker's late report is refused.
        let late = AttemptReport {
            message_id: "m1".into(),
            lease: a[0].lease,
            at_ms: 3_100,
            smarthost: None,
            outcomes: vec![outcome("x@a.test", RecipientState::Delivered, "250 ok")],
            next_attempt_ms: None,
            dsn: None,
        };
        assert_eq!(
            s.record_attempt("w1", &late).await.unwrap(),
            Recorded::LeaseLost
        );
        assert_eq!(
            s.record_attempt("w2", &late).await.unwrap(),
            Recorded::LeaseLost,
            "the new holder's name with the old lease"
        );
        assert_eq!(
            s.record_attempt(
                "w2",
                &AttemptReport {
                    lease: b[0].lease,
                    ..late
                }
            )
            .await
            .unwrap(),
            Recorded::State(MessageState::Delivered)
        );
        assert!(
            s.lease_due("w3", 99_000, 1_000, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn per_recipient_outcomes_and_history() {
        let s = SqliteStore::in_memory().await.unwrap();
        s.accept_message(
            &msg("m1", &["ok@a.test", "no@a.test", "later@a.test"]),
            None,
        )
        .await
        .unwrap();
        let leased = s.lease_due("w", 2_000, 60_000, 10).await.unwrap();
        assert_eq!(leased[0].recipients.len(), 3);
        let mut dsn = msg("dsn1", &["a@example.com"]);
        dsn.envelope_from = String::new();
        dsn.door = "dsn".into();
        let r = s
            .record_attempt(
                "w",
                &AttemptReport {
                    message_id: "m1".into(),
                    lease: leased[0].lease,
                    at_ms: 2_100,
                    smarthost: Some("up".into()),
                    outcomes: vec![
                        outcome("ok@a.test", RecipientState::Delivered, "250 2.0.0 ok"),
                        outcome(
                            "no@a.test",
                            RecipientState::Failed,
                            "550 5.1.1 no such user",
                        ),
                        outcome("later@a.test", RecipientState::Deferred, "451 4.3.0 later"),
                    ],
                    next_attempt_ms: Some(10_000),
                    dsn: Some(dsn),
                },
            )
            .await
            .unwrap();
        assert_eq!(r, Recorded::State(MessageState::Deferred));
        // Not due before next_attempt_ms; then only the deferred recipient is left.
        assert!(s.lease_due("w", 9_999, 60_000, 10).await.unwrap().len() == 1); // the DSN
        let again = s.lease_due("w", 10_000, 60_000, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].recipients,
            vec![("later@a.test".to_owned(), RecipientState::Deferred)]
        );
        let st = s.message_status("m1").await.unwrap().unwrap();
        assert_eq!(st.entry.state, MessageState::Deferred);
        assert_eq!(st.history.len(), 3);
        let no = st
            .recipient_status
            .iter()
            .find(|r| r.recipient == "no@a.test")
            .unwrap();
        assert_eq!(no.state, RecipientState::Failed);
        assert_eq!(no.last_reply.as_deref(), Some("550 5.1.1 no such user"));
        assert_eq!(no.code.as_deref(), Some("upstream.refused"));
        let dsn = s.message_status("dsn1").await.unwrap().unwrap();
        assert_eq!(dsn.door, "dsn");
        assert_eq!(dsn.entry.envelope_from, "");
    }

    #[tokio::test]
    async fn held_messages_are_released_at_hold_until() {
        let s = SqliteStore::in_memory().await.unwrap();
        let mut m = msg("h", &["x@a.test"]);
        m.state = MessageState::Held;
        m.hold_until_ms = Some(5_000);
        s.accept_message(&m, None).await.unwrap();
        assert_eq!(s.next_due_ms().await.unwrap(), Some(5_000));
        assert_eq!(s.release_held(4_999).await.unwrap(), 0);
        assert!(s.lease_due("w", 4_999, 10, 10).await.unwrap().is_empty());
        assert_eq!(s.release_held(5_000).await.unwrap(), 1);
        assert_eq!(s.lease_due("w", 5_000, 10, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn capture_retry_delete_and_listing() {
        let s = SqliteStore::in_memory().await.unwrap();
        s.accept_message(&msg("c", &["x@a.test"]), None)
            .await
            .unwrap();
        s.accept_message(&msg("f", &["y@a.test"]), None)
            .await
            .unwrap();
        let leased = s.lease_due("w", 2_000, 1_000, 10).await.unwrap();
        let lease = |id: &str| leased.iter().find(|m| m.id == id).unwrap().lease;
        assert_eq!(
            s.mark_captured("w", "c", lease("c"), 2_000).await.unwrap(),
            Recorded::State(MessageState::Captured)
        );
        s.record_attempt(
            "w",
            &AttemptReport {
                message_id: "f".into(),
                lease: lease("f"),
                at_ms: 2_000,
                smarthost: None,
                outcomes: vec![outcome("y@a.test", RecipientState::Failed, "550 no")],
                next_attempt_ms: None,
                dsn: None,
            },
        )
        .await
        .unwrap();
        let captured = s.list_captured(10).await.unwrap();
        assert_eq!(captured.len(), 1);
        assert_eq!(captured[0].captured_at_ms, Some(2_000));
        assert!(s.captured_message("c").await.unwrap().is_some());
        assert!(s.captured_message("f").await.unwrap().is_none());
        let listed = s.list_queue(&QueueFilter::default()).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, MessageState::Failed);
        assert_eq!(
            s.retry_message("c", 3_000).await.unwrap(),
            RetryOutcome::Final(MessageState::Captured)
        );
        assert_eq!(
            s.retry_message("f", 3_000).await.unwrap(),
            RetryOutcome::Requeued
        );
        let again = s.lease_due("w", 3_000, 1_000, 10).await.unwrap();
        assert_eq!(
            again[0].recipients,
            vec![("y@a.test".to_owned(), RecipientState::Pending)]
        );
        assert!(s.delete_message("f").await.unwrap());
        assert!(!s.delete_message("f").await.unwrap());
        assert_eq!(
            s.retry_message("f", 3_000).await.unwrap(),
            RetryOutcome::NotFound
        );
    }
}
