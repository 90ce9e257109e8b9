//! Admin API for the queue and captured mail:
//!
//! - `GET /mailgate/v1/messages?state=&limit=`: newest first.
//! - `GET /mailgate/v1/messages/{id}`: state, attempts, per-recipient state and last reply (verbatim),
//!   next attempt, decision_id, and the history of every attempt.
//! - `GET /mailgate/v1/captured`: captured messages with from, to and subject.
//! - `GET /mailgate/v1/captured/{id}`: raw and parsed (headers, parts); `?format=raw` returns the
//!   message itself as `message/rfc822`.
//! - `POST /mailgate/v1/simulate` `{"principal", "code", "for": "10m"}` (or `"clear": true`):
//!   fault injection, as `mailgate simulate`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use mailgate_admin::AdminError;
use mailgate_admin::faults;
use mailgate_admin::queue::{self, CapturedSummary, rfc3339};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Admin, ApiPath, ApiQuery, AppState, api_error, json_rejection_status};

/// Query of the listings.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    format: Option<String>,
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "queue lookup failed");
    api_error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
}

/// `GET /mailgate/v1/messages`
pub async fn list_messages(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).min(1000);
    let filter = match q.state.as_deref().map(queue::parse_state).transpose() {
        Ok(f) => f,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e),
    };
    match queue::messages(state.queue.as_ref(), filter, limit).await {
        Ok(list) => Json(json!({"messages": list})).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `GET /mailgate/v1/messages/{id}`
pub async fn get_message(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Response {
    match queue::message(state.queue.as_ref(), &id).await {
        Ok(Some(s)) => {
            let mut v = serde_json::to_value(&s).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("accepted_at".into(), json!(rfc3339(s.entry.accepted_at_ms)));
                o.insert(
                    "next_attempt_at".into(),
                    json!(s.entry.next_attempt_ms.map(rfc3339)),
                );
            }
            Json(v).into_response()
        }
        Ok(None) => api_error(StatusCode::NOT_FOUND, format!("no message `{id}`")),
        Err(e) => unavailable(e),
    }
}

/// `GET /mailgate/v1/captured`
pub async fn list_captured(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).min(1000);
    match queue::captured_list(state.queue.as_ref(), limit).await {
        Ok(list) => Json(json!({ "messages": list })).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `GET /mailgate/v1/captured/{id}`
pub async fn get_captured(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Response {
    match queue::captured(state.queue.as_ref(), &id).await {
        Ok(Some(c)) => {
            if q.format.as_deref() == Some("raw") {
                return ([(header::CONTENT_TYPE, "message/rfc822")], c.raw).into_response();
            }
            let mut v = json!(CapturedSummary::of(&c));
            if let Some(o) = v.as_object_mut() {
                o.insert("raw".into(), json!(String::from_utf8_lossy(&c.raw)));
                o.insert("parsed".into(), queue::parsed(&c));
            }
            Json(v).into_response()
        }
        Ok(None) => api_error(StatusCode::NOT_FOUND, format!("no captured message `{id}`")),
        Err(e) => unavailable(e),
    }
}

/// Body of `POST /mailgate/v1/simulate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulateRequest {
    principal: String,
    code: Option<String>,
    #[serde(rename = "for")]
    duration: Option<String>,
    #[serde(default)]
    clear: bool,
}

/// `POST /mailgate/v1/simulate`
pub async fn post_simulate(
    State(state): State<Arc<AppState>>,
    Admin(who): Admin,
    body: Result<Json<SimulateRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return api_error(
                json_rejection_status(&e),
                format!("simulate: {}", e.body_text()),
            );
        }
    };
    let q = state.gateway.store();
    let result = if req.clear {
        faults::clear(q, &req.principal).await.map(|_| None)
    } else {
        let Some(code) = req.code.as_deref() else {
            return api_error(StatusCode::BAD_REQUEST, "simulate: `code` is required");
        };
        let duration = req.duration.as_deref().unwrap_or("10m");
        let actor = format!("admin-token:{who}");
        faults::inject(q, &req.principal, code, duration, &actor)
            .await
            .map(Some)
    };
    match result {
        Ok(fault) => {
            // In force at once on this node (other nodes read it when they reload).
            if let Err(e) = state.gateway.reload_faults().await {
                return unavailable(e);
            }
            Json(json!({
                "principal": req.principal.to_ascii_lowercase(),
                "cleared": req.clear,
                "fault": fault.map(|f| json!({
                    "code": f.code,
                    "until": rfc3339(f.until_ms),
                    "injected": true,
                })),
            }))
            .into_response()
        }
        Err(AdminError::Invalid(e)) => api_error(StatusCode::BAD_REQUEST, format!("simulate: {e}")),
        Err(e) => unavailable(e),
    }
}
