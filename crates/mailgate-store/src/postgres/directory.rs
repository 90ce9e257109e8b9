//! [`Store`] on PostgreSQL: the directory (objects, a generation, an audit log), nodes, admin
//! tokens, decisions (day partitions), usage, acceptance and retention.
//!
//! Every write here is its own transaction, committed before the call returns (durable with the
//! server's `synchronous_commit = on`). Decisions are written one statement each: batching them
//! with acceptances (issue 16 item 6, group commit as `sqlite/group.rs` does) is not done yet, so
//! [`Store::enqueue_decision`] is a durable write like [`Store::record_decision`] and
//! [`Store::flush`] has nothing to wait for.

use async_trait::async_trait;
use mailgate_core::directory::{Directory, Kind, Object};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{OrStore, PgStore, now_ms};
use crate::{
    AuditAction, AuditEntry, Changeset, DecisionSummary, MessageState, MessageSummary, NewMessage,
    NodeState, Purged, Snapshot, Store, StoreError, StoredDecision, StoredVerdict, TraceJson,
    UsageEntry, UsageReplay,
};

/// Rows retention deletes per statement: each slice is a short transaction, so senders never
/// wait long behind it.
const PURGE_SLICE: i64 = 1000;

/// How far back [`Store::recent_refusals`] looks (decisions, newest first).
const RECENT_WINDOW: i64 = 100_000;

fn now_secs() -> i64 {
    now_ms() / 1000
}

/// Inserts an accepted message (or a DSN) and its body inside `tx`.
pub(crate) async fn insert_message(
    tx: &mut sqlx::PgConnection,
    m: &NewMessage,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO messages (id, decision_id, accepted_at_ms, door, principal, envelope_from,
                               recipients, size, state, hold_until_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&m.id)
    .bind(&m.decision_id)
    .bind(m.accepted_at_ms)
    .bind(&m.door)
    .bind(&m.principal)
    .bind(&m.envelope_from)
    .bind(&m.recipients)
    .bind(m.raw.len() as i64)
    .bind(m.state.as_str())
    .bind(m.hold_until_ms)
    .execute(&mut *tx)
    .await
    .or_store()?;
    sqlx::query("INSERT INTO message_bodies (message_id, raw) VALUES ($1, $2)")
        .bind(&m.id)
        .bind(&m.raw)
        .execute(&mut *tx)
        .await
        .or_store()?;
    Ok(())
}

/// Appends a send to the usage log and moves the rate state forward (never back), inside `tx`.
async fn insert_usage(
    tx: &mut sqlx::PgConnection,
    principal: &str,
    entry: UsageEntry,
    rate_tat_ms: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO usage_log (principal, at_ms, recipients) VALUES ($1, $2, $3)")
        .bind(principal)
        .bind(entry.at_ms)
        .bind(entry.recipients)
        .execute(&mut *tx)
        .await
        .or_store()?;
    if let Some(tat) = rate_tat_ms {
        sqlx::query(
            "INSERT INTO rate_state (principal, tat_ms) VALUES ($1, $2)
             ON CONFLICT (principal) DO UPDATE
                 SET tat_ms = GREATEST(rate_state.tat_ms, excluded.tat_ms)",
        )
        .bind(principal)
        .bind(tat)
        .execute(&mut *tx)
        .await
        .or_store()?;
    }
    Ok(())
}

fn decision_of(row: &PgRow) -> Result<StoredDecision, StoreError> {
    let verdict: String = row.try_get("verdict").or_store()?;
    Ok(StoredDecision {
        id: row.try_get("id").or_store()?,
        at_ms: row.try_get("at_ms").or_store()?,
        door: row.try_get("door").or_store()?,
        principal: row.try_get("principal").or_store()?,
        verdict: StoredVerdict::parse(&verdict)
            .ok_or_else(|| StoreError::corrupt(format!("unknown verdict `{verdict}`")))?,
        code: row.try_get("code").or_store()?,
        body: TraceJson(row.try_get("body").or_store()?),
    })
}

impl PgStore {
    async fn insert_decision(&self, d: &StoredDecision) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO decisions (id, at_ms, door, principal, verdict, code, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&d.id)
        .bind(d.at_ms)
        .bind(&d.door)
        .bind(&d.principal)
        .bind(d.verdict.as_str())
        .bind(&d.code)
        .bind(d.body.as_bytes())
        .execute(&self.pool)
        .await
        .or_store()?;
        Ok(())
    }

    /// Retention of decisions taken before `before` that no remaining message names: whole day
    /// partitions first (dropped when nothing in them is named), then row by row in slices
    /// (the default partition, the day `before` falls in, partitions a message still names).
    async fn purge_decisions(&self, before: i64) -> Result<u64, StoreError> {
        let mut purged = 0;
        // Day partitions that end at or before the cutoff (their name is their UTC day).
        let old: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'decisions'::regclass AND c.relname ~ '^decisions_d[0-9]{8}$'
               AND (extract(epoch FROM to_date(substr(c.relname, 12), 'YYYYMMDD'))::bigint
                    + 86400) * 1000 <= $1
             ORDER BY 1",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        for name in old {
            let mut tx = self.pool.begin().await.or_store()?;
            // The name comes from pg_class and matches the pattern above: safe to quote in.
            let named: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM \"{name}\" d JOIN messages m ON m.decision_id = d.id)"
            )))
            .fetch_one(&mut *tx)
            .await
            .or_store()?;
            if named {
                continue; // emptied row by row below, dropped by a later purge
            }
            let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM \"{name}\""
            )))
            .fetch_one(&mut *tx)
            .await
            .or_store()?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE \"{name}\"")))
                .execute(&mut *tx)
                .await
                .or_store()?;
            tx.commit().await.or_store()?;
            purged += rows as u64;
        }
        loop {
            let n = sqlx::query(
                "DELETE FROM decisions WHERE (id, at_ms) IN (
                     SELECT d.id, d.at_ms FROM decisions d
                     WHERE d.at_ms < $1
                       AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.decision_id = d.id)
                     LIMIT $2)",
            )
            .bind(before)
            .bind(PURGE_SLICE)
            .execute(&self.pool)
            .await
            .or_store()?
            .rows_affected();
            purged += n;
            if (n as i64) < PURGE_SLICE {
                break;
            }
        }
        Ok(purged)
    }
}

#[async_trait]
impl Store for PgStore {
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // One REPEATABLE READ transaction: the objects and the generation are one commit's.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .or_store()?;
        let generation: i64 =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'directory_generation'")
                .fetch_one(&mut *tx)
                .await
                .or_store()?;
        let rows = sqlx::query("SELECT kind, id, body FROM directory_objects ORDER BY seq")
            .fetch_all(&mut *tx)
            .await
            .or_store()?;
        tx.commit().await.or_store()?;
        let mut objects = Vec::with_capacity(rows.len());
        for row in rows {
            let kind: String = row.try_get("kind").or_store()?;
            let kind = Kind::from_section(&kind).ok_or_else(|| {
                StoreError::corrupt(format!("stored object of unknown kind `{kind}`"))
            })?;
            let body: String = row.try_get("body").or_store()?;
            objects.push(Object {
                kind,
                id: row.try_get("id").or_store()?,
                body: serde_json::from_str(&body).or_store()?,
            });
        }
        Ok(Snapshot {
            directory: Directory::from_objects(objects)?,
            generation,
        })
    }

    async fn generation(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'directory_generation'")
            .fetch_one(&self.pool)
            .await
            .or_store()
    }

    async fn commit(
        &self,
        expected_generation: i64,
        changes: &Changeset,
        actor: &str,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await.or_store()?;
        // The generation row's lock serialises writers: the check below and the change are one
        // step, whatever other nodes commit.
        let found: i64 = sqlx::query_scalar(
            "SELECT value FROM meta WHERE key = 'directory_generation' FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await
        .or_store()?;
        if found != expected_generation {
            return Err(StoreError::Conflict {
                expected: expected_generation,
                found,
            });
        }
        if changes.is_empty() {
            return Ok(found);
        }
        let generation = found + 1;
        let now = now_ms();
        let mut audit = Vec::with_capacity(changes.upserts.len() + changes.deletes.len());
        for o in &changes.upserts {
            // xmax is 0 on a row this statement inserted, not on one it updated.
            let inserted: bool = sqlx::query_scalar(
                "INSERT INTO directory_objects (kind, id, body, updated_at_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (kind, id) DO UPDATE
                     SET body = excluded.body, updated_at_ms = excluded.updated_at_ms
                 RETURNING (xmax = 0)",
            )
            .bind(o.kind.section())
            .bind(&o.id)
            .bind(o.body.to_string())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .or_store()?;
            let action = if inserted {
                AuditAction::Create
            } else {
                AuditAction::Update
            };
            audit.push((action, o.kind, o.id.as_str()));
        }
        for (kind, id) in &changes.deletes {
            sqlx::query("DELETE FROM directory_objects WHERE kind = $1 AND id = $2")
                .bind(kind.section())
                .bind(id)
                .execute(&mut *tx)
                .await
                .or_store()?;
            audit.push((AuditAction::Delete, *kind, id.as_str()));
        }
        for (action, kind, id) in audit {
            sqlx::query(
                "INSERT INTO directory_audit (at_secs, actor, action, kind, id, generation)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(now / 1000)
            .bind(actor)
            .bind(action.as_str())
            .bind(kind.section())
            .bind(id)
            .bind(generation)
            .execute(&mut *tx)
            .await
            .or_store()?;
        }
        sqlx::query("UPDATE meta SET value = $1 WHERE key = 'directory_generation'")
            .bind(generation)
            .execute(&mut *tx)
            .await
            .or_store()?;
        tx.commit().await.or_store()?;
        tracing::info!(
            generation,
            actor,
            upserts = changes.upserts.len(),
            deletes = changes.deletes.len(),
            "directory changed"
        );
        Ok(generation)
    }

    async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at_secs, actor, action, kind, id, generation FROM directory_audit
             ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        rows.iter()
            .map(|row| {
                let action: String = row.try_get("action").or_store()?;
                let kind: String = row.try_get("kind").or_store()?;
                Ok(AuditEntry {
                    at_secs: row.try_get("at_secs").or_store()?,
                    actor: row.try_get("actor").or_store()?,
                    action: AuditAction::parse(&action)
                        .ok_or_else(|| StoreError::Corrupt(format!("audit action `{action}`")))?,
                    kind: Kind::from_section(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("audit kind `{kind}`")))?,
                    id: row.try_get("id").or_store()?,
                    generation: row.try_get("generation").or_store()?,
                })
            })
            .collect()
    }

    async fn node_seen(&self, node: &NodeState) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (id, host, pid, generation, seen_ms, interval_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
                 generation = excluded.generation, seen_ms = excluded.seen_ms,
                 interval_ms = excluded.interval_ms",
        )
        .bind(&node.id)
        .bind(&node.host)
        .bind(i64::from(node.pid))
        .bind(node.generation)
        .bind(node.seen_ms)
        .bind(node.interval_ms)
        .execute(&self.pool)
        .await
        .or_store()?;
        Ok(())
    }

    async fn node_gone(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .or_store()?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeState>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, host, pid, generation, seen_ms, interval_ms FROM nodes ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        rows.iter()
            .map(|r| {
                Ok(NodeState {
                    id: r.try_get("id").or_store()?,
                    host: r.try_get("host").or_store()?,
                    pid: u32::try_from(r.try_get::<i64, _>("pid").or_store()?).unwrap_or(0),
                    generation: r.try_get("generation").or_store()?,
                    seen_ms: r.try_get("seen_ms").or_store()?,
                    interval_ms: r.try_get("interval_ms").or_store()?,
                })
            })
            .collect()
    }

    async fn add_admin_token(&self, name: &str, token_sha256: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO admin_tokens (name, token_sha256, created_at_secs) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE
                 SET token_sha256 = excluded.token_sha256, created_at_secs = excluded.created_at_secs",
        )
        .bind(name)
        .bind(token_sha256)
        .bind(now_secs())
        .execute(&self.pool)
        .await
        .or_store()?;
        Ok(())
    }

    async fn admin_token(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT name FROM admin_tokens WHERE token_sha256 = $1")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await
            .or_store()
    }

    async fn record_decision(&self, d: &StoredDecision) -> Result<(), StoreError> {
        self.insert_decision(d).await
    }

    async fn enqueue_decision(&self, d: StoredDecision) -> Result<(), StoreError> {
        // Durable when it returns: committed before anything this store accepts after it.
        self.insert_decision(&d).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every write was committed before its call returned: nothing is queued.
        Ok(())
    }

    async fn decision(&self, id: &str) -> Result<Option<StoredDecision>, StoreError> {
        let row = sqlx::query(
            "SELECT id, at_ms, door, principal, verdict, code, body FROM decisions
             WHERE id = $1 LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .or_store()?;
        row.as_ref().map(decision_of).transpose()
    }

    async fn recent_refusals(&self, limit: u32) -> Result<Vec<DecisionSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, door, principal, code FROM
               (SELECT id, at_ms, door, principal, verdict, code FROM decisions
                ORDER BY at_ms DESC, id DESC LIMIT $1) recent
             WHERE verdict = 'denied' ORDER BY at_ms DESC, id DESC LIMIT $2",
        )
        .bind(RECENT_WINDOW)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        rows.iter()
            .map(|row| {
                Ok(DecisionSummary {
                    id: row.try_get("id").or_store()?,
                    at_ms: row.try_get("at_ms").or_store()?,
                    door: row.try_get("door").or_store()?,
                    principal: row.try_get("principal").or_store()?,
                    code: row.try_get("code").or_store()?,
                })
            })
            .collect()
    }

    async fn record_usage(
        &self,
        principal: &str,
        entry: UsageEntry,
        rate_tat_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.or_store()?;
        insert_usage(&mut tx, principal, entry, rate_tat_ms).await?;
        tx.commit().await.or_store()
    }

    async fn usage_since(&self, since_ms: i64) -> Result<UsageReplay, StoreError> {
        sqlx::query("DELETE FROM usage_log WHERE at_ms < $1")
            .bind(since_ms)
            .execute(&self.pool)
            .await
            .or_store()?;
        let mut replay = UsageReplay::default();
        for row in sqlx::query(
            "SELECT principal, at_ms, recipients FROM usage_log WHERE at_ms >= $1
             ORDER BY at_ms, seq",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await
        .or_store()?
        {
            replay.sends.push((
                row.try_get("principal").or_store()?,
                UsageEntry {
                    at_ms: row.try_get("at_ms").or_store()?,
                    recipients: row.try_get("recipients").or_store()?,
                },
            ));
        }
        for row in sqlx::query("SELECT principal, tat_ms FROM rate_state ORDER BY principal")
            .fetch_all(&self.pool)
            .await
            .or_store()?
        {
            replay.rate_tat_ms.push((
                row.try_get("principal").or_store()?,
                row.try_get("tat_ms").or_store()?,
            ));
        }
        Ok(replay)
    }

    async fn accept_message(
        &self,
        m: &NewMessage,
        usage: Option<(UsageEntry, Option<i64>)>,
    ) -> Result<(), StoreError> {
        // The message, its body and the usage it consumes: one transaction, all or nothing.
        let mut tx = self.pool.begin().await.or_store()?;
        insert_message(&mut tx, m).await?;
        if let Some((entry, tat)) = usage {
            insert_usage(&mut tx, &m.principal, entry, tat).await?;
        }
        tx.commit().await.or_store()
    }

    async fn message(&self, id: &str) -> Result<Option<MessageSummary>, StoreError> {
        let row = sqlx::query(
            "SELECT id, decision_id, state, envelope_from, recipients, size, accepted_at_ms
             FROM messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .or_store()?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.try_get("state").or_store()?;
        Ok(Some(MessageSummary {
            id: row.try_get("id").or_store()?,
            decision_id: row.try_get("decision_id").or_store()?,
            state: MessageState::parse(&state)
                .ok_or_else(|| StoreError::corrupt(format!("unknown message state `{state}`")))?,
            envelope_from: row.try_get("envelope_from").or_store()?,
            recipients: row.try_get("recipients").or_store()?,
            size: row.try_get("size").or_store()?,
            accepted_at_ms: row.try_get("accepted_at_ms").or_store()?,
        }))
    }

    async fn purge(
        &self,
        decisions_before_ms: Option<i64>,
        messages_before_ms: Option<i64>,
    ) -> Result<Purged, StoreError> {
        let mut purged = Purged::default();
        if let Some(before) = messages_before_ms {
            // Bodies, recipients and history go with their message (ON DELETE CASCADE).
            loop {
                let n = sqlx::query(
                    "DELETE FROM messages WHERE id IN (
                         SELECT id FROM messages
                         WHERE state IN ('delivered', 'failed', 'captured')
                           AND COALESCE(done_at_ms, accepted_at_ms) < $1
                         LIMIT $2)",
                )
                .bind(before)
                .bind(PURGE_SLICE)
                .execute(&self.pool)
                .await
                .or_store()?
                .rows_affected();
                purged.messages += n;
                if (n as i64) < PURGE_SLICE {
                    break;
                }
            }
        }
        if let Some(before) = decisions_before_ms {
            purged.decisions = self.purge_decisions(before).await?;
        }
        Ok(purged)
    }
}
