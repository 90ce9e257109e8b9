//! SendGrid's error envelope, `{"errors":[{"message","field","help"}]}`, byte-compatible with what
//! SendGrid sends, plus Mailgate's explanation: in `help` (where SendGrid leaves it `null`) and in
//! the `X-Mailgate-Decision` / `X-Mailgate-Code` headers. Every error has a JSON body and a real
//! reason phrase, because sendgrid-python's `e.to_dict` parses the body and @sendgrid/client's
//! `err.message` is the status text.

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mailgate_core::catalogue::{Reason, RequestProblem};
use mailgate_core::directory::SEND_COST_UNITS;
use mailgate_core::engine::{Denial, LimitState};
use serde_json::{Value, json};

/// Where SendGrid's validation errors point (`help`).
pub(crate) const HELP_BASE: &str =
    "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html";

/// One entry of `errors[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) message: String,
    pub(crate) field: Option<String>,
    pub(crate) help: Option<String>,
}

impl FieldError {
    /// A validation error with SendGrid's help anchor (`#message.<path without indices>`).
    pub(crate) fn at(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            message: message.into(),
            field: Some(field.to_owned()),
            help: Some(help_for(field)),
        }
    }

    /// An error without field or help.
    pub(crate) fn plain(message: impl Into<String>) -> FieldError {
        FieldError {
            message: message.into(),
            field: None,
            help: None,
        }
    }

    fn to_json(&self) -> Value {
        json!({"message": self.message, "field": self.field, "help": self.help})
    }
}

/// `personalizations.0.to.1.email` -> `...errors.html#message.personalizations.to`.
pub(crate) fn help_for(field: &str) -> String {
    let path: Vec<&str> = field
        .split('.')
        .filter(|s| !s.is_empty() && !s.bytes().all(|b| b.is_ascii_digit()) && *s != "email")
        .collect();
    format!("{HELP_BASE}#message.{}", path.join("."))
}

/// A response with SendGrid's envelope.
pub(crate) fn envelope(status: u16, errors: &[FieldError]) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let body = json!({"errors": errors.iter().map(FieldError::to_json).collect::<Vec<_>>()});
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A single plain error.
pub(crate) fn simple(status: u16, message: &str) -> Response {
    envelope(status, &[FieldError::plain(message)])
}

/// Mailgate's explanation of a denial, as it goes into `help` (a limit's remedy with its usage;
/// for a request's form, the catalogue's remedy in SendGrid's terms, `RequestProblem::remedy`).
pub(crate) fn explanation(denial: &Denial, decision_id: &str) -> String {
    let message = denial.message.trim_end_matches('.');
    let remedy = denial.remedy_with_usage();
    let remedy = remedy.trim_end_matches('.');
    format!(
        "mailgate {}: {message}. Object at fault: {}. Remedy: {remedy}. Decision: {decision_id}",
        denial.code.code(),
        denial.object_at_fault,
    )
}

/// Adds the decision id and code headers.
pub(crate) fn mark(headers: &mut HeaderMap, decision_id: &str, code: &str) {
    if let Ok(v) = HeaderValue::from_str(decision_id) {
        headers.insert("x-mailgate-decision", v);
    }
    if let Ok(v) = HeaderValue::from_str(code) {
        headers.insert("x-mailgate-code", v);
    }
}

/// The `X-RateLimit-*` headers for a limit that ran out (sendgrid-go parses `Reset` with Atoi:
/// integer Unix seconds).
pub(crate) fn rate_limit_headers(headers: &mut HeaderMap, l: &LimitState, now_ms: u64) {
    let per_minute = match l.name {
        mailgate_core::directory::LimitName::Rate => l.limit / SEND_COST_UNITS,
        _ => l.limit,
    };
    let reset_ms = l.reset_at_ms.unwrap_or(now_ms + 1000);
    let pairs = [
        ("x-ratelimit-limit", per_minute.to_string()),
        ("x-ratelimit-remaining", "0".to_owned()),
        ("x-ratelimit-reset", reset_ms.div_ceil(1000).to_string()),
        (
            "retry-after",
            reset_ms
                .saturating_sub(now_ms)
                .div_ceil(1000)
                .max(1)
                .to_string(),
        ),
    ];
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    }
}

/// Renders an engine denial as SendGrid would answer it, with Mailgate's explanation in `help`.
/// `validation`: the request's validation errors, rendered instead when the denial is
/// `message.invalid` (SendGrid lists every problem at once).
pub(crate) fn denial_response(
    denial: &Denial,
    decision_id: &str,
    now_ms: u64,
    validation: &[FieldError],
) -> Response {
    let code = denial.code.code();
    let mut resp = if denial.code == mailgate_core::catalogue::Reason::MessageInvalid
        && !validation.is_empty()
    {
        envelope(400, validation)
    } else {
        let (status, message, field) = match denial.sendgrid() {
            Some(r) => (r.http_status, r.message, r.field),
            None => (403, "access forbidden".to_owned(), None),
        };
        envelope(
            status,
            &[FieldError {
                message,
                field,
                help: Some(explanation(denial, decision_id)),
            }],
        )
    };
    let headers = resp.headers_mut();
    mark(headers, decision_id, code);
    if resp.status() == StatusCode::TOO_MANY_REQUESTS
        && let Some(l) = &denial.limit
    {
        rate_limit_headers(resp.headers_mut(), l, now_ms);
    }
    resp
}

/// Renders the engine's refusal of a management call (key management, IP access, sender
/// identities). SendGrid answers a key that lacks the call's scope with `403 access forbidden`
/// (the catalogue's SendGrid reply for `permission.missing`, `401 Authenticated user is not
/// authorized to send mail`, is its answer to a send); any other refusal as for a send.
pub(crate) fn management_denial_response(
    denial: &Denial,
    decision_id: &str,
    now_ms: u64,
) -> Response {
    if denial.code != Reason::PermissionMissing {
        return denial_response(denial, decision_id, now_ms, &[]);
    }
    let mut r = envelope(
        403,
        &[FieldError {
            message: "access forbidden".into(),
            field: None,
            help: Some(explanation(denial, decision_id)),
        }],
    );
    mark(r.headers_mut(), decision_id, denial.code.code());
    r
}

/// A refusal of a key-management request's form, which no decision is made about (the engine
/// judges calls, not how their bodies are spelled): `status` with SendGrid's `message`, the
/// reason code in `X-Mailgate-Code`, and in `help` what is wrong and `remedy`, how the request
/// is formed.
fn request_error(
    status: u16,
    message: String,
    reason: Reason,
    what: &str,
    remedy: &str,
) -> Response {
    let code = reason.code();
    let mut r = envelope(
        status,
        &[FieldError {
            message,
            field: None,
            help: Some(format!("mailgate {code}: {what}. Remedy: {remedy}.")),
        }],
    );
    r.headers_mut()
        .insert("x-mailgate-code", HeaderValue::from_static(code));
    r
}

/// A key-management body that is not JSON: 400 with what is wrong with it (line and column) and
/// the reason code `message.invalid`.
pub(crate) fn invalid_json(e: &serde_json::Error) -> Response {
    let detail = crate::wire::json_problem(e);
    request_error(
        400,
        format!("invalid request: {detail}"),
        Reason::MessageInvalid,
        &detail,
        RequestProblem::NotJson.remedy(),
    )
}

/// `policy.too_many_recipients` on this door: the directory's `limits.recipients_per_message`
/// caps each message, and each personalization is one message, so the refusal names the
/// personalization and that limit (the catalogue's text speaks of a per-request limit, which on
/// this door is SendGrid's 1000 across all personalizations, checked apart).
pub(crate) fn too_many_recipients(
    denial: &Denial,
    decision_id: &str,
    personalization: usize,
    recipients: usize,
) -> Response {
    let limit = denial.args.limit.as_deref().unwrap_or("?");
    let mut r = envelope(
        400,
        &[FieldError {
            message: format!(
                "There is a limit of {limit} recipients (to + cc + bcc) per personalization: Mailgate makes one message per personalization, and limits.recipients_per_message allows {limit} recipients per message; this personalization has {recipients}."
            ),
            field: Some(format!("personalizations.{personalization}")),
            help: Some(explanation(denial, decision_id)),
        }],
    );
    mark(r.headers_mut(), decision_id, denial.code.code());
    r
}

/// A bug (a state the door should never reach): 500 with SendGrid's generic text.
pub(crate) fn internal(detail: &str) -> Response {
    tracing::error!(error = detail, "sendgrid door fault");
    simple(500, "internal server error")
}

/// Seconds a client is told to wait after a temporary refusal (store fault, memory budget).
pub(crate) const RETRY_AFTER_SECS: u32 = 5;

/// A store (or counters) fault: the catalogue's `store.unavailable`, a temporary refusal:
/// `503` with `Retry-After` in SendGrid's envelope, Mailgate's explanation in `help` and the code
/// in `X-Mailgate-Code`. SendGrid's clients treat a 503 as retryable; nothing was stored.
pub(crate) fn unavailable(detail: &str) -> Response {
    tracing::error!(
        error = detail,
        "sendgrid door: the store cannot serve the request"
    );
    let reason = Reason::StoreUnavailable;
    let spec = reason.spec();
    let (status, message) = spec
        .sendgrid
        .reply()
        .map_or((503, "service unavailable"), |r| (r.http_status, r.message));
    let mut r = envelope(
        status,
        &[FieldError {
            message: message.to_owned(),
            field: None,
            help: Some(format!(
                "mailgate {}: {}. Remedy: {} (retry after {RETRY_AFTER_SECS} seconds).",
                reason.code(),
                spec.message.trim_end_matches('.'),
                spec.remedy.trim_end_matches('.'),
            )),
        }],
    );
    let h = r.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    h.insert("x-mailgate-code", HeaderValue::from_static(reason.code()));
    r
}

/// A gateway fault (store or counters), rendered as [`unavailable`].
pub(crate) fn fault(e: &mailgate_gateway::GatewayError) -> Response {
    unavailable(&e.to_string())
}

/// The process holds as many message bodies in memory as its budget allows
/// (`limits.data_memory_bytes`): a temporary refusal, `503` with `Retry-After`.
pub(crate) fn busy(m: &mailgate_gateway::budget::MemoryBudget) -> Response {
    tracing::warn!(
        used = m.used(),
        max = m.max(),
        "sendgrid door: message memory budget spent; request refused for now"
    );
    let reason = Reason::ServerBusy;
    let mut r = envelope(
        503,
        &[FieldError {
            message: "service unavailable".into(),
            field: None,
            help: Some(format!(
                "mailgate {}: the gateway is holding as many message bodies in memory as it may ({} bytes) and took nothing from this request. Remedy: {} (retry after {RETRY_AFTER_SECS} seconds).",
                reason.code(),
                m.max(),
                reason.spec().remedy.trim_end_matches('.'),
            )),
        }],
    );
    let h = r.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    h.insert("x-mailgate-code", HeaderValue::from_static(reason.code()));
    r
}

/// `413` with SendGrid's text for a key-management request over `limit` bytes, before or while
/// it was read; the remedy is the one every door gives for such a body.
pub(crate) fn too_large(limit: usize) -> Response {
    request_error(
        413,
        "content too large".into(),
        Reason::MessageTooLarge,
        "the request body is over this endpoint's limit; nothing past it was kept",
        &mailgate_gateway::body::too_large_remedy(limit),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_anchor_drops_indices_and_email() {
        assert_eq!(
            help_for("personalizations.0.to.1.email"),
            format!("{HELP_BASE}#message.personalizations.to")
        );
        assert_eq!(help_for("from.email"), format!("{HELP_BASE}#message.from"));
        assert_eq!(
            help_for("attachments.1.content"),
            format!("{HELP_BASE}#message.attachments.content")
        );
    }

    #[test]
    fn envelope_has_all_three_keys_with_nulls() {
        let r = simple(401, "Permission denied, wrong credentials");
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
    }
}
