//! [`FaultStore`] on SQLite: the `simulated_faults` table, written on the rare-writes connection.

use async_trait::async_trait;
use sqlx::Row;

use super::{OrStore, SqliteStore};
use crate::StoreError;
use crate::faults::{FaultStore, SimulatedFault};

#[async_trait]
impl FaultStore for SqliteStore {
    async fn set_fault(&self, f: &SimulatedFault) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO simulated_faults (principal, code, until_ms, created_at_ms, actor) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (principal) DO UPDATE SET code = excluded.code, until_ms = excluded.until_ms,
                 created_at_ms = excluded.created_at_ms, actor = excluded.actor",
        )
        .bind(f.principal.to_ascii_lowercase())
        .bind(&f.code)
        .bind(f.until_ms)
        .bind(f.created_at_ms)
        .bind(&f.actor)
        .execute(self.writer())
        .await.or_store()?;
        Ok(())
    }

    async fn clear_fault(&self, principal: &str) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM simulated_faults WHERE principal = ?")
            .bind(principal.to_ascii_lowercase())
            .execute(self.writer())
            .await
            .or_store()?
            .rows_affected();
        Ok(n > 0)
    }

    async fn active_faults(&self, now_ms: i64) -> Result<Vec<SimulatedFault>, StoreError> {
        let rows = sqlx::query(
            "SELECT principal, code, until_ms, created_at_ms, actor FROM simulated_faults
             WHERE until_ms > ? ORDER BY principal",
        )
        .bind(now_ms)
        .fetch_all(self.pool())
        .await
        .or_store()?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(SimulatedFault {
                principal: r.try_get("principal").or_store()?,
                code: r.try_get("code").or_store()?,
                until_ms: r.try_get("until_ms").or_store()?,
                created_at_ms: r.try_get("created_at_ms").or_store()?,
                actor: r.try_get("actor").or_store()?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[tokio::test]
    async fn faults_are_set_replaced_expire_and_clear() {
        let s = SqliteStore::in_memory().await.unwrap();
        let f = |code: &str, until_ms| SimulatedFault {
            principal: "Alice@Example.com".into(),
            code: code.into(),
            until_ms,
            created_at_ms: 1,
            actor: "t".into(),
        };
        s.set_fault(&f("limit.rate", 100)).await.unwrap();
        s.set_fault(&f("limit.daily_messages", 200)).await.unwrap();
        let active = s.active_faults(150).await.unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].principal, "alice@example.com");
        assert_eq!(active[0].code, "limit.daily_messages");
        assert!(s.active_faults(200).await.unwrap().is_empty());
        assert!(s.clear_fault("ALICE@example.com").await.unwrap());
        assert!(!s.clear_fault("alice@example.com").await.unwrap());
    }
}
