//! Gmail API routes, on Google's paths so a client's `api_endpoint` override is all it takes:
//! `users.messages.send` (JSON `raw`, media, multipart and resumable uploads), `users.getProfile`
//! and `users.settings.sendAs` (list, get).
//!
//! The door gathers facts into a `SendAttempt` and asks the gateway; it never decides. Every
//! handler states the method it serves in its signature ([`Caller<M>`](crate::caller::Caller)):
//! the engine decides that method's action (a send, or reading or changing settings, with the
//! scopes Google's discovery document gives each method) and the door renders the answer.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body as RequestBody;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use mailgate_core::engine::{
    Body, Credential, GMAIL_MAX_MESSAGE_BYTES, Originator, RequestProblem, SEND_SCOPES, SendAttempt,
};
use mailgate_gateway::{Accepted, Message};
use mailgate_store::UploadOpened;
use serde::Deserialize;
use serde_json::json;

use crate::GmailState;
use crate::caller::{
    Caller, CommonParams, CreateSendAs, DeleteSendAs, GetProfile, ListSendAs, Method as _,
    SendMessage, UpdateSendAs, VerifySendAs, acting_address,
};
use crate::errors::{
    denial_response, fault, internal, invalid_argument, invalid_request, simple, too_large,
    unavailable,
};
use mailgate_gateway::body::{self, ReadFail};

/// Gmail's upload limit: 35 MiB.
pub(crate) const MAX_MESSAGE_BYTES: usize = GMAIL_MAX_MESSAGE_BYTES as usize;

/// Google's name of `users.messages.send`, in its refusals' `ErrorInfo`.
const SEND_METHOD: &str = SendMessage::RPC;

/// `GET /gmail/v1/users/{userId}/profile`.
pub(crate) async fn profile(
    State(st): State<Arc<GmailState>>,
    caller: Caller<GetProfile>,
) -> Response {
    match caller.address(&st) {
        Ok(addr) => Json(json!({
            "emailAddress": addr,
            "messagesTotal": 0,
            "threadsTotal": 0,
            "historyId": "1",
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// `GET /gmail/v1/users/{userId}/settings/sendAs`.
pub(crate) async fn send_as_list(
    State(st): State<Arc<GmailState>>,
    caller: Caller<ListSendAs>,
) -> Response {
    let addr = match caller.address(&st) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let live = st.gateway.live();
    let Some(user) = live.index.directory().user(&addr) else {
        return simple(
            400,
            "FAILED_PRECONDITION",
            "failedPrecondition",
            "Precondition check failed.",
        );
    };
    Json(json!({ "sendAs": send_as_resources(user) })).into_response()
}

/// `GET /gmail/v1/users/{userId}/settings/sendAs/{sendAsEmail}`.
pub(crate) async fn send_as_get(
    State(st): State<Arc<GmailState>>,
    caller: Caller<ListSendAs>,
    Path((_, email)): Path<(String, String)>,
) -> Response {
    let addr = match caller.address(&st) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let live = st.gateway.live();
    let found = live
        .index
        .directory()
        .user(&addr)
        .map(send_as_resources)
        .unwrap_or_default()
        .into_iter()
        .find(|r| {
            r["sendAsEmail"]
                .as_str()
                .is_some_and(|e| e.eq_ignore_ascii_case(&email))
        });
    match found {
        Some(r) => Json(r).into_response(),
        None => simple(
            404,
            "NOT_FOUND",
            "notFound",
            "Requested entity was not found.",
        ),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SendAsBody {
    send_as_email: Option<String>,
    display_name: Option<String>,
    reply_to_address: Option<String>,
}

enum SendAsProblem {
    NotFound,
    Exists,
    Primary,
    NoUser,
}

impl SendAsProblem {
    fn response(&self) -> Response {
        match self {
            SendAsProblem::NotFound => simple(
                404,
                "NOT_FOUND",
                "notFound",
                "Requested entity was not found.",
            ),
            SendAsProblem::Exists => simple(
                409,
                "ALREADY_EXISTS",
                "duplicate",
                "Requested entity already exists",
            ),
            SendAsProblem::Primary => {
                invalid_argument("The primary send-as address cannot be deleted")
            }
            SendAsProblem::NoUser => simple(
                400,
                "FAILED_PRECONDITION",
                "failedPrecondition",
                "Precondition check failed.",
            ),
        }
    }
}

/// Runs a send-as change for `addr` through the directory, then reloads it so it applies at once.
async fn edit_send_as(
    st: &GmailState,
    addr: &str,
    f: impl FnMut(&mut mailgate_core::directory::Directory) -> Result<serde_json::Value, SendAsProblem>,
) -> Response {
    let actor = format!("gmail-api:{addr}");
    match mailgate_gateway::edit_directory(st.gateway.store(), &actor, f).await {
        Ok(v) => {
            if let Err(e) = st.gateway.refresh().await {
                tracing::warn!(error = %e, "directory reload after a send-as change failed");
            }
            Json(v).into_response()
        }
        Err(mailgate_gateway::EditError::Refused(p)) => p.response(),
        Err(mailgate_gateway::EditError::Invalid(issues)) => invalid_argument(
            &issues
                .first()
                .map(|i| i.message.clone())
                .unwrap_or_else(|| "Invalid send-as address".into()),
        ),
        Err(mailgate_gateway::EditError::Store(e)) => {
            tracing::error!(error = %e, "gmail door: store fault");
            unavailable()
        }
        Err(mailgate_gateway::EditError::Busy) => simple(
            503,
            "UNAVAILABLE",
            "backendError",
            "The service is currently unavailable.",
        ),
    }
}

fn find_user<'a>(
    d: &'a mut mailgate_core::directory::Directory,
    addr: &str,
) -> Result<&'a mut mailgate_core::directory::User, SendAsProblem> {
    d.user_mut(addr).ok_or(SendAsProblem::NoUser)
}

fn resource_of(
    user: &mailgate_core::directory::User,
    email: &str,
) -> Result<serde_json::Value, SendAsProblem> {
    send_as_resources(user)
        .into_iter()
        .find(|r| {
            r["sendAsEmail"]
                .as_str()
                .is_some_and(|e| e.eq_ignore_ascii_case(email))
        })
        .ok_or(SendAsProblem::NotFound)
}

/// `POST .../settings/sendAs`: a new send-as address; `accepted` when its domain is one of the
/// organisation's verified domains, else `pending` until verified.
pub(crate) async fn send_as_create(
    State(st): State<Arc<GmailState>>,
    caller: Caller<CreateSendAs>,
    headers: HeaderMap,
    body: RequestBody,
) -> Response {
    let addr = match caller.address(&st) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let body = match read_small(&headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let b = match serde_json::from_slice::<SendAsBody>(&body) {
        Ok(b) => b,
        Err(e) => {
            return invalid_request(
                &format!("Invalid JSON payload received. {e}"),
                RequestProblem::SendAsJson,
            );
        }
    };
    let Some(email) = b.send_as_email.clone().map(|e| e.trim().to_owned()) else {
        return invalid_argument("sendAsEmail is required");
    };
    edit_send_as(&st, &addr, |d| {
        let domain = mailgate_core::validate::domain_of(&email).to_ascii_lowercase();
        let verified = d.domains.iter().any(|x| x.name == domain && x.verified);
        let user = find_user(d, &addr)?;
        if user.email.eq_ignore_ascii_case(&email)
            || user.aliases.iter().any(|a| a.eq_ignore_ascii_case(&email))
            || user
                .send_as
                .iter()
                .any(|s| s.email.eq_ignore_ascii_case(&email))
        {
            return Err(SendAsProblem::Exists);
        }
        user.send_as.push(mailgate_core::directory::SendAs {
            email: email.clone(),
            display_name: b.display_name.clone().filter(|s| !s.is_empty()),
            reply_to: b.reply_to_address.clone().filter(|s| !s.is_empty()),
            status: if verified {
                mailgate_core::directory::SendAsStatus::Accepted
            } else {
                mailgate_core::directory::SendAsStatus::Pending
            },
        });
        resource_of(user, &email)
    })
    .await
}

/// `PUT`/`PATCH .../settings/sendAs/{email}`: display name and reply-to.
pub(crate) async fn send_as_update(
    State(st): State<Arc<GmailState>>,
    caller: Caller<UpdateSendAs>,
    headers: HeaderMap,
    Path((_, email)): Path<(String, String)>,
    body: RequestBody,
) -> Response {
    let addr = match caller.address(&st) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let body = match read_small(&headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let b = match serde_json::from_slice::<SendAsBody>(&body) {
        Ok(b) => b,
        Err(e) => {
            return invalid_request(
                &format!("Invalid JSON payload received. {e}"),
                RequestProblem::SendAsJson,
            );
        }
    };
    edit_send_as(&st, &addr, |d| {
        let user = find_user(d, &addr)?;
        if user.email.eq_ignore_ascii_case(&email) {
            if let Some(n) = &b.display_name {
                user.display_name = Some(n.clone()).filter(|s| !s.is_empty());
            }
        } else {
            let s = user
                .send_as
                .iter_mut()
                .find(|s| s.email.eq_ignore_ascii_case(&email))
                .ok_or(SendAsProblem::NotFound)?;
            if let Some(n) = &b.display_name {
                s.display_name = Some(n.clone()).filter(|x| !x.is_empty());
            }
            if let Some(r) = &b.reply_to_address {
                s.reply_to = Some(r.clone()).filter(|x| !x.is_empty());
            }
        }
        resource_of(user, &email)
    })
    .await
}

/// `DELETE .../settings/sendAs/{email}`.
pub(crate) async fn send_as_delete(
    State(st): State<Arc<GmailState>>,
    caller: Caller<DeleteSendAs>,
    Path((_, email)): Path<(String, String)>,
) -> Response {
    let addr = match caller.address(&st) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let r = edit_send_as(&st, &addr, |d| {
        let user = find_user(d, &addr)?;
        if user.email.eq_ignore_ascii_case(&email) {
            return Err(SendAsProblem::Primary);
        }
        let before = user.send_as.len();
        user.send_as
            .retain(|s| !s.email.eq_ignore_ascii_case(&email));
        if user.send_as.len() == before {
            return Err(SendAsProblem::NotFound);
        }
        Ok(serde_json::Value::Null)
    })
    .await;
    if r.status().is_success() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        r
    }
}

/// `POST .../settings/sendAs/{email}/verify`: asks for the verification again. Mailgate records
/// the request; an administrator (or the address owner through the directory) accepts it.
pub(crate) async fn send_as_verify(
    State(st): State<Arc<GmailState>>,
    caller: Caller<VerifySendAs>,
    Path((_, email)): Path<(String, String)>,
) -> Response {
    let addr = match caller.address(&st) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let live = st.gateway.live();
    let pending = live.index.directory().user(&addr).and_then(|u| {
        u.send_as
            .iter()
            .find(|s| s.email.eq_ignore_ascii_case(&email))
            .map(|s| s.status == mailgate_core::directory::SendAsStatus::Pending)
    });
    match pending {
        None => SendAsProblem::NotFound.response(),
        Some(false) => invalid_argument("Send-as address is already verified"),
        Some(true) => {
            tracing::info!(user = %addr, send_as = %email, "send-as verification requested: accept it with users[].send_as[].status: accepted");
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// Gmail's SendAs resources for a user: the primary, the aliases, then the send-as addresses.
fn send_as_resources(user: &mailgate_core::directory::User) -> Vec<serde_json::Value> {
    let mut out = vec![json!({
        "sendAsEmail": user.email,
        "displayName": user.display_name.clone().unwrap_or_default(),
        "replyToAddress": "",
        "signature": "",
        "isPrimary": true,
        "isDefault": true,
    })];
    for a in &user.aliases {
        out.push(json!({
            "sendAsEmail": a,
            "displayName": user.display_name.clone().unwrap_or_default(),
            "replyToAddress": "",
            "signature": "",
            "isDefault": false,
            "treatAsAlias": true,
            "verificationStatus": "accepted",
        }));
    }
    for s in &user.send_as {
        out.push(json!({
            "sendAsEmail": s.email,
            "displayName": s.display_name.clone().unwrap_or_default(),
            "replyToAddress": s.reply_to.clone().unwrap_or_default(),
            "signature": "",
            "isDefault": false,
            "treatAsAlias": false,
            "verificationStatus": match s.status {
                mailgate_core::directory::SendAsStatus::Accepted => "accepted",
                mailgate_core::directory::SendAsStatus::Pending => "pending",
            },
        }));
    }
    out
}

#[derive(Debug, Deserialize)]
struct MessageResource<'a> {
    #[serde(borrow)]
    raw: Option<RawField<'a>>,
}

/// `raw`, borrowed from the body when it has no escapes (base64url has none): a 47 MiB `raw` is
/// not copied once more before it is decoded. (serde borrows a `Cow` only as a field of its
/// own, not inside an `Option`, hence the newtype.)
#[derive(Debug, Deserialize)]
struct RawField<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

/// `POST /gmail/v1/users/{userId}/messages/send` (JSON body with `raw`).
pub(crate) async fn send_json(
    State(st): State<Arc<GmailState>>,
    caller: Caller<SendMessage>,
    headers: HeaderMap,
    body: RequestBody,
) -> Response {
    let attempt = caller.attempt;
    // Reserved twice over: the JSON and the message decoded from it live together.
    let memory = st.gateway.budget().data_memory().clone();
    let held = match body::read_held(&headers, body, MAX_JSON_BODY_BYTES, Some(&memory), 2).await {
        Ok(b) => b,
        // base64 makes 3 bytes of message 4 bytes of `raw`.
        Err(ReadFail::TooLarge(n)) => return oversize(&st, attempt, n / 4 * 3).await,
        Err(ReadFail::Broken) => return unreadable(),
        Err(ReadFail::Busy) => return crate::errors::busy(),
    };
    let body::Held { bytes: body, lease } = held;
    let raw = match serde_json::from_slice::<MessageResource<'_>>(&body) {
        Ok(MessageResource { raw: Some(r), .. }) => decode_raw(&r.0),
        Ok(_) => Err(
            "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
                .to_owned(),
        ),
        Err(e) => Err(format!("Invalid JSON payload received. {e}")),
    };
    drop(body);
    let answer = send(&st, attempt, raw, dry_run(&headers)).await;
    drop(lease);
    answer
}

/// `POST /upload/gmail/v1/users/{userId}/messages/send` (media, multipart or resumable start),
/// and the resumable variant's `PUT` with `upload_id`.
pub(crate) async fn send_upload(
    State(st): State<Arc<GmailState>>,
    // Nothing is read, kept or opened for a request the engine refuses before the message.
    caller: Caller<SendMessage>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    Query(q): Query<CommonParams>,
    body: RequestBody,
) -> Response {
    let attempt = caller.attempt;
    let owner = principal_key(&attempt.credential);
    if let Some(id) = &q.upload_id {
        // Second step of a resumable upload: the bytes of the message. The session is the
        // caller's own (same principal, same userId) or it does not exist.
        let known = match owner.as_deref() {
            Some(o) => match take_upload(&st, id, o, &user_id).await {
                Ok(known) => known,
                Err(r) => return r,
            },
            None => false,
        };
        if !known {
            return simple(
                404,
                "NOT_FOUND",
                "notFound",
                "Upload session not found or expired.",
            );
        }
        return match read_message(&st, &headers, body).await {
            Ok(b) => send_held(&st, attempt, b, dry_run(&headers)).await,
            Err(ReadFail::TooLarge(n)) => oversize(&st, attempt, n).await,
            Err(ReadFail::Broken) => unreadable(),
            Err(ReadFail::Busy) => crate::errors::busy(),
        };
    }
    match q.upload_type.as_deref() {
        Some("media") | None => match read_message(&st, &headers, body).await {
            Ok(b) => send_held(&st, attempt, b, dry_run(&headers)).await,
            Err(ReadFail::TooLarge(n)) => oversize(&st, attempt, n).await,
            Err(ReadFail::Broken) => unreadable(),
            Err(ReadFail::Busy) => crate::errors::busy(),
        },
        Some("multipart") => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            match read_message(&st, &headers, body).await {
                Ok(held) => {
                    let message = multipart_message(&ct, &held.bytes);
                    let lease = held.lease;
                    let answer = send(&st, attempt, message, dry_run(&headers)).await;
                    drop(lease);
                    answer
                }
                Err(ReadFail::TooLarge(n)) => oversize(&st, attempt, n).await,
                Err(ReadFail::Broken) => unreadable(),
                Err(ReadFail::Busy) => crate::errors::busy(),
            }
        }
        Some("resumable") => {
            let Some(owner) = owner else {
                return internal("an authenticated attempt without a principal");
            };
            // The start carries the message's metadata (JSON, tiny), unused here: read it
            // anyway, so the connection can carry the upload that follows (an unread body
            // makes the server close it, and clients reuse it for the PUT).
            if let Err(r) = read_small(&headers, body).await {
                return r;
            }
            let id = match open_upload(&st, &owner, &user_id).await {
                Ok(id) => id,
                Err(r) => return r,
            };
            let location = st.upload_location(&headers, &user_id, &id);
            let mut r = StatusCode::OK.into_response();
            if let Some(v) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Some(other) => invalid_request(
            &format!("Invalid uploadType: {other}"),
            RequestProblem::UploadType,
        ),
    }
}

/// The largest request body of an upload: Gmail's 35 MiB message plus 1 MiB for the multipart
/// envelope around it.
pub(crate) const MAX_UPLOAD_BODY_BYTES: usize = MAX_MESSAGE_BYTES + 1024 * 1024;

/// A 35 MiB message as base64url in `raw`: 4/3 as large.
const MAX_RAW_BASE64_BYTES: usize = MAX_MESSAGE_BYTES.div_ceil(3) * 4;

/// The largest body of `messages.send` with JSON: `raw` for a 35 MiB message, with room for line
/// breaks every 76 characters (some encoders wrap base64; JSON escapes each `\r\n` as 4
/// characters: 80/76), plus 1 MiB for the rest of the JSON. The decoded message is held to
/// 35 MiB whatever its encoding.
pub(crate) const MAX_JSON_BODY_BYTES: usize =
    MAX_RAW_BASE64_BYTES + MAX_RAW_BASE64_BYTES / 19 + 1024 * 1024;

/// The largest body of a settings request (a send-as resource is a few hundred bytes).
pub(crate) const MAX_SETTINGS_BODY_BYTES: usize = 64 * 1024;

/// Reads the body of a settings request or of a resumable upload's start (JSON metadata, at
/// most [`MAX_SETTINGS_BODY_BYTES`]). Called only once the credential passed.
async fn read_small(headers: &HeaderMap, body: RequestBody) -> Result<Vec<u8>, Response> {
    body::read(headers, body, MAX_SETTINGS_BODY_BYTES)
        .await
        .map_err(|e| match e {
            ReadFail::TooLarge(_) => too_large(MAX_SETTINGS_BODY_BYTES),
            ReadFail::Broken => unreadable(),
            ReadFail::Busy => crate::errors::busy(),
        })
}

/// A body that broke off (the client went away or sent a broken chunk).
fn unreadable() -> Response {
    invalid_request(
        "The request body could not be read.",
        RequestProblem::BrokenBody,
    )
}

/// A send whose message (or whose request body, `size` being the message it would hold) is over
/// Gmail's 35 MiB: the engine decides it with that size, so the refusal is `message.too_large`
/// with its remedy and a decision id like every other (the engine knows the Gmail API's own
/// limit, `Door::max_message_bytes`, which answers when the organisation allows larger
/// messages).
async fn oversize(st: &GmailState, mut attempt: SendAttempt, size: u64) -> Response {
    let now = mailgate_gateway::now_ms();
    attempt.size = Some(size);
    attempt.body = Body::Valid;
    let decided = match st.gateway.decide("gmail", &attempt).await {
        Ok(d) => d,
        Err(e) => return fault(&e),
    };
    match decided.decision.denial() {
        Some(d) => denial_response(d, &decided.id, SEND_METHOD, &SEND_SCOPES, now),
        None => internal("a message over the Gmail API's limit was not refused"),
    }
}

/// Whose upload session this is: one key per authenticated principal.
fn principal_key(c: &Credential) -> Option<String> {
    match c {
        Credential::OauthUser { user, .. } => Some(format!("user:{}", user.to_ascii_lowercase())),
        Credential::ServiceAccount { email, subject, .. } => Some(format!(
            "sa:{}:{}",
            email.to_ascii_lowercase(),
            subject.as_deref().unwrap_or_default().to_ascii_lowercase()
        )),
        Credential::ApiKey { key_id } => Some(format!("key:{key_id}")),
        _ => None,
    }
}

/// The message part of a `multipart/related` upload (metadata JSON, then the message).
fn multipart_message(content_type: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()
        .map(|b| b.trim_matches('"').to_owned())
        .ok_or("multipart upload without a boundary")?;
    let delim = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest: &[u8] = text;
    while let Some(start) = find(rest, delim.as_bytes()) {
        rest = &rest[start + delim.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let end = find(rest, delim.as_bytes()).unwrap_or(rest.len());
        parts.push(&rest[..end]);
    }
    // Each part: headers, blank line, content (minus the CRLF before the next delimiter).
    let mut contents = parts.iter().filter_map(|p| {
        let p = p
            .strip_prefix(b"\r\n")
            .or_else(|| p.strip_prefix(b"\n"))
            .unwrap_or(p);
        // The part's own header block ends at its first blank line, CRLF or bare LF (Python's
        // email generator writes LF), whichever comes first.
        let crlf = find(p, b"\r\n\r\n").map(|i| (i, 4));
        let lf = find(p, b"\n\n").map(|i| (i, 2));
        let split = match (crlf, lf) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }?;
        let (head, content) = (&p[..split.0], &p[split.0 + split.1..]);
        let content = content
            .strip_suffix(b"\r\n")
            .or_else(|| content.strip_suffix(b"\n"))
            .unwrap_or(content);
        Some((
            String::from_utf8_lossy(head).to_ascii_lowercase(),
            content.to_vec(),
        ))
    });
    let _metadata = contents.next().ok_or("multipart upload without parts")?;
    let (_, message) = contents
        .next()
        .ok_or("multipart upload without the message part")?;
    Ok(message)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `raw` is base64url; Google also accepts standard base64 and missing padding.
fn decode_raw(raw: &str) -> Result<Vec<u8>, String> {
    // Copy only when there is whitespace to drop (rare: clients send one line).
    let cleaned: std::borrow::Cow<str> = if raw.chars().any(char::is_whitespace) {
        raw.chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .into()
    } else {
        raw.into()
    };
    let trimmed = cleaned.trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .map_err(|_| "Invalid value for ByteString: raw is not base64url".to_owned())
}

/// What the door learned from the message.
struct Parsed {
    /// Every From and Sender field with every address (the engine checks them all).
    originator: Originator,
    recipients: Vec<String>,
    problem: Option<(String, Option<String>)>,
}

fn addresses(a: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(a) = a {
        for addr in a.iter() {
            if let Some(e) = addr.address() {
                out.push(e.trim().to_owned());
            }
        }
    }
    out
}

fn parse(raw: &[u8]) -> Parsed {
    let Some(msg) = mail_parser::MessageParser::default().parse_headers(raw) else {
        return Parsed {
            originator: Originator::default(),
            recipients: vec![],
            problem: Some(("Invalid RFC 822 message".into(), None)),
        };
    };
    let originator = mailgate_gateway::message::originator(&msg);
    let mut recipients = addresses(msg.to());
    recipients.extend(addresses(msg.cc()));
    recipients.extend(addresses(msg.bcc()));
    let mut problem = None;
    let has_to_header = msg.header(mail_parser::HeaderName::To).is_some();
    if has_to_header && addresses(msg.to()).is_empty() {
        problem = Some(("Invalid To header".to_owned(), Some("to".to_owned())));
    }
    Parsed {
        originator,
        recipients,
        problem,
    }
}

/// Reads an uploaded message within the process's memory budget for message bodies (reserved
/// twice over: the body and what is built from it while the message is stored).
async fn read_message(
    st: &GmailState,
    headers: &HeaderMap,
    body: RequestBody,
) -> Result<body::Held, ReadFail> {
    let memory = st.gateway.budget().data_memory().clone();
    body::read_held(headers, body, MAX_UPLOAD_BODY_BYTES, Some(&memory), 2).await
}

/// [`send`] of an uploaded message, its memory reservation held until the answer.
async fn send_held(
    st: &GmailState,
    attempt: SendAttempt,
    held: body::Held,
    dry_run: bool,
) -> Response {
    let body::Held { bytes, lease } = held;
    let answer = send(st, attempt, Ok(bytes), dry_run).await;
    drop(lease);
    answer
}

/// The request asks for a dry run (`X-Mailgate-Dry-Run: true`, Mailgate's own header): the send
/// is decided with every fact of the message, as a real send would be, and the answer is the
/// same refusal, or a `200` saying it would have been accepted; nothing is queued and no limit
/// is charged (the engine's explain mode). `mailgate doctor gmail` probes with it when the
/// endpoint is a Mailgate (Google's API has no dry run).
fn dry_run(headers: &HeaderMap) -> bool {
    headers
        .get("x-mailgate-dry-run")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1")
}

async fn send(
    st: &GmailState,
    mut attempt: SendAttempt,
    raw: Result<Vec<u8>, String>,
    dry_run: bool,
) -> Response {
    let now = mailgate_gateway::now_ms();
    let mut raw = match raw {
        Ok(r) => r,
        Err(detail) => {
            attempt.body = Body::Invalid {
                detail: detail.clone(),
                field: Some("raw".into()),
            };
            attempt.size = Some(0);
            return decided_refusal(st, &attempt, now)
                .await
                .unwrap_or_else(|| invalid_argument(&detail));
        }
    };
    attempt.size = Some(raw.len() as u64);
    if raw.len() > MAX_MESSAGE_BYTES {
        return oversize(st, attempt, raw.len() as u64).await;
    }
    let parsed = parse(&raw);
    let mut add_from = None;
    let mut originator = parsed.originator.clone();
    if originator.from.is_empty() {
        // Gmail fills a missing From with the sender's address.
        add_from = acting_address(st, &attempt);
        originator.from.extend(add_from.clone().map(|a| vec![a]));
    }
    // The envelope follows the From, when the header's From and Sender fields are well-formed
    // (else `message.invalid` refuses the message, and a From that is not checked must not
    // stand in for the envelope either).
    let from = originator
        .problem()
        .is_none()
        .then(|| originator.from_addresses().next().map(str::to_owned))
        .flatten();
    attempt.envelope_from.clone_from(&from);
    attempt.header = Some(originator);
    attempt.recipients = Some(parsed.recipients.clone());
    attempt.body = match &parsed.problem {
        Some((detail, field)) => Body::Invalid {
            detail: detail.clone(),
            field: field.clone(),
        },
        None => Body::Valid,
    };
    if dry_run {
        let decided = match st.gateway.dry_run("gmail", &attempt).await {
            Ok(d) => d,
            Err(e) => return fault(&e),
        };
        if let Some(denial) = decided.decision.denial() {
            return denial_response(denial, &decided.id, SEND_METHOD, &SEND_SCOPES, now);
        }
        let mut r = Json(json!({
            "dryRun": true,
            "decision": decided.id,
            "held": decided.decision.verdict == mailgate_core::engine::Verdict::Held,
        }))
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&decided.id) {
            r.headers_mut().insert("x-mailgate-decision", v);
        }
        return r;
    }
    let decided = match st.gateway.decide("gmail", &attempt).await {
        Ok(d) => d,
        Err(e) => return fault(&e),
    };
    if let Some(denial) = decided.decision.denial() {
        return denial_response(denial, &decided.id, SEND_METHOD, &SEND_SCOPES, now);
    }
    if !decided.decision.complete {
        return internal("decision incomplete with every fact known");
    }
    let new_from = decided
        .decision
        .rewrites
        .iter()
        .find(|r| r.header == "From")
        .map(|r| r.replacement.clone());
    raw =
        mailgate_gateway::message::rewrite_headers(&raw, new_from.as_deref(), add_from.as_deref());
    let envelope_from = new_from.or(from).unwrap_or_default();
    let self_addressed = parsed
        .recipients
        .iter()
        .any(|r| r.eq_ignore_ascii_case(&envelope_from));
    let message = Message {
        envelope_from,
        recipients: parsed.recipients,
        raw,
    };
    match st
        .gateway
        .accept("gmail", &attempt, &decided, message)
        .await
    {
        Ok(Accepted::Stored { message_id, state }) => {
            let labels = if self_addressed {
                json!(["UNREAD", "SENT", "INBOX"])
            } else {
                json!(["SENT"])
            };
            let mut r = Json(json!({
                "id": message_id,
                "threadId": message_id,
                "labelIds": labels,
            }))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&decided.id) {
                r.headers_mut().insert("x-mailgate-decision", v);
            }
            if state == mailgate_store::MessageState::Held {
                r.headers_mut()
                    .insert("x-mailgate-held", HeaderValue::from_static("true"));
            }
            r
        }
        Ok(Accepted::Refused(again)) => match again.decision.denial() {
            Some(d) => denial_response(d, &again.id, SEND_METHOD, &SEND_SCOPES, now),
            None => internal("refused without a denial"),
        },
        Err(e) => fault(&e),
    }
}

/// Decides an attempt the door already knows is bad, so the refusal still carries a decision id.
async fn decided_refusal(st: &GmailState, attempt: &SendAttempt, now: u64) -> Option<Response> {
    let decided = st.gateway.decide("gmail", attempt).await.ok()?;
    let denial = decided.decision.denial()?;
    Some(denial_response(
        denial,
        &decided.id,
        SEND_METHOD,
        &SEND_SCOPES,
        now,
    ))
}

/// Open resumable-upload sessions per principal: beyond, a new one is refused (429), never
/// another's evicted.
pub(crate) const MAX_UPLOADS_PER_PRINCIPAL: usize = 16;
/// Open resumable-upload sessions in the whole store (each a few hundred bytes), every node's.
pub(crate) const MAX_UPLOADS: usize = 10_000;
/// How long a resumable-upload session stays open (Google's last a week; a client here uploads
/// right after opening one, and a short life keeps the table small).
pub(crate) const UPLOAD_TTL: Duration = Duration::from_secs(3600);

/// Why no session was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadsFull {
    /// This principal holds its maximum; retry after this many seconds (its oldest expires).
    Principal(u64),
    /// The process holds its maximum.
    Total(u64),
}

impl UploadsFull {
    fn response(self) -> Response {
        let (secs, msg) = match self {
            UploadsFull::Principal(s) => (
                s,
                format!(
                    "Too many open upload sessions for this user (at most {MAX_UPLOADS_PER_PRINCIPAL}): finish or abandon one first"
                ),
            ),
            UploadsFull::Total(s) => (
                s,
                "Too many open upload sessions on this gateway: retry later".to_owned(),
            ),
        };
        let mut r = simple(429, "RESOURCE_EXHAUSTED", "rateLimitExceeded", &msg);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        r
    }
}

/// Opens a resumable-upload session for `owner` acting for `user_id`, in the store every node
/// shares (so the `PUT` may reach another node); its id.
async fn open_upload(st: &GmailState, owner: &str, user_id: &str) -> Result<String, Response> {
    let id = mailgate_auth::random_token::<18>().map_err(|_| UploadsFull::Total(1).response())?;
    let now = i64::try_from(mailgate_gateway::now_ms()).unwrap_or(i64::MAX);
    let opened = st
        .gateway
        .store()
        .open_upload(
            &id,
            owner,
            user_id,
            now,
            i64::try_from(UPLOAD_TTL.as_millis()).unwrap_or(i64::MAX),
            MAX_UPLOADS_PER_PRINCIPAL as u32,
            MAX_UPLOADS as u32,
        )
        .await;
    let secs = |ms: i64| u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000);
    match opened {
        Ok(UploadOpened::Opened) => Ok(id),
        Ok(UploadOpened::OwnerFull { retry_after_ms }) => {
            Err(UploadsFull::Principal(secs(retry_after_ms)).response())
        }
        Ok(UploadOpened::Full { retry_after_ms }) => {
            Err(UploadsFull::Total(secs(retry_after_ms)).response())
        }
        Err(e) => Err(fault(&e.into())),
    }
}

/// Takes (closes) session `id` if it is `owner`'s, for `user_id`, and has not expired, on
/// whichever node opened it.
async fn take_upload(
    st: &GmailState,
    id: &str,
    owner: &str,
    user_id: &str,
) -> Result<bool, Response> {
    let now = i64::try_from(mailgate_gateway::now_ms()).unwrap_or(i64::MAX);
    st.gateway
        .store()
        .take_upload(id, owner, user_id, now)
        .await
        .map_err(|e| fault(&e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_upload_yields_the_message() {
        let body = b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\nContent-Type: message/rfc822\r\n\r\nTo: a@b.com\r\n\r\nhi\r\n--xyz--\r\n";
        let m = multipart_message("multipart/related; boundary=\"xyz\"", body).unwrap();
        assert_eq!(m, b"To: a@b.com\r\n\r\nhi");
    }

    #[test]
    fn multipart_with_lf_line_ends_keeps_the_crlf_message() {
        let body = b"--b\nContent-Type: application/json\nMIME-Version: 1.0\n\n{}\n--b\nContent-Type: message/rfc822\n\nTo: a@b.com\r\n\r\nhi\r\n\n--b--\n";
        let m = multipart_message("multipart/related; boundary=b", body).unwrap();
        assert_eq!(m, b"To: a@b.com\r\n\r\nhi\r\n");
    }

    #[test]
    fn a_35_mib_message_fits_as_json_raw_even_wrapped_at_76_columns() {
        let lines = MAX_RAW_BASE64_BYTES.div_ceil(76);
        let wrapped = MAX_RAW_BASE64_BYTES + lines * r"\r\n".len();
        assert!(wrapped + r#"{"raw":""}"#.len() <= MAX_JSON_BODY_BYTES);
    }

    #[test]
    fn raw_is_borrowed_from_the_body_unless_escaped() {
        let m: MessageResource<'_> = serde_json::from_slice(br#"{"raw":"aGk_"}"#).unwrap();
        assert!(matches!(
            m.raw,
            Some(RawField(std::borrow::Cow::Borrowed("aGk_")))
        ));
        let m: MessageResource<'_> = serde_json::from_slice(br#"{"raw":"aGk\/"}"#).unwrap();
        assert_eq!(m.raw.unwrap().0, "aGk/");
    }

    #[test]
    fn raw_accepts_base64url_with_or_without_padding() {
        assert_eq!(decode_raw("aGk_").unwrap(), vec![b'h', b'i', 0x3f]);
        assert_eq!(decode_raw("aGk=").unwrap(), b"hi");
        assert!(decode_raw("***").is_err());
        assert_eq!(decode_raw("aG\r\nk=").unwrap(), b"hi");
    }

    #[test]
    fn recipients_include_cc_and_bcc() {
        let p = parse(b"From: A <a@x.com>\r\nTo: b@y.com, C <c@y.com>\r\nCc: d@y.com\r\nBcc: e@y.com\r\n\r\nx");
        assert_eq!(p.originator.single_from(), Some("a@x.com"));
        assert_eq!(p.recipients, ["b@y.com", "c@y.com", "d@y.com", "e@y.com"]);
        assert!(p.problem.is_none());
    }
}
