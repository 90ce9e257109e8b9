//! [`LockoutStore`] on SQLite: the `auth_failures` table (migration 0018), written on the rare-writes
//! connection (one writer at a time, so concurrent counts add up). The same statements as
//! PostgreSQL's (`postgres/lockout.rs`) in SQLite's dialect.

use async_trait::async_trait;

use super::{OrStore, SqliteStore};
use crate::StoreError;
use crate::lockout::{Counted, LockoutRule, LockoutStore, check_key};

/// A row not locked at `now` whose last failure or lock ended `forget` ms or more before `now`
/// (both placeholders).
fn forgotten(now: &str, forget: &str) -> String {
    format!(
        "((locked_until_ms IS NULL OR locked_until_ms <= {now})
          AND MAX(last_ms, COALESCE(locked_until_ms, 0)) + {forget} <= {now})"
    )
}

/// Keys one `locked_until` call may ask about.
const MAX_KEYS: usize = 16;

impl SqliteStore {
    /// Makes room for one new row under `rule.max_rows`: forgotten rows go first, then the
    /// oldest that are not locked (those that never locked first), down to 90 % of the cap.
    async fn auth_failures_room(
        &self,
        rule: &LockoutRule,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let cap = i64::try_from(rule.max_rows).unwrap_or(i64::MAX);
        let count = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM auth_failures")
                .fetch_one(self.writer())
                .await
                .or_store()
        };
        if count().await? < cap {
            return Ok(true);
        }
        if cap == 0 {
            return Ok(false);
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM auth_failures WHERE {}",
            forgotten("?1", "?2")
        )))
        .bind(now_ms)
        .bind(rule.forget_after_ms)
        .execute(self.writer())
        .await
        .or_store()?;
        let n = count().await?;
        if n < cap {
            return Ok(true);
        }
        sqlx::query(
            "DELETE FROM auth_failures WHERE key IN (
                 SELECT key FROM auth_failures
                 WHERE locked_until_ms IS NULL OR locked_until_ms <= ?1
                 ORDER BY (locked_until_ms IS NOT NULL), last_ms LIMIT ?2)",
        )
        .bind(now_ms)
        .bind(n - (cap - cap / 10))
        .execute(self.writer())
        .await
        .or_store()?;
        Ok(count().await? < cap)
    }

    /// Applies the lock `failures` call for, if it reaches past the stored one.
    async fn auth_failures_lock(
        &self,
        key: &str,
        rule: &LockoutRule,
        now_ms: i64,
        failures: i64,
        stored: Option<i64>,
    ) -> Result<Counted, StoreError> {
        let failures = u32::try_from(failures).unwrap_or(u32::MAX);
        let wanted = rule.lock_ms(failures).map(|l| now_ms.saturating_add(l));
        let locked_until_ms = match wanted {
            Some(u) if stored.is_none_or(|s| s < u) => {
                sqlx::query(
                    "UPDATE auth_failures SET locked_until_ms = ?2
                     WHERE key = ?1 AND (locked_until_ms IS NULL OR locked_until_ms < ?2)",
                )
                .bind(key)
                .bind(u)
                .execute(self.writer())
                .await
                .or_store()?;
                // Another node's later lock, if it won, is later still.
                Some(u)
            }
            _ => stored,
        };
        Ok(Counted::Counted {
            failures,
            locked_until_ms,
        })
    }
}

#[async_trait]
impl LockoutStore for SqliteStore {
    async fn count_failure(
        &self,
        key: &str,
        rule: &LockoutRule,
        now_ms: i64,
    ) -> Result<Counted, StoreError> {
        check_key(key)?;
        // Twice at most: a new key's insert can lose to another node's, whose row is then
        // counted on the second turn.
        for _ in 0..2 {
            let f = forgotten("?2", "?3");
            let row: Option<(i64, Option<i64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE auth_failures SET
                     failures = CASE WHEN {f} THEN 1 ELSE MIN(failures + 1, 1000000) END,
                     locked_until_ms = CASE WHEN {f} THEN NULL ELSE locked_until_ms END,
                     last_ms = MAX(last_ms, ?2)
                 WHERE key = ?1 RETURNING failures, locked_until_ms"
            )))
            .bind(key)
            .bind(now_ms)
            .bind(rule.forget_after_ms)
            .fetch_optional(self.writer())
            .await
            .or_store()?;
            if let Some((failures, stored)) = row {
                return self
                    .auth_failures_lock(key, rule, now_ms, failures, stored)
                    .await;
            }
            if !self.auth_failures_room(rule, now_ms).await? {
                return Ok(Counted::Full);
            }
            let inserted = sqlx::query(
                "INSERT INTO auth_failures (key, failures, last_ms) VALUES (?1, 1, ?2)
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(now_ms)
            .execute(self.writer())
            .await
            .or_store()?
            .rows_affected();
            if inserted == 1 {
                return self.auth_failures_lock(key, rule, now_ms, 1, None).await;
            }
        }
        Err(StoreError::Busy(
            "a failed-authentication count raced twice".into(),
        ))
    }

    async fn locked_until(&self, keys: &[&str], now_ms: i64) -> Result<Option<i64>, StoreError> {
        let keys = &keys[..keys.len().min(MAX_KEYS)];
        if keys.is_empty() {
            return Ok(None);
        }
        let marks = (2..keys.len() + 2)
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT MAX(locked_until_ms) FROM auth_failures
             WHERE locked_until_ms > ?1 AND key IN ({marks})"
        );
        let mut q = sqlx::query_scalar::<_, Option<i64>>(sqlx::AssertSqlSafe(sql)).bind(now_ms);
        for k in keys {
            q = q.bind(k);
        }
        q.fetch_one(self.pool()).await.or_store()
    }

    fn counts_for_several_nodes(&self) -> bool {
        false
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        sqlx::query("DELETE FROM auth_failures WHERE key = ?1")
            .bind(key)
            .execute(self.writer())
            .await
            .or_store()?;
        Ok(())
    }
}
