//! A Google-style OAuth 2.0 authorization server: `POST /token` (RFC 7523 JWT-bearer for service
//! accounts with domain-wide delegation, `authorization_code` with PKCE, rotating
//! `refresh_token`), `POST /revoke`, `GET /tokeninfo`, and a minimal login + consent page at
//! `/o/oauth2/auth`. Tokens are opaque; only their SHA-256 is stored, so revocation is immediate.
//! Errors use Google's `{"error", "error_description"}` bodies and statuses (gmail-wire.md §4).
//!
//! JWTs are verified per RFC 8725: the algorithm is pinned to RS256 (no `none`, no HMAC
//! confusion), the key is the issuer's registered key (by `kid` when given), and `aud`, `iss`,
//! `iat` and `exp` (at most one hour apart, 60 s clock skew) are all checked.

use std::sync::Arc;

use axum::Form;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use mailgate_core::catalogue::Reason;
use mailgate_core::engine::{Credential, CredentialState, Door, SendAttempt};
use mailgate_store::{TokenRecord, TokenStore};
use serde::Deserialize;
use serde_json::json;

use crate::GmailState;

/// Access tokens live one hour, like Google's.
pub(crate) const ACCESS_TTL_MS: i64 = 3_600_000;
const CODE_TTL_MS: i64 = 600_000;
const REFRESH_TTL_MS: i64 = 180 * 24 * 3_600_000;
/// Clock skew tolerated on `iat`/`exp`.
const LEEWAY_S: i64 = 60;
/// `exp - iat` may be at most 65 minutes (Google's documented bound).
const MAX_LIFETIME_S: i64 = 65 * 60;

const SHORT_LIVED: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your 'iat' and 'exp' values and use a clock with skew to account for clock differences between systems.";
const BAD_SIGNATURE: &str = "Invalid JWT Signature.";
const EXPIRED_OR_REVOKED: &str = "Token has been expired or revoked.";

/// Who a token speaks for (stored as the token's grant JSON).
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Grant {
    /// A user through an OAuth client.
    User { user: String, client_id: String },
    /// A service account, acting as itself or as `subject`.
    ServiceAccount {
        email: String,
        subject: Option<String>,
    },
    /// An authorization code waiting to be exchanged.
    Code {
        user: String,
        client_id: String,
        redirect_uri: String,
        code_challenge: Option<String>,
    },
}

fn token_error(status: u16, error: &str, description: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (
        code,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Mints a new opaque token with Google's access-token prefix.
fn mint(prefix: &str) -> Result<String, Response> {
    mailgate_auth::random_token::<32>()
        .map(|t| format!("{prefix}{t}"))
        .map_err(|_| token_error(500, "internal_failure", "Backend Error"))
}

#[derive(Debug, Deserialize)]
pub(crate) struct TokenForm {
    grant_type: Option<String>,
    assertion: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    #[allow(
        dead_code,
        reason = "accepted for compatibility; scopes come from the grant"
    )]
    scope: Option<String>,
}

/// `POST /token`.
pub(crate) async fn token(
    State(st): State<Arc<GmailState>>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return token_error(
            400,
            "invalid_request",
            "Required parameter is missing: grant_type",
        );
    };
    let result = match form.grant_type.as_deref() {
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => jwt_bearer(&st, &form).await,
        Some("authorization_code") => authorization_code(&st, &headers, &form).await,
        Some("refresh_token") => refresh(&st, &headers, &form).await,
        Some(other) => Err(token_error(
            400,
            "unsupported_grant_type",
            &format!("Invalid grant_type: {other}"),
        )),
        None => Err(token_error(
            400,
            "invalid_request",
            "Required parameter is missing: grant_type",
        )),
    };
    result.unwrap_or_else(|r| r)
}

#[derive(Debug, Deserialize)]
struct JwtClaims {
    iss: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    sub: Option<String>,
    iat: i64,
    exp: i64,
}

async fn jwt_bearer(st: &GmailState, form: &TokenForm) -> Result<Response, Response> {
    let assertion = form.assertion.as_deref().ok_or_else(|| {
        token_error(
            400,
            "invalid_request",
            "Required parameter is missing: assertion",
        )
    })?;
    let (claims, sa) = match verify_assertion(st, assertion) {
        Ok(v) => v,
        Err(refusal) => return Err(refused_credential(st, refusal).await),
    };
    if claims.scope.contains(',') || claims.scope.trim().is_empty() {
        return Err(token_error(
            400,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        ));
    }
    let scopes: Vec<String> = claims.scope.split_whitespace().map(str::to_owned).collect();
    // Ask the engine about the credential, delegation and account (the send-time facts are
    // unknown, so those checks stay pending). Only the reasons the token endpoint answers for
    // refuse a token; the rest (e.g. API not enabled) surface when the token is used, as at Google.
    let attempt = SendAttempt::new(
        Door::Gmail,
        Credential::ServiceAccount {
            email: sa.email.clone(),
            project: sa.project.clone(),
            scopes: scopes.clone(),
            subject: claims.sub.clone(),
        },
    );
    let grant_scopes = st
        .gateway
        .live()
        .index
        .grant(&sa.client_id)
        .map(|g| g.scopes.clone());
    let (refusal, decision_id) = token_refusal(st, &attempt, claims.sub.is_some()).await?;
    if let Some(r) = refusal {
        return Err(r);
    }
    // With `sub`, every requested scope must be in the delegation grant (Google's rule for
    // issuing a delegated token; the engine checks the send scopes again at every send).
    if claims.sub.is_some()
        && let Some(granted) = grant_scopes
        && let Some(missing) = scopes.iter().find(|s| !granted.contains(s))
    {
        return Err(explained_token_error(
            Reason::DelegationScopeNotGranted,
            &format!("domain_wide_delegation[{}]", sa.client_id),
            &format!(
                "scope {missing} is not in domain_wide_delegation[{}].scopes: add it there and run `mailgate apply`, or request only granted scopes",
                sa.client_id
            ),
            &decision_id,
        ));
    }
    let grant = Grant::ServiceAccount {
        email: sa.email.clone(),
        subject: claims.sub.clone(),
    };
    let access = issue(
        st,
        "access",
        &grant,
        &scopes,
        None,
        ACCESS_TTL_MS,
        "ya29.mg_",
    )
    .await?;
    Ok(token_ok(&access, None, &scopes))
}

/// Why an assertion was not accepted: the credential state for the engine, who presented it, and
/// Google's `error_description`.
struct AssertionRefusal {
    state: CredentialState,
    presented: String,
    description: &'static str,
}

/// Verifies a JWT-bearer assertion per RFC 8725 and finds its service account.
fn verify_assertion(
    st: &GmailState,
    assertion: &str,
) -> Result<(JwtClaims, mailgate_core::directory::ServiceAccount), AssertionRefusal> {
    let refuse = |state, presented: &str, description| AssertionRefusal {
        state,
        presented: presented.to_owned(),
        description,
    };
    let Ok(header) = jsonwebtoken::decode_header(assertion) else {
        return Err(refuse(
            CredentialState::Invalid,
            "JWT assertion",
            "Invalid JWT: not a JWT",
        ));
    };
    // RFC 8725: the algorithm is ours to choose, not the token's.
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err(refuse(
            CredentialState::Invalid,
            "JWT assertion",
            BAD_SIGNATURE,
        ));
    }
    let Ok(unverified) =
        jsonwebtoken::dangerous::insecure_decode::<JwtClaims>(assertion).map(|d| d.claims)
    else {
        return Err(refuse(
            CredentialState::Invalid,
            "JWT assertion",
            "Invalid JWT: claims missing",
        ));
    };
    let presented = format!("JWT assertion from {}", unverified.iss);
    let live = st.gateway.live();
    let Some(sa) = live.index.service_account(&unverified.iss).cloned() else {
        return Err(refuse(CredentialState::Invalid, &presented, BAD_SIGNATURE));
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&st.token_audiences());
    validation.set_issuer(&[sa.email.as_str()]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    validation.leeway = LEEWAY_S as u64;
    let mut last_err = None;
    for k in sa
        .keys
        .iter()
        .filter(|k| header.kid.as_deref().is_none_or(|kid| kid == k.id))
    {
        let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(k.public_key_pem.as_bytes()) else {
            continue;
        };
        match jsonwebtoken::decode::<JwtClaims>(assertion, &key, &validation) {
            Ok(d) => {
                let c = d.claims;
                let now_s = (mailgate_gateway::now_ms() / 1000) as i64;
                if c.exp < c.iat || c.exp - c.iat > MAX_LIFETIME_S || c.iat > now_s + LEEWAY_S {
                    return Err(refuse(CredentialState::Expired, &presented, SHORT_LIVED));
                }
                return Ok((c, sa));
            }
            Err(e) => last_err = Some(e),
        }
    }
    use jsonwebtoken::errors::ErrorKind;
    Err(match last_err.as_ref().map(|e| e.kind()) {
        Some(ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature) => {
            refuse(CredentialState::Expired, &presented, SHORT_LIVED)
        }
        Some(ErrorKind::InvalidAudience) => refuse(
            CredentialState::Invalid,
            &presented,
            "Invalid JWT: the audience must be this gateway's token endpoint",
        ),
        _ => refuse(CredentialState::Invalid, &presented, BAD_SIGNATURE),
    })
}

/// A refused assertion, decided by the engine (so it is kept under a decision id like every
/// refusal) and answered with Google's body plus Mailgate's explanation.
async fn refused_credential(st: &GmailState, r: AssertionRefusal) -> Response {
    let attempt = SendAttempt::new(
        Door::Gmail,
        Credential::Refused {
            state: r.state,
            presented: Some(r.presented),
        },
    );
    let decided = match st.gateway.decide("token", &attempt).await {
        Ok(d) => d,
        Err(_) => return token_error(500, "internal_failure", "Backend Error"),
    };
    let Some(d) = decided.decision.denial() else {
        return token_error(400, "invalid_grant", r.description);
    };
    let error = d.token().map(|t| t.error).unwrap_or("invalid_grant");
    let mut resp = (
        StatusCode::BAD_REQUEST,
        Json(json!({
            "error": error,
            "error_description": r.description,
            "mailgate": {
                "code": d.code.code(),
                "check": d.stage.as_str(),
                "object_at_fault": d.object_at_fault.to_string(),
                "remedy": d.remedy,
                "decision_id": decided.id,
            },
        })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&decided.id) {
        resp.headers_mut().insert("x-mailgate-decision", v);
    }
    resp
}

/// The engine's verdict on a token request: the first denial the token endpoint renders.
async fn token_refusal(
    st: &GmailState,
    attempt: &SendAttempt,
    delegated: bool,
) -> Result<(Option<Response>, String), Response> {
    let decided = st
        .gateway
        .decide("token", attempt)
        .await
        .map_err(|_| token_error(500, "internal_failure", "Backend Error"))?;
    for d in &decided.decision.denials {
        let applies = match d.code {
            // Without `sub` a service account acts as itself: Google issues the token and the
            // API answers "Precondition check failed." later.
            Reason::DelegationNotConfigured
            | Reason::DelegationScopeNotGranted
            | Reason::DelegationSubjectUnknown => delegated,
            Reason::ClientDisabled
            | Reason::AccountSuspended
            | Reason::AccountSendingRevoked
            | Reason::PolicyDenied
            | Reason::AuthInvalid
            | Reason::AuthExpired
            | Reason::AuthRevoked
            | Reason::AuthLocked => true,
            _ => false,
        };
        if applies && let Some(reply) = d.token() {
            // Google's two fields, plus Mailgate's explanation in a field clients ignore
            // (google-auth hands the whole body to the caller in `RefreshError.args[1]`).
            let status = StatusCode::from_u16(reply.http_status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut r = (
                status,
                Json(json!({
                    "error": reply.error,
                    "error_description": reply.description,
                    "mailgate": {
                        "code": d.code.code(),
                        "check": d.stage.as_str(),
                        "object_at_fault": d.object_at_fault.to_string(),
                        "remedy": d.remedy,
                        "decision_id": decided.id,
                    },
                })),
            )
                .into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Ok(v) = HeaderValue::from_str(&decided.id) {
                r.headers_mut().insert("x-mailgate-decision", v);
            }
            return Ok((Some(r), decided.id));
        }
    }
    Ok((None, decided.id))
}

/// A token-endpoint refusal for a rule of token issuance itself, with Mailgate's explanation.
fn explained_token_error(
    reason: Reason,
    object_at_fault: &str,
    remedy: &str,
    decision_id: &str,
) -> Response {
    let Some(reply) = reason.token_reply(&Default::default()) else {
        return token_error(400, "invalid_request", remedy);
    };
    let status = StatusCode::from_u16(reply.http_status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({
            "error": reply.error,
            "error_description": reply.description,
            "mailgate": {
                "code": reason.code(),
                "check": reason.spec().stage.as_str(),
                "object_at_fault": object_at_fault,
                "remedy": remedy,
                "decision_id": decision_id,
            },
        })),
    )
        .into_response()
}

async fn issue(
    st: &GmailState,
    kind: &str,
    grant: &Grant,
    scopes: &[String],
    family: Option<&str>,
    ttl_ms: i64,
    prefix: &str,
) -> Result<String, Response> {
    let token = mint(prefix)?;
    let now = mailgate_gateway::now_ms() as i64;
    let family = match family {
        Some(f) => f.to_owned(),
        None => mint("")?,
    };
    st.tokens
        .insert_token(&TokenRecord {
            token_sha256: mailgate_auth::sha256_hex(token.as_bytes()),
            kind: kind.to_owned(),
            grant: serde_json::to_value(grant).unwrap_or_default(),
            scopes: scopes.to_vec(),
            family,
            created_at_ms: now,
            expires_at_ms: now + ttl_ms,
            revoked: false,
            used: false,
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot store a token");
            token_error(500, "internal_failure", "Backend Error")
        })?;
    Ok(token)
}

fn token_ok(access: &str, refresh: Option<&str>, scopes: &[String]) -> Response {
    let mut body = json!({
        "access_token": access,
        "expires_in": ACCESS_TTL_MS / 1000 - 1,
        "scope": scopes.join(" "),
        "token_type": "Bearer",
    });
    if let (Some(r), Some(o)) = (refresh, body.as_object_mut()) {
        o.insert("refresh_token".into(), json!(r));
    }
    let mut resp = Json(body).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Client authentication: HTTP Basic or form fields; the secret is compared by hash in constant time.
fn client_auth(
    st: &GmailState,
    headers: &HeaderMap,
    form: &TokenForm,
) -> Result<mailgate_core::directory::OAuthClient, Response> {
    let mut id = form.client_id.clone();
    let mut secret = form.client_secret.clone();
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        use base64::Engine as _;
        if let Ok(dec) = base64::engine::general_purpose::STANDARD.decode(basic.trim())
            && let Ok(s) = String::from_utf8(dec)
            && let Some((u, p)) = s.split_once(':')
        {
            id = Some(u.to_owned());
            secret = Some(p.to_owned());
        }
    }
    let not_found = || token_error(401, "invalid_client", "The OAuth client was not found.");
    let id = id.ok_or_else(not_found)?;
    let live = st.gateway.live();
    let client = live.index.client(&id).cloned().ok_or_else(not_found)?;
    if client.disabled {
        return Err(token_error(
            401,
            "disabled_client",
            "The OAuth client was disabled.",
        ));
    }
    if let Some(expected) = &client.secret_sha256 {
        let given = secret
            .as_deref()
            .map(|s| mailgate_auth::sha256_hex(s.as_bytes()))
            .unwrap_or_default();
        if !mailgate_auth::ct_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(token_error(401, "invalid_client", "Unauthorized"));
        }
    }
    Ok(client)
}

async fn authorization_code(
    st: &GmailState,
    headers: &HeaderMap,
    form: &TokenForm,
) -> Result<Response, Response> {
    let client = client_auth(st, headers, form)?;
    let code = form
        .code
        .as_deref()
        .ok_or_else(|| token_error(400, "invalid_request", "Missing required parameter: code"))?;
    let sha = mailgate_auth::sha256_hex(code.as_bytes());
    let bad = || token_error(400, "invalid_grant", "Malformed auth code.");
    let rec = st
        .tokens
        .token(&sha)
        .await
        .map_err(|_| bad())?
        .ok_or_else(bad)?;
    let Ok(Grant::Code {
        user,
        client_id,
        redirect_uri,
        code_challenge,
    }) = serde_json::from_value::<Grant>(rec.grant.clone())
    else {
        return Err(bad());
    };
    if rec.kind != "code" || client_id != client.client_id {
        return Err(bad());
    }
    if rec.expires_at_ms < mailgate_gateway::now_ms() as i64 || rec.revoked {
        return Err(token_error(400, "invalid_grant", "Bad Request"));
    }
    if form.redirect_uri.as_deref() != Some(redirect_uri.as_str()) {
        return Err(token_error(400, "redirect_uri_mismatch", "Bad Request"));
    }
    match code_challenge {
        Some(challenge) => {
            let verifier = form.code_verifier.as_deref().unwrap_or_default();
            use base64::Engine as _;
            let digest = aws_sha256(verifier.as_bytes());
            let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
            if !mailgate_auth::ct_eq(computed.as_bytes(), challenge.as_bytes()) {
                return Err(token_error(400, "invalid_grant", "Invalid code verifier."));
            }
        }
        None if client.secret_sha256.is_none() => {
            return Err(token_error(
                400,
                "invalid_request",
                "code_verifier or client_secret is required",
            ));
        }
        None => {}
    }
    // Single use: a replayed code revokes everything minted from it (RFC 6749 §10.5).
    if !st.tokens.use_token(&sha).await.map_err(|_| bad())? {
        let _ = st.tokens.revoke_family(&rec.family).await;
        return Err(token_error(400, "invalid_grant", "Bad Request"));
    }
    let grant = Grant::User {
        user,
        client_id: client.client_id.clone(),
    };
    let access = issue(
        st,
        "access",
        &grant,
        &rec.scopes,
        Some(&rec.family),
        ACCESS_TTL_MS,
        "ya29.mg_",
    )
    .await?;
    let refresh = issue(
        st,
        "refresh",
        &grant,
        &rec.scopes,
        Some(&rec.family),
        REFRESH_TTL_MS,
        "1//mg_",
    )
    .await?;
    Ok(token_ok(&access, Some(&refresh), &rec.scopes))
}

fn aws_sha256(data: &[u8]) -> Vec<u8> {
    // mailgate-auth exposes hex; PKCE wants raw bytes.
    let hex = mailgate_auth::sha256_hex(data);
    (0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("00"), 16).ok())
        .collect()
}

async fn refresh(
    st: &GmailState,
    headers: &HeaderMap,
    form: &TokenForm,
) -> Result<Response, Response> {
    let client = client_auth(st, headers, form)?;
    let token = form.refresh_token.as_deref().ok_or_else(|| {
        token_error(
            400,
            "invalid_request",
            "Missing required parameter: refresh_token",
        )
    })?;
    let sha = mailgate_auth::sha256_hex(token.as_bytes());
    let gone = || token_error(400, "invalid_grant", EXPIRED_OR_REVOKED);
    let rec = st
        .tokens
        .token(&sha)
        .await
        .map_err(|_| gone())?
        .ok_or_else(gone)?;
    let Ok(grant @ Grant::User { .. }) = serde_json::from_value::<Grant>(rec.grant.clone()) else {
        return Err(gone());
    };
    let Grant::User { client_id, .. } = &grant else {
        return Err(gone());
    };
    if rec.kind != "refresh" || *client_id != client.client_id {
        return Err(token_error(401, "unauthorized_client", "Unauthorized"));
    }
    if rec.revoked || rec.expires_at_ms < mailgate_gateway::now_ms() as i64 {
        return Err(gone());
    }
    // Rotation: each refresh token works once; a reused one means it leaked, so the whole family
    // is revoked.
    if !st.tokens.use_token(&sha).await.map_err(|_| gone())? {
        let _ = st.tokens.revoke_family(&rec.family).await;
        tracing::warn!(family = %rec.family, "refresh token reused: family revoked");
        return Err(gone());
    }
    // The user's state is checked again, as Google does for suspended accounts.
    if let Grant::User { user, client_id } = &grant {
        let project = st
            .gateway
            .live()
            .index
            .client(client_id)
            .map(|c| c.project.clone())
            .unwrap_or_default();
        let attempt = SendAttempt::new(
            Door::Gmail,
            Credential::OauthUser {
                user: user.clone(),
                client_id: client_id.clone(),
                project,
                scopes: rec.scopes.clone(),
            },
        );
        if let (Some(r), _) = token_refusal(st, &attempt, false).await? {
            return Err(r);
        }
    }
    let access = issue(
        st,
        "access",
        &grant,
        &rec.scopes,
        Some(&rec.family),
        ACCESS_TTL_MS,
        "ya29.mg_",
    )
    .await?;
    let new_refresh = issue(
        st,
        "refresh",
        &grant,
        &rec.scopes,
        Some(&rec.family),
        REFRESH_TTL_MS,
        "1//mg_",
    )
    .await?;
    Ok(token_ok(&access, Some(&new_refresh), &rec.scopes))
}

#[derive(Debug, Deserialize)]
pub(crate) struct RevokeParams {
    token: Option<String>,
}

/// `POST /revoke` (token in the form or the query, as Google accepts both).
pub(crate) async fn revoke(
    State(st): State<Arc<GmailState>>,
    Query(q): Query<RevokeParams>,
    form: Result<Form<RevokeParams>, axum::extract::rejection::FormRejection>,
) -> Response {
    let token = form.ok().and_then(|f| f.0.token).or(q.token);
    let Some(token) = token else {
        return token_error(400, "invalid_request", "Missing required parameter: token");
    };
    let sha = mailgate_auth::sha256_hex(token.as_bytes());
    match st.tokens.token(&sha).await {
        Ok(Some(rec)) if !rec.revoked => {
            let _ = st.tokens.revoke_family(&rec.family).await;
            Json(json!({})).into_response()
        }
        _ => token_error(400, "invalid_token", "Token expired or revoked"),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct TokenInfoParams {
    access_token: Option<String>,
}

/// `GET /tokeninfo?access_token=` with Google's field names and string values.
pub(crate) async fn tokeninfo(
    State(st): State<Arc<GmailState>>,
    Query(q): Query<TokenInfoParams>,
) -> Response {
    let invalid = || token_error(400, "invalid_token", "Invalid Value");
    let Some(token) = q.access_token else {
        return invalid();
    };
    let now = mailgate_gateway::now_ms() as i64;
    let rec = match st
        .tokens
        .token(&mailgate_auth::sha256_hex(token.as_bytes()))
        .await
    {
        Ok(Some(r)) if r.kind == "access" && !r.revoked && r.expires_at_ms > now => r,
        _ => return invalid(),
    };
    let live = st.gateway.live();
    let (azp, sub, email) = match serde_json::from_value::<Grant>(rec.grant.clone()) {
        Ok(Grant::User { user, client_id }) => (client_id, user.clone(), Some(user)),
        Ok(Grant::ServiceAccount { email, subject }) => {
            let numeric = live
                .index
                .service_account(&email)
                .map(|s| s.client_id.clone())
                .unwrap_or_default();
            (numeric.clone(), numeric, subject.or(Some(email)))
        }
        _ => return invalid(),
    };
    let mut body = json!({
        "azp": azp,
        "aud": azp,
        "sub": sub,
        "scope": rec.scopes.join(" "),
        "exp": (rec.expires_at_ms / 1000).to_string(),
        "expires_in": ((rec.expires_at_ms - now) / 1000).to_string(),
        "access_type": "offline",
    });
    if let (Some(e), Some(o)) = (email, body.as_object_mut()) {
        o.insert("email".into(), json!(e));
        o.insert("email_verified".into(), json!("true"));
    }
    Json(body).into_response()
}

/// Resolves a bearer token to the credential the engine understands.
pub(crate) async fn credential_for(st: &GmailState, token: &str) -> Credential {
    credential_for_access_token(st.tokens.as_ref(), &st.gateway, token).await
}

/// Resolves an OAuth access token issued by this gateway's authorization server (a Gmail API
/// bearer token, or the token of SMTP XOAUTH2 / OAUTHBEARER) to the credential the engine
/// understands: unknown, expired and revoked tokens become [`Credential::Refused`].
pub async fn credential_for_access_token(
    tokens: &dyn TokenStore,
    gateway: &mailgate_gateway::Gateway,
    token: &str,
) -> Credential {
    let refused = |state| Credential::Refused {
        state,
        presented: Some("OAuth access token".into()),
    };
    let rec = match tokens
        .token(&mailgate_auth::sha256_hex(token.as_bytes()))
        .await
    {
        Ok(Some(r)) if r.kind == "access" => r,
        Ok(_) => return refused(CredentialState::Invalid),
        Err(e) => {
            tracing::error!(error = %e, "token lookup failed");
            return refused(CredentialState::Invalid);
        }
    };
    if rec.revoked {
        return refused(CredentialState::Revoked);
    }
    if rec.expires_at_ms <= mailgate_gateway::now_ms() as i64 {
        return refused(CredentialState::Expired);
    }
    let live = gateway.live();
    match serde_json::from_value::<Grant>(rec.grant) {
        Ok(Grant::User { user, client_id }) => Credential::OauthUser {
            project: live
                .index
                .client(&client_id)
                .map(|c| c.project.clone())
                .unwrap_or_default(),
            user,
            client_id,
            scopes: rec.scopes,
        },
        Ok(Grant::ServiceAccount { email, subject }) => Credential::ServiceAccount {
            project: live
                .index
                .service_account(&email)
                .map(|s| s.project.clone())
                .unwrap_or_default(),
            email,
            scopes: rec.scopes,
            subject,
        },
        _ => refused(CredentialState::Invalid),
    }
}

// ---------------------------------------------------------------------------------------------
// Login + consent (authorization-code flow)

#[derive(Debug, Deserialize)]
pub(crate) struct AuthParams {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    // Form fields of the consent page.
    email: Option<String>,
    password: Option<String>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn error_page(status: StatusCode, msg: &str) -> Response {
    (
        status,
        Html(format!(
            "<!doctype html><title>Mailgate sign-in</title><h1>Authorization error</h1><p>{}</p>",
            esc(msg)
        )),
    )
        .into_response()
}

/// Checks client and redirect URI; errors here are shown, never redirected (RFC 6749 §4.1.2.1).
fn check_auth_request(
    st: &GmailState,
    p: &AuthParams,
) -> Result<(mailgate_core::directory::OAuthClient, String, Vec<String>), Response> {
    let client_id = p.client_id.as_deref().unwrap_or_default();
    let live = st.gateway.live();
    let Some(client) = live.index.client(client_id).cloned() else {
        return Err(error_page(
            StatusCode::UNAUTHORIZED,
            &format!("Error 401: invalid_client. The OAuth client `{client_id}` was not found."),
        ));
    };
    if client.disabled {
        return Err(error_page(
            StatusCode::UNAUTHORIZED,
            "Error 401: disabled_client. The OAuth client was disabled.",
        ));
    }
    let redirect = p.redirect_uri.clone().unwrap_or_default();
    if !client.redirect_uris.contains(&redirect) {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            &format!(
                "Error 400: redirect_uri_mismatch. `{redirect}` is not registered for this client (oauth_clients[{client_id}].redirect_uris)."
            ),
        ));
    }
    if p.response_type.as_deref() != Some("code") {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Error 400: unsupported_response_type (use response_type=code)",
        ));
    }
    if p.code_challenge.is_some() && p.code_challenge_method.as_deref() != Some("S256") {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Error 400: invalid_request. Only code_challenge_method=S256 is supported.",
        ));
    }
    let scopes: Vec<String> = p
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if scopes.is_empty() {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Error 400: invalid_scope. Missing required parameter: scope",
        ));
    }
    Ok((client, redirect, scopes))
}

fn consent_page(
    p: &AuthParams,
    client_name: &str,
    scopes: &[String],
    error: Option<&str>,
) -> Response {
    let hidden = |name: &str, v: &Option<String>| {
        v.as_deref()
            .map(|v| format!("<input type=hidden name=\"{name}\" value=\"{}\">", esc(v)))
            .unwrap_or_default()
    };
    let items: String = scopes
        .iter()
        .map(|s| format!("<li><code>{}</code></li>", esc(s)))
        .collect();
    let err = error
        .map(|e| format!("<p role=alert style=\"color:#b00\">{}</p>", esc(e)))
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><meta charset=utf-8><title>Sign in - Mailgate</title>\
<h1>Sign in to continue to {name}</h1>{err}\
<p>{name} is asking for access to:</p><ul>{items}</ul>\
<form method=post action=\"/o/oauth2/auth\">\
{h1}{h2}{h3}{h4}{h5}{h6}{h7}\
<label>Email <input name=email type=email autocomplete=username required></label><br>\
<label>Password <input name=password type=password autocomplete=current-password required></label><br>\
<button type=submit>Allow</button></form>",
        name = esc(client_name),
        h1 = hidden("client_id", &p.client_id),
        h2 = hidden("redirect_uri", &p.redirect_uri),
        h3 = hidden("response_type", &p.response_type),
        h4 = hidden("scope", &p.scope),
        h5 = hidden("state", &p.state),
        h6 = hidden("code_challenge", &p.code_challenge),
        h7 = hidden("code_challenge_method", &p.code_challenge_method),
    ))
    .into_response()
}

/// `GET /o/oauth2/auth`: the login + consent page listing the requested scopes.
pub(crate) async fn auth_page(
    State(st): State<Arc<GmailState>>,
    Query(p): Query<AuthParams>,
) -> Response {
    match check_auth_request(&st, &p) {
        Ok((client, _, scopes)) => {
            let name = client.name.clone().unwrap_or(client.client_id.clone());
            consent_page(&p, &name, &scopes, None)
        }
        Err(r) => r,
    }
}

/// `POST /o/oauth2/auth`: checks the password, then redirects with a code.
pub(crate) async fn auth_submit(
    State(st): State<Arc<GmailState>>,
    Form(p): Form<AuthParams>,
) -> Response {
    let (client, redirect, scopes) = match check_auth_request(&st, &p) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let name = client.name.clone().unwrap_or(client.client_id.clone());
    let email = p.email.clone().unwrap_or_default();
    let password = p.password.clone().unwrap_or_default();
    let user = {
        let live = st.gateway.live();
        live.index.directory().user(&email).cloned()
    };
    let ok = user
        .as_ref()
        .and_then(|u| u.password_hash.as_deref())
        .is_some_and(|h| mailgate_auth::verify_password(&password, h));
    let Some(user) = user.filter(|_| ok) else {
        tracing::info!(login = %email, "consent: wrong email or password");
        return consent_page(&p, &name, &scopes, Some("Wrong email or password."));
    };
    let grant = Grant::Code {
        user: user.email.clone(),
        client_id: client.client_id.clone(),
        redirect_uri: redirect.clone(),
        code_challenge: p.code_challenge.clone(),
    };
    let code = match issue(&st, "code", &grant, &scopes, None, CODE_TTL_MS, "4/mg_").await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut url = match url::Url::parse(&redirect) {
        Ok(u) => u,
        Err(_) => return error_page(StatusCode::BAD_REQUEST, "redirect_uri is not a URL"),
    };
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("code", &code);
        q.append_pair("scope", &scopes.join(" "));
        if let Some(s) = &p.state {
            q.append_pair("state", s);
        }
    }
    Redirect::to(url.as_str()).into_response()
}
