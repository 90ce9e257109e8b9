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
use mailgate_store::{CapturedMessage, QueueFilter};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::serve::{Admin, ApiPath, ApiQuery, AppState, api_error};

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

/// RFC 3339 of Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    // One format everywhere (CLI, admin API, refusals): RFC 3339 UTC with milliseconds.
    mailgate_core::engine::rfc3339_ms(ms.max(0) as u64)
}

/// `GET /mailgate/v1/messages`
pub async fn list_messages(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Response {
    let filter = QueueFilter {
        state: q.state,
        limit: q.limit.unwrap_or(100).min(1000),
    };
    match state.queue.list_queue(&filter).await {
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
    match state.queue.message_status(&id).await {
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

fn captured_json(c: &CapturedMessage) -> Value {
    let s = mailgate_relay::capture::summary(&c.raw);
    json!({
        "id": c.id,
        "decision_id": c.decision_id,
        "accepted_at": rfc3339(c.accepted_at_ms),
        "captured_at": c.captured_at_ms.map(rfc3339),
        "envelope_from": c.envelope_from,
        "recipients": c.recipients,
        "size": c.size,
        "from": s.from,
        "to": s.to,
        "subject": s.subject,
    })
}

/// `GET /mailgate/v1/captured`
pub async fn list_captured(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Response {
    match state
        .queue
        .list_captured(q.limit.unwrap_or(100).min(1000))
        .await
    {
        Ok(list) => Json(json!({"messages": list.iter().map(captured_json).collect::<Vec<_>>()}))
            .into_response(),
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
    match state.queue.captured_message(&id).await {
        Ok(Some(c)) => {
            if q.format.as_deref() == Some("raw") {
                return ([(header::CONTENT_TYPE, "message/rfc822")], c.raw).into_response();
            }
            let mut v = captured_json(&c);
            if let Some(o) = v.as_object_mut() {
                o.insert("raw".into(), json!(String::from_utf8_lossy(&c.raw)));
                o.insert("parsed".into(), mailgate_relay::capture::parsed(&c.raw));
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
                crate::serve::json_rejection_status(&e),
                format!("simulate: {}", e.body_text()),
            );
        }
    };
    let result = if req.clear {
        state.queue.clear_fault(&req.principal).await.map(|_| None)
    } else {
        let Some(code) = req.code.as_deref() else {
            return api_error(StatusCode::BAD_REQUEST, "simulate: `code` is required");
        };
        let f = match crate::queue_cli::new_fault(
            &req.principal,
            code,
            req.duration.as_deref().unwrap_or("10m"),
            &format!("admin-token:{who}"),
        ) {
            Ok(f) => f,
            Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("simulate: {e}")),
        };
        state.queue.set_fault(&f).await.map(|_| Some(f))
    };
    match result {
        Ok(fault) => {
            // In force at once on this node (other nodes poll the store).
            if let Err(e) =
                crate::relay_setup::load_faults(&state.gateway, state.queue.as_ref()).await
            {
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
        Err(e) => unavailable(e),
    }
}
