//! Storage of OAuth tokens (access, refresh, authorization codes), by SHA-256 only.

use async_trait::async_trait;

use crate::{StoreError, TokenKind};

/// One issued token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// SHA-256 (hex) of the token.
    pub token_sha256: String,
    /// Access token, refresh token or authorization code.
    pub kind: TokenKind,
    /// Who the token is for and how it was granted (JSON; `mailgate_gateway::Grant` is its shape).
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
    /// Records that a JWT-bearer assertion (`key`: its `iss` + `jti`, or its SHA-256) was
    /// exchanged, to be remembered until `expires_at_ms`. Returns false when it was already
    /// recorded and has not expired (a replay). Expired records are pruned on the way (a bounded
    /// number per call), so the table holds at most the assertions of the last hour or so. Call
    /// it only for assertions whose signature verified: this is a write on behalf of a client.
    async fn use_assertion(
        &self,
        key: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
}
