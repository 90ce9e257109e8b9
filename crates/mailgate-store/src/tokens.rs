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

/// A [`TokenStore`] that remembers the access tokens it looked up for up to [`TOKEN_CACHE_TTL`],
/// so that a client sending with one token costs one store lookup a second, not one per send
/// (issue 16: on PostgreSQL the lookup was 2,000 of the ~4,600 statements of the Gmail door's
/// benchmark row, `docs/performance.md`).
///
/// What it changes, and what not (ARCHITECTURE.md, "Access-token cache"):
/// - Only access tokens found live (not revoked, not expired) are remembered: codes and refresh
///   tokens are single-use and always read from the store; an unknown token is never remembered
///   (guessing fills nothing), and the cache holds at most [`TOKEN_CACHE_MAX`] tokens.
/// - A revocation through this value ([`TokenStore::revoke_family`]: `/revoke`, refresh-token
///   reuse) forgets the family's tokens before it returns: on one node, revocation is immediate
///   as before. Another node sharing the store may accept the revoked token for at most
///   [`TOKEN_CACHE_TTL`], the same bound as for a directory change.
/// - Expiry is checked by the caller on every use (the record's `expires_at_ms`), cached or not.
pub struct CachedTokens {
    inner: std::sync::Arc<dyn TokenStore>,
    ttl: std::time::Duration,
    cache: std::sync::Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    tokens: std::collections::HashMap<String, (std::time::Instant, TokenRecord)>,
    /// Revocations through this value so far: a lookup that a revocation overtook remembers
    /// nothing (its record may predate the revocation).
    revocations: u64,
}

/// How long a looked-up access token is used without asking the store again.
pub const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Most access tokens remembered at once.
pub const TOKEN_CACHE_MAX: usize = 10_000;

impl std::fmt::Debug for CachedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CachedTokens {
    /// `inner` with its access tokens remembered for [`TOKEN_CACHE_TTL`].
    pub fn new(inner: std::sync::Arc<dyn TokenStore>) -> CachedTokens {
        CachedTokens::with_ttl(inner, TOKEN_CACHE_TTL)
    }

    /// `inner` with its access tokens remembered for `ttl` (tests).
    pub fn with_ttl(
        inner: std::sync::Arc<dyn TokenStore>,
        ttl: std::time::Duration,
    ) -> CachedTokens {
        CachedTokens {
            inner,
            ttl,
            cache: std::sync::Mutex::new(Remembered::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The remembered record of a token, if fresh; else the revocation count to pass to
    /// [`CachedTokens::remember`] after asking the store.
    fn cached(&self, token_sha256: &str) -> Result<TokenRecord, u64> {
        let cache = self.lock();
        match cache.tokens.get(token_sha256) {
            Some((at, rec)) if at.elapsed() < self.ttl => Ok(rec.clone()),
            _ => Err(cache.revocations),
        }
    }

    fn remember(&self, rec: &TokenRecord, revocations: u64) {
        if rec.kind != TokenKind::Access || rec.revoked || rec.used {
            return;
        }
        let mut cache = self.lock();
        if cache.revocations != revocations {
            return;
        }
        if cache.tokens.len() >= TOKEN_CACHE_MAX {
            let ttl = self.ttl;
            cache.tokens.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.tokens.len() >= TOKEN_CACHE_MAX {
                return;
            }
        }
        cache.tokens.insert(
            rec.token_sha256.clone(),
            (std::time::Instant::now(), rec.clone()),
        );
    }
}

#[async_trait]
impl TokenStore for CachedTokens {
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.inner.insert_token(token).await
    }

    async fn token(&self, token_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        let revocations = match self.cached(token_sha256) {
            Ok(rec) => return Ok(Some(rec)),
            Err(n) => n,
        };
        let found = self.inner.token(token_sha256).await?;
        if let Some(rec) = &found {
            self.remember(rec, revocations);
        }
        Ok(found)
    }

    async fn use_token(&self, token_sha256: &str) -> Result<bool, StoreError> {
        self.inner.use_token(token_sha256).await
    }

    async fn revoke_family(&self, family: &str) -> Result<u64, StoreError> {
        let revoked = self.inner.revoke_family(family).await;
        // Whatever the store said (a failure may have committed): the family forgotten, and the
        // lookups in flight, which may have read it before the revocation, remember nothing.
        let mut cache = self.lock();
        cache.revocations = cache.revocations.wrapping_add(1);
        cache.tokens.retain(|_, (_, rec)| rec.family != family);
        revoked
    }

    async fn use_assertion(
        &self,
        key: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.inner.use_assertion(key, expires_at_ms, now_ms).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// One family's tokens in memory, and how many lookups reached it.
    #[derive(Default)]
    struct Counting {
        records: std::sync::Mutex<Vec<TokenRecord>>,
        lookups: AtomicUsize,
    }

    #[async_trait]
    impl TokenStore for Counting {
        async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
            self.records.lock().unwrap().push(t.clone());
            Ok(())
        }
        async fn token(&self, sha: &str) -> Result<Option<TokenRecord>, StoreError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let records = self.records.lock().unwrap();
            Ok(records.iter().find(|r| r.token_sha256 == sha).cloned())
        }
        async fn use_token(&self, sha: &str) -> Result<bool, StoreError> {
            let mut records = self.records.lock().unwrap();
            let r = records.iter_mut().find(|r| r.token_sha256 == sha);
            Ok(r.is_some_and(|r| !std::mem::replace(&mut r.used, true)))
        }
        async fn revoke_family(&self, family: &str) -> Result<u64, StoreError> {
            let mut n = 0;
            for r in self.records.lock().unwrap().iter_mut() {
                if r.family == family {
                    r.revoked = true;
                    n += 1;
                }
            }
            Ok(n)
        }
        async fn use_assertion(&self, _: &str, _: i64, _: i64) -> Result<bool, StoreError> {
            Ok(true)
        }
    }

    fn record(sha: &str, kind: TokenKind) -> TokenRecord {
        TokenRecord {
            token_sha256: sha.into(),
            kind,
            grant: serde_json::json!({}),
            scopes: vec![],
            family: "fam".into(),
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            revoked: false,
            used: false,
        }
    }

    async fn setup(ttl: Duration) -> (Arc<Counting>, CachedTokens) {
        let inner = Arc::new(Counting::default());
        let cached = CachedTokens::with_ttl(inner.clone(), ttl);
        cached
            .insert_token(&record("access", TokenKind::Access))
            .await
            .unwrap();
        cached
            .insert_token(&record("refresh", TokenKind::Refresh))
            .await
            .unwrap();
        (inner, cached)
    }

    #[tokio::test]
    async fn an_access_token_is_looked_up_once_per_ttl_and_again_after_it() {
        let (inner, cached) = setup(Duration::from_millis(200)).await;
        for _ in 0..5 {
            assert!(cached.token("access").await.unwrap().is_some());
        }
        assert_eq!(inner.lookups.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(cached.token("access").await.unwrap().is_some());
        assert_eq!(inner.lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_revocation_through_the_cache_is_seen_by_the_next_lookup() {
        let (_, cached) = setup(Duration::from_secs(3600)).await;
        assert!(!cached.token("access").await.unwrap().unwrap().revoked);
        assert_eq!(cached.revoke_family("fam").await.unwrap(), 2);
        assert!(cached.token("access").await.unwrap().unwrap().revoked);
    }

    #[tokio::test]
    async fn single_use_tokens_and_unknown_tokens_are_never_remembered() {
        let (inner, cached) = setup(Duration::from_secs(3600)).await;
        for _ in 0..3 {
            assert!(cached.token("refresh").await.unwrap().is_some());
            assert!(cached.token("guessed").await.unwrap().is_none());
        }
        assert_eq!(inner.lookups.load(Ordering::SeqCst), 6);
        // A refresh token used is seen used at once.
        assert!(cached.use_token("refresh").await.unwrap());
        assert!(cached.token("refresh").await.unwrap().unwrap().used);
    }

    #[tokio::test]
    async fn a_lookup_overtaken_by_a_revocation_remembers_nothing() {
        let (inner, cached) = setup(Duration::from_secs(3600)).await;
        // The lookup read the record before the revocation, and finishes after it.
        let Err(before) = cached.cached("access") else {
            panic!("nothing remembered yet")
        };
        let stale = inner.token("access").await.unwrap().unwrap();
        cached.revoke_family("fam").await.unwrap();
        cached.remember(&stale, before);
        assert!(cached.token("access").await.unwrap().unwrap().revoked);
    }
}
