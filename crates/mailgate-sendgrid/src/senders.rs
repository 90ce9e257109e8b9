//! Sender identities as SendGrid's API shows them, read-only: `GET /v3/verified_senders`
//! (Single Sender Verification) and `GET /v3/whitelabel/domains` (Domain Authentication), so a
//! client, or `mailgate doctor sendgrid`, can learn which From addresses the key may use.
//!
//! Both answer from the directory, for the calling key's owner:
//! - `verified_senders`: every address the owner may send as (primary address, aliases, accepted
//!   and pending send-as addresses, groups with `members_can_send_as`, delegated mailboxes), each
//!   `verified: true` when the engine would let it send: not pending, and not in one of the
//!   organisation's domains that is unverified (Mailgate requires both, where SendGrid accepts a
//!   verified Single Sender alone).
//! - `whitelabel/domains`: the organisation's domains, `valid` being `domains[].verified`, with
//!   the verification TXT record where the directory holds one.
//!
//! SendGrid gates these reads with scopes Mailgate does not have (its permissions are those of
//! `directory::permissions::KNOWN`); here a key that holds `mail.send` may read what it may send
//! as. A key without it gets SendGrid's `403 access forbidden`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use mailgate_core::engine::Ownership;
use serde_json::{Value, json};

use crate::SendgridState;
use crate::extract::{Key, MailSend};

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

/// `GET /v3/verified_senders`: `{"results": [{"id", "nickname", "from_email", "from_name",
/// "reply_to", "reply_to_name", "address", "address2", "state", "city", "country", "zip",
/// "verified", "locked"}]}`, the owner's primary address first.
pub(crate) async fn verified_senders(
    State(st): State<Arc<SendgridState>>,
    Key { key: caller, .. }: Key<MailSend>,
) -> Response {
    let live = st.gateway.live();
    let ix = &live.index;
    let Some(u) = ix.user_by_primary(&caller.owner) else {
        return Json(json!({ "results": [] })).into_response();
    };
    let user = ix.user(u);
    let mut owned: Vec<&(String, Ownership)> = ix.facts(u).owned.iter().collect();
    // The primary address first: it is what a client (and the doctor) picks by default.
    owned.sort_by_key(|(_, how)| !matches!(how, Ownership::Primary));
    let results: Vec<Value> = owned
        .iter()
        .enumerate()
        .map(|(i, (addr, how))| {
            let send_as = user
                .send_as
                .iter()
                .find(|s| s.email.eq_ignore_ascii_case(addr));
            let name = send_as
                .and_then(|s| s.display_name.clone())
                .or_else(|| user.display_name.clone())
                .unwrap_or_default();
            let reply_to = send_as
                .and_then(|s| s.reply_to.clone())
                .unwrap_or_else(|| addr.clone());
            let verified =
                *how != Ownership::PendingSendAs && ix.domain(domain_of(addr)) != Some(false);
            json!({
                "id": i + 1,
                "nickname": format!("{} ({})", addr, how.describe()),
                "from_email": addr,
                "from_name": name,
                "reply_to": reply_to,
                "reply_to_name": name,
                "address": "",
                "address2": "",
                "state": "",
                "city": "",
                "country": "",
                "zip": "",
                "verified": verified,
                "locked": false,
            })
        })
        .collect();
    Json(json!({ "results": results })).into_response()
}

/// `GET /v3/whitelabel/domains`: a JSON array of `{"id", "user_id", "subdomain", "domain",
/// "username", "ips", "custom_spf", "default", "legacy", "automatic_security", "valid", "dns"}`.
pub(crate) async fn domains(
    State(st): State<Arc<SendgridState>>,
    Key { key: caller, .. }: Key<MailSend>,
) -> Response {
    let live = st.gateway.live();
    let list: Vec<Value> = live
        .index
        .directory()
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let dns = match &d.verification_token {
                Some(t) => json!({"domain_verification": {
                    "valid": d.verified, "type": "txt", "host": d.name, "data": t,
                }}),
                None => json!({}),
            };
            json!({
                "id": i + 1,
                "user_id": 1,
                "subdomain": "",
                "domain": d.name,
                "username": caller.owner,
                "ips": [],
                "custom_spf": false,
                "default": i == 0,
                "legacy": false,
                "automatic_security": false,
                "valid": d.verified,
                "dns": dns,
            })
        })
        .collect();
    Json(Value::Array(list)).into_response()
}
