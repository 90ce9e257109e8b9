//! [`Store`] on SQLite: the directory (one row per object, a generation, an audit log), nodes,
//! admin tokens, decisions, usage, acceptance (on the write thread, group-committed) and retention.

use async_trait::async_trait;
use mailgate_core::directory::{Directory, Kind, Object};
use sqlx::{Connection, Row};

use super::group::Op;
use super::{OrStore, SqliteStore, now_secs};
use crate::{
    AuditAction, AuditEntry, Changeset, DecisionSummary, MessageState, MessageSummary, NewMessage,
    NodeState, Purged, Snapshot, Store, StoreError, StoredDecision, UsageEntry, UsageReplay,
};

#[async_trait]
impl Store for SqliteStore {
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // One read transaction so the objects and the generation agree.
        let mut tx = self.pool.begin().await.or_store()?;
        let generation: i64 =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'directory_generation'")
                .fetch_one(&mut *tx)
                .await
                .or_store()?;
        let rows = sqlx::query("SELECT kind, id, body FROM directory_objects ORDER BY rowid")
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

    async fn node_seen(&self, node: &NodeState) -> Result<(), StoreError> {
        // Not worth an fsync: a row lost to a power cut is written again within seconds.
        let mut conn = self.relaxed_writer().await?;
        sqlx::query(
            "INSERT OR REPLACE INTO nodes (id, host, pid, generation, seen_ms, interval_ms)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&node.id)
        .bind(&node.host)
        .bind(i64::from(node.pid))
        .bind(node.generation)
        .bind(node.seen_ms)
        .bind(node.interval_ms)
        .execute(&mut *conn)
        .await
        .or_store()?;
        Ok(())
    }

    async fn node_gone(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.relaxed_writer().await?;
        sqlx::query("DELETE FROM nodes WHERE id = ?")
            .bind(id)
            .execute(&mut *conn)
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

    async fn generation(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'directory_generation'")
                .fetch_one(&self.pool)
                .await
                .or_store()?,
        )
    }

    async fn commit(
        &self,
        expected_generation: i64,
        changes: &Changeset,
        actor: &str,
    ) -> Result<i64, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.or_store()?;
        let found: i64 =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'directory_generation'")
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
        let now = now_secs();
        for o in &changes.upserts {
            let existed: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM directory_objects WHERE kind = ? AND id = ?")
                    .bind(o.kind.section())
                    .bind(&o.id)
                    .fetch_optional(&mut *tx)
                    .await
                    .or_store()?;
            sqlx::query(
                "INSERT INTO directory_objects (kind, id, body, updated_at) VALUES (?, ?, ?, ?)
                 ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            )
            .bind(o.kind.section())
            .bind(&o.id)
            .bind(o.body.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await.or_store()?;
            audit(
                &mut tx,
                now,
                actor,
                if existed.is_some() {
                    AuditAction::Update
                } else {
                    AuditAction::Create
                },
                o.kind,
                &o.id,
                generation,
            )
            .await?;
        }
        for (kind, id) in &changes.deletes {
            sqlx::query("DELETE FROM directory_objects WHERE kind = ? AND id = ?")
                .bind(kind.section())
                .bind(id)
                .execute(&mut *tx)
                .await
                .or_store()?;
            audit(
                &mut tx,
                now,
                actor,
                AuditAction::Delete,
                *kind,
                id,
                generation,
            )
            .await?;
        }
        sqlx::query("UPDATE meta SET value = ? WHERE key = 'directory_generation'")
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

    async fn add_admin_token(&self, name: &str, token_sha256: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO admin_tokens (name, token_sha256, created_at) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256, created_at = excluded.created_at",
        )
        .bind(name)
        .bind(token_sha256)
        .bind(now_secs())
        .execute(&self.writer)
        .await.or_store()?;
        Ok(())
    }

    async fn admin_token(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT name FROM admin_tokens WHERE token_sha256 = ?")
                .bind(token_sha256)
                .fetch_optional(&self.pool)
                .await
                .or_store()?,
        )
    }

    async fn record_decision(&self, d: &StoredDecision) -> Result<(), StoreError> {
        self.group.submit(Op::Decision(d.clone())).await
    }

    async fn enqueue_decision(&self, d: StoredDecision) -> Result<(), StoreError> {
        self.group.enqueue(Op::Decision(d)).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.group.submit(Op::Flush).await
    }

    async fn decision(&self, id: &str) -> Result<Option<StoredDecision>, StoreError> {
        match self.read_decision(id).await? {
            Some(d) => Ok(Some(d)),
            // It may still be queued for the writer: read your own writes.
            None => {
                self.flush().await?;
                self.read_decision(id).await
            }
        }
    }

    async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, actor, action, kind, id, generation FROM directory_audit
             ORDER BY seq DESC LIMIT ?",
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
                    at_secs: row.try_get("at").or_store()?,
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

    async fn recent_refusals(&self, limit: u32) -> Result<Vec<DecisionSummary>, StoreError> {
        // Queued refusals first; then a bounded walk down the time index.
        self.flush().await?;
        let rows = sqlx::query(
            "SELECT id, at_ms, door, principal, code FROM
               (SELECT id, at_ms, door, principal, verdict, code FROM decisions
                ORDER BY at_ms DESC LIMIT 100000)
             WHERE verdict = 'denied' ORDER BY at_ms DESC LIMIT ?",
        )
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
        let principal = principal.to_owned();
        self.group
            .call(false, move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .or_store()?;
                super::group::insert_usage(&tx, &principal, entry, rate_tat_ms)?;
                tx.commit().or_store()?;
                Ok(())
            })
            .await
    }

    async fn accept_message(
        &self,
        m: &NewMessage,
        usage: Option<(UsageEntry, Option<i64>)>,
    ) -> Result<(), StoreError> {
        self.group
            .submit(Op::Accept {
                message: m.clone(),
                usage,
            })
            .await
    }

    async fn message(&self, id: &str) -> Result<Option<MessageSummary>, StoreError> {
        let row = sqlx::query(
            "SELECT id, decision_id, state, envelope_from, recipients, size, accepted_at_ms FROM messages WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await.or_store()?;
        let Some(row) = row else { return Ok(None) };
        let recipients: String = row.try_get("recipients").or_store()?;
        Ok(Some(MessageSummary {
            id: row.try_get("id").or_store()?,
            decision_id: row.try_get("decision_id").or_store()?,
            state: {
                let s: String = row.try_get("state").or_store()?;
                MessageState::parse(&s)
                    .ok_or_else(|| StoreError::corrupt(format!("unknown message state `{s}`")))?
            },
            envelope_from: row.try_get("envelope_from").or_store()?,
            recipients: serde_json::from_str(&recipients).or_store()?,
            size: row.try_get("size").or_store()?,
            accepted_at_ms: row.try_get("accepted_at_ms").or_store()?,
        }))
    }

    async fn purge(
        &self,
        decisions_before_ms: Option<i64>,
        messages_before_ms: Option<i64>,
    ) -> Result<Purged, StoreError> {
        // In slices of 1,000 rows, each its own short transaction, so senders never wait long
        // for the write connection. Deletions need no fsync of their own (relaxed writer).
        const SLICE: i64 = 1000;
        let mut purged = Purged::default();
        if let Some(before) = messages_before_ms {
            loop {
                let mut conn = self.relaxed_writer().await?;
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.or_store()?;
                let ids: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM messages
                     WHERE state IN ('delivered', 'failed', 'captured')
                       AND COALESCE(done_at_ms, accepted_at_ms) < ?
                     LIMIT ?",
                )
                .bind(before)
                .bind(SLICE)
                .fetch_all(&mut *tx)
                .await
                .or_store()?;
                for id in &ids {
                    for table in [
                        "DELETE FROM message_bodies WHERE message_id = ?",
                        "DELETE FROM message_recipients WHERE message_id = ?",
                        "DELETE FROM delivery_attempts WHERE message_id = ?",
                        "DELETE FROM messages WHERE id = ?",
                    ] {
                        sqlx::query(table)
                            .bind(id)
                            .execute(&mut *tx)
                            .await
                            .or_store()?;
                    }
                }
                tx.commit().await.or_store()?;
                purged.messages += ids.len() as u64;
                if (ids.len() as i64) < SLICE {
                    break;
                }
            }
        }
        if let Some(before) = decisions_before_ms {
            loop {
                let mut conn = self.relaxed_writer().await?;
                let n = sqlx::query(
                    "DELETE FROM decisions WHERE rowid IN (
                         SELECT d.rowid FROM decisions d
                         WHERE d.at_ms < ?
                           AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.decision_id = d.id)
                         LIMIT ?)",
                )
                .bind(before)
                .bind(SLICE)
                .execute(&mut *conn)
                .await
                .or_store()?
                .rows_affected();
                purged.decisions += n;
                if (n as i64) < SLICE {
                    break;
                }
            }
        }
        Ok(purged)
    }

    async fn usage_since(&self, since_ms: i64) -> Result<UsageReplay, StoreError> {
        sqlx::query("DELETE FROM usage_log WHERE at_ms < ?")
            .bind(since_ms)
            .execute(&self.writer)
            .await
            .or_store()?;
        let rows = sqlx::query(
            "SELECT principal, at_ms, recipients FROM usage_log WHERE at_ms >= ? ORDER BY at_ms, seq",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await.or_store()?;
        let mut replay = UsageReplay::default();
        for row in rows {
            replay.sends.push((
                row.try_get("principal").or_store()?,
                UsageEntry {
                    at_ms: row.try_get("at_ms").or_store()?,
                    recipients: row.try_get("recipients").or_store()?,
                },
            ));
        }
        for row in sqlx::query("SELECT principal, tat_ms FROM rate_state")
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
}

async fn audit(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    at: i64,
    actor: &str,
    action: AuditAction,
    kind: Kind,
    id: &str,
    generation: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO directory_audit (at, actor, action, kind, id, generation) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(at)
    .bind(actor)
    .bind(action.as_str())
    .bind(kind.section())
    .bind(id)
    .bind(generation)
    .execute(&mut **tx)
    .await.or_store()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoredVerdict;
    use mailgate_core::directory::{Domain, User, UserStatus};

    fn sample() -> Directory {
        let mut d = Directory::default();
        d.domains.push(Domain {
            name: "example.com".into(),
            verified: true,
            verification_token: None,
        });
        d.users.push(User::new("alice@example.com"));
        d
    }

    #[tokio::test]
    async fn commit_then_snapshot_round_trips() {
        let store = SqliteStore::in_memory().await.unwrap();
        let empty = store.snapshot().await.unwrap();
        assert_eq!(empty.generation, 0);
        let cs = Changeset::between(&empty.directory, &sample());
        let g = store.commit(0, &cs, "test").await.unwrap();
        assert_eq!(g, 1);
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.directory, sample());
        assert_eq!(store.generation().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn stale_writers_are_refused_and_nothing_changes() {
        let store = SqliteStore::in_memory().await.unwrap();
        let cs = Changeset::between(&Directory::default(), &sample());
        store.commit(0, &cs, "first").await.unwrap();
        let mut changed = sample();
        changed.users[0].status = UserStatus::Suspended;
        let cs2 = Changeset::between(&Directory::default(), &changed);
        let err = store.commit(0, &cs2, "stale").await.unwrap_err();
        assert!(matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                found: 1
            }
        ));
        assert_eq!(store.snapshot().await.unwrap().directory, sample());
    }

    #[tokio::test]
    async fn deletes_remove_objects() {
        let store = SqliteStore::in_memory().await.unwrap();
        store
            .commit(
                0,
                &Changeset::between(&Directory::default(), &sample()),
                "t",
            )
            .await
            .unwrap();
        let mut smaller = sample();
        smaller.users.clear();
        let cs = Changeset::between(&sample(), &smaller);
        assert_eq!(
            cs.deletes,
            vec![(Kind::User, "alice@example.com".to_owned())]
        );
        store.commit(1, &cs, "t").await.unwrap();
        assert!(store.snapshot().await.unwrap().directory.users.is_empty());
    }

    #[tokio::test]
    async fn recent_refusals_are_the_newest_denials_first() {
        let store = SqliteStore::in_memory().await.unwrap();
        for (i, verdict) in ["denied", "allowed", "denied", "denied"].iter().enumerate() {
            let denied = *verdict == "denied";
            store
                .enqueue_decision(StoredDecision {
                    id: format!("01D{i}"),
                    at_ms: 10 + i as i64,
                    door: "sendgrid".into(),
                    principal: "alice@example.com".into(),
                    verdict: StoredVerdict::parse(verdict).unwrap(),
                    code: denied.then(|| "sender.not_owned".into()),
                    body: serde_json::json!({}).into(),
                })
                .await
                .unwrap();
        }
        // Queued, not yet durable: still listed.
        let ids: Vec<String> = store
            .recent_refusals(2)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, ["01D3", "01D2"]);
        let all = store.recent_refusals(10).await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].code.as_deref(), Some("sender.not_owned"));
    }

    #[tokio::test]
    async fn decisions_are_kept_and_found_by_id() {
        let store = SqliteStore::in_memory().await.unwrap();
        let d = StoredDecision {
            id: "01TEST".into(),
            at_ms: 5,
            door: "smtp".into(),
            principal: "alice@example.com".into(),
            verdict: StoredVerdict::Denied,
            code: Some("account.suspended".into()),
            body: serde_json::json!({"checks": [1, 2]}).into(),
        };
        store.record_decision(&d).await.unwrap();
        assert_eq!(store.decision("01TEST").await.unwrap(), Some(d.clone()));
        assert_eq!(store.decision("nope").await.unwrap(), None);
        // Stored packed, not as JSON text.
        let class: String =
            sqlx::query_scalar("SELECT typeof(body) FROM decisions WHERE id = '01TEST'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(class, "blob");
        // A trace kept before packing (JSON text) still reads.
        sqlx::query(
            "INSERT INTO decisions (id, at_ms, door, principal, verdict, code, body)
             VALUES ('01OLD', 5, 'smtp', 'alice@example.com', 'denied', 'account.suspended', ?)",
        )
        .bind(String::from_utf8(d.body.0.clone()).unwrap())
        .execute(store.writer())
        .await
        .unwrap();
        let old = store.decision("01OLD").await.unwrap().unwrap();
        assert_eq!(old.body.parse().unwrap(), d.body.parse().unwrap());
    }

    /// A database migrated by a newer Mailgate (a migration this binary does not have) is
    /// refused with `SchemaTooNew`, not opened and not "migrated" back.
    #[tokio::test]
    async fn a_schema_newer_than_the_binary_is_refused_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let s = SqliteStore::open(&path).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (99990101000000, 'from the future', 1, x'00', 0)",
        )
        .execute(s.writer())
        .await
        .unwrap();
        drop(s);
        let e = SqliteStore::open(&path).await.unwrap_err();
        assert!(matches!(e, StoreError::SchemaTooNew(_)), "{e:?}");
        assert!(!e.is_temporary());
        assert!(e.to_string().contains("newer"), "{e}");
    }

    #[tokio::test]
    async fn usage_survives_reopening_and_old_sends_drop_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let s = SqliteStore::open(&path).await.unwrap();
            let e = |at_ms| UsageEntry {
                at_ms,
                recipients: 2,
            };
            s.record_usage("a", e(100), Some(1_000)).await.unwrap();
            s.record_usage("a", e(200), Some(900)).await.unwrap();
            s.record_usage("b", e(300), None).await.unwrap();
        }
        let s = SqliteStore::open(&path).await.unwrap();
        let r = s.usage_since(150).await.unwrap();
        assert_eq!(
            r.sends,
            vec![
                (
                    "a".to_owned(),
                    UsageEntry {
                        at_ms: 200,
                        recipients: 2
                    }
                ),
                (
                    "b".to_owned(),
                    UsageEntry {
                        at_ms: 300,
                        recipients: 2
                    }
                ),
            ]
        );
        // The rate state only moves forward.
        assert_eq!(r.rate_tat_ms, vec![("a".to_owned(), 1_000)]);
    }

    #[tokio::test]
    async fn file_store_is_shared_between_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let a = SqliteStore::open(&path).await.unwrap();
        let b = SqliteStore::open(&path).await.unwrap();
        a.commit(
            0,
            &Changeset::between(&Directory::default(), &sample()),
            "a",
        )
        .await
        .unwrap();
        assert_eq!(b.generation().await.unwrap(), 1);
        assert_eq!(b.snapshot().await.unwrap().directory, sample());
    }
}
