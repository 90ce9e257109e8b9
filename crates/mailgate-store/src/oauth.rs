//! Storage of OAuth tokens (access, refresh, authorization codes), by SHA-256 only.

use async_trait::async_trait;
use sqlx::Row;

use crate::{SqliteStore, StoreError};

/// One issued token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// SHA-256 (hex) of the token.
    pub token_sha256: String,
    /// `access`, `refresh` or `code`.
    pub kind: String,
    /// Who the token is for and how it was granted (JSON; the OAuth crate defines the shape).
    pub grant: serde_json::Value,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Refresh-token family: every token minted from one authorization shares it.
    pub family: String,
    /// Issued at (Unix ms).
    pub created_at_ms: i64,
    /// Expires at (Unix ms).
    pub expires_at_ms: i64,
    /// Revoked.
    pub revoked: bool,
    /// Already used (codes are single-use; refresh tokens rotate).
    pub used: bool,
}

/// Token storage.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Stores a new token.
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// Finds a token by the SHA-256 of its value.
    async fn token(&self, token_sha256: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Marks a token used; returns false if it was already used (a replay).
    async fn use_token(&self, token_sha256: &str) -> Result<bool, StoreError>;
    /// Revokes every token of a family (revocation, refresh-token reuse).
    async fn revoke_family(&self, family: &str) -> Result<u64, StoreError>;
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO oauth_tokens (token_sha256, kind, grant_body, scopes, family, created_at_ms, expires_at_ms, revoked, used)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.token_sha256)
        .bind(&t.kind)
        .bind(t.grant.to_string())
        .bind(t.scopes.join(" "))
        .bind(&t.family)
        .bind(t.created_at_ms)
        .bind(t.expires_at_ms)
        .bind(t.revoked)
        .bind(t.used)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn token(&self, token_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT token_sha256, kind, grant_body, scopes, family, created_at_ms, expires_at_ms, revoked, used
             FROM oauth_tokens WHERE token_sha256 = ?",
        )
        .bind(token_sha256)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let grant: String = row.try_get("grant_body")?;
        let scopes: String = row.try_get("scopes")?;
        Ok(Some(TokenRecord {
            token_sha256: row.try_get("token_sha256")?,
            kind: row.try_get("kind")?,
            grant: serde_json::from_str(&grant)
                .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))?,
            scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            family: row.try_get("family")?,
            created_at_ms: row.try_get("created_at_ms")?,
            expires_at_ms: row.try_get("expires_at_ms")?,
            revoked: row.try_get("revoked")?,
            used: row.try_get("used")?,
        }))
    }

    async fn use_token(&self, token_sha256: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE oauth_tokens SET used = 1 WHERE token_sha256 = ? AND used = 0")
            .bind(token_sha256)
            .execute(self.writer())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn revoke_family(&self, family: &str) -> Result<u64, StoreError> {
        let r = sqlx::query("UPDATE oauth_tokens SET revoked = 1 WHERE family = ?")
            .bind(family)
            .execute(self.writer())
            .await?;
        Ok(r.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sha: &str, family: &str) -> TokenRecord {
        TokenRecord {
            token_sha256: sha.into(),
            kind: "code".into(),
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
}
