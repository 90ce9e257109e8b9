//! What a handler needs, stated in its signature: [`Key<S>`], the calling API key once the engine
//! accepted it and it holds the scope `S`, and [`KeysJson`], a key-management request's JSON.
//!
//! Both reject with a ready answer in SendGrid's dialect. [`Key`] is taken from the request's
//! head (`FromRequestParts`) and [`KeysJson`] from its body (`FromRequest`, which axum allows only
//! as a handler's last argument and runs after every head extractor): a handler that takes both
//! checks the key before a byte of the body is read, so a request without a valid key gets its
//! `401`/`403` with the body unread (docs/security.md).

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::Response;
use mailgate_core::directory::{ApiKey, permissions};
use mailgate_core::engine::{Action, Credential, Door, SendAttempt};
use mailgate_gateway::Decided;
use mailgate_gateway::body::{self, ReadFail};
use serde_json::{Value, json};

use crate::errors::{fault, internal, invalid_json, management_denial_response, simple, too_large};
use crate::{ConnFacts, SendgridState};

/// Largest body of a key-management or IP-access request (`/v3/api_keys`,
/// `/v3/access_settings/whitelist`): their JSON is a name, a few scopes or a few addresses.
pub const KEYS_BODY_LIMIT: usize = 64 * 1024;

/// A SendGrid permission scope a route requires, named by a type (`Key<ApiKeysRead>`).
pub(crate) trait Scope: Send + Sync + 'static {
    /// The scope the calling key must hold; `None`: any key the engine accepts.
    const NAME: Option<&'static str>;
}

macro_rules! scopes {
    ($($(#[$doc:meta])* $t:ident => $name:expr;)*) => {$(
        $(#[$doc])*
        pub(crate) struct $t;
        impl Scope for $t {
            const NAME: Option<&'static str> = $name;
        }
    )*};
}

scopes! {
    /// Any key the engine accepts (`GET /v3/scopes`: a key may always read its own scopes).
    AnyScope => None;
    /// `mail.send` (the sender identities a key may send as).
    MailSend => Some(permissions::MAIL_SEND);
    /// `api_keys.create`.
    ApiKeysCreate => Some("api_keys.create");
    /// `api_keys.read`.
    ApiKeysRead => Some("api_keys.read");
    /// `api_keys.update`.
    ApiKeysUpdate => Some("api_keys.update");
    /// `api_keys.delete`.
    ApiKeysDelete => Some("api_keys.delete");
    /// `access_settings.whitelist.create`.
    WhitelistCreate => Some("access_settings.whitelist.create");
    /// `access_settings.whitelist.read`.
    WhitelistRead => Some("access_settings.whitelist.read");
    /// `access_settings.whitelist.delete`.
    WhitelistDelete => Some("access_settings.whitelist.delete");
}

/// The calling API key, once the engine allowed the route's call for it: a management call
/// ([`Action::Manage`]) needing the scope `S`, decided like every call (transport, the credential
/// in `Authorization`: present, well formed, live, allowed from this address; the key holds the
/// scope). A refusal is rendered in SendGrid's dialect with Mailgate's explanation in `help`.
pub(crate) struct Key<S: Scope> {
    /// The key, as the live directory holds it.
    pub(crate) key: ApiKey,
    /// The call as the engine was asked about it (credential and transport).
    attempt: SendAttempt,
    scope: PhantomData<S>,
}

impl<S: Scope> Key<S> {
    /// Whether this key may also use `permission` (a key may grant only the scopes it holds
    /// itself): `Err` is the engine's refusal, rendered.
    pub(crate) async fn may(
        &self,
        st: &SendgridState,
        permission: &'static str,
    ) -> Result<(), Response> {
        let attempt = self.attempt.clone().for_action(Action::Manage {
            permission: Some(permission),
        });
        match st.gateway.screen("sendgrid", &attempt).await {
            Err(e) => Err(fault(&e)),
            Ok(None) => Ok(()),
            Ok(Some(refused)) => Err(refusal(&refused)),
        }
    }
}

/// The engine's refusal of a management call, as SendGrid answers it.
fn refusal(refused: &Decided) -> Response {
    match refused.decision.denial() {
        Some(d) => management_denial_response(d, &refused.id, mailgate_gateway::now_ms()),
        None => internal("refused without a denial"),
    }
}

impl<S: Scope> FromRequestParts<Arc<SendgridState>> for Key<S> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<SendgridState>,
    ) -> Result<Self, Response> {
        let Some(conn) = parts.extensions.get::<ConnFacts>() else {
            return Err(internal("a request reached the door without ConnFacts"));
        };
        let mut attempt = SendAttempt::new(Door::Sendgrid, st.credential(&parts.headers))
            .for_action(Action::Manage {
                permission: S::NAME,
            });
        attempt.transport = conn.transport(&parts.headers);
        let decided = st
            .gateway
            .decide("sendgrid", &attempt)
            .await
            .map_err(|e| fault(&e))?;
        if decided.decision.denial().is_some() {
            return Err(refusal(&decided));
        }
        let Credential::ApiKey { key_id } = &attempt.credential else {
            return Err(internal("an allowed management call without an API key"));
        };
        let key = st
            .gateway
            .live()
            .index
            .key(key_id)
            .cloned()
            .ok_or_else(|| internal("key vanished"))?;
        Ok(Key {
            key,
            attempt,
            scope: PhantomData,
        })
    }
}

/// A key-management request's JSON (an empty body is `{}`), read with the gateway's body reader
/// up to [`KEYS_BODY_LIMIT`]. Past it: SendGrid's `413`, sent once the rest was read and dropped
/// (bounded); not JSON: `400` naming line and column.
pub(crate) struct KeysJson(pub(crate) Value);

impl<S: Send + Sync> FromRequest<S> for KeysJson {
    type Rejection = Response;

    async fn from_request(req: Request, _: &S) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let bytes = body::read(&parts.headers, body, KEYS_BODY_LIMIT)
            .await
            .map_err(|e| match e {
                ReadFail::TooLarge(_) => too_large(KEYS_BODY_LIMIT),
                // Not reserved from the memory budget, so never `Busy`; nobody is likely to
                // read the answer to a broken body.
                ReadFail::Broken | ReadFail::Busy => simple(400, "Bad Request"),
            })?;
        if bytes.is_empty() {
            return Ok(KeysJson(json!({})));
        }
        serde_json::from_slice(&bytes)
            .map(KeysJson)
            .map_err(|e| invalid_json(&e))
    }
}
