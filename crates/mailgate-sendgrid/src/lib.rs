//! The SendGrid-compatible front door: `POST /v3/mail/send` as the official clients
//! (sendgrid-python, @sendgrid/mail, sendgrid-go) call it, the API key management API
//! (`/v3/api_keys`, `/v3/scopes`) and IP Access Management (`/v3/access_settings/whitelist`).
//!
//! A thin adapter like the Gmail door: it authenticates the `Bearer` key (SHA-256 lookup), turns
//! each personalization into a `SendAttempt`, asks the gateway, and renders the decision exactly as
//! SendGrid would, with Mailgate's explanation in `help` and the `X-Mailgate-Decision` header. It
//! never decides a send itself. Key management changes the directory through
//! `mailgate_gateway::edit_directory`, so the same validation and commit rules as the CLI apply.

#![allow(
    clippy::result_large_err,
    reason = "handlers return early with a ready `Response` as the error; its size is irrelevant next to network I/O"
)]

mod errors;
mod keys;
mod mail;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, header};
use axum::routing::{MethodRouter, any, get, post};
use mailgate_core::engine::{Credential, CredentialState, Transport};
use mailgate_gateway::Gateway;
pub use mailgate_gmail::ConnFacts;

/// The largest request SendGrid accepts (total message size, attachments included).
pub const MAX_REQUEST_BYTES: usize = 30 * 1024 * 1024;

/// The door's state.
pub struct SendgridState {
    gateway: Arc<Gateway>,
}

impl SendgridState {
    /// A door on `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        SendgridState { gateway }
    }

    /// The credential an `Authorization` header presents: nothing, a key whose secret matched
    /// (the engine judges revocation, expiry and restrictions), or a refused one.
    fn credential(&self, headers: &HeaderMap) -> Credential {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Credential::None;
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value)
            .trim();
        if token.is_empty() {
            return Credential::None;
        }
        let refused = |presented: Option<String>| Credential::Refused {
            state: CredentialState::Invalid,
            presented,
        };
        let Some(id) = mailgate_auth::api_key_id(token) else {
            return refused(Some("API key (not SG.<id>.<secret>)".into()));
        };
        let live = self.gateway.live();
        match live.index.key(id) {
            Some(k)
                if mailgate_auth::ct_eq(
                    mailgate_auth::sha256_hex(token.as_bytes()).as_bytes(),
                    k.secret_sha256.as_bytes(),
                ) =>
            {
                Credential::ApiKey {
                    key_id: id.to_owned(),
                }
            }
            _ => refused(Some(format!("API key `{id}`"))),
        }
    }
}

/// Connection facts for the engine.
fn transport(conn: &ConnFacts, headers: &HeaderMap) -> Transport {
    Transport {
        tls: conn.tls,
        listener_requires_tls: conn.listener_requires_tls,
        client_ip: Some(conn.peer.ip()),
        referrer: headers
            .get(header::REFERER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// Each route, also with a doubled leading slash: sendgrid-python given a host ending in `/`
/// requests `//v3/mail/send`.
fn both(
    r: Router<Arc<SendgridState>>,
    path: &str,
    m: MethodRouter<Arc<SendgridState>>,
) -> Router<Arc<SendgridState>> {
    r.route(path, m.clone()).route(&format!("/{path}"), m)
}

/// The door's routes. Requests must carry a [`ConnFacts`] extension (the listener adds it).
pub fn router(state: Arc<SendgridState>) -> Router {
    let mut r = Router::new();
    r = both(
        r,
        "/v3/mail/send",
        post(mail::send).fallback(mail::method_not_allowed),
    );
    r = both(
        r,
        "/v3/api_keys",
        get(keys::list_keys)
            .post(keys::create_key)
            .fallback(keys::method_not_allowed),
    );
    r = both(
        r,
        "/v3/api_keys/{id}",
        get(keys::get_key)
            .patch(keys::patch_key)
            .put(keys::put_key)
            .delete(keys::delete_key)
            .fallback(keys::method_not_allowed),
    );
    r = both(r, "/v3/scopes", get(keys::scopes));
    r = both(
        r,
        "/v3/access_settings/whitelist",
        get(keys::whitelist_list)
            .post(keys::whitelist_add)
            .delete(keys::whitelist_delete_many),
    );
    r = both(
        r,
        "/v3/access_settings/whitelist/{rule_id}",
        get(keys::whitelist_get).delete(keys::whitelist_delete_one),
    );
    r = both(r, "/v3/{*rest}", any(keys::not_found));
    r.layer(DefaultBodyLimit::disable()).with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use mailgate_core::orgfile::OrgFile;
    use mailgate_store::{Changeset, SqliteStore, Store as _};
    use tower::ServiceExt as _;

    const KEY: &str = "SG.unit-key-0001.c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2Vj";

    async fn app() -> Router {
        let store = Arc::new(SqliteStore::in_memory().await.unwrap());
        let org = format!(
            "domains: [{{name: example.com, verified: true}}]\nusers:\n  - email: a@example.com\napi_keys:\n  - name: k\n    id: unit-key-0001\n    secret_sha256: {}\n    owner: a@example.com\n    permissions: [mail.send]\n",
            mailgate_auth::sha256_hex(KEY.as_bytes())
        );
        let dir = OrgFile::parse(&org).unwrap().directory;
        store
            .commit(0, &Changeset::between(&Default::default(), &dir), "t")
            .await
            .unwrap();
        let gw = Gateway::open(store).await.unwrap();
        router(Arc::new(SendgridState::new(gw)))
    }

    fn req(method: &str, path: &str, key: Option<&str>, body: &str) -> Request<Body> {
        let mut r = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        let mut r = r.body(Body::from(body.to_owned())).unwrap();
        r.extensions_mut().insert(ConnFacts {
            peer: "127.0.0.1:5000".parse().unwrap(),
            tls: None,
            listener_requires_tls: false,
        });
        r
    }

    async fn json_of(r: axum::response::Response) -> serde_json::Value {
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    const MAIL: &str = r#"{"from":{"email":"a@example.com"},"subject":"s","personalizations":[{"to":[{"email":"b@example.org"}]}],"content":[{"type":"text/plain","value":"x"}]}"#;

    #[tokio::test]
    async fn wrong_method_is_405_before_any_credential_check() {
        let r = app()
            .await
            .oneshot(req("GET", "/v3/mail/send", None, ""))
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
        assert_eq!(
            json_of(r).await,
            serde_json::json!({"errors":[{"message":"POST method allowed only","field":null,"help":null}]})
        );
    }

    #[tokio::test]
    async fn missing_key_is_sendgrids_401_with_an_explanation() {
        let r = app()
            .await
            .oneshot(req("POST", "/v3/mail/send", None, MAIL))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("x-mailgate-decision"));
        let v = json_of(r).await;
        assert_eq!(
            v["errors"][0]["message"],
            "Permission denied, wrong credentials"
        );
        assert_eq!(v["errors"][0]["field"], serde_json::Value::Null);
        assert!(
            v["errors"][0]["help"]
                .as_str()
                .unwrap()
                .starts_with("mailgate auth.missing: ")
        );
    }

    #[tokio::test]
    async fn a_valid_send_is_202_also_on_a_doubled_slash() {
        let app = app().await;
        for path in ["/v3/mail/send", "//v3/mail/send"] {
            let r = app
                .clone()
                .oneshot(req("POST", path, Some(KEY), MAIL))
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "{path}");
            assert_eq!(r.headers()["x-message-id"].len(), 22);
        }
        let r = app
            .clone()
            .oneshot(req("GET", "/v3/nothing/here", Some(KEY), ""))
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }

    #[tokio::test]
    async fn wrong_content_type_is_415_and_bad_json_400() {
        let app = app().await;
        let mut r = req("POST", "/v3/mail/send", Some(KEY), MAIL);
        r.headers_mut()
            .insert("content-type", "text/plain".parse().unwrap());
        let resp = app.clone().oneshot(r).await.unwrap();
        assert_eq!(resp.status(), 415);
        let resp = app
            .clone()
            .oneshot(req("POST", "/v3/mail/send", Some(KEY), "{not json"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(json_of(resp).await["errors"][0]["message"], "Bad Request");
    }
}
