//! [`Store`] on PostgreSQL: the directory (objects, a generation, an audit log), nodes, admin
//! tokens, decisions (day partitions), usage, acceptance and retention.
//!
//! Every write here is its own transaction, committed before the call returns (durable with the
//! server's `synchronous_commit = on`), except [`Store::enqueue_decision`]: those decisions are
//! group-committed by the writer task of `decisions.rs` (one statement per batch), and an
//! acceptance writes its own decision in its transaction when it is still pending, so the
//! decision is durable no later than the message. [`Store::decision`] finds a pending decision
//! at once, and looks a decision id up only in the day partitions its time can be in.

use async_trait::async_trait;
use mailgate_core::directory::{Directory, Kind, Object};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::decisions::{self, Claim};
use super::{OrStore, PgStore, now_ms};
use crate::{
    AuditAction, AuditEntry, Changeset, DecisionSummary, MessageState, MessageSummary, NewMessage,
    NodeState, Purged, Snapshot, Store, StoreError, StoredDecision, StoredVerdict, TraceJson,
    UsageEntry, UsageReplay,
};

/// Rows retention deletes per statement: each slice is a short transaction, so senders never
/// wait long behind it.
const PURGE_SLICE: i64 = 1000;

/// Longest wait for a table lock in retention's DDL (making and dropping decision partitions).
const LOCK_WAIT_MS: u64 = 500;

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

/// Where a decision id's own time says its row is: the `at_ms` range to look in, so the planner
/// prunes every other day partition. Decision ids (`mailgate_gateway::new_decision_id`) are
/// ULID-shaped: 26 Crockford base-32 digits whose first 10 are the Unix milliseconds it was made
/// at, which the gateway stores as `at_ms`; the range allows a minute either way. `None` for any
/// other id (looked up in every partition).
pub(crate) fn decision_time_range(id: &str) -> Option<(i64, i64)> {
    const SLACK_MS: i64 = 60_000;
    let bytes = id.as_bytes();
    if bytes.len() != 26 {
        return None;
    }
    let mut ms: i64 = 0;
    for (i, b) in bytes.iter().enumerate() {
        let digit = match b.to_ascii_uppercase() {
            c @ b'0'..=b'9' => c - b'0',
            c @ b'A'..=b'H' => c - b'A' + 10,
            b'J' => 18,
            b'K' => 19,
            b'M' => 20,
            b'N' => 21,
            c @ b'P'..=b'T' => c - b'P' + 22,
            c @ b'V'..=b'Z' => c - b'V' + 27,
            _ => return None,
        };
        if i == 0 && digit > 7 {
            return None; // 130 bits of digits for 128 bits: the first holds 3
        }
        if i < 10 {
            ms = (ms << 5) | i64::from(digit);
        }
    }
    Some((ms - SLACK_MS, ms + SLACK_MS))
}

impl PgStore {
    /// Writes the pending decision of an accepted message inside the acceptance's transaction
    /// `tx` (nothing when it is not pending: the writer committed it, or it was recorded). Call
    /// [`Claim::committed`] on the result after `tx` committed.
    pub(crate) async fn flush_decisions(
        &self,
        tx: &mut sqlx::PgConnection,
        decision_id: &str,
    ) -> Result<Claim, StoreError> {
        let claim = self.decisions.claim(decision_id);
        if let Some(d) = claim.decision() {
            decisions::insert_decisions(&mut *tx, std::slice::from_ref(d)).await?;
        }
        Ok(claim)
    }

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

    /// Makes the decision partitions of today and the coming days that are missing. Creating one
    /// locks the parent table: with a short lock timeout, so senders never queue behind it for
    /// long (a miss is logged and tried again at the next purge).
    async fn partitions_ahead(&self) {
        let made = async {
            let mut tx = self.pool.begin().await.or_store()?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = '{}ms'",
                LOCK_WAIT_MS
            )))
            .execute(&mut *tx)
            .await
            .or_store()?;
            sqlx::query("SELECT mailgate_decision_partitions($1, $2)")
                .bind(now_ms())
                .bind(super::PARTITION_DAYS_AHEAD)
                .execute(&mut *tx)
                .await
                .or_store()?;
            tx.commit().await.or_store()
        };
        if let Err(e) = made.await {
            tracing::warn!(error = %e, "could not make the coming days' decision partitions; retention tries again later");
        }
    }

    /// Drops the day partition `name` whole unless a remaining message names a decision in it
    /// (`None` then). Returns how many decisions went with it. The drop locks the parent table:
    /// with a short lock timeout, so a long transaction elsewhere makes retention try again
    /// later instead of making every sender wait behind the drop.
    async fn drop_partition(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await.or_store()?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{}ms'",
            LOCK_WAIT_MS
        )))
        .execute(&mut *tx)
        .await
        .or_store()?;
        // The name comes from pg_class and matches `decisions_dYYYYMMDD`: safe to quote in.
        let named: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM \"{name}\" d JOIN messages m ON m.decision_id = d.id)"
        )))
        .fetch_one(&mut *tx)
        .await
        .or_store()?;
        if named {
            return Ok(None);
        }
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{name}\""
        )))
        .fetch_one(&mut *tx)
        .await
        .or_store()?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS \"{name}\""
        )))
        .execute(&mut *tx)
        .await
        .or_store()?;
        tx.commit().await.or_store()?;
        Ok(Some(rows as u64))
    }

    /// Retention of decisions taken before `before` that no remaining message names: whole day
    /// partitions first (dropped when nothing in them is named), then row by row in slices
    /// (the default partition, the day `before` falls in, partitions a message still names).
    /// It also makes the coming days' partitions (a node serving for weeks without a restart
    /// would otherwise fill the default partition).
    async fn purge_decisions(&self, before: i64) -> Result<u64, StoreError> {
        let mut purged = 0;
        self.partitions_ahead().await;
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
            match self.drop_partition(&name).await {
                Ok(Some(rows)) => purged += rows,
                Ok(None) => {} // named: emptied row by row below, dropped by a later purge
                Err(e) => {
                    // Busy (the lock was not free within LOCK_WAIT) or dropped by another node
                    // a moment ago: its rows go row by row below, or at the next purge.
                    tracing::warn!(partition = %name, error = %e, "could not drop a decision partition; retention tries again later");
                }
            }
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
    fn spawn_change_listener(
        &self,
        changed: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let pool = self.pool.clone();
        Some(tokio::spawn(async move {
            super::changes::listen(&pool, changed).await
        }))
    }

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
        // Durable when it returns: its own statement (explanations come one at a time).
        self.insert_decision(d).await
    }

    async fn enqueue_decision(&self, d: StoredDecision) -> Result<(), StoreError> {
        // Pending (found at once), then group-committed by the writer or by the acceptance
        // that names it; waits only for room in the bounded queue.
        self.decisions.enqueue(d).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.decisions.flush().await
    }

    async fn decision(&self, id: &str) -> Result<Option<StoredDecision>, StoreError> {
        if let Some(d) = self.decisions.get(id) {
            return Ok(Some(d));
        }
        // First where the id's time puts it (one or two day partitions), then anywhere: a row
        // kept under another time is still found, at the cost of probing every partition only
        // for an id that is nowhere near its own time, or nowhere.
        if let Some((from, to)) = decision_time_range(id) {
            let row = sqlx::query(
                "SELECT id, at_ms, door, principal, verdict, code, body FROM decisions
                 WHERE id = $1 AND at_ms >= $2 AND at_ms <= $3 LIMIT 1",
            )
            .bind(id)
            .bind(from)
            .bind(to)
            .fetch_optional(&self.pool)
            .await
            .or_store()?;
            if let Some(row) = row {
                return decision_of(&row).map(Some);
            }
        }
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
        // Refusals still queued count too.
        self.decisions.flush().await?;
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
        // Its decision, if still pending, is durable with it (`decisions.rs`).
        let decision = self.flush_decisions(&mut tx, &m.decision_id).await?;
        insert_message(&mut tx, m).await?;
        if let Some((entry, tat)) = usage {
            insert_usage(&mut tx, &m.principal, entry, tat).await?;
        }
        tx.commit().await.or_store()?;
        decision.committed();
        Ok(())
    }

    fn shared_counters(&self) -> Option<&dyn crate::CounterStore> {
        Some(self)
    }

    async fn accept_admitted(
        &self,
        m: &NewMessage,
        slot: crate::SendSlot,
    ) -> Result<(), StoreError> {
        self.accept_admitted_message(m, slot).await
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

#[cfg(test)]
mod tests {
    use super::decision_time_range;

    /// The ULID specification's id made at 1469918176385 ms (`ulid(1469918176385)`); ids of
    /// another shape have no time.
    #[test]
    fn a_decision_ids_time_is_read_from_its_first_ten_digits() {
        let (from, to) = decision_time_range("01ARYZ6S41TSV4RRFFQ69G5FAV").unwrap();
        assert_eq!((from + to) / 2, 1_469_918_176_385);
        assert_eq!(to - from, 120_000);
        assert_eq!(
            decision_time_range("01aryz6s41tsv4rrffq69g5fav"),
            Some((from, to))
        );
        for other in [
            "",
            "01TEST",
            "d-m1",
            "81ARZ3NDEKTSV4RRFFQ69G5FAV",  // more than 128 bits
            "01ARZ3NDEKTSV4RRFFQ69G5FAU",  // U is no Crockford digit
            "01ARZ3NDEKTSV4RRFFQ69G5FAV1", // 27 digits
        ] {
            assert_eq!(decision_time_range(other), None, "{other}");
        }
    }
}
