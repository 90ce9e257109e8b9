//! [`TokenStore`] on PostgreSQL: `oauth_tokens` and the JWT replay cache. Single use is one
//! conditional UPDATE and a replay check one conditional upsert, so they are atomic across
//! nodes without a lock of ours.

use async_trait::async_trait;
use sqlx::Row;

use super::{OrStore, PgStore};
use crate::tokens::{TokenRecord, TokenStore};
use crate::{StoreError, TokenKind};

/// Expired replay-cache rows pruned per insert (as on SQLite): the table shrinks under any
/// steady load, and an insert stays one short transaction.
const REPLAY_PRUNE_BATCH: i64 = 64;

#[async_trait]
impl TokenStore for PgStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO oauth_tokens (token_sha256, kind, grant_body, scopes, family,
                                       created_at_ms, expires_at_ms, revoked, used)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&t.token_sha256)
        .bind(t.kind.as_str())
        .bind(sqlx::types::Json(&t.grant))
        .bind(&t.scopes)
        .bind(&t.family)
        .bind(t.created_at_ms)
        .bind(t.expires_at_ms)
        .bind(t.revoked)
        .bind(t.used)
        .execute(&self.pool)
        .await
        .or_store()?;
        Ok(())
    }

    async fn token(&self, token_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT token_sha256, kind, grant_body, scopes, family, created_at_ms, expires_at_ms,
                    revoked, used
             FROM oauth_tokens WHERE token_sha256 = $1",
        )
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await
        .or_store()?;
        let Some(row) = row else { return Ok(None) };
        let kind: String = row.try_get("kind").or_store()?;
        let grant: sqlx::types::Json<serde_json::Value> = row.try_get("grant_body").or_store()?;
        Ok(Some(TokenRecord {
            token_sha256: row.try_get("token_sha256").or_store()?,
            kind: TokenKind::parse(&kind)
                .ok_or_else(|| StoreError::corrupt(format!("unknown token kind `{kind}`")))?,
            grant: grant.0,
            scopes: row.try_get("scopes").or_store()?,
            family: row.try_get("family").or_store()?,
            created_at_ms: row.try_get("created_at_ms").or_store()?,
            expires_at_ms: row.try_get("expires_at_ms").or_store()?,
            revoked: row.try_get("revoked").or_store()?,
            used: row.try_get("used").or_store()?,
        }))
    }

    async fn use_token(&self, token_sha256: &str) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE oauth_tokens SET used = true WHERE token_sha256 = $1 AND NOT used")
                .bind(token_sha256)
                .execute(&self.pool)
                .await
                .or_store()?;
        Ok(r.rows_affected() == 1)
    }

    async fn revoke_family(&self, family: &str) -> Result<u64, StoreError> {
        let r = sqlx::query("UPDATE oauth_tokens SET revoked = true WHERE family = $1")
            .bind(family)
            .execute(&self.pool)
            .await
            .or_store()?;
        Ok(r.rows_affected())
    }

    async fn use_assertion(
        &self,
        key: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.or_store()?;
        // SKIP LOCKED: two nodes pruning at once take different rows instead of waiting.
        sqlx::query(
            "DELETE FROM jwt_replay WHERE assertion_key IN
               (SELECT assertion_key FROM jwt_replay WHERE expires_at_ms < $1
                LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now_ms)
        .bind(REPLAY_PRUNE_BATCH)
        .execute(&mut *tx)
        .await
        .or_store()?;
        // A row still here is live unless it expired after the prune's batch: an expired one is
        // replaced, a live one is a replay. Two nodes inserting one key at once: the second
        // waits for the first's row and then finds it live (no row changed: a replay).
        let r = sqlx::query(
            "INSERT INTO jwt_replay (assertion_key, expires_at_ms) VALUES ($1, $2)
             ON CONFLICT (assertion_key) DO UPDATE SET expires_at_ms = excluded.expires_at_ms
             WHERE jwt_replay.expires_at_ms < $3",
        )
        .bind(key)
        .bind(expires_at_ms)
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .or_store()?;
        tx.commit().await.or_store()?;
        Ok(r.rows_affected() == 1)
    }
}
