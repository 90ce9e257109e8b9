//! The admin HTTP API's routes (`/mailgate/v1/...`, every route, body and answer in
//! docs/admin-api.md) and `/healthz`. The queue, captured-mail and simulate handlers are in
//! `queue_api.rs`; what they do is in `mailgate_admin`.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::api::{Admin, ApiPath, ApiQuery, AppState, api_error, json_rejection_status};

/// Below this much free space in the data directory, `/healthz` says `degraded`.
const MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    rustix::fs::statvfs(dir)
        .ok()
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
}

/// Largest admin API request body.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// The HTTP API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/mailgate/v1/users/{email}", get(get_user))
        .route("/mailgate/v1/explain", post(post_explain))
        .route("/mailgate/v1/why", post(post_why))
        .route("/mailgate/v1/decisions/{id}", get(get_decision))
        .route("/mailgate/v1/budget", get(get_budget))
        .route("/mailgate/v1/audit", get(get_audit))
        .route("/mailgate/v1/status", get(get_status))
        .route(
            "/mailgate/v1/messages",
            get(crate::queue_api::list_messages),
        )
        .route(
            "/mailgate/v1/messages/{id}",
            get(crate::queue_api::get_message),
        )
        .route(
            "/mailgate/v1/captured",
            get(crate::queue_api::list_captured),
        )
        .route(
            "/mailgate/v1/captured/{id}",
            get(crate::queue_api::get_captured),
        )
        .route(
            "/mailgate/v1/simulate",
            post(crate::queue_api::post_simulate),
        )
        // Admin requests are small JSON documents; the token is checked before the body is read.
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    // Healthy means: the store answers, its last write succeeded, and there is room to write.
    match state.gateway.store().generation().await {
        Ok(generation) => {
            let mut causes = Vec::new();
            if let Some(fault) = state.gateway.write_fault() {
                causes.push(format!("the store cannot write: {fault}"));
            }
            if let Some(free) = state.data_dir.as_deref().and_then(free_bytes)
                && free < MIN_FREE_BYTES
            {
                causes.push(format!(
                    "the data directory has {} MiB free (below {} MiB): free space or move it",
                    free / (1024 * 1024),
                    MIN_FREE_BYTES / (1024 * 1024)
                ));
            }
            let mut body = json!({
                "service": "mailgate",
                "version": env!("CARGO_PKG_VERSION"),
                "status": if causes.is_empty() { "ok" } else { "degraded" },
                "directory_generation": state.gateway.live().generation,
                "store_generation": generation,
            });
            if causes.is_empty() {
                return Json(body).into_response();
            }
            body["reason"] = json!("store.unavailable");
            body["causes"] = json!(causes);
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "health check: store unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"service": "mailgate", "version": env!("CARGO_PKG_VERSION"), "status": "unavailable", "reason": "store.unavailable", "causes": ["the store does not answer"]})),
            )
                .into_response()
        }
    }
}

async fn get_user(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(email): ApiPath<String>,
) -> Response {
    let snap = state.gateway.live();
    match snap.index.directory().user(&email) {
        Some(u) => {
            let mut u = u.clone();
            // Never hand out hashes either.
            u.password_hash = None;
            Json(json!({"user": u, "directory_generation": snap.generation})).into_response()
        }
        None => api_error(
            StatusCode::NOT_FOUND,
            format!("no user `{email}` in the directory"),
        ),
    }
}

async fn post_explain(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    body: Result<Json<mailgate_admin::explain::ExplainRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return api_error(
                json_rejection_status(&e),
                format!("explain: {}", e.body_text()),
            );
        }
    };
    match mailgate_admin::explain::explain(&state.gateway, &req).await {
        Ok(Ok(d)) => {
            let mut v = mailgate_gateway::decision_json(&d.decision, &d.id);
            if let (Some(_), Some(o)) = (req.principal_hint(), v.as_object_mut()) {
                o.insert(
                    "hint".into(),
                    mailgate_admin::explain::NO_PRINCIPAL_JSON.into(),
                );
            }
            Json(v).into_response()
        }
        Ok(Err(bad)) => api_error(StatusCode::BAD_REQUEST, bad.to_string()),
        Err(e) => {
            tracing::error!(error = %e, "explain failed");
            api_error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}

/// The body of `POST /mailgate/v1/why`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WhyRequest {
    /// The error text or body to explain.
    text: String,
}

/// What an error text means (`mailgate why --json`, docs/why.md): always `200`, with
/// `understood: false` and the questions for a text the table does not know.
async fn post_why(_admin: Admin, body: Result<Json<WhyRequest>, JsonRejection>) -> Response {
    match body {
        Ok(Json(req)) => Json(mailgate_core::why::why_json(&req.text)).into_response(),
        Err(e) => api_error(json_rejection_status(&e), format!("why: {}", e.body_text())),
    }
}

/// What the budgets refused and hold now: refusals before authentication by door and reason
/// (counted, not stored), bytes of bodies buffered, password checks run.
async fn get_budget(State(state): State<Arc<AppState>>, _admin: Admin) -> Response {
    let b = state.gateway.budget();
    let refusals: Vec<_> = b
        .refusal_counts()
        .into_iter()
        .map(|(door, code, count)| json!({"door": door, "code": code, "count": count}))
        .collect();
    Json(json!({
        "unauthenticated_refusals": refusals,
        "data_memory": {"used_bytes": b.data_memory().used(), "max_bytes": b.data_memory().max()},
        "password_checks": b.passwords().checks(),
        "http_connections_refused": crate::listen::REFUSED_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed),
        "tls_handshakes_refused": crate::listen::REFUSED_HANDSHAKES.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .into_response()
}

/// The query of `GET /mailgate/v1/audit`.
#[derive(Debug, Default, serde::Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
}

/// Who changed what in the directory, newest first (`mailgate audit --json`).
async fn get_audit(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).min(1000);
    match mailgate_admin::directory::audit(state.gateway.store(), limit).await {
        Ok(changes) => Json(json!({ "changes": changes })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "audit log lookup failed");
            api_error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}

/// The nodes serving from this store, their heartbeats and leases (`mailgate status --json`).
async fn get_status(State(state): State<Arc<AppState>>, _admin: Admin) -> Response {
    let now = mailgate_gateway::now_ms() as i64;
    match mailgate_admin::status::status(state.gateway.store(), state.queue.as_ref(), now).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "node status lookup failed");
            api_error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}

async fn get_decision(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Response {
    match state.gateway.decision(&id).await {
        Ok(Some(d)) => {
            let body = d.body.parse().unwrap_or_else(|e| {
                tracing::error!(decision_id = %d.id, error = %e, "stored decision trace does not parse");
                serde_json::Value::Null
            });
            Json(mailgate_admin::decisions::document(&d, &body)).into_response()
        }
        Ok(None) => api_error(StatusCode::NOT_FOUND, format!("no decision `{id}`")),
        Err(e) => {
            tracing::error!(error = %e, "decision lookup failed");
            api_error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}
