//! [`FaultStore`] on PostgreSQL: the `simulated_faults` table, shared by every node.

use async_trait::async_trait;
use sqlx::Row;

use super::{OrStore, PgStore};
use crate::StoreError;
use crate::faults::{FaultStore, SimulatedFault};

#[async_trait]
impl FaultStore for PgStore {
    async fn set_fault(&self, f: &SimulatedFault) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO simulated_faults (principal, code, until_ms, created_at_ms, actor)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (principal) DO UPDATE SET code = excluded.code, until_ms = excluded.until_ms,
                 created_at_ms = excluded.created_at_ms, actor = excluded.actor",
        )
        .bind(f.principal.to_ascii_lowercase())
        .bind(&f.code)
        .bind(f.until_ms)
        .bind(f.created_at_ms)
        .bind(&f.actor)
        .execute(&self.pool)
        .await
        .or_store()?;
        Ok(())
    }

    async fn clear_fault(&self, principal: &str) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM simulated_faults WHERE principal = $1")
            .bind(principal.to_ascii_lowercase())
            .execute(&self.pool)
            .await
            .or_store()?
            .rows_affected();
        Ok(n > 0)
    }

    async fn active_faults(&self, now_ms: i64) -> Result<Vec<SimulatedFault>, StoreError> {
        let rows = sqlx::query(
            "SELECT principal, code, until_ms, created_at_ms, actor FROM simulated_faults
             WHERE until_ms > $1 ORDER BY principal",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .or_store()?;
        rows.iter()
            .map(|r| {
                Ok(SimulatedFault {
                    principal: r.try_get("principal").or_store()?,
                    code: r.try_get("code").or_store()?,
                    until_ms: r.try_get("until_ms").or_store()?,
                    created_at_ms: r.try_get("created_at_ms").or_store()?,
                    actor: r.try_get("actor").or_store()?,
                })
            })
            .collect()
    }
}
