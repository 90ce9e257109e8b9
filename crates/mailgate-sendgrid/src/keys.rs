//! Key management as SendGrid's clients use it: `/v3/api_keys` (create, list, get, rename,
//! rescope, delete), `/v3/scopes`, and IP Access Management (`/v3/access_settings/whitelist`).
//!
//! Everything is the directory: a key created here is an `api_keys[]` entry owned by the calling
//! key's owner (only the SHA-256 of its secret is stored; the secret is shown once), and every
//! change goes through `mailgate_gateway::edit_directory` (whole-directory validation, one
//! commit), exactly as the CLI's verbs do.
//!
//! The IP access list is SendGrid's account-wide allow list. Mailgate keeps it where the engine
//! already enforces it: the `allowed_ips` of the owner's keys. Listing shows the union of those
//! ranges; adding a range adds it to every live key of the owner (new keys inherit the list);
//! removing one removes it from all of them. An empty list means no restriction, as on SendGrid.
//! Rule ids are derived from the range (stable across restarts and deletions).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use mailgate_core::directory::{ApiKey, Directory, permissions};
use mailgate_gateway::{EditError, edit_directory};
use serde_json::{Value, json};

use crate::SendgridState;
use crate::errors::{FieldError, envelope, internal, simple};
use crate::extract::{
    AnyScope, ApiKeysCreate, ApiKeysDelete, ApiKeysRead, ApiKeysUpdate, Key, KeysJson, Scope,
    WhitelistCreate, WhitelistDelete, WhitelistRead,
};

/// What `POST /v3/api_keys` without `scopes` grants: every permission Mailgate knows.
pub(crate) fn full_access() -> Vec<String> {
    permissions::KNOWN.iter().map(|s| (*s).to_owned()).collect()
}

fn bad_request(field: &str, message: &str) -> Response {
    envelope(
        400,
        &[FieldError {
            message: message.to_owned(),
            field: Some(field.to_owned()),
            help: None,
        }],
    )
}

fn not_found_response() -> Response {
    simple(404, "not found")
}

/// Unknown `/v3/...` paths.
pub(crate) async fn not_found() -> Response {
    not_found_response()
}

/// Wrong method on a key route.
pub(crate) async fn method_not_allowed() -> Response {
    simple(405, "method not allowed")
}

/// Applies `f` to the directory as `caller`, then reloads the gateway's snapshot.
async fn edit<T>(
    st: &SendgridState,
    caller: &ApiKey,
    f: impl FnMut(&mut Directory) -> Result<T, Response>,
) -> Result<T, Response> {
    let actor = format!("sendgrid-api:{}", caller.id);
    let out = edit_directory(st.gateway.store(), &actor, f)
        .await
        .map_err(|e| match e {
            EditError::Refused(r) => r,
            EditError::Invalid(issues) => envelope(
                400,
                &issues
                    .iter()
                    .map(|i| FieldError {
                        message: i.message.clone(),
                        field: Some(i.path()),
                        help: None,
                    })
                    .collect::<Vec<_>>(),
            ),
            EditError::Busy => simple(503, "service unavailable"),
            EditError::Store(e) => crate::errors::unavailable(&e.to_string()),
        })?;
    if let Err(e) = st.gateway.refresh().await {
        tracing::warn!(error = %e, "directory reload after a key change failed");
    }
    Ok(out)
}

fn scopes_of(v: &Value) -> Result<Option<Vec<String>>, Response> {
    match v.get("scopes") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad_request("scopes", "scopes must be an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(bad_request("scopes", "scopes must be an array of strings")),
    }
}

/// Checks requested scopes: known to Mailgate (else SendGrid's `400` naming `scopes`), and held
/// by the caller, as the engine judges it (no escalation: a key grants only what it holds).
async fn grantable<S: Scope>(
    st: &SendgridState,
    caller: &Key<S>,
    scopes: &[String],
) -> Result<(), Response> {
    for s in scopes {
        let Some(known) = permissions::KNOWN.iter().copied().find(|k| *k == s) else {
            return Err(bad_request(
                "scopes",
                &format!(
                    "unknown scope `{s}`; Mailgate knows: {}",
                    permissions::KNOWN.join(", ")
                ),
            ));
        };
        caller.may(st, known).await?;
    }
    Ok(())
}

fn name_of(v: &Value) -> Result<String, Response> {
    match v.get("name").and_then(Value::as_str) {
        Some(n) if !n.trim().is_empty() => Ok(n.to_owned()),
        _ => Err(bad_request("name", "missing required argument")),
    }
}

/// The owner's IP access list: the union of its live keys' `allowed_ips`.
fn account_ips(dir: &Directory, owner: &str) -> Vec<IpNet> {
    let mut ips: Vec<IpNet> = dir
        .api_keys
        .iter()
        .filter(|k| k.owner == owner && !k.revoked)
        .flat_map(|k| k.allowed_ips.iter().copied())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// `POST /v3/api_keys`.
pub(crate) async fn create_key(
    State(st): State<Arc<SendgridState>>,
    key: Key<ApiKeysCreate>,
    KeysJson(v): KeysJson,
) -> Response {
    let caller = &key.key;
    let name = match name_of(&v) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let scopes = match scopes_of(&v) {
        // No scopes: a Full Access key, as on SendGrid (bounded by what the caller holds).
        Ok(None) => full_access()
            .into_iter()
            .filter(|s| caller.permissions.contains(s))
            .collect(),
        Ok(Some(s)) => s,
        Err(r) => return r,
    };
    if let Err(r) = grantable(&st, &key, &scopes).await {
        return r;
    }
    let (id, full) = match mailgate_auth::new_api_key() {
        Ok(x) => x,
        Err(e) => return internal(&e.to_string()),
    };
    let sha = mailgate_auth::sha256_hex(full.as_bytes());
    let new_key = |dir: &Directory| ApiKey {
        id: id.clone(),
        name: name.clone(),
        secret: None,
        secret_sha256: sha.clone(),
        owner: caller.owner.clone(),
        project: caller.project.clone(),
        permissions: scopes.clone(),
        allowed_ips: account_ips(dir, &caller.owner),
        allowed_referrers: Vec::new(),
        allowed_apis: Vec::new(),
        expires: None,
        revoked: false,
    };
    let res = edit(&st, caller, |dir| {
        let k = new_key(dir);
        dir.api_keys.push(k);
        Ok(())
    })
    .await;
    if let Err(r) = res {
        return r;
    }
    tracing::info!(key_id = %id, owner = %caller.owner, by = %caller.id, "API key created over the SendGrid API");
    (
        StatusCode::CREATED,
        Json(json!({"api_key": full, "api_key_id": id, "name": name, "scopes": scopes})),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
}

/// `GET /v3/api_keys`.
pub(crate) async fn list_keys(
    State(st): State<Arc<SendgridState>>,
    Query(q): Query<ListQuery>,
    Key { key: caller, .. }: Key<ApiKeysRead>,
) -> Response {
    let live = st.gateway.live();
    let result: Vec<Value> = live
        .index
        .directory()
        .api_keys
        .iter()
        .filter(|k| k.owner == caller.owner && !k.revoked)
        .take(q.limit.unwrap_or(usize::MAX))
        .map(|k| json!({"name": k.name, "api_key_id": k.id}))
        .collect();
    Json(json!({ "result": result })).into_response()
}

fn owned_key(st: &SendgridState, caller: &ApiKey, id: &str) -> Option<ApiKey> {
    st.gateway
        .live()
        .index
        .key(id)
        .filter(|k| k.owner == caller.owner && !k.revoked)
        .cloned()
}

/// `GET /v3/api_keys/{id}`.
pub(crate) async fn get_key(
    State(st): State<Arc<SendgridState>>,
    Path(id): Path<String>,
    Key { key: caller, .. }: Key<ApiKeysRead>,
) -> Response {
    match owned_key(&st, &caller, &id) {
        Some(k) => {
            Json(json!({"result": [{"api_key_id": k.id, "name": k.name, "scopes": k.permissions}]}))
                .into_response()
        }
        None => not_found_response(),
    }
}

async fn update_key(
    st: &SendgridState,
    key: &Key<ApiKeysUpdate>,
    id: &str,
    v: &Value,
    with_scopes: bool,
) -> Response {
    let caller = &key.key;
    let name = match name_of(v) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let scopes = if with_scopes {
        match scopes_of(v) {
            Ok(s) => s,
            Err(r) => return r,
        }
    } else {
        None
    };
    if let Some(s) = &scopes
        && let Err(r) = grantable(st, key, s).await
    {
        return r;
    }
    let res = edit(st, caller, |dir| {
        let k = dir
            .api_keys
            .iter_mut()
            .find(|k| k.id == id && k.owner == caller.owner && !k.revoked)
            .ok_or_else(not_found_response)?;
        k.name.clone_from(&name);
        if let Some(s) = &scopes {
            k.permissions.clone_from(s);
        }
        Ok(k.permissions.clone())
    })
    .await;
    match res {
        Ok(perms) if with_scopes => {
            Json(json!({"api_key_id": id, "name": name, "scopes": perms})).into_response()
        }
        Ok(_) => Json(json!({"api_key_id": id, "name": name})).into_response(),
        Err(r) => r,
    }
}

/// `PATCH /v3/api_keys/{id}`: rename.
pub(crate) async fn patch_key(
    State(st): State<Arc<SendgridState>>,
    Path(id): Path<String>,
    key: Key<ApiKeysUpdate>,
    KeysJson(v): KeysJson,
) -> Response {
    update_key(&st, &key, &id, &v, false).await
}

/// `PUT /v3/api_keys/{id}`: rename and rescope.
pub(crate) async fn put_key(
    State(st): State<Arc<SendgridState>>,
    Path(id): Path<String>,
    key: Key<ApiKeysUpdate>,
    KeysJson(v): KeysJson,
) -> Response {
    update_key(&st, &key, &id, &v, true).await
}

/// `DELETE /v3/api_keys/{id}`: the key is revoked (kept, so a later use is refused as
/// `auth.revoked` and the audit trail keeps its name), and disappears from listings.
pub(crate) async fn delete_key(
    State(st): State<Arc<SendgridState>>,
    Path(id): Path<String>,
    Key { key: caller, .. }: Key<ApiKeysDelete>,
) -> Response {
    let res = edit(&st, &caller, |dir| {
        let k = dir
            .api_keys
            .iter_mut()
            .find(|k| k.id == id && k.owner == caller.owner && !k.revoked)
            .ok_or_else(not_found_response)?;
        k.revoked = true;
        Ok(())
    })
    .await;
    match res {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

/// `GET /v3/scopes`: the calling key's scopes.
pub(crate) async fn scopes(Key { key, .. }: Key<AnyScope>) -> Response {
    Json(json!({"scopes": key.permissions})).into_response()
}

/// A stable rule id for a range: the first 31 bits of SHA-256 of its text.
pub(crate) fn rule_id(net: &IpNet) -> u32 {
    let h = mailgate_auth::sha256_hex(net.to_string().as_bytes());
    u32::from_str_radix(h.get(..8).unwrap_or("0"), 16).unwrap_or(0) & 0x7fff_ffff
}

fn rule_json(net: &IpNet) -> Value {
    json!({"id": rule_id(net), "ip": net.to_string(), "created_at": 0, "updated_at": 0})
}

/// SendGrid's accepted forms: `1.2.3.4`, `1.2.3.0/24`, `192.*.*.*` (trailing wildcards), IPv6.
pub(crate) fn parse_rule(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Some(IpNet::from(ip));
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let fixed = parts.iter().take_while(|p| **p != "*").count();
    if parts.get(fixed..)?.iter().any(|p| *p != "*") {
        return None;
    }
    let mut octets = [0u8; 4];
    for (o, p) in octets.iter_mut().zip(parts.iter().take(fixed)) {
        *o = p.parse().ok()?;
    }
    let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(octets), (fixed * 8) as u8).ok()?;
    Some(IpNet::V4(net.trunc()))
}

/// `GET /v3/access_settings/whitelist`.
pub(crate) async fn whitelist_list(
    State(st): State<Arc<SendgridState>>,
    Key { key: caller, .. }: Key<WhitelistRead>,
) -> Response {
    let ips = account_ips(st.gateway.live().index.directory(), &caller.owner);
    Json(json!({"result": ips.iter().map(rule_json).collect::<Vec<_>>()})).into_response()
}

/// `POST /v3/access_settings/whitelist` with `{"ips":[{"ip":"..."}]}`.
pub(crate) async fn whitelist_add(
    State(st): State<Arc<SendgridState>>,
    Key { key: caller, .. }: Key<WhitelistCreate>,
    KeysJson(v): KeysJson,
) -> Response {
    let Some(list) = v
        .get("ips")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
    else {
        return bad_request("ips", "ips are required");
    };
    let mut nets = Vec::new();
    for (i, item) in list.iter().enumerate() {
        match item.get("ip").and_then(Value::as_str).and_then(parse_rule) {
            Some(n) => nets.push(n),
            None => return bad_request(&format!("ips.{i}.ip"), "invalid ip address"),
        }
    }
    let res = edit(&st, &caller, |dir| {
        for k in dir
            .api_keys
            .iter_mut()
            .filter(|k| k.owner == caller.owner && !k.revoked)
        {
            for n in &nets {
                if !k.allowed_ips.contains(n) {
                    k.allowed_ips.push(*n);
                }
            }
        }
        Ok(())
    })
    .await;
    if let Err(r) = res {
        return r;
    }
    (
        StatusCode::CREATED,
        Json(json!({"result": nets.iter().map(rule_json).collect::<Vec<_>>()})),
    )
        .into_response()
}

async fn remove_rules(st: &SendgridState, caller: &ApiKey, ids: &[u32]) -> Result<usize, Response> {
    edit(st, caller, |dir| {
        let mut removed = 0;
        for k in dir
            .api_keys
            .iter_mut()
            .filter(|k| k.owner == caller.owner && !k.revoked)
        {
            let before = k.allowed_ips.len();
            k.allowed_ips.retain(|n| !ids.contains(&rule_id(n)));
            removed += before - k.allowed_ips.len();
        }
        Ok(removed)
    })
    .await
}

/// `DELETE /v3/access_settings/whitelist` with `{"ids":[...]}`.
pub(crate) async fn whitelist_delete_many(
    State(st): State<Arc<SendgridState>>,
    Key { key: caller, .. }: Key<WhitelistDelete>,
    KeysJson(v): KeysJson,
) -> Response {
    let ids: Vec<u32> = v
        .get("ids")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(Value::as_u64)
                .filter_map(|n| u32::try_from(n).ok())
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() {
        return bad_request("ids", "ids are required");
    }
    match remove_rules(&st, &caller, &ids).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

/// `GET /v3/access_settings/whitelist/{rule_id}`.
pub(crate) async fn whitelist_get(
    State(st): State<Arc<SendgridState>>,
    Path(rule): Path<String>,
    Key { key: caller, .. }: Key<WhitelistRead>,
) -> Response {
    let ips = account_ips(st.gateway.live().index.directory(), &caller.owner);
    match ips
        .iter()
        .find(|n| rule.parse::<u32>().ok() == Some(rule_id(n)))
    {
        Some(n) => Json(rule_json(n)).into_response(),
        None => not_found_response(),
    }
}

/// `DELETE /v3/access_settings/whitelist/{rule_id}`.
pub(crate) async fn whitelist_delete_one(
    State(st): State<Arc<SendgridState>>,
    Path(rule): Path<String>,
    Key { key: caller, .. }: Key<WhitelistDelete>,
) -> Response {
    let Ok(id) = rule.parse::<u32>() else {
        return not_found_response();
    };
    match remove_rules(&st, &caller, &[id]).await {
        Ok(0) => not_found_response(),
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_normalise_like_sendgrid() {
        assert_eq!(
            parse_rule("192.168.1.1").unwrap().to_string(),
            "192.168.1.1/32"
        );
        assert_eq!(parse_rule("192.*.*.*").unwrap().to_string(), "192.0.0.0/8");
        assert_eq!(
            parse_rule("192.168.1.3/32").unwrap().to_string(),
            "192.168.1.3/32"
        );
        assert_eq!(parse_rule("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_rule("::1").unwrap().to_string(), "::1/128");
        assert!(parse_rule("192.*.1.*").is_none());
        assert!(parse_rule("nonsense").is_none());
    }

    #[test]
    fn rule_ids_are_stable_and_positive() {
        let n = parse_rule("10.0.0.0/8").unwrap();
        assert_eq!(rule_id(&n), rule_id(&parse_rule("10.*.*.*").unwrap()));
        assert!(rule_id(&n) <= 0x7fff_ffff);
    }
}
