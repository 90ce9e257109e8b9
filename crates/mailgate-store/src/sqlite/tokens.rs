//! [`TokenStore`] on SQLite: `oauth_tokens` and the JWT replay cache, on the rare-writes
//! connection.

use async_trait::async_trait;
use sqlx::Row;

use super::{OrStore, SqliteStore};
use crate::tokens::{TokenRecord, TokenStore};
use crate::{StoreError, TokenKind};

/// Expired replay-cache rows pruned per insert: more than one, so the table shrinks under any
/// steady load, and few enough that an insert stays one short transaction.
const REPLAY_PRUNE_BATCH: i64 = 64;

#[async_trait]
impl TokenStore for SqliteStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO oauth_tokens (token_sha256, kind, grant_body, scopes, family, created_at_ms, expires_at_ms, revoked, used)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.token_sha256)
        .bind(t.kind.as_str())
        .bind(t.grant.to_string())
        .bind(t.scopes.join(" "))
        .bind(&t.family)
        .bind(t.created_at_ms)
        .bind(t.expires_at_ms)
        .bind(t.revoked)
        .bind(t.used)
        .execute(self.writer())
        .await.or_store()?;
        Ok(())
    }

    async fn token(&self, token_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT token_sha256, kind, grant_body, scopes, family, created_at_ms, expires_at_ms, revoked, used
             FROM oauth_tokens WHERE token_sha256 = ?",
        )
        .bind(token_sha256)
        .fetch_optional(self.pool())
        .await.or_store()?;
        let Some(row) = row else { return Ok(None) };
        let grant: String = row.try_get("grant_body").or_store()?;
        let scopes: String = row.try_get("scopes").or_store()?;
        Ok(Some(TokenRecord {
            token_sha256: row.try_get("token_sha256").or_store()?,
            kind: {
                let kind: String = row.try_get("kind").or_store()?;
                TokenKind::parse(&kind)
                    .ok_or_else(|| StoreError::corrupt(format!("unknown token kind `{kind}`")))?
            },
            grant: serde_json::from_str(&grant).or_store()?,
            scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            family: row.try_get("family").or_store()?,
            created_at_ms: row.try_get("created_at_ms").or_store()?,
            expires_at_ms: row.try_get("expires_at_ms").or_store()?,
            revoked: row.try_get("revoked").or_store()?,
            used: row.try_get("used").or_store()?,
        }))
    }

    async fn use_token(&self, token_sha256: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE oauth_tokens SET used = 1 WHERE token_sha256 = ? AND used = 0")
            .bind(token_sha256)
            .execute(self.writer())
            .await
            .or_store()?;
        Ok(r.rows_affected() == 1)
    }

    async fn revoke_family(&self, family: &str) -> Result<u64, StoreError> {
        let r = sqlx::query("UPDATE oauth_tokens SET revoked = 1 WHERE family = ?")
            .bind(family)
            .execute(self.writer())
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
        let mut tx = self.writer().begin().await.or_store()?;
        sqlx::query(
            "DELETE FROM jwt_replay WHERE assertion_key IN
               (SELECT assertion_key FROM jwt_replay WHERE expires_at_ms < ? LIMIT ?)",
        )
        .bind(now_ms)
        .bind(REPLAY_PRUNE_BATCH)
        .execute(&mut *tx)
        .await
        .or_store()?;
        // A row still here after the prune is live unless it expired after the batch limit: an
        // expired one is replaced, a live one is a replay.
        let r = sqlx::query(
            "INSERT INTO jwt_replay (assertion_key, expires_at_ms) VALUES (?, ?)
             ON CONFLICT (assertion_key) DO UPDATE SET expires_at_ms = excluded.expires_at_ms
             WHERE jwt_replay.expires_at_ms < ?",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sha: &str, family: &str) -> TokenRecord {
        TokenRecord {
            token_sha256: sha.into(),
            kind: TokenKind::Code,
            grant: serde_json::json!({"user": "a@example.com"}),
            scopes: vec!["s1".into(), "s2".into()],
            family: family.into(),
            created_at_ms: 1,
            expires_at_ms: 2,
            revoked: false,
            used: false,
        }
    }

    #[tokio::test]
    async fn codes_are_single_use_and_families_revoke_together() {
        let s = SqliteStore::in_memory().await.unwrap();
        s.insert_token(&rec("a", "f")).await.unwrap();
        s.insert_token(&rec("b", "f")).await.unwrap();
        assert_eq!(s.token("a").await.unwrap(), Some(rec("a", "f")));
        assert!(s.use_token("a").await.unwrap());
        assert!(!s.use_token("a").await.unwrap(), "second use is a replay");
        assert_eq!(s.revoke_family("f").await.unwrap(), 2);
        assert!(s.token("b").await.unwrap().unwrap().revoked);
        assert_eq!(s.token("zz").await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_assertion_is_used_once_until_it_expires_and_expired_rows_are_pruned() {
        let s = SqliteStore::in_memory().await.unwrap();
        assert!(s.use_assertion("k", 1_000, 0).await.unwrap());
        assert!(!s.use_assertion("k", 1_000, 500).await.unwrap(), "replay");
        assert!(
            !s.use_assertion("k", 1_000, 1_000).await.unwrap(),
            "until exp"
        );
        // Past its expiry the row no longer counts (the token endpoint refuses the expired
        // assertion anyway) and is pruned.
        assert!(s.use_assertion("k", 5_000, 1_001).await.unwrap());
        for i in 0..100 {
            assert!(s.use_assertion(&format!("old{i}"), 10, 0).await.unwrap());
        }
        assert!(s.use_assertion("new", 9_000, 2_000).await.unwrap());
        assert!(s.use_assertion("new2", 9_000, 2_000).await.unwrap());
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM jwt_replay WHERE expires_at_ms < 2000")
                .fetch_one(s.pool())
                .await
                .unwrap();
        assert!(
            left < 100 - REPLAY_PRUNE_BATCH,
            "expired rows pruned: {left} left"
        );
        assert!(!s.use_assertion("new", 9_000, 3_000).await.unwrap());
    }
}
