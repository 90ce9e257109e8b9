//! The Gmail-compatible front door: Gmail API routes on Google's paths and a Google-style OAuth
//! 2.0 authorization server. A thin adapter: it turns HTTP requests into `SendAttempt`s, asks the
//! gateway, and renders the decision exactly as Google would, plus Mailgate's explanation.

#![allow(
    clippy::result_large_err,
    reason = "handlers return early with a ready `Response` as the error; its size is irrelevant next to network I/O"
)]

mod errors;
mod gmail;
mod oauth;

pub use oauth::credential_for_access_token;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use mailgate_core::engine::{Credential, CredentialState, TlsVersion, Transport};
use mailgate_gateway::Gateway;
use mailgate_store::TokenStore;

/// Google's token endpoint, the audience google-auth puts in every service-account assertion.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";

/// Facts about the connection a request came over, inserted by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnFacts {
    /// The client's address.
    pub peer: SocketAddr,
    /// Negotiated TLS version; `None` on the plain loopback listener.
    pub tls: Option<TlsVersion>,
    /// Whether the listener requires TLS (false only for the explicit loopback dev listener).
    pub listener_requires_tls: bool,
}

impl ConnFacts {
    fn transport(&self, headers: &HeaderMap) -> Transport {
        Transport {
            tls: self.tls,
            listener_requires_tls: self.listener_requires_tls,
            client_ip: Some(self.peer.ip()),
            referrer: headers
                .get(axum::http::header::REFERER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

/// The door's state.
pub struct GmailState {
    gateway: Arc<Gateway>,
    tokens: Arc<dyn TokenStore>,
    audiences: Vec<String>,
    uploads: gmail::Uploads,
}

impl GmailState {
    /// `token_urls`: the URLs of this gateway's token endpoint that JWT `aud` may name (what
    /// `mailgate sa key create` writes as `token_uri`).
    pub fn new(
        gateway: Arc<Gateway>,
        tokens: Arc<dyn TokenStore>,
        token_urls: Vec<String>,
    ) -> Self {
        GmailState {
            gateway,
            tokens,
            audiences: token_urls,
            uploads: Default::default(),
        }
    }

    /// The `aud` values a JWT-bearer assertion may carry: this gateway's token URLs, and
    /// Google's, because google-auth always sets `aud` to `https://oauth2.googleapis.com/token`
    /// whatever the key file's `token_uri` says (google/oauth2/service_account.py). Accepting it is
    /// safe: the signing keys are generated here and registered nowhere else.
    fn token_audiences(&self) -> Vec<String> {
        let mut a = self.audiences.clone();
        a.push(GOOGLE_TOKEN_URL.to_owned());
        a
    }

    /// An API key given as `key=`: Gmail needs OAuth, and the engine says so (`key.unsupported`)
    /// once it knows which key it is.
    fn api_key_credential(&self, key: &str) -> Credential {
        let refused = Credential::Refused {
            state: CredentialState::Invalid,
            presented: Some("API key".into()),
        };
        let Some(id) = mailgate_auth::api_key_id(key) else {
            return refused;
        };
        let live = self.gateway.live();
        match live.index.key(id) {
            Some(k)
                if mailgate_auth::ct_eq(
                    mailgate_auth::sha256_hex(key.as_bytes()).as_bytes(),
                    k.secret_sha256.as_bytes(),
                ) =>
            {
                Credential::ApiKey {
                    key_id: id.to_owned(),
                }
            }
            _ => refused,
        }
    }
}

/// The door's routes. Requests must carry a [`ConnFacts`] extension (the listener adds it).
pub fn router(state: Arc<GmailState>) -> Router {
    let upload_limit = gmail::MAX_MESSAGE_BYTES + 1024 * 1024;
    Router::new()
        .route("/token", post(oauth::token))
        .route("/oauth2/v4/token", post(oauth::token))
        .route("/revoke", post(oauth::revoke))
        .route("/tokeninfo", get(oauth::tokeninfo).post(oauth::tokeninfo))
        .route("/oauth2/v3/tokeninfo", get(oauth::tokeninfo))
        .route(
            "/o/oauth2/auth",
            get(oauth::auth_page).post(oauth::auth_submit),
        )
        .route(
            "/gmail/v1/users/{user_id}/messages/send",
            post(gmail::send_json),
        )
        .route(
            "/upload/gmail/v1/users/{user_id}/messages/send",
            post(gmail::send_upload).put(gmail::send_upload),
        )
        .route(
            "/resumable/upload/gmail/v1/users/{user_id}/messages/send",
            post(gmail::send_upload).put(gmail::send_upload),
        )
        .route("/gmail/v1/users/{user_id}/profile", get(gmail::profile))
        .route(
            "/gmail/v1/users/{user_id}/settings/sendAs",
            get(gmail::send_as_list).post(gmail::send_as_create),
        )
        .route(
            "/gmail/v1/users/{user_id}/settings/sendAs/{email}",
            get(gmail::send_as_get)
                .put(gmail::send_as_update)
                .patch(gmail::send_as_update)
                .delete(gmail::send_as_delete),
        )
        .route(
            "/gmail/v1/users/{user_id}/settings/sendAs/{email}/verify",
            post(gmail::send_as_verify),
        )
        .layer(DefaultBodyLimit::max(upload_limit))
        .with_state(state)
}
