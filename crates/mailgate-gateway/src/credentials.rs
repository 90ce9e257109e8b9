//! What a presented secret is, resolved once for every door: an API key (the SendGrid door's
//! `Bearer`, an SMTP password, a Gmail `key=`) or an OAuth access token this gateway's
//! authorization server issued (a Gmail API bearer token, SMTP XOAUTH2 / OAUTHBEARER).
//!
//! Resolution only says who the secret speaks for, or that it speaks for nobody: whether that
//! caller may do anything (a revoked or expired key, a suspended account, a missing scope) is the
//! engine's to decide, so every door answers the same thing with the same code.

use mailgate_core::engine::{Credential, CredentialState};
use mailgate_store::{StoreError, TokenKind, TokenStore};
use serde::{Deserialize, Serialize};

use crate::{Gateway, now_ms};

/// Who a token speaks for: the stored form of a token's grant (`TokenRecord.grant`, JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Grant {
    /// A user through an OAuth client.
    User {
        /// The user's primary address.
        user: String,
        /// The OAuth client.
        client_id: String,
    },
    /// A service account, acting as itself or as `subject` (domain-wide delegation).
    ServiceAccount {
        /// The service account.
        email: String,
        /// The user it acts as.
        subject: Option<String>,
    },
    /// An authorization code waiting to be exchanged.
    Code {
        /// The user who consented.
        user: String,
        /// The OAuth client.
        client_id: String,
        /// Where the code was sent (the exchange must name it again).
        redirect_uri: String,
        /// PKCE challenge, if the client sent one.
        code_challenge: Option<String>,
    },
}

/// What an API key matched in the directory in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeyMatch {
    /// The secret matches the key `key_id` (revoked, expired or restricted: the engine says).
    Key {
        /// The key's id.
        key_id: String,
    },
    /// Not shaped like an API key (`SG.<id>.<secret>`).
    NotAKey,
    /// Shaped like the key `key_id`, but no such key, or not its secret.
    Unmatched {
        /// The id the secret names (not a secret).
        key_id: String,
    },
}

impl ApiKeyMatch {
    /// The credential for the engine; a refusal is presented (in the decision's explanation and
    /// the audit) as `label(id)`, `id` being the key id the secret named, if any.
    pub fn credential(self, label: impl FnOnce(Option<&str>) -> String) -> Credential {
        match self {
            ApiKeyMatch::Key { key_id } => Credential::ApiKey { key_id },
            ApiKeyMatch::NotAKey => Credential::Refused {
                state: CredentialState::Invalid,
                presented: Some(label(None)),
            },
            ApiKeyMatch::Unmatched { key_id } => Credential::Refused {
                state: CredentialState::Invalid,
                presented: Some(label(Some(&key_id))),
            },
        }
    }
}

/// How an OAuth access token that speaks for nobody is presented.
const ACCESS_TOKEN: &str = "OAuth access token";

impl Gateway {
    /// Looks up an API key (`SG.<id>.<secret>`) in the directory in force: by its id, then the
    /// SHA-256 of the whole key against the stored one in constant time. Only the key's state
    /// (revoked, expired, restrictions) is left to the engine.
    pub fn api_key(&self, key: &str) -> ApiKeyMatch {
        let Some(id) = mailgate_auth::api_key_id(key) else {
            return ApiKeyMatch::NotAKey;
        };
        let live = self.live();
        match live.index.key(id) {
            Some(k)
                if mailgate_auth::ct_eq(
                    mailgate_auth::sha256_hex(key.as_bytes()).as_bytes(),
                    k.secret_sha256.as_bytes(),
                ) =>
            {
                ApiKeyMatch::Key {
                    key_id: id.to_owned(),
                }
            }
            _ => ApiKeyMatch::Unmatched {
                key_id: id.to_owned(),
            },
        }
    }

    /// Resolves an OAuth access token issued by this gateway's authorization server to the
    /// credential the engine understands: unknown, expired and revoked tokens become
    /// [`Credential::Refused`]. `Err` is a fault of the store (answer with a temporary refusal
    /// and do not count it as a failed authentication), never a verdict on the token.
    pub async fn resolve_access_token(
        &self,
        tokens: &dyn TokenStore,
        token: &str,
    ) -> Result<Credential, StoreError> {
        let refused = |state| Credential::Refused {
            state,
            presented: Some(ACCESS_TOKEN.into()),
        };
        let rec = match tokens
            .token(&mailgate_auth::sha256_hex(token.as_bytes()))
            .await?
        {
            Some(r) if r.kind == TokenKind::Access => r,
            _ => return Ok(refused(CredentialState::Invalid)),
        };
        if rec.revoked {
            return Ok(refused(CredentialState::Revoked));
        }
        if rec.expires_at_ms <= now_ms() as i64 {
            return Ok(refused(CredentialState::Expired));
        }
        let live = self.live();
        Ok(match serde_json::from_value::<Grant>(rec.grant) {
            Ok(Grant::User { user, client_id }) => Credential::OauthUser {
                project: live
                    .index
                    .client(&client_id)
                    .map(|c| c.project.clone())
                    .unwrap_or_default(),
                user,
                client_id,
                scopes: rec.scopes,
            },
            Ok(Grant::ServiceAccount { email, subject }) => Credential::ServiceAccount {
                project: live
                    .index
                    .service_account(&email)
                    .map(|s| s.project.clone())
                    .unwrap_or_default(),
                email,
                scopes: rec.scopes,
                subject,
            },
            _ => refused(CredentialState::Invalid),
        })
    }

    /// [`Gateway::resolve_access_token`] with a store fault logged and refused like an invalid
    /// token (for a door that has no temporary answer to give at that point).
    pub async fn credential_for_access_token(
        &self,
        tokens: &dyn TokenStore,
        token: &str,
    ) -> Credential {
        match self.resolve_access_token(tokens, token).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "token lookup failed");
                Credential::Refused {
                    state: CredentialState::Invalid,
                    presented: Some(ACCESS_TOKEN.into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mailgate_core::engine::{Door, SendAttempt};
    use mailgate_core::orgfile::OrgFile;
    use mailgate_store::{Changeset, Stores, TokenRecord};
    use serde_json::json;

    use super::*;

    const LIVE_KEY: &str = "SG.unit-live-0001.the-secret-of-the-live-key-0123456789";
    const REVOKED_KEY: &str = "SG.unit-gone-0002.the-secret-of-the-revoked-key-012345";

    fn org() -> String {
        format!(
            "domains: [{{name: example.com, verified: true}}]
users:
  - email: a@example.com
projects:
  - id: app
    number: 1
    enabled_apis: [gmail.googleapis.com, sendgrid.api]
oauth_clients:
  - client_id: web
    name: Web
    secret: s
    project: app
    redirect_uris: [http://127.0.0.1:1/cb]
service_accounts:
  - email: sa@app.iam.example.com
    project: app
    client_id: \"1\"
api_keys:
  - name: live
    id: unit-live-0001
    secret_sha256: {}
    owner: a@example.com
    permissions: [mail.send]
  - name: gone
    id: unit-gone-0002
    secret_sha256: {}
    owner: a@example.com
    permissions: [mail.send]
    revoked: true
",
            mailgate_auth::sha256_hex(LIVE_KEY.as_bytes()),
            mailgate_auth::sha256_hex(REVOKED_KEY.as_bytes()),
        )
    }

    async fn gateway() -> (Arc<Gateway>, Stores) {
        let store = mailgate_store::in_memory().await.unwrap();
        let dir = OrgFile::parse(&org()).unwrap().directory;
        store
            .directory
            .commit(0, &Changeset::between(&Default::default(), &dir), "t")
            .await
            .unwrap();
        (Gateway::open(store.directory.clone()).await.unwrap(), store)
    }

    /// Each door's way of presenting a refused key, as the doors pass it.
    fn label(id: Option<&str>) -> String {
        match id {
            Some(id) => format!("API key `{id}`"),
            None => "not a key".into(),
        }
    }

    #[tokio::test]
    async fn an_api_key_resolves_only_with_its_whole_secret() {
        let (gw, _) = gateway().await;
        assert_eq!(
            gw.api_key(LIVE_KEY),
            ApiKeyMatch::Key {
                key_id: "unit-live-0001".into()
            }
        );
        // Not shaped like a key at all.
        for k in ["", "hunter2", "Bearer", "SG.", "SG..x"] {
            assert_eq!(gw.api_key(k), ApiKeyMatch::NotAKey, "{k:?}");
        }
        // An id nobody has.
        assert_eq!(
            gw.api_key("SG.unit-none-0003.the-secret-of-the-live-key-0123456789"),
            ApiKeyMatch::Unmatched {
                key_id: "unit-none-0003".into()
            }
        );
        // The right id with a wrong secret: of the same length (compared in constant time), one
        // character off, a prefix, and the key with more after it.
        let same_length = LIVE_KEY.replace("0123456789", "9876543210");
        let one_off = format!("{}8", &LIVE_KEY[..LIVE_KEY.len() - 1]);
        let prefix = &LIVE_KEY[..LIVE_KEY.len() - 1];
        let longer = format!("{LIVE_KEY}0");
        for k in [same_length.as_str(), &one_off, prefix, &longer] {
            assert_eq!(
                gw.api_key(k),
                ApiKeyMatch::Unmatched {
                    key_id: "unit-live-0001".into()
                },
                "{k}"
            );
        }
        // The secret of another key under this key's id.
        let swapped = REVOKED_KEY.replace("unit-gone-0002", "unit-live-0001");
        assert!(matches!(
            gw.api_key(&swapped),
            ApiKeyMatch::Unmatched { .. }
        ));

        // What a refusal presents never contains the secret.
        let c = gw.api_key(&same_length).credential(label);
        let Credential::Refused { state, presented } = &c else {
            panic!("{c:?}")
        };
        assert_eq!(*state, CredentialState::Invalid);
        assert_eq!(presented.as_deref(), Some("API key `unit-live-0001`"));
        let c = gw.api_key("hunter2").credential(label);
        assert!(
            matches!(c, Credential::Refused { presented: Some(ref p), .. } if p == "not a key")
        );
    }

    #[tokio::test]
    async fn a_revoked_key_resolves_and_the_engine_refuses_it_as_revoked() {
        let (gw, _) = gateway().await;
        // Resolution says whose key it is; revocation is the engine's to judge, so every door
        // answers `auth.revoked` (not `auth.invalid`) for it.
        let c = gw.api_key(REVOKED_KEY).credential(label);
        assert_eq!(
            c,
            Credential::ApiKey {
                key_id: "unit-gone-0002".into()
            }
        );
        let attempt = |c: Credential| {
            SendAttempt::new(Door::Sendgrid, c)
                .from("a@example.com")
                .to(["b@example.org"])
                .parsed(10)
        };
        let d = gw.decide("sendgrid", &attempt(c)).await.unwrap();
        assert_eq!(d.decision.denial().unwrap().code.code(), "auth.revoked");
        let live = gw.api_key(LIVE_KEY).credential(label);
        let d = gw.decide("sendgrid", &attempt(live)).await.unwrap();
        assert!(d.decision.accepted(), "{:?}", d.decision.denial());
        let wrong = gw
            .api_key(&LIVE_KEY.replace("0123456789", "9876543210"))
            .credential(label);
        let d = gw.decide("sendgrid", &attempt(wrong)).await.unwrap();
        assert_eq!(d.decision.denial().unwrap().code.code(), "auth.invalid");
    }

    fn token(
        secret: &str,
        kind: TokenKind,
        grant: serde_json::Value,
        expires_in_ms: i64,
    ) -> TokenRecord {
        let now = now_ms() as i64;
        TokenRecord {
            token_sha256: mailgate_auth::sha256_hex(secret.as_bytes()),
            kind,
            grant,
            scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
            family: format!("family-{secret}"),
            created_at_ms: now,
            expires_at_ms: now + expires_in_ms,
            revoked: false,
            used: false,
        }
    }

    #[test]
    fn the_stored_form_of_a_grant_does_not_change() {
        // Tokens already in a store were written in this form: it must keep resolving.
        let user = Grant::User {
            user: "a@example.com".into(),
            client_id: "web".into(),
        };
        assert_eq!(
            serde_json::to_value(&user).unwrap(),
            json!({"type": "user", "user": "a@example.com", "client_id": "web"})
        );
        let sa = Grant::ServiceAccount {
            email: "sa@app.iam.example.com".into(),
            subject: Some("a@example.com".into()),
        };
        assert_eq!(
            serde_json::to_value(&sa).unwrap(),
            json!({"type": "service_account", "email": "sa@app.iam.example.com", "subject": "a@example.com"})
        );
        let code: Grant = serde_json::from_value(json!({
            "type": "code", "user": "a@example.com", "client_id": "web",
            "redirect_uri": "http://127.0.0.1:1/cb", "code_challenge": null
        }))
        .unwrap();
        assert!(matches!(code, Grant::Code { .. }));
    }

    #[tokio::test]
    async fn access_tokens_resolve_to_who_they_speak_for_or_to_a_refusal() {
        let (gw, store) = gateway().await;
        let user = json!({"type": "user", "user": "a@example.com", "client_id": "web"});
        let sa = json!({"type": "service_account", "email": "sa@app.iam.example.com", "subject": "a@example.com"});
        let hour = 3_600_000;
        for t in [
            token("ya29.user", TokenKind::Access, user.clone(), hour),
            token("ya29.sa", TokenKind::Access, sa, hour),
            token("ya29.expired", TokenKind::Access, user.clone(), -1),
            token("1//refresh", TokenKind::Refresh, user.clone(), hour),
            token(
                "ya29.code-grant",
                TokenKind::Access,
                json!({"type": "code", "user": "a@example.com", "client_id": "web", "redirect_uri": "x", "code_challenge": null}),
                hour,
            ),
            token(
                "ya29.garbage",
                TokenKind::Access,
                json!({"type": "nobody"}),
                hour,
            ),
            token("ya29.revoked", TokenKind::Access, user, hour),
        ] {
            store.tokens.insert_token(&t).await.unwrap();
        }
        let rec = store
            .tokens
            .token(&mailgate_auth::sha256_hex(b"ya29.revoked"))
            .await
            .unwrap()
            .unwrap();
        store.tokens.revoke_family(&rec.family).await.unwrap();

        let tokens: &dyn TokenStore = store.tokens.as_ref();
        let resolve = |t: &'static str| {
            let gw = gw.clone();
            async move { gw.resolve_access_token(tokens, t).await.unwrap() }
        };
        assert_eq!(
            resolve("ya29.user").await,
            Credential::OauthUser {
                user: "a@example.com".into(),
                client_id: "web".into(),
                project: "app".into(),
                scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
            }
        );
        assert_eq!(
            resolve("ya29.sa").await,
            Credential::ServiceAccount {
                email: "sa@app.iam.example.com".into(),
                project: "app".into(),
                scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
                subject: Some("a@example.com".into()),
            }
        );
        let refused = |state| Credential::Refused {
            state,
            presented: Some("OAuth access token".into()),
        };
        assert_eq!(
            resolve("ya29.revoked").await,
            refused(CredentialState::Revoked)
        );
        assert_eq!(
            resolve("ya29.expired").await,
            refused(CredentialState::Expired)
        );
        // A refresh token, a code's grant, an unreadable grant and an unknown token are not
        // access tokens.
        for t in [
            "1//refresh",
            "ya29.code-grant",
            "ya29.garbage",
            "ya29.unknown",
            "",
        ] {
            assert_eq!(resolve(t).await, refused(CredentialState::Invalid), "{t}");
        }
        // The SMTP door's form agrees when the store answers.
        assert_eq!(
            gw.credential_for_access_token(tokens, "ya29.revoked").await,
            refused(CredentialState::Revoked)
        );
    }
}
