//! Google's error shapes, byte-compatible with what Google sends, plus Mailgate's explanation in
//! one more `details[]` entry (`"domain": "mailgate"`) and the `X-Mailgate-Decision` header.
//! Google's client libraries parse `error.message`, `error.errors` and `error.details`; an extra
//! ErrorInfo entry reaches the caller as `HttpError.error_details`.

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mailgate_core::catalogue::{GmailReply, Reason, RenderArgs, RequestProblem};
use mailgate_core::engine::Denial;
use serde_json::{Value, json};

/// What Mailgate adds to a refusal.
pub(crate) struct Explanation<'a> {
    pub(crate) code: &'a str,
    pub(crate) check: &'a str,
    pub(crate) object_at_fault: String,
    pub(crate) remedy: &'a str,
    pub(crate) decision_id: Option<&'a str>,
}

/// Renders a Google error body (the shape of docs/gmail.md).
pub(crate) fn google_error(
    reply: &GmailReply,
    method: &str,
    explanation: Option<Explanation<'_>>,
    extra_headers: HeaderMap,
) -> Response {
    let spec = reply.spec;
    let mut first = serde_json::Map::new();
    first.insert("message".into(), json!(reply.errors_message));
    first.insert("domain".into(), json!(spec.domain));
    first.insert("reason".into(), json!(spec.reason));
    if let Some(loc) = spec.location {
        first.insert("location".into(), json!(loc));
        first.insert("locationType".into(), json!("header"));
    }
    if spec.reason == "accessNotConfigured" {
        first.insert(
            "extendedHelp".into(),
            json!("https://console.developers.google.com"),
        );
    }
    let mut details: Vec<Value> = Vec::new();
    if let Some(reason) = spec.error_info {
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": "googleapis.com",
            "metadata": {
                "method": method,
                "service": "gmail.googleapis.com",
            },
        }));
    }
    let decision_id = explanation
        .as_ref()
        .and_then(|e| e.decision_id.map(str::to_owned));
    if let Some(e) = explanation {
        let mut metadata = serde_json::Map::new();
        metadata.insert("code".into(), json!(e.code));
        metadata.insert("check".into(), json!(e.check));
        metadata.insert("object_at_fault".into(), json!(e.object_at_fault));
        metadata.insert("remedy".into(), json!(e.remedy));
        if let Some(id) = e.decision_id {
            metadata.insert("decision_id".into(), json!(id));
        }
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": e.code,
            "domain": "mailgate",
            "metadata": metadata,
        }));
    }
    let mut error = serde_json::Map::new();
    error.insert("code".into(), json!(spec.http_status));
    error.insert("message".into(), json!(reply.message));
    error.insert("errors".into(), json!([first]));
    error.insert("status".into(), json!(spec.status));
    if !details.is_empty() {
        error.insert("details".into(), json!(details));
    }
    let status = StatusCode::from_u16(spec.http_status).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = (status, Json(json!({ "error": error }))).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Origin, X-Origin, Referer"),
    );
    if let Some(id) = decision_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        headers.insert("x-mailgate-decision", id);
    }
    headers.extend(extra_headers);
    resp
}

/// The `WWW-Authenticate` value Google sends on scope errors, naming the accepted scopes.
pub(crate) fn insufficient_scope_header(scopes: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    let v = format!(
        "Bearer realm=\"https://accounts.google.com/\", error=\"insufficient_scope\", scope=\"{}\"",
        scopes.join(" ")
    );
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    h
}

/// Renders an engine denial as Google would answer it, with Mailgate's explanation. `scopes`:
/// the scopes the method takes (`Action::scopes`), named in `WWW-Authenticate` when the token
/// has none of them.
pub(crate) fn denial_response(
    denial: &Denial,
    decision_id: &str,
    method: &str,
    scopes: &[&str],
    now_ms: u64,
) -> Response {
    let Some(reply) = denial.gmail() else {
        // Reasons that never answer on this door (e.g. relay rules) still get an answer.
        return internal_denial(denial, decision_id);
    };
    let mut headers = HeaderMap::new();
    if denial.code == Reason::ScopeInsufficient {
        headers = insufficient_scope_header(scopes);
    }
    if let Some(secs) = denial.retry_after_secs(now_ms)
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        headers.insert(header::RETRY_AFTER, v);
    }
    let remedy = denial.remedy_with_usage();
    google_error(
        &reply,
        method,
        Some(Explanation {
            code: denial.code.code(),
            check: denial.check(),
            object_at_fault: denial.object_at_fault.to_string(),
            remedy: &remedy,
            decision_id: Some(decision_id),
        }),
        headers,
    )
}

fn internal_denial(denial: &Denial, decision_id: &str) -> Response {
    let reply = GmailReply {
        spec: mailgate_core::catalogue::GmailSpec {
            http_status: 403,
            status: "PERMISSION_DENIED",
            reason: "forbidden",
            domain: "global",
            errors_message: None,
            location: None,
            error_info: None,
            message: "",
        },
        message: denial.message.clone(),
        errors_message: denial.message.clone(),
    };
    google_error(
        &reply,
        "",
        Some(Explanation {
            code: denial.code.code(),
            check: denial.check(),
            object_at_fault: denial.object_at_fault.to_string(),
            remedy: &denial.remedy,
            decision_id: Some(decision_id),
        }),
        HeaderMap::new(),
    )
}

/// A request-shape error (not a policy decision): 400 `invalidArgument`, Google's shape.
pub(crate) fn invalid_argument(message: &str) -> Response {
    simple(400, "INVALID_ARGUMENT", "invalidArgument", message)
}

/// A request the door cannot read (not JSON, an unknown `uploadType`, a `userId` too long, a body
/// that broke off): 400 `invalidArgument` in Google's shape, with Mailgate's `message.invalid`
/// and the catalogue's remedy for the `problem` in the `details[]` entry. No decision: nothing
/// was asked of the engine.
pub(crate) fn invalid_request(message: &str, problem: RequestProblem) -> Response {
    let reply = GmailReply {
        spec: mailgate_core::catalogue::GmailSpec {
            http_status: 400,
            status: "INVALID_ARGUMENT",
            reason: "invalidArgument",
            domain: "global",
            errors_message: None,
            location: None,
            error_info: None,
            message: "",
        },
        message: message.to_owned(),
        errors_message: message.to_owned(),
    };
    let reason = problem.reason();
    google_error(
        &reply,
        "",
        Some(Explanation {
            code: reason.code(),
            check: reason.check_name(),
            object_at_fault: "request".into(),
            remedy: problem.remedy(),
            decision_id: None,
        }),
        HeaderMap::new(),
    )
}

/// Any other plain Google error.
pub(crate) fn simple(
    code: u16,
    status: &'static str,
    reason: &'static str,
    message: &str,
) -> Response {
    let reply = GmailReply {
        spec: mailgate_core::catalogue::GmailSpec {
            http_status: code,
            status,
            reason,
            domain: "global",
            errors_message: None,
            location: None,
            error_info: None,
            message: "",
        },
        message: message.to_owned(),
        errors_message: message.to_owned(),
    };
    google_error(&reply, "", None, HeaderMap::new())
}

/// Seconds a client is told to wait after a store fault (`Retry-After`).
pub(crate) const STORE_RETRY_AFTER_SECS: u64 = 5;

/// The reason code of a store fault.
pub(crate) const STORE_UNAVAILABLE: &str = "store.unavailable";

/// A store fault: a temporary refusal, 503 `UNAVAILABLE` as Google answers when its backend is
/// down, with `Retry-After` and Mailgate's reason (`store.unavailable`), so clients retry
/// instead of giving up.
pub(crate) fn unavailable() -> Response {
    temporary(Reason::StoreUnavailable, "store", STORE_RETRY_AFTER_SECS)
}

/// The process holds as many message bodies in memory as its budget allows
/// (`limits.data_memory_bytes`): 503 `UNAVAILABLE` with `Retry-After` and `server.busy`; nothing
/// of the request was kept.
pub(crate) fn busy() -> Response {
    temporary(Reason::ServerBusy, "limits.data_memory_bytes", 2)
}

/// A temporary refusal that is not a decision (the service's state, not the caller's rules).
fn temporary(reason: Reason, object_at_fault: &str, retry_after_secs: u64) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    match reason.gmail_reply(&RenderArgs::default()) {
        Some(reply) => google_error(
            &reply,
            "",
            Some(Explanation {
                code: reason.code(),
                check: reason.check_name(),
                object_at_fault: object_at_fault.into(),
                remedy: reason.spec().remedy,
                decision_id: None,
            }),
            headers,
        ),
        None => {
            let mut r = simple(
                503,
                "UNAVAILABLE",
                "backendError",
                "The service is currently unavailable.",
            );
            r.headers_mut().extend(headers);
            r
        }
    }
}

/// A request body larger than the route allows (`limit` bytes) that is not a message (a setting,
/// a resumable upload's metadata): 413 in Google's shape with the reason code
/// `message.too_large` and its remedy. No decision: the engine judges messages, not these.
pub(crate) fn too_large(limit: usize) -> Response {
    let reason = Reason::MessageTooLarge;
    let args = RenderArgs {
        limit: Some(limit.to_string()),
        ..RenderArgs::default()
    };
    let remedy = mailgate_gateway::body::too_large_remedy(limit);
    match reason.gmail_reply(&args) {
        Some(reply) => google_error(
            &reply,
            "",
            Some(Explanation {
                code: reason.code(),
                check: reason.check_name(),
                object_at_fault: "request body".into(),
                remedy: &remedy,
                decision_id: None,
            }),
            HeaderMap::new(),
        ),
        None => simple(
            413,
            "INVALID_ARGUMENT",
            "uploadTooLarge",
            "Request Entity Too Large",
        ),
    }
}

/// A fault of the door itself: Google's 500 `backendError` (the cause is logged, not told).
pub(crate) fn internal(msg: &str) -> Response {
    tracing::error!(error = msg, "gmail door fault");
    simple(500, "INTERNAL", "backendError", "Backend Error")
}

/// A gateway fault: the store's are temporary (503 + `Retry-After`, `store.unavailable`), the
/// rest internal.
pub(crate) fn fault(e: &mailgate_gateway::GatewayError) -> Response {
    match e {
        mailgate_gateway::GatewayError::Store(e) => {
            tracing::error!(error = %e, "gmail door: store fault");
            unavailable()
        }
        other => internal(&other.to_string()),
    }
}
