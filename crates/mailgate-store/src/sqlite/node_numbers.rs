//! [`NodeNumberStore`] on SQLite: the `node_numbers` table (migration 0020), leased the same way
//! as on PostgreSQL (one node serves an SQLite file, so it gets number 0 unless an earlier node
//! id's lease is still running), in one transaction on the rare-writes connection that writes
//! first (so it holds SQLite's write lock throughout).

use async_trait::async_trait;

use super::{OrStore, SqliteStore};
use crate::StoreError;
use crate::node_numbers::NodeNumberStore;

#[async_trait]
impl NodeNumberStore for SqliteStore {
    async fn lease_node_number(
        &self,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Option<u16>, StoreError> {
        let mut tx = self.writer().begin().await.or_store()?;
        let mine: Option<i64> = sqlx::query_scalar(
            "UPDATE node_numbers SET until_ms = ?2 WHERE holder = ?1 RETURNING number",
        )
        .bind(holder)
        .bind(until_ms)
        .fetch_optional(&mut *tx)
        .await
        .or_store()?;
        let number = match mine {
            Some(n) => Some(n),
            None => sqlx::query_scalar(
                "UPDATE node_numbers SET holder = ?1, until_ms = ?3
                 WHERE number = (SELECT number FROM node_numbers
                                 WHERE holder IS NULL OR until_ms < ?2
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
