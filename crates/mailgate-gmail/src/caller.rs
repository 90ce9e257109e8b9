//! What a Gmail handler needs, stated in its signature: [`Caller<M>`], the request's credential
//! and connection facts as a `SendAttempt` for the method `M`, once the engine decided that
//! attempt (for a send: before its message is read).
//!
//! The engine decides every call ([`Action`]): which checks apply to the method, which OAuth
//! scopes suffice for it, and the one refusal to answer; the extractor only renders that refusal
//! in Google's words. It is taken from the request's head (`FromRequestParts`), so axum runs it
//! before a handler's body argument: a request without a valid credential gets its answer with
//! its body unread (docs/security.md).

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use mailgate_core::engine::{Action, Credential, Door, Mailbox, RequestProblem, SendAttempt};
use mailgate_gateway::ConnFacts;

use crate::GmailState;
use crate::errors::{denial_response, fault, internal, invalid_request, unavailable};

/// The query parameters every Gmail route may carry (Google's system parameters and the
/// upload protocol's).
#[derive(Debug, serde::Deserialize, Default)]
pub(crate) struct CommonParams {
    #[serde(rename = "uploadType")]
    pub(crate) upload_type: Option<String>,
    pub(crate) access_token: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) upload_id: Option<String>,
}

/// The longest `userId` path parameter: an address is at most 254 characters (RFC 5321's path
/// limit), and `me` is shorter. Longer ones are refused before anything else (400), so a request
/// cannot make the door keep or copy an absurd path parameter.
pub(crate) const MAX_USER_ID_BYTES: usize = 254;

/// A Gmail method: the engine's action for it and Google's RPC name (the `method` of the
/// `ErrorInfo` in its refusals).
pub(crate) trait Method: Send + Sync + 'static {
    /// What the method does, for the engine.
    const ACTION: Action;
    /// Google's name of the method.
    const RPC: &'static str;
}

macro_rules! methods {
    ($($(#[$doc:meta])* $t:ident => $action:expr, $rpc:literal;)*) => {$(
        $(#[$doc])*
        pub(crate) struct $t;
        impl Method for $t {
            const ACTION: Action = $action;
            const RPC: &'static str = concat!("caribou.api.proto.MailboxService.", $rpc);
        }
    )*};
}

methods! {
    /// `users.messages.send` (JSON, media, multipart, resumable).
    SendMessage => Action::Send, "SendMessage";
    /// `users.getProfile`.
    GetProfile => Action::ReadSettings, "GetProfile";
    /// `users.settings.sendAs.list` and `get`.
    ListSendAs => Action::ReadSettings, "ListSendAs";
    /// `users.settings.sendAs.create`.
    CreateSendAs => Action::ManageSendAs, "CreateSendAs";
    /// `users.settings.sendAs.update` and `patch`.
    UpdateSendAs => Action::UpdateSettings, "UpdateSendAs";
    /// `users.settings.sendAs.delete`.
    DeleteSendAs => Action::ManageSendAs, "DeleteSendAs";
    /// `users.settings.sendAs.verify`.
    VerifySendAs => Action::ManageSendAs, "VerifySendAs";
}

/// The caller of method `M`: the engine passed its credential for `M` (for a send, every check
/// no message fact can change: [`mailgate_gateway::Gateway::screen_before_message`]; for any
/// other method, every check that applies to it). Rejected with Google's error body and
/// Mailgate's explanation.
pub(crate) struct Caller<M: Method> {
    /// The attempt (action `M::ACTION`); a send adds the message's facts to it.
    pub(crate) attempt: SendAttempt,
    method: PhantomData<M>,
}

impl<M: Method> Caller<M> {
    /// The address the request acts for: the `userId`, or the credential's own.
    pub(crate) fn address(&self, st: &GmailState) -> Result<String, Response> {
        acting_address(st, &self.attempt).ok_or_else(|| internal("no acting address"))
    }
}

impl<M: Method> FromRequestParts<Arc<GmailState>> for Caller<M> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<GmailState>) -> Result<Self, Response> {
        // One connection's pipelined requests would otherwise run back to back on one worker
        // without ever waiting (a refusal touches no socket or store): let the worker's other
        // tasks in between, so a flood on one connection does not stall the others.
        tokio::task::yield_now().await;
        // The same extractors, in the same order, as the handlers took them before: a request
        // the framework refuses gets the same answer.
        let axum::Extension(conn) = axum::Extension::<ConnFacts>::from_request_parts(parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        let Path(params) =
            Path::<std::collections::BTreeMap<String, String>>::from_request_parts(parts, st)
                .await
                .map_err(IntoResponse::into_response)?;
        let Query(q) = Query::<CommonParams>::from_request_parts(parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        let user_id = params.get("user_id").map(String::as_str).unwrap_or("");
        if user_id.len() > MAX_USER_ID_BYTES || user_id.is_empty() {
            return Err(invalid_request(
                &format!(
                    "Invalid userId: at most {MAX_USER_ID_BYTES} characters (an email address or `me`)"
                ),
                RequestProblem::UserId,
            ));
        }
        let credential = credential(st, &parts.headers, &q).await?;
        let attempt =
            base_attempt(&conn, credential, user_id, &parts.headers).for_action(M::ACTION);
        let decided = if M::ACTION.is_send() {
            st.gateway.screen_before_message("gmail", &attempt).await
        } else {
            st.gateway.decide("gmail", &attempt).await.map(Some)
        }
        .map_err(|e| fault(&e))?;
        if let Some(decided) = decided
            && let Some(d) = decided.decision.denial()
        {
            return Err(denial_response(
                d,
                &decided.id,
                M::RPC,
                attempt.action.scopes(Door::Gmail),
                mailgate_gateway::now_ms(),
            ));
        }
        Ok(Caller {
            attempt,
            method: PhantomData,
        })
    }
}

/// The credential presented: bearer header, `access_token` parameter, or an API `key`. A store
/// fault while resolving a token is a 503.
async fn credential(
    st: &GmailState,
    headers: &HeaderMap,
    q: &CommonParams,
) -> Result<Credential, Response> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .or_else(|| q.access_token.clone());
    if let Some(token) = bearer {
        return crate::oauth::credential_for(st, &token).await.map_err(|e| {
            tracing::error!(error = %e, "token lookup failed");
            unavailable()
        });
    }
    if let Some(key) = q
        .key
        .as_deref()
        .or_else(|| headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()))
    {
        return Ok(st.api_key_credential(key));
    }
    Ok(Credential::None)
}

fn base_attempt(
    conn: &ConnFacts,
    credential: Credential,
    user_id: &str,
    headers: &HeaderMap,
) -> SendAttempt {
    let mut a = SendAttempt::new(Door::Gmail, credential);
    a.transport = conn.transport(headers);
    a.mailbox = if user_id == "me" {
        Mailbox::Me
    } else {
        Mailbox::Address(user_id.to_owned())
    };
    a
}

/// The address the request acts for, once authentication passed.
pub(crate) fn acting_address(st: &GmailState, a: &SendAttempt) -> Option<String> {
    if let Mailbox::Address(m) = &a.mailbox {
        return Some(m.clone());
    }
    match &a.credential {
        Credential::OauthUser { user, .. } => Some(user.clone()),
        Credential::ServiceAccount { subject, .. } => subject.clone(),
        Credential::ApiKey { key_id } => {
            st.gateway.live().index.key(key_id).map(|k| k.owner.clone())
        }
        _ => None,
    }
}
