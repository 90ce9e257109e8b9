//! Admin API for the queue and captured mail:
//!
//! - `GET /mailgate/v1/messages?state=&limit=`: newest first.
//! - `GET /mailgate/v1/messages/{id}`: state, attempts, per-recipient state and last reply (verbatim),
//!   next attempt, decision_id, and the history of every attempt.
//! - `GET /mailgate/v1/captured`: captured messages with from, to and subject.
//! - `GET /mailgate/v1/captured/{id}`: raw and parsed (headers, parts); `?format=raw` returns the
//!   message itself as `message/rfc822`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mailgate_store::{CapturedMessage, QueueFilter};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::serve::{AppState, admin, api_error};

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
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `GET /mailgate/v1/messages`
pub async fn list_messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = admin(&state, &headers).await {
        return r;
    }
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
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = admin(&state, &headers).await {
        return r;
    }
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
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = admin(&state, &headers).await {
        return r;
    }
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
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = admin(&state, &headers).await {
        return r;
    }
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
