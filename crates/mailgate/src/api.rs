//! What every admin API handler shares: the server's state, the admin-token extractor, and the
//! admin API's JSON errors (for its own refusals and for axum's extractor rejections).

use std::sync::Arc;

use axum::Json;
use axum::extract::Path;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mailgate_gateway::Gateway;
use serde_json::json;

/// Shared state of a running gateway's HTTP API.
pub struct AppState {
    /// The gateway every door shares.
    pub gateway: Arc<Gateway>,
    /// The delivery queue (message status, captured mail).
    pub queue: Arc<dyn mailgate_store::QueueStore>,
    /// The directory of the SQLite database file (its free space is part of health); `None`
    /// when the store is not a file (PostgreSQL).
    pub data_dir: Option<std::path::PathBuf>,
}

/// The status for a refused JSON body: 413 past the admin API's body limit, 415 without a JSON
/// content type, 400 for anything else (bad JSON or the wrong shape).
pub fn json_rejection_status(e: &JsonRejection) -> StatusCode {
    match e.status() {
        s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// A Mailgate admin API error in its JSON shape: `{"error": {"code", "status", "message"}}`.
pub fn api_error(code: StatusCode, message: impl Into<String>) -> Response {
    let mut resp = (
        code,
        Json(json!({"error": {
            "code": code.as_u16(),
            "status": code.canonical_reason().unwrap_or(""),
            "message": message.into(),
        }})),
    )
        .into_response();
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"mailgate-admin\""),
        );
    }
    resp
}

/// An admin API caller whose bearer token matched (the token's name). Extracted from the request
/// head before any other extractor, so an unauthenticated request never has its body read.
pub(crate) struct Admin(pub(crate) String);

impl axum::extract::FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Response> {
        admin(state, &parts.headers).await.map(Admin)
    }
}

/// `Query` whose rejection (a malformed query string) is the admin API's JSON error, not axum's
/// plain text.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| ApiQuery(q))
            .map_err(|e| api_error(StatusCode::BAD_REQUEST, e.body_text()))
    }
}

/// `Path` whose rejection (e.g. a segment that is not UTF-8 once decoded) is the admin API's JSON
/// error.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| api_error(StatusCode::BAD_REQUEST, e.body_text()))
    }
}

/// Checks the admin bearer token; returns the token's name.
async fn admin(state: &AppState, headers: &HeaderMap) -> Result<String, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(api_error(
            StatusCode::UNAUTHORIZED,
            "admin API: send `Authorization: Bearer <admin token>` (create one with `mailgate admin-token create NAME`)",
        ));
    };
    let hash = mailgate_auth::sha256_hex(token.as_bytes());
    match state.gateway.store().admin_token(&hash).await {
        Ok(Some(name)) => Ok(name),
        Ok(None) => Err(api_error(
            StatusCode::UNAUTHORIZED,
            "admin API: unknown admin token",
        )),
        Err(e) => {
            tracing::error!(error = %e, "admin token lookup failed");
            Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable",
            ))
        }
    }
}
