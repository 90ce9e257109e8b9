//! [`NodeNumberStore`] on PostgreSQL: the `node_numbers` table (migration 0007), shared by every
//! node. A lease is one transaction at READ COMMITTED under an advisory lock of its own (leases
//! are rare: one when a node joins, one per heartbeat), so each statement sees every lease
//! committed before it and two nodes never take the same free number.

use async_trait::async_trait;

use super::{OrStore, PgStore};
use crate::StoreError;
use crate::node_numbers::NodeNumberStore;

/// The advisory lock leases take ("NODENUM\0" in ASCII).
const NODE_NUMBER_LOCK: i64 = 0x4E4F_4445_4E55_4D00;

#[async_trait]
impl NodeNumberStore for PgStore {
    async fn lease_node_number(
        &self,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Option<u16>, StoreError> {
        let mut tx = self.pool().begin().await.or_store()?;
        // Whatever the server's default: at REPEATABLE READ the snapshot would predate the lock.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await
            .or_store()?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(NODE_NUMBER_LOCK)
            .execute(&mut *tx)
            .await
            .or_store()?;
        let mine: Option<i16> = sqlx::query_scalar(
            "UPDATE node_numbers SET until_ms = $2 WHERE holder = $1 RETURNING number",
        )
        .bind(holder)
        .bind(until_ms)
        .fetch_optional(&mut *tx)
        .await
        .or_store()?;
        let number = match mine {
            Some(n) => Some(n),
            None => sqlx::query_scalar(
                "UPDATE node_numbers SET holder = $1, until_ms = $3
                 WHERE number = (SELECT number FROM node_numbers
                                 WHERE holder IS NULL OR until_ms < $2
                                 ORDER BY number LIMIT 1)
                 RETURNING number",
            )
            .bind(holder)
            .bind(now_ms)
            .bind(until_ms)
            .fetch_optional(&mut *tx)
            .await
            .or_store()?,
        };
        tx.commit().await.or_store()?;
        Ok(number.and_then(|n| u16::try_from(n).ok()))
    }
}
