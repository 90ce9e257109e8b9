//! The SendGrid-compatible front door: `POST /v3/mail/send` as the official clients
//! (sendgrid-python, @sendgrid/mail, sendgrid-go) call it, the API key management API
//! (`/v3/api_keys`, `/v3/scopes`), IP Access Management (`/v3/access_settings/whitelist`) and,
//! read-only, the sender identities (`/v3/verified_senders`, `/v3/whitelabel/domains`).
//!
//! A thin adapter like the Gmail door: it resolves the `Bearer` key through the gateway, turns
//! each personalization into a `SendAttempt` (and each management call into one for
//! `Action::Manage` with the route's scope, `extract::Key`), asks the gateway, and renders the
//! decision exactly as SendGrid would, with Mailgate's explanation in `help` and the
//! `X-Mailgate-Decision` header. It never decides a call itself. Key management changes the
//! directory through `mailgate_gateway::edit_directory`, so the same validation and commit rules
//! as the CLI apply.

#![allow(
    clippy::result_large_err,
    reason = "handlers return early with a ready `Response` as the error; its size is irrelevant next to network I/O"
)]

mod errors;
mod extract;
mod keys;
mod mail;
mod senders;
mod wire;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, header};
use axum::routing::{MethodRouter, any, get, post};
pub use extract::KEYS_BODY_LIMIT;
pub use mail::{MAX_EXPANDED_BYTES, MAX_MESSAGE_BYTES};
use mailgate_core::engine::Credential;
use mailgate_gateway::{ConnFacts, Gateway};
pub use wire::PARSE_BUDGET_BYTES;

/// The largest request SendGrid accepts (total message size, attachments included): the
/// engine's `SENDGRID_MAX_REQUEST_BYTES`, which refuses a request over it.
pub const MAX_REQUEST_BYTES: usize = mailgate_core::engine::SENDGRID_MAX_REQUEST_BYTES as usize;

/// The door's state.
pub struct SendgridState {
    gateway: Arc<Gateway>,
    /// Parses and builds of mail/send bodies running at once (on the blocking pool): half the
    /// cores, at least one, so large sends never take every core from the async workers
    /// (which serve every other request and door).
    heavy: Arc<tokio::sync::Semaphore>,
}

impl SendgridState {
    /// A door on `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        SendgridState {
            gateway,
            heavy: Arc::new(tokio::sync::Semaphore::new((cores / 2).max(1))),
        }
    }

    /// Runs CPU-heavy `job` (parsing, MIME building) on the gateway's low-priority heavy-work
    /// threads, at most [`SendgridState::heavy`] at once; `None` if the job panicked (a bug,
    /// logged) or the heavy-work queue is full.
    pub(crate) async fn heavy<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _permit = self.heavy.clone().acquire_owned().await.ok()?;
        match self.gateway.budget().heavy().run(job).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "sendgrid door: a heavy job did not run");
                None
            }
        }
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
        self.gateway.api_key(token).credential(|id| match id {
            Some(id) => format!("API key `{id}`"),
            None => "API key (not SG.<id>.<secret>)".into(),
        })
    }
}

/// A refusal may leave the request's body unread (refused from its headers): the connection
/// cannot carry another request then, and the server closes it. Saying so (`Connection: close`
/// on HTTP/1, for a request that had a body, as the Gmail door does) makes clients with a
/// keep-alive pool (Node's default agent, for @sendgrid/client) open a new connection instead of
/// reusing a closed one.
async fn close_after_error(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let http1 = req.version() <= axum::http::Version::HTTP_11;
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut r = next.run(req).await;
    if http1 && has_body && (r.status().is_client_error() || r.status().is_server_error()) {
        r.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
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

/// The door's routes. Requests must carry a [`ConnFacts`] extension (the listener adds it; the
/// type is the gateway's, shared with the Gmail door).
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
    r = both(r, "/v3/verified_senders", get(senders::verified_senders));
    r = both(r, "/v3/whitelabel/domains", get(senders::domains));
    r = both(r, "/v3/{*rest}", any(keys::not_found));
    // Handlers read bodies after the key, with the gateway's body reader and each route's limit
    // (`extract::KeysJson`, mail/send); this limit only guards any extractor added later.
    r.layer(DefaultBodyLimit::max(KEYS_BODY_LIMIT))
        .layer(axum::middleware::from_fn(close_after_error))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use mailgate_core::orgfile::OrgFile;
    use mailgate_store::Changeset;
    use tower::ServiceExt as _;

    const KEY: &str = "SG.unit-key-0001.c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2Vj";
    /// A key that may manage keys.
    const ADMIN_KEY: &str = "SG.unit-key-0002.YWRtaW5hZG1pbmFkbWluYWRtaW5hZG1pbmFkbWluYWRt";

    async fn app() -> Router {
        let store = mailgate_store::in_memory().await.unwrap().directory;
        let org = format!(
            "domains: [{{name: example.com, verified: true}}]\nusers:\n  - email: a@example.com\napi_keys:\n  - name: k\n    id: unit-key-0001\n    secret_sha256: {}\n    owner: a@example.com\n    permissions: [mail.send]\n  - name: admin\n    id: unit-key-0002\n    secret_sha256: {}\n    owner: a@example.com\n    permissions: [mail.send, api_keys.create, api_keys.read, api_keys.update, access_settings.whitelist.create]\n",
            mailgate_auth::sha256_hex(KEY.as_bytes()),
            mailgate_auth::sha256_hex(ADMIN_KEY.as_bytes())
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
        assert_eq!(resp.headers()["x-mailgate-code"], "message.invalid");
        let v = json_of(resp).await;
        assert_eq!(
            v["errors"][0]["message"],
            "Content-Type should be application/json."
        );
        let help = v["errors"][0]["help"].as_str().unwrap();
        assert!(
            help.contains("Remedy: send Content-Type: application/json"),
            "{help}"
        );
        assert!(!help.contains("base64url"), "{help}");
        let resp = app
            .clone()
            .oneshot(req("POST", "/v3/mail/send", Some(KEY), "{not json"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()["x-mailgate-code"], "message.invalid");
        let v = json_of(resp).await;
        assert_eq!(
            v["errors"][0]["message"],
            "Bad Request: the body is not valid JSON: key must be a string at line 1 column 2"
        );
        let help = v["errors"][0]["help"].as_str().unwrap();
        assert!(help.starts_with("mailgate message.invalid: "), "{help}");
        assert!(
            help.contains("Remedy: send the body as one JSON object"),
            "{help}"
        );
        assert!(!help.contains("raw"), "{help}");
    }

    fn with_length(mut r: Request<Body>, len: u64) -> Request<Body> {
        r.headers_mut()
            .insert("content-length", len.to_string().parse().unwrap());
        r
    }

    #[tokio::test]
    async fn key_management_without_a_key_is_401_whatever_the_body() {
        let app = app().await;
        let big = "x".repeat(200_000);
        for (method, path) in [
            ("POST", "/v3/api_keys"),
            ("PUT", "/v3/api_keys/unit-key-0001"),
            ("PATCH", "/v3/api_keys/unit-key-0001"),
            ("POST", "/v3/access_settings/whitelist"),
            ("DELETE", "/v3/access_settings/whitelist"),
        ] {
            let r = app
                .clone()
                .oneshot(with_length(req(method, path, None, &big), 1 << 30))
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{method} {path}");
            assert_eq!(
                json_of(r).await["errors"][0]["message"],
                "Permission denied, wrong credentials"
            );
        }
    }

    #[tokio::test]
    async fn a_refusal_of_a_request_with_a_body_closes_the_connection() {
        let app = app().await;
        let r = app
            .clone()
            .oneshot(with_length(req("POST", "/v3/api_keys", None, "{}"), 2))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["connection"], "close");
        let r = app
            .clone()
            .oneshot(with_length(
                req("POST", "/v3/mail/send", Some(KEY), MAIL),
                MAIL.len() as u64,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert!(!r.headers().contains_key("connection"));
    }

    #[tokio::test]
    async fn a_key_without_the_routes_scope_is_403_before_its_body_is_read() {
        let app = app().await;
        // Announced as 1 GiB: had the body been read first, this would be the 413.
        for (method, path, scope) in [
            ("POST", "/v3/api_keys", "api_keys.create"),
            ("PUT", "/v3/api_keys/unit-key-0001", "api_keys.update"),
            ("PATCH", "/v3/api_keys/unit-key-0001", "api_keys.update"),
            ("DELETE", "/v3/api_keys/unit-key-0001", "api_keys.delete"),
            ("GET", "/v3/api_keys", "api_keys.read"),
            (
                "POST",
                "/v3/access_settings/whitelist",
                "access_settings.whitelist.create",
            ),
            (
                "DELETE",
                "/v3/access_settings/whitelist",
                "access_settings.whitelist.delete",
            ),
            (
                "GET",
                "/v3/access_settings/whitelist/1",
                "access_settings.whitelist.read",
            ),
        ] {
            let r = app
                .clone()
                .oneshot(with_length(req(method, path, Some(KEY), "{}"), 1 << 30))
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{method} {path}");
            assert_eq!(r.headers()["x-mailgate-code"], "permission.missing");
            let decision = r.headers()["x-mailgate-decision"]
                .to_str()
                .unwrap()
                .to_owned();
            let v = json_of(r).await;
            assert_eq!(v["errors"][0]["message"], "access forbidden", "{v}");
            assert_eq!(v["errors"][0]["field"], serde_json::Value::Null, "{v}");
            let help = v["errors"][0]["help"].as_str().unwrap();
            assert!(
                help.starts_with("mailgate permission.missing: API key `unit-key-0001` lacks the ")
                    && help.contains(&format!(
                        "Remedy: add {scope} to api_keys[unit-key-0001].permissions"
                    ))
                    && help.ends_with(&format!("Decision: {decision}")),
                "{method} {path}: {help}"
            );
        }
        // Any accepted key may read its own scopes, and one holding mail.send its senders.
        let r = app
            .clone()
            .oneshot(req("GET", "/v3/scopes", Some(KEY), ""))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            json_of(r).await,
            serde_json::json!({"scopes": ["mail.send"]})
        );
        let r = app
            .clone()
            .oneshot(req("GET", "/v3/verified_senders", Some(KEY), ""))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            json_of(r).await["results"][0]["from_email"],
            "a@example.com"
        );
    }

    #[tokio::test]
    async fn a_key_grants_only_known_scopes_it_holds_itself() {
        let app = app().await;
        // The admin key holds api_keys.create but not api_keys.delete.
        let r = app
            .clone()
            .oneshot(req(
                "POST",
                "/v3/api_keys",
                Some(ADMIN_KEY),
                r#"{"name":"n","scopes":["mail.send","api_keys.delete"]}"#,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["x-mailgate-code"], "permission.missing");
        let v = json_of(r).await;
        assert_eq!(v["errors"][0]["message"], "access forbidden", "{v}");
        let help = v["errors"][0]["help"].as_str().unwrap();
        assert!(
            help.contains("Remedy: add api_keys.delete to api_keys[unit-key-0002].permissions"),
            "{help}"
        );
        let r = app
            .clone()
            .oneshot(req(
                "PUT",
                "/v3/api_keys/unit-key-0001",
                Some(ADMIN_KEY),
                r#"{"name":"n","scopes":["no.such.scope"]}"#,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v = json_of(r).await;
        assert_eq!(v["errors"][0]["field"], "scopes", "{v}");
        // Nothing was made or changed: the key still has only mail.send.
        let r = app
            .clone()
            .oneshot(req("GET", "/v3/scopes", Some(KEY), ""))
            .await
            .unwrap();
        assert_eq!(
            json_of(r).await,
            serde_json::json!({"scopes": ["mail.send"]})
        );
    }

    #[tokio::test]
    async fn a_key_management_body_that_is_not_json_is_400_naming_where() {
        let r = app()
            .await
            .oneshot(req(
                "POST",
                "/v3/api_keys",
                Some(ADMIN_KEY),
                "{\"name\": nope}",
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-mailgate-code"], "message.invalid");
        let v = json_of(r).await;
        let m = v["errors"][0]["message"].as_str().unwrap();
        assert!(
            m.starts_with("invalid request: ") && m.contains("line 1"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn mail_send_past_the_memory_budget_is_a_503_to_retry() {
        let store = mailgate_store::in_memory().await.unwrap().directory;
        let org = format!(
            "domains: [{{name: example.com, verified: true}}]\nusers:\n  - email: a@example.com\napi_keys:\n  - name: k\n    id: unit-key-0001\n    secret_sha256: {}\n    owner: a@example.com\n    permissions: [mail.send]\n",
            mailgate_auth::sha256_hex(KEY.as_bytes())
        );
        let dir = OrgFile::parse(&org).unwrap().directory;
        store
            .commit(0, &Changeset::between(&Default::default(), &dir), "t")
            .await
            .unwrap();
        let limits = mailgate_gateway::budget::Limits {
            data_memory_bytes: 64,
            ..Default::default()
        };
        let gw = Gateway::open_with_limits(store, limits).await.unwrap();
        let app = router(Arc::new(SendgridState::new(gw)));
        let r = app
            .clone()
            .oneshot(with_length(
                req("POST", "/v3/mail/send", Some(KEY), MAIL),
                MAIL.len() as u64,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "5");
        assert_eq!(r.headers()["x-mailgate-code"], "server.busy");
        let v = json_of(r).await;
        assert_eq!(v["errors"][0]["message"], "service unavailable");
        assert!(
            v["errors"][0]["help"]
                .as_str()
                .unwrap()
                .starts_with("mailgate server.busy: "),
            "{v}"
        );
    }

    #[tokio::test]
    async fn key_management_bodies_are_limited_to_64_kib() {
        let app = app().await;
        // Announced over the limit: refused from the header.
        let r = app
            .clone()
            .oneshot(with_length(
                req("POST", "/v3/api_keys", Some(ADMIN_KEY), r#"{"name":"n"}"#),
                (KEYS_BODY_LIMIT + 1) as u64,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        let v = json_of(r).await;
        assert_eq!(v["errors"][0]["message"], "content too large");
        assert!(
            v["errors"][0]["help"]
                .as_str()
                .unwrap()
                .starts_with("mailgate message.too_large: ")
        );
        // Sent over the limit without a length (as chunked): refused while reading.
        let body = format!(r#"{{"name":"{}"}}"#, "n".repeat(KEYS_BODY_LIMIT));
        let r = app
            .clone()
            .oneshot(req("POST", "/v3/api_keys", Some(ADMIN_KEY), &body))
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        // Within it: the key is made.
        let r = app
            .clone()
            .oneshot(req(
                "POST",
                "/v3/api_keys",
                Some(ADMIN_KEY),
                r#"{"name":"new","scopes":["mail.send"]}"#,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }

    #[tokio::test]
    async fn mail_send_over_30_mb_announced_is_413_before_reading() {
        let app = app().await;
        let r = app
            .clone()
            .oneshot(with_length(
                req("POST", "/v3/mail/send", Some(KEY), MAIL),
                MAX_REQUEST_BYTES as u64 + 1,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        assert_eq!(r.headers()["x-mailgate-code"], "message.too_large");
        assert!(r.headers().contains_key("x-mailgate-decision"));
        let v = json_of(r).await;
        assert_eq!(v["errors"][0]["message"], "content too large");
        assert_eq!(v["errors"][0]["field"], serde_json::Value::Null);
        // The explanation is the engine's decision on SendGrid's limit (not the organisation's
        // limits.max_message_bytes, which allows 35 MiB here).
        let help = v["errors"][0]["help"].as_str().unwrap();
        assert!(help.starts_with("mailgate message.too_large: "), "{help}");
        assert!(
            help.contains(
                "Object at fault: the SendGrid-compatible API's request size limit. Remedy: send a smaller message or split it: the SendGrid-compatible API takes requests up to 31457280 bytes (30 MB)"
            ),
            "{help}"
        );
        // Without a key the answer is the 401, whatever the length.
        let r = app
            .clone()
            .oneshot(with_length(
                req("POST", "/v3/mail/send", None, MAIL),
                MAX_REQUEST_BYTES as u64 + 1,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }

    #[tokio::test]
    async fn a_wrong_content_type_without_a_key_is_still_401() {
        let app = app().await;
        let mut r = req("POST", "/v3/mail/send", None, "[0,0,0]");
        r.headers_mut()
            .insert("content-type", "text/plain".parse().unwrap());
        let resp = app.clone().oneshot(r).await.unwrap();
        assert_eq!(resp.status(), 401);
    }

    #[tokio::test]
    async fn too_many_personalizations_are_counted_not_kept() {
        let app = app().await;
        let mut body = String::from(
            r#"{"from":{"email":"a@example.com"},"subject":"s","content":[{"type":"text/plain","value":"x"}],"personalizations":[{}"#,
        );
        for _ in 0..20_000 {
            body.push_str(",{}");
        }
        body.push_str("]}");
        let r = app
            .clone()
            .oneshot(req("POST", "/v3/mail/send", Some(KEY), &body))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v = json_of(r).await;
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("You have provided 20001 personalizations"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn substitutions_that_expand_too_far_are_refused_naming_the_field() {
        let app = app().await;
        let body = serde_json::json!({"from":{"email":"a@example.com"},"subject":"s",
            "personalizations":[{"to":[{"email":"b@example.org"}],"substitutions":{"a":"y".repeat(1000)}}],
            "content":[{"type":"text/plain","value":"a".repeat(40_000)}]})
        .to_string();
        let r = app
            .clone()
            .oneshot(req("POST", "/v3/mail/send", Some(KEY), &body))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v = json_of(r).await;
        assert_eq!(v["errors"][0]["field"], "personalizations.0.substitutions");
        // The same request size without the expansion goes through.
        let body = serde_json::json!({"from":{"email":"a@example.com"},"subject":"s",
            "personalizations":[{"to":[{"email":"b@example.org"}],"substitutions":{"a":"y"}}],
            "content":[{"type":"text/plain","value":"a".repeat(40_000)}]})
        .to_string();
        let r = app
            .clone()
            .oneshot(req("POST", "/v3/mail/send", Some(KEY), &body))
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }

    #[tokio::test]
    async fn copies_of_a_large_message_past_the_request_budget_are_refused_up_front() {
        let app = app().await;
        let pers: Vec<serde_json::Value> = (0..30)
            .map(|i| serde_json::json!({"to":[{"email":format!("r{i}@example.org")}]}))
            .collect();
        let body = serde_json::json!({"from":{"email":"a@example.com"},"subject":"s",
            "personalizations": pers,
            "content":[{"type":"text/plain","value":"z".repeat(3 * 1024 * 1024)}]})
        .to_string();
        let r = app
            .clone()
            .oneshot(req("POST", "/v3/mail/send", Some(KEY), &body))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v = json_of(r).await;
        assert_eq!(v["errors"][0]["field"], "personalizations");
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("one message per personalization"),
            "{v}"
        );
    }
}
