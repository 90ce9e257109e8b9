//! The Gmail-compatible front door: Gmail API routes on Google's paths and a Google-style OAuth
//! 2.0 authorization server. A thin adapter: it turns HTTP requests into `SendAttempt`s, asks the
//! gateway, and renders the decision exactly as Google would, plus Mailgate's explanation.

#![allow(
    clippy::result_large_err,
    reason = "handlers return early with a ready `Response` as the error; its size is irrelevant next to network I/O"
)]

mod caller;
mod errors;
mod gmail;
mod oauth;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use mailgate_core::engine::Credential;
use mailgate_gateway::Gateway;
use mailgate_store::TokenStore;

/// Google's token endpoint, the audience google-auth puts in every service-account assertion.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";

/// The door's state.
pub struct GmailState {
    gateway: Arc<Gateway>,
    tokens: Arc<dyn TokenStore>,
    audiences: Vec<String>,
    /// Key of the consent form's anti-CSRF tokens (random per process).
    csrf_key: [u8; 32],
}

impl GmailState {
    /// `token_urls`: the URLs of this gateway's token endpoint that JWT `aud` may name (what
    /// `mailgate sa key create` writes as `token_uri`).
    pub fn new(
        gateway: Arc<Gateway>,
        tokens: Arc<dyn TokenStore>,
        token_urls: Vec<String>,
    ) -> Self {
        // Without the OS random source nothing here is safe: a fixed key would make CSRF
        // tokens forgeable, so fall back to a key nobody can learn (the time and address of
        // this allocation are not secret enough, but the process also refuses every token
        // minting without randomness, so the consent flow cannot complete anyway).
        let csrf_key = mailgate_auth::random_bytes::<32>().unwrap_or_else(|_| {
            tracing::error!("no randomness for the consent page's CSRF key");
            let mut k = [0u8; 32];
            let t = mailgate_gateway::now_ms().to_le_bytes();
            k[..8].copy_from_slice(&t);
            k
        });
        GmailState {
            gateway,
            tokens,
            audiences: token_urls,
            csrf_key,
        }
    }

    /// The `Location` of a new resumable upload session: never the request's `Host` header
    /// (anyone can send any), but one of this gateway's configured URLs (`http.public_url`, and
    /// the HTTPS listener's names): the one the request's `Host` names, else the public URL.
    fn upload_location(&self, headers: &HeaderMap, user_id: &str, id: &str) -> Option<String> {
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let bases: Vec<url::Url> = self
            .audiences
            .iter()
            .filter_map(|t| t.strip_suffix("/token"))
            .filter_map(|b| url::Url::parse(b).ok())
            .collect();
        let authority = |u: &url::Url| match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => String::new(),
        };
        let mut url = bases
            .iter()
            .find(|u| authority(u).eq_ignore_ascii_case(host))
            .or_else(|| bases.first())?
            .clone();
        url.path_segments_mut().ok()?.pop_if_empty().extend([
            "upload", "gmail", "v1", "users", user_id, "messages", "send",
        ]);
        url.query_pairs_mut()
            .append_pair("uploadType", "resumable")
            .append_pair("upload_id", id);
        Some(url.into())
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
        self.gateway.api_key(key).credential(|_| "API key".into())
    }
}

/// A refusal may leave the request's body unread (refused from its headers): the connection
/// cannot carry another request then, and the server closes it. Saying so (`Connection: close`
/// on HTTP/1, for a request that had a body) makes clients open a new one instead of reusing a
/// closed one.
async fn close_after_error(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let http1 = req.version() <= axum::http::Version::HTTP_11;
    let has_body = req
        .headers()
        .contains_key(axum::http::header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut r = next.run(req).await;
    if http1 && has_body && (r.status().is_client_error() || r.status().is_server_error()) {
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
}

/// The largest body of an OAuth request (`/token`, `/revoke`, the consent form): a JWT
/// assertion is a few KB.
pub const MAX_OAUTH_BODY_BYTES: usize = 64 * 1024;

/// The door's routes. Requests must carry a [`mailgate_gateway::ConnFacts`] extension (the
/// listener adds it).
///
/// Bodies: the OAuth routes' forms are read by axum's extractor, at most
/// [`MAX_OAUTH_BODY_BYTES`]; the Gmail routes read theirs themselves, only once the engine passed
/// the credential (a 35 MiB message: at most 36 MiB for an upload, 50 MiB of JSON with `raw`;
/// 64 KiB for a setting), so no body is buffered for a request without a valid credential. A
/// body past its limit is read on and dropped ([`mailgate_gateway::body::discard_rest`],
/// bounded) before the `413`.
pub fn router(state: Arc<GmailState>) -> Router {
    let oauth = Router::new()
        .route("/token", post(oauth::token))
        .route("/oauth2/v4/token", post(oauth::token))
        .route("/revoke", post(oauth::revoke))
        .route("/tokeninfo", get(oauth::tokeninfo).post(oauth::tokeninfo))
        .route("/oauth2/v3/tokeninfo", get(oauth::tokeninfo))
        .route(
            "/o/oauth2/auth",
            get(oauth::auth_page).post(oauth::auth_submit),
        )
        .layer(DefaultBodyLimit::max(MAX_OAUTH_BODY_BYTES));
    let gmail = Router::new()
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
        // Bodies are read by the handlers after authentication, with their own limits.
        .layer(DefaultBodyLimit::max(gmail::MAX_SETTINGS_BODY_BYTES))
        .layer(axum::middleware::from_fn(close_after_error));
    oauth.merge(gmail).with_state(state)
}
