//! `mailgate serve`: the listeners, the live directory, graceful shutdown (the admin routes are in
//! `admin_api.rs`).
//!
//! The directory is held in memory as an immutable snapshot behind an `ArcSwap`: requests read it
//! without locks, and a background task swaps in a new snapshot when the store's generation moves
//! (changes made by `mailgate apply` or another node), so no change needs a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::Response;
use mailgate_gateway::Gateway;
use serde_json::json;

use crate::api::AppState;
use crate::config::Config;

/// The bound listeners, reported once the gateway is ready.
pub struct Bound {
    /// Plain HTTP (loopback).
    pub http: SocketAddr,
    /// HTTPS, when a certificate is configured (or generated in demo mode).
    pub https: Option<SocketAddr>,
    /// SMTP submission (STARTTLS when a certificate is configured).
    pub smtp_submission: SocketAddr,
    /// SMTPS (implicit TLS), when a certificate is configured.
    pub smtps: Option<SocketAddr>,
    /// SMTP relay listener.
    pub smtp_relay: SocketAddr,
}

/// Runs the gateway until SIGINT/SIGTERM. `tls` is the HTTPS certificate and key (PEM), if any.
pub async fn run(
    config: &Config,
    state: Arc<AppState>,
    gmail: Arc<mailgate_gmail::GmailState>,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    smtp: Arc<mailgate_smtp::SmtpContext>,
    ready: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    let sendgrid = Arc::new(mailgate_sendgrid::SendgridState::new(state.gateway.clone()));
    let app = crate::admin_api::router(state.clone())
        .merge(mailgate_gmail::router(gmail))
        .merge(mailgate_sendgrid::router(sendgrid))
        .layer(axum::middleware::from_fn(framework_errors_in_json))
        .layer(axum::middleware::from_fn(yield_first));
    let http = crate::listen::bind(config.http_listen, "http.listen").await?;
    let https = match &tls {
        Some(_) => Some(crate::listen::bind(config.https_listen, "https.listen").await?),
        None => None,
    };
    let acceptor = match &tls {
        Some((cert, key)) => Some(crate::listen::https_acceptor(cert, key)?),
        None => None,
    };
    // SMTP: the same certificate, no ALPN.
    let smtp_tls = match &tls {
        Some((cert, key)) => Some(mailgate_tls::server_config_from_pem(cert, key, &[])?),
        None => None,
    };
    let submission =
        crate::listen::bind(config.smtp_submission_listen, "smtp.submission_listen").await?;
    let smtps = match &smtp_tls {
        Some(_) => Some(crate::listen::bind(config.smtps_listen, "smtp.smtps_listen").await?),
        None => None,
    };
    let smtp_relay = crate::listen::bind(config.smtp_relay_listen, "smtp.relay_listen").await?;
    ready(Bound {
        http: http.local_addr()?,
        https: https.as_ref().map(|l| l.local_addr()).transpose()?,
        smtp_submission: submission.local_addr()?,
        smtps: smtps.as_ref().map(|l| l.local_addr()).transpose()?,
        smtp_relay: smtp_relay.local_addr()?,
    });

    let reloader = state
        .gateway
        .spawn_reloader(Duration::from_millis(config.reload_interval_ms));
    let retention = spawn_retention(
        state.gateway.clone(),
        config.retention_decisions_days,
        config.retention_messages_days,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = vec![tokio::spawn(crate::listen::serve(
        http,
        None,
        app.clone(),
        state.gateway.clone(),
        stop_rx.clone(),
    ))];
    if let (Some(l), Some(a)) = (https, acceptor) {
        tasks.push(tokio::spawn(crate::listen::serve(
            l,
            Some(a),
            app,
            state.gateway.clone(),
            stop_rx.clone(),
        )));
    }
    use mailgate_smtp::Listener;
    let mut smtp_listeners = vec![
        (submission, Listener::Submission),
        (smtp_relay, Listener::Relay),
    ];
    if let Some(l) = smtps {
        smtp_listeners.push((l, Listener::Smtps));
    }
    for (l, kind) in smtp_listeners {
        tasks.push(tokio::spawn(mailgate_smtp::serve(
            l,
            kind,
            smtp.clone(),
            smtp_tls.clone(),
            stop_rx.clone(),
        )));
    }
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    reloader.abort();
    retention.abort();
    // No more acceptances: what they handed to this node's workers and no worker took yet
    // (PostgreSQL) is due at once for the other nodes.
    let now = i64::try_from(mailgate_gateway::now_ms()).unwrap_or(i64::MAX);
    match state.queue.release_handed_off(now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            messages = n,
            "delivery: released the accepted messages no worker had taken yet; other nodes deliver them"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not release the accepted messages no worker had taken yet: they are delivered when their lease expires")
        }
    }
    // Writers (the CLI, other nodes' settings APIs) stop waiting for this node.
    state.gateway.leave().await;
    // Decisions of refused sends are written behind the answer (group commit); keep them.
    if let Err(e) = state.gateway.store().flush().await {
        tracing::warn!(error = %e, "could not write the last decisions");
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// No framework error reaches a client as plain text or an empty body: axum's own answers (an
/// unknown route, a wrong method, and the extractors' rejections: a path segment that is not
/// UTF-8 once decoded, a query string that does not deserialize, a body past a limit) are
/// rewritten into the JSON of the door the path belongs to (SendGrid's `errors[]` with
/// Mailgate's explanation in `help` and `X-Mailgate-Code`, Google's `error` object with
/// `errors[]` and Mailgate's `details[]` entry, OAuth's `error`/`error_description` with a
/// `mailgate` object, or the admin API's with `reason`). A rejection of the request's form carries a reason code: `413` is
/// `message.too_large`, any other `4xx` but `404`/`405` (an unknown route or method, which is no
/// message's fault) is `message.invalid`. The doors' own errors are JSON (or the consent page's
/// HTML) already and pass untouched.
async fn framework_errors_in_json(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.starts_with("text/plain"));
    if !plain {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        match status {
            StatusCode::NOT_FOUND => format!("no such route: {path}"),
            StatusCode::METHOD_NOT_ALLOWED => {
                let allow = parts
                    .headers
                    .get(header::ALLOW)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if allow.is_empty() {
                    format!("method not allowed on {path}")
                } else {
                    format!("method not allowed on {path} (allowed: {allow})")
                }
            }
            s => s.canonical_reason().unwrap_or("error").to_owned(),
        }
    } else {
        text
    };
    let p = path.trim_start_matches('/');
    let code = framework_reason(status);
    let doc = if p.starts_with("v3/") {
        "docs/sendgrid.md"
    } else if p.starts_with("mailgate/") {
        "docs/admin-api.md"
    } else {
        "docs/gmail.md"
    };
    let remedy = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!("send a smaller request body ({doc})"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            format!("send the Content-Type this route takes ({doc})")
        }
        _ => format!("fix the request as the message says ({doc})"),
    };
    if let Some(code) = code {
        parts.headers.insert(
            header::HeaderName::from_static("x-mailgate-code"),
            header::HeaderValue::from_static(code),
        );
    }
    let body = if p.starts_with("v3/") {
        let help = code.map(|c| {
            format!(
                "mailgate {c}: {}. Remedy: {remedy}.",
                message.trim_end_matches('.')
            )
        });
        json!({"errors": [{"message": message, "field": null, "help": help}]})
    } else if p.starts_with("gmail/") || p.starts_with("upload/") || p.starts_with("resumable/") {
        let (google_status, reason) = match status {
            StatusCode::NOT_FOUND => ("NOT_FOUND", "notFound"),
            StatusCode::METHOD_NOT_ALLOWED => ("METHOD_NOT_ALLOWED", "httpMethodNotAllowed"),
            StatusCode::UNAUTHORIZED => ("UNAUTHENTICATED", "authError"),
            StatusCode::FORBIDDEN => ("PERMISSION_DENIED", "forbidden"),
            StatusCode::TOO_MANY_REQUESTS => ("RESOURCE_EXHAUSTED", "rateLimitExceeded"),
            StatusCode::PAYLOAD_TOO_LARGE => ("INVALID_ARGUMENT", "uploadTooLarge"),
            s if s.is_server_error() => ("INTERNAL", "backendError"),
            _ => ("INVALID_ARGUMENT", "badRequest"),
        };
        let mut error = json!({
            "code": status.as_u16(),
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": google_status,
        });
        if let Some(c) = code {
            error["details"] = json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": c,
                "domain": "mailgate",
                "metadata": {"code": c, "check": "request", "object_at_fault": "request", "remedy": remedy},
            }]);
        }
        json!({ "error": error })
    } else if matches!(
        p,
        "token" | "revoke" | "tokeninfo" | "oauth2/v4/token" | "oauth2/v3/tokeninfo"
    ) {
        let mut body = json!({"error": "invalid_request", "error_description": message});
        if let Some(c) = code {
            // As the token endpoint's own refusals carry it.
            body["mailgate"] = json!({"code": c, "check": "request", "remedy": remedy});
        }
        body
    } else {
        let mut error = json!({
            "code": status.as_u16(),
            "status": status.canonical_reason().unwrap_or(""),
            "message": message,
        });
        if let Some(c) = code {
            error["reason"] = json!(c);
        }
        json!({ "error": error })
    };
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// The reason code of a framework rejection with `status`: `message.too_large` for a body past a
/// limit, `message.invalid` for any other request the route could not read, none for an unknown
/// route or method or a fault.
fn framework_reason(status: StatusCode) -> Option<&'static str> {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => Some("message.too_large"),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => None,
        s if s.is_client_error() => Some("message.invalid"),
        _ => None,
    }
}

/// Every request gives the worker thread up once before it runs: requests pipelined on one
/// connection (refusals are quick and always ready) otherwise ran back to back and delayed every
/// other task of that worker (measured by the Gmail door's flood test: probe p99 44-135 ms
/// without, 7-25 ms with).
async fn yield_first(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    tokio::task::yield_now().await;
    next.run(req).await
}

/// Applies `[retention]` at start and then hourly (days = 0 keeps that kind forever), on one
/// node at a time (`JobStore::try_job`).
fn spawn_retention(
    gateway: Arc<Gateway>,
    decisions_days: u64,
    messages_days: u64,
) -> tokio::task::JoinHandle<()> {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // One node at a time (PostgreSQL: an advisory lock held for the run; SQLite: the
            // one node). The others skip this run.
            let _job = match gateway.store().try_job("retention").await {
                Ok(Some(guard)) => guard,
                Ok(None) => {
                    tracing::debug!("retention: another node is running it");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention: cannot tell which node runs it; will retry");
                    continue;
                }
            };
            let now = mailgate_gateway::now_ms() as i64;
            let cutoff = |days: u64| {
                (days > 0).then(|| now.saturating_sub((days as i64).saturating_mul(DAY_MS)))
            };
            match gateway
                .store()
                .purge(cutoff(decisions_days), cutoff(messages_days))
                .await
            {
                Ok(p) if p.decisions + p.messages > 0 => tracing::info!(
                    decisions = p.decisions,
                    messages = p.messages,
                    decisions_days,
                    messages_days,
                    "retention: deleted old records"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention: purge failed; will retry"),
            }
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing requests in flight");
}
