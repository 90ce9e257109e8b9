//! [`UploadStore`] on SQLite: the `upload_sessions` table (migration 0019), written on the
//! rare-writes connection. An open is one transaction that writes first (so it holds SQLite's
//! write lock throughout); a take is one conditional `DELETE`.

use async_trait::async_trait;

use super::{OrStore, SqliteStore};
use crate::StoreError;
use crate::uploads::{UploadOpened, UploadStore};

#[async_trait]
impl UploadStore for SqliteStore {
    async fn open_upload(
        &self,
        id: &str,
        owner: &str,
        user_id: &str,
        now_ms: i64,
        ttl_ms: i64,
        per_owner: u32,
        total: u32,
    ) -> Result<UploadOpened, StoreError> {
        let mut tx = self.writer().begin().await.or_store()?;
        sqlx::query("DELETE FROM upload_sessions WHERE expires_ms <= ?1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .or_store()?;
        let (mine, first_mine): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), MIN(expires_ms) FROM upload_sessions WHERE owner = ?1",
        )
        .bind(owner)
        .fetch_one(&mut *tx)
        .await
        .or_store()?;
        if mine >= i64::from(per_owner) {
            return Ok(UploadOpened::OwnerFull {
                retry_after_ms: first_mine.map_or(1_000, |e| (e - now_ms).max(1)),
            });
        }
        let (all, first): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), MIN(expires_ms) FROM upload_sessions")
                .fetch_one(&mut *tx)
                .await
                .or_store()?;
        if all >= i64::from(total) {
            return Ok(UploadOpened::Full {
                retry_after_ms: first.map_or(1_000, |e| (e - now_ms).max(1)),
            });
        }
        sqlx::query(
            "INSERT INTO upload_sessions (id, owner, user_id, expires_ms) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(owner)
        .bind(user_id)
        .bind(now_ms.saturating_add(ttl_ms))
        .execute(&mut *tx)
        .await
        .or_store()?;
        tx.commit().await.or_store()?;
        Ok(UploadOpened::Opened)
    }

    async fn take_upload(
        &self,
        id: &str,
        owner: &str,
        user_id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "DELETE FROM upload_sessions
             WHERE id = ?1 AND owner = ?2 AND user_id = ?3 AND expires_ms > ?4",
        )
        .bind(id)
        .bind(owner)
        .bind(user_id)
        .bind(now_ms)
        .execute(self.writer())
        .await
        .or_store()?
        .rows_affected();
        Ok(n == 1)
    }
}
