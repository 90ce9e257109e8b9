//! A Google-style OAuth 2.0 authorization server: `POST /token` (RFC 7523 JWT-bearer for service
//! accounts with domain-wide delegation, `authorization_code` with PKCE, rotating
//! `refresh_token`), `POST /revoke`, `GET /tokeninfo`, and a minimal login + consent page at
//! `/o/oauth2/auth`. Tokens are opaque; only their SHA-256 is stored, so revocation is immediate.
//! Errors use Google's `{"error", "error_description"}` bodies and statuses (docs/gmail.md).
//!
//! JWTs are verified per RFC 8725: the algorithm is pinned to RS256 (no `none`, no HMAC
//! confusion), the key is the issuer's registered key (by `kid` when given), and `aud`, `iss`,
//! `iat`, `exp` (at most one hour apart, 60 s clock skew) and `nbf` (same skew) are all checked;
//! a `crit` header is refused (RFC 7515 §4.1.11: Mailgate understands no extension), and an
//! assertion is exchanged once: its `jti` (or, without one, its SHA-256) is kept until its `exp`
//! in the store (`jwt_replay`), after its signature verified.

use std::sync::Arc;

use axum::Form;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use mailgate_core::engine::{Action, Credential, CredentialState, Door, SendAttempt};
use mailgate_store::{TokenKind, TokenRecord};
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
/// How long after its `iat` the very same assertion without a `jti` may be exchanged again.
/// google-auth (Python and Node) and Go's oauth2 sign `iat` in whole seconds and no `jti`, so two
/// workers of one application that ask for a token with the same key, subject and scopes in
/// the same second send byte-identical assertions; Google exchanges both. Refusing the second
/// would refuse a legitimate client (found running the docs' examples side by side); after
/// these few seconds a repeat is a replay and refused. An assertion with a `jti` is exchanged
/// once, always (RFC 7523 §3 item 7).
const SAME_SECOND_GRACE_S: i64 = 10;
const REPLAYED: &str = "Invalid JWT: this assertion was already exchanged for a token. Sign a new assertion (a new 'iat'/'exp', or a new 'jti') for every token request.";
const NOT_YET_VALID: &str = "Invalid JWT: Token is not valid yet ('nbf' is in the future). Check the clock of the system that signs the assertions.";
const CRITICAL_HEADER: &str =
    "Invalid JWT: the header lists critical extensions ('crit') this server does not understand.";

/// Who a token speaks for: one stored form for every door ([`mailgate_gateway::Grant`]).
pub(crate) use mailgate_gateway::Grant;

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

/// A store fault at the token endpoint: a temporary refusal (RFC 6749's
/// `temporarily_unavailable`, 503 + `Retry-After`) with Mailgate's reason code.
fn token_unavailable() -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "error": "temporarily_unavailable",
            "error_description": format!("The service is temporarily unavailable ({}); retry later.", crate::errors::STORE_UNAVAILABLE),
            "mailgate": {
                "code": crate::errors::STORE_UNAVAILABLE,
                "check": "store",
                "remedy": "the gateway cannot use its store (disk full or database fault): retry later",
            },
        })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(crate::errors::STORE_RETRY_AFTER_SECS),
    );
    r
}

/// The password pool is full (too many sign-ins or client secrets being checked at once).
fn token_busy() -> Response {
    let mut r = token_error(
        503,
        "temporarily_unavailable",
        "Too many requests are being authenticated; retry in a second.",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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
    #[serde(default)]
    jti: Option<String>,
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
    // The engine decides the issuance (`Action::IssueToken`): the credential, its client, the
    // delegation when the token acts for a user (every requested scope granted) and the
    // account's state; the rest (e.g. the API not enabled) surfaces when the token is used, as
    // at Google.
    let attempt = SendAttempt::new(
        Door::Gmail,
        Credential::ServiceAccount {
            email: sa.email.clone(),
            project: sa.project.clone(),
            scopes: scopes.clone(),
            subject: claims.sub.clone(),
        },
    )
    .for_action(Action::IssueToken);
    if let Some(r) = token_refusal(st, &attempt).await? {
        return Err(r);
    }
    // Replay: recorded only now, when a token is about to be issued (a refused request can be
    // sent again as it was, and google-auth resends the same assertion when it retries), and
    // only after the signature verified: this write is on behalf of a key holder only.
    let key = match &claims.jti {
        Some(jti) => format!(
            "jti:{}",
            mailgate_auth::sha256_hex(format!("{}\0{jti}", sa.email).as_bytes())
        ),
        None => format!("sha256:{}", mailgate_auth::sha256_hex(assertion.as_bytes())),
    };
    let now_ms = mailgate_gateway::now_ms() as i64;
    let keep_until_ms = claims.exp.saturating_add(LEEWAY_S).saturating_mul(1000);
    let twin_of_a_fresh_one =
        claims.jti.is_none() && now_ms / 1000 <= claims.iat + SAME_SECOND_GRACE_S;
    match st.tokens.use_assertion(&key, keep_until_ms, now_ms).await {
        Ok(true) => {}
        Ok(false) if twin_of_a_fresh_one => {}
        Ok(false) => {
            return Err(refused_credential(
                st,
                AssertionRefusal {
                    state: CredentialState::Invalid,
                    presented: format!("JWT assertion from {}", sa.email),
                    description: REPLAYED,
                },
            )
            .await);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record a JWT assertion");
            return Err(token_unavailable());
        }
    }
    let grant = Grant::ServiceAccount {
        email: sa.email.clone(),
        subject: claims.sub.clone(),
    };
    let access = issue(
        st,
        TokenKind::Access,
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
    // RFC 7515 §4.1.11: an extension the recipient does not understand makes the JWS invalid;
    // Mailgate understands none.
    if header.crit.is_some() {
        return Err(refuse(
            CredentialState::Invalid,
            "JWT assertion",
            CRITICAL_HEADER,
        ));
    }
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
    validation.validate_nbf = true;
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
        Some(ErrorKind::ExpiredSignature) => {
            refuse(CredentialState::Expired, &presented, SHORT_LIVED)
        }
        Some(ErrorKind::ImmatureSignature) => {
            refuse(CredentialState::Invalid, &presented, NOT_YET_VALID)
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
        Err(e) => return gateway_fault(&e),
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
                "check": d.check(),
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

/// The engine's refusal of a token request (the attempt's action is `Action::IssueToken`), in
/// the token endpoint's words: Google's two fields, plus Mailgate's explanation in a field
/// clients ignore (google-auth hands the whole body to the caller in `RefreshError.args[1]`).
async fn token_refusal(
    st: &GmailState,
    attempt: &SendAttempt,
) -> Result<Option<Response>, Response> {
    let decided = st
        .gateway
        .decide("token", attempt)
        .await
        .map_err(|e| gateway_fault(&e))?;
    let Some((d, reply)) = decided
        .decision
        .denial()
        .and_then(|d| Some((d, d.token()?)))
    else {
        return Ok(None);
    };
    let status = StatusCode::from_u16(reply.http_status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (
        status,
        Json(json!({
            "error": reply.error,
            "error_description": reply.description,
            "mailgate": {
                "code": d.code.code(),
                "check": d.check(),
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
    Ok(Some(r))
}

/// A store fault at the token endpoint.
fn store_fault(e: &mailgate_store::StoreError) -> Response {
    tracing::error!(error = %e, "token endpoint: store fault");
    token_unavailable()
}

/// A gateway fault at the token endpoint: the store's are temporary.
fn gateway_fault(e: &mailgate_gateway::GatewayError) -> Response {
    match e {
        mailgate_gateway::GatewayError::Store(e) => {
            tracing::error!(error = %e, "token endpoint: store fault");
            token_unavailable()
        }
        other => {
            tracing::error!(error = %other, "token endpoint fault");
            token_error(500, "internal_failure", "Backend Error")
        }
    }
}

async fn issue(
    st: &GmailState,
    kind: TokenKind,
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
            kind,
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
            token_unavailable()
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

/// Client authentication: HTTP Basic or form fields. The secret is checked against its argon2id
/// hash on the bounded password pool (never on the async workers), or, for a client applied
/// before secrets were hashed that way, against its SHA-256 in constant time.
async fn client_auth(
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
    let client = {
        let live = st.gateway.live();
        live.index.client(&id).cloned().ok_or_else(not_found)?
    };
    if client.disabled {
        return Err(token_error(
            401,
            "disabled_client",
            "The OAuth client was disabled.",
        ));
    }
    let unauthorized = || token_error(401, "invalid_client", "Unauthorized");
    if let Some(phc) = &client.secret_hash {
        let Some(given) = secret else {
            return Err(unauthorized());
        };
        match st
            .gateway
            .budget()
            .passwords()
            .verify(Some(phc.clone()), given)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(unauthorized()),
            Err(_) => return Err(token_busy()),
        }
    } else if let Some(expected) = &client.secret_sha256 {
        let given = secret
            .as_deref()
            .map(|s| mailgate_auth::sha256_hex(s.as_bytes()))
            .unwrap_or_default();
        if !mailgate_auth::ct_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(unauthorized());
        }
    }
    Ok(client)
}

/// Whether a client has a secret (a confidential client); public clients must use PKCE.
fn confidential(client: &mailgate_core::directory::OAuthClient) -> bool {
    client.secret_hash.is_some() || client.secret_sha256.is_some()
}

async fn authorization_code(
    st: &GmailState,
    headers: &HeaderMap,
    form: &TokenForm,
) -> Result<Response, Response> {
    let client = client_auth(st, headers, form).await?;
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
        .map_err(|e| store_fault(&e))?
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
    if rec.kind != TokenKind::Code || client_id != client.client_id {
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
        None if !confidential(&client) => {
            return Err(token_error(
                400,
                "invalid_request",
                "code_verifier or client_secret is required",
            ));
        }
        None => {}
    }
    // Single use: a replayed code revokes everything minted from it (RFC 6749 §10.5).
    if !st
        .tokens
        .use_token(&sha)
        .await
        .map_err(|e| store_fault(&e))?
    {
        let _ = st.tokens.revoke_family(&rec.family).await;
        return Err(token_error(400, "invalid_grant", "Bad Request"));
    }
    let grant = Grant::User {
        user,
        client_id: client.client_id.clone(),
    };
    let access = issue(
        st,
        TokenKind::Access,
        &grant,
        &rec.scopes,
        Some(&rec.family),
        ACCESS_TTL_MS,
        "ya29.mg_",
    )
    .await?;
    let refresh = issue(
        st,
        TokenKind::Refresh,
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
    let client = client_auth(st, headers, form).await?;
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
        .map_err(|e| store_fault(&e))?
        .ok_or_else(gone)?;
    let Ok(grant @ Grant::User { .. }) = serde_json::from_value::<Grant>(rec.grant.clone()) else {
        return Err(gone());
    };
    let Grant::User { client_id, .. } = &grant else {
        return Err(gone());
    };
    if rec.kind != TokenKind::Refresh || *client_id != client.client_id {
        return Err(token_error(401, "unauthorized_client", "Unauthorized"));
    }
    if rec.revoked || rec.expires_at_ms < mailgate_gateway::now_ms() as i64 {
        return Err(gone());
    }
    // Rotation: each refresh token works once; a reused one means it leaked, so the whole family
    // is revoked.
    if !st
        .tokens
        .use_token(&sha)
        .await
        .map_err(|e| store_fault(&e))?
    {
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
        )
        .for_action(Action::IssueToken);
        if let Some(r) = token_refusal(st, &attempt).await? {
            return Err(r);
        }
    }
    let access = issue(
        st,
        TokenKind::Access,
        &grant,
        &rec.scopes,
        Some(&rec.family),
        ACCESS_TTL_MS,
        "ya29.mg_",
    )
    .await?;
    let new_refresh = issue(
        st,
        TokenKind::Refresh,
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
        Ok(Some(rec)) if !rec.revoked => match st.tokens.revoke_family(&rec.family).await {
            Ok(_) => Json(json!({})).into_response(),
            Err(e) => store_fault(&e),
        },
        Ok(_) => token_error(400, "invalid_token", "Token expired or revoked"),
        Err(e) => store_fault(&e),
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
        Ok(Some(r)) if r.kind == TokenKind::Access && !r.revoked && r.expires_at_ms > now => r,
        Ok(_) => return invalid(),
        Err(e) => return store_fault(&e),
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

/// Resolves a bearer token to the credential the engine understands; `Err` is a store fault
/// (answered as a temporary refusal, never as a bad credential).
pub(crate) async fn credential_for(
    st: &GmailState,
    token: &str,
) -> Result<Credential, mailgate_store::StoreError> {
    st.gateway
        .resolve_access_token(st.tokens.as_ref(), token)
        .await
}

// ---------------------------------------------------------------------------------------------
// Login + consent (authorization-code flow)
//
// Defences (docs/security.md): the sign-in form carries an anti-CSRF token (an HMAC, under a
// per-process random key, of a random cookie, the time and every authorization parameter), so a
// form posted from elsewhere, without the cookie, late or with other parameters is refused; the
// page may not be framed and loads nothing (`X-Frame-Options`, CSP) and is never cached;
// passwords are verified on the bounded password pool, unknown users against a dummy hash (same
// time either way); failures count in the lockout every door shares (per login and client
// network, exponential back-off); and the engine's account checks run before a code is issued, so
// a suspended, revoked or under-review account gets its reason instead of a code.

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
    csrf_token: Option<String>,
}

/// Scopes a client may ask for: Google's Gmail API scopes (its discovery document) and the
/// sign-in scopes. Anything else is `invalid_scope`, as at Google.
pub(crate) const KNOWN_SCOPES: &[&str] = &[
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://www.googleapis.com/auth/gmail.metadata",
    "https://www.googleapis.com/auth/gmail.insert",
    "https://www.googleapis.com/auth/gmail.labels",
    "https://www.googleapis.com/auth/gmail.settings.basic",
    "https://www.googleapis.com/auth/gmail.settings.sharing",
    "https://www.googleapis.com/auth/gmail.addons.current.action.compose",
    "https://www.googleapis.com/auth/gmail.addons.current.message.action",
    "https://www.googleapis.com/auth/gmail.addons.current.message.metadata",
    "https://www.googleapis.com/auth/gmail.addons.current.message.readonly",
    "openid",
    "email",
    "profile",
    "https://www.googleapis.com/auth/userinfo.email",
    "https://www.googleapis.com/auth/userinfo.profile",
];

/// The cookie the consent form's anti-CSRF token is bound to.
const CSRF_COOKIE: &str = "mg_consent";
/// How long a sign-in form stays valid.
const CSRF_TTL_MS: u64 = 3_600_000;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The headers every response of the sign-in page carries: not framed (clickjacking), nothing
/// loaded or run, forms posted only here (and, through the redirect that follows, to the
/// client's registered redirect URI), never cached.
fn harden(mut r: Response, redirect_uri: Option<&str>) -> Response {
    let target = redirect_uri
        .and_then(|u| url::Url::parse(u).ok())
        .map(|u| match u.scheme() {
            "http" | "https" => u.origin().ascii_serialization(),
            other => format!("{other}:"),
        })
        .filter(|t| {
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:/[]".contains(&b))
        })
        .map(|t| format!(" {t}"))
        .unwrap_or_default();
    let csp = format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'{target}; frame-ancestors 'none'; base-uri 'none'"
    );
    let h = r.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn error_page(status: StatusCode, msg: &str) -> Response {
    harden(
        (
            status,
            Html(format!(
                "<!doctype html><meta charset=utf-8><title>Mailgate sign-in</title><h1>Authorization error</h1><p>{}</p>",
                esc(msg)
            )),
        )
            .into_response(),
        None,
    )
}

/// The scope list, each once, in order; unknown ones refused (`invalid_scope`).
fn parse_scopes(scope: Option<&str>) -> Result<Vec<String>, Response> {
    let mut scopes: Vec<String> = Vec::new();
    for s in scope.unwrap_or_default().split_whitespace() {
        if !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_owned());
        }
    }
    if scopes.is_empty() {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Error 400: invalid_scope. Missing required parameter: scope",
        ));
    }
    let unknown: Vec<String> = scopes
        .iter()
        .filter(|s| !KNOWN_SCOPES.contains(&s.as_str()))
        .take(5)
        .map(|s| s.chars().take(100).collect())
        .collect();
    if !unknown.is_empty() {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            &format!(
                "Error 400: invalid_scope. Some requested scopes were invalid. {{invalid=[{}]}}",
                unknown.join(", ")
            ),
        ));
    }
    Ok(scopes)
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
            &format!(
                "Error 401: invalid_client. The OAuth client `{}` was not found.",
                client_id.chars().take(200).collect::<String>()
            ),
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
                "Error 400: redirect_uri_mismatch. `{}` is not registered for this client (oauth_clients[{client_id}].redirect_uris).",
                redirect.chars().take(200).collect::<String>()
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
    let scopes = parse_scopes(p.scope.as_deref())?;
    Ok((client, redirect, scopes))
}

/// The anti-CSRF cookie's value, when the request carries a well-formed one.
fn cookie_nonce(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(CSRF_COOKIE)?.strip_prefix('='))
        .find(|v| {
            v.len() == 22
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
}

/// The MAC binding a form to its cookie, its issue time and every authorization parameter.
fn csrf_mac(st: &GmailState, nonce: &str, issued_ms: u64, p: &AuthParams) -> String {
    use base64::Engine as _;
    let mut m = format!("mailgate consent v1\0{nonce}\0{issued_ms}");
    for v in [
        &p.client_id,
        &p.redirect_uri,
        &p.response_type,
        &p.scope,
        &p.state,
        &p.code_challenge,
        &p.code_challenge_method,
    ] {
        match v {
            Some(v) => {
                m.push('\x01');
                m.push_str(v);
            }
            None => m.push('\x02'),
        }
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(mailgate_auth::hmac_sha256(&st.csrf_key, m.as_bytes()))
}

/// Whether the posted form carries a token this gateway issued, for this cookie and these
/// parameters, within [`CSRF_TTL_MS`].
fn csrf_ok(st: &GmailState, headers: &HeaderMap, p: &AuthParams, now_ms: u64) -> bool {
    let Some(nonce) = cookie_nonce(headers) else {
        return false;
    };
    let Some((ts, mac)) = p.csrf_token.as_deref().and_then(|t| t.split_once('.')) else {
        return false;
    };
    let Ok(issued) = ts.parse::<u64>() else {
        return false;
    };
    if issued > now_ms.saturating_add(60_000) || now_ms.saturating_sub(issued) > CSRF_TTL_MS {
        return false;
    }
    mailgate_auth::ct_eq(mac.as_bytes(), csrf_mac(st, &nonce, issued, p).as_bytes())
}

/// What the sign-in page shows besides the form.
struct PageNote {
    status: StatusCode,
    message: String,
    retry_after_secs: Option<u64>,
}

fn note(status: StatusCode, message: impl Into<String>) -> Option<PageNote> {
    Some(PageNote {
        status,
        message: message.into(),
        retry_after_secs: None,
    })
}

#[allow(
    clippy::too_many_arguments,
    reason = "one page, rendered from the request and what happened to it"
)]
fn consent_page(
    st: &GmailState,
    p: &AuthParams,
    client_name: &str,
    scopes: &[String],
    nonce: &str,
    secure: bool,
    note: Option<PageNote>,
) -> Response {
    let hidden = |name: &str, v: &Option<String>| {
        v.as_deref()
            .map(|v| format!("<input type=hidden name=\"{name}\" value=\"{}\">", esc(v)))
            .unwrap_or_default()
    };
    let now = mailgate_gateway::now_ms();
    let token = format!("{now}.{}", csrf_mac(st, nonce, now, p));
    let items: String = scopes
        .iter()
        .map(|s| format!("<li><code>{}</code></li>", esc(s)))
        .collect();
    let err = note
        .as_ref()
        .map(|n| format!("<p role=alert style=\"color:#b00\">{}</p>", esc(&n.message)))
        .unwrap_or_default();
    let mut r = Html(format!(
        "<!doctype html><meta charset=utf-8><title>Sign in - Mailgate</title>\
<h1>Sign in to continue to {name}</h1>{err}\
<p>{name} is asking for access to:</p><ul>{items}</ul>\
<form method=post action=\"/o/oauth2/auth\">\
{h1}{h2}{h3}{h4}{h5}{h6}{h7}<input type=hidden name=\"csrf_token\" value=\"{token}\">\
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
    .into_response();
    if let Some(n) = &note {
        *r.status_mut() = n.status;
        if let Some(secs) = n.retry_after_secs {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
    }
    let cookie = format!(
        "{CSRF_COOKIE}={nonce}; Path=/o/oauth2/auth; Max-Age={}; HttpOnly; SameSite=Strict{}",
        CSRF_TTL_MS / 1000,
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    harden(r, p.redirect_uri.as_deref())
}

/// `GET /o/oauth2/auth`: the login + consent page listing the requested scopes.
pub(crate) async fn auth_page(
    State(st): State<Arc<GmailState>>,
    conn: axum::Extension<mailgate_gateway::ConnFacts>,
    headers: HeaderMap,
    query: Result<Query<AuthParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = query else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Error 400: invalid_request. The authorization request could not be read.",
        );
    };
    match check_auth_request(&st, &p) {
        Ok((client, _, scopes)) => {
            let name = client.name.clone().unwrap_or(client.client_id.clone());
            // Reuse the browser's cookie, so two sign-in tabs do not invalidate each other.
            let nonce = match cookie_nonce(&headers) {
                Some(n) => n,
                None => match mailgate_auth::random_token::<16>() {
                    Ok(n) => n,
                    Err(_) => {
                        return error_page(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Error 500: no randomness available.",
                        );
                    }
                },
            };
            consent_page(&st, &p, &name, &scopes, &nonce, conn.tls.is_some(), None)
        }
        Err(r) => r,
    }
}

/// The engine's refusal of a failed sign-in (kept under a decision id like every refusal, in
/// memory only since nobody authenticated), as a line for the page.
async fn refusal_line(
    st: &GmailState,
    conn: &mailgate_gateway::ConnFacts,
    headers: &HeaderMap,
    state: CredentialState,
    shown: &str,
) -> String {
    let mut attempt = SendAttempt::new(
        Door::Gmail,
        Credential::Refused {
            state,
            presented: Some("consent page password".into()),
        },
    );
    attempt.transport = conn.transport(headers);
    match st.gateway.decide("consent", &attempt).await {
        Ok(d) => match d.decision.denial() {
            Some(x) => format!("{shown} [mailgate: {}, decision {}]", x.code.code(), d.id),
            None => shown.to_owned(),
        },
        Err(_) => shown.to_owned(),
    }
}

/// The engine's answer on the account at consent time (`Action::SignIn`: the engine says which
/// of the account's states refuse a code), rendered as the page's line.
async fn account_refusal(
    st: &GmailState,
    conn: &mailgate_gateway::ConnFacts,
    headers: &HeaderMap,
    user: &str,
    client: &mailgate_core::directory::OAuthClient,
    scopes: &[String],
) -> Result<Option<String>, Response> {
    let mut attempt = SendAttempt::new(
        Door::Gmail,
        Credential::OauthUser {
            user: user.to_owned(),
            client_id: client.client_id.clone(),
            project: client.project.clone(),
            scopes: scopes.to_vec(),
        },
    )
    .for_action(Action::SignIn);
    attempt.transport = conn.transport(headers);
    // A refusal is kept under its id; an allowance is not (the code's issuance follows).
    let refused = match st.gateway.screen("gmail", &attempt).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "consent: cannot ask the engine");
            return Err(unavailable_page());
        }
    };
    Ok(refused.and_then(|decided| {
        decided.decision.denial().map(|d| {
            format!(
                "{} [mailgate: {}, decision {}] Remedy: {}",
                d.message,
                d.code.code(),
                decided.id,
                d.remedy
            )
        })
    }))
}

fn unavailable_page() -> Response {
    let mut r = error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "Error 503: the service is temporarily unavailable ({}). Try again in a moment.",
            crate::errors::STORE_UNAVAILABLE
        ),
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(crate::errors::STORE_RETRY_AFTER_SECS),
    );
    r
}

/// `POST /o/oauth2/auth`: checks the form's origin and the password, asks the engine about the
/// account, then redirects with a code.
pub(crate) async fn auth_submit(
    State(st): State<Arc<GmailState>>,
    conn: axum::Extension<mailgate_gateway::ConnFacts>,
    headers: HeaderMap,
    form: Result<Form<AuthParams>, axum::extract::rejection::FormRejection>,
) -> Response {
    let p = match form {
        Ok(Form(p)) => p,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Error 413: the sign-in form is too large.",
            );
        }
        Err(_) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Error 400: invalid_request. The sign-in form could not be read.",
            );
        }
    };
    let (client, redirect, scopes) = match check_auth_request(&st, &p) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !csrf_ok(&st, &headers, &p, mailgate_gateway::now_ms()) {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Error 400: invalid_request. This sign-in form has expired or was not sent from this page: go back to the application and sign in again.",
        );
    }
    let Some(nonce) = cookie_nonce(&headers) else {
        return error_page(StatusCode::BAD_REQUEST, "Error 400: invalid_request.");
    };
    let name = client.name.clone().unwrap_or(client.client_id.clone());
    let secure = conn.tls.is_some();
    let page = |n: Option<PageNote>| consent_page(&st, &p, &name, &scopes, &nonce, secure, n);
    let email = p.email.as_deref().unwrap_or_default().trim().to_owned();
    let password = p.password.clone().unwrap_or_default();
    let ip = conn.peer.ip();
    let lockout = st.gateway.lockout();
    if let Err(wait) = lockout.check_shared(&email, ip).await {
        let secs = wait.as_secs().max(1);
        let line = refusal_line(
            &st,
            &conn,
            &headers,
            CredentialState::Locked,
            &format!("Too many failed sign-in attempts. Try again in {secs} seconds."),
        )
        .await;
        if st.gateway.budget().log_limited("consent locked out") {
            tracing::info!(login = %mailgate_auth::redact_login(&email), "consent: locked out");
        }
        return page(Some(PageNote {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: line,
            retry_after_secs: Some(secs),
        }));
    }
    let (hash, primary) = {
        let live = st.gateway.live();
        let user = live.index.directory().user(&email);
        (
            user.and_then(|u| u.password_hash.clone()),
            user.map(|u| u.email.clone()),
        )
    };
    // Unknown users are checked against a dummy hash: the same time as a wrong password.
    let ok = match st.gateway.budget().passwords().verify(hash, password).await {
        Ok(ok) => ok,
        Err(_) => {
            return page(Some(PageNote {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message:
                    "The sign-in service is busy. Try again in a moment. [mailgate: server.busy]"
                        .into(),
                retry_after_secs: Some(1),
            }));
        }
    };
    let Some(user) = primary.filter(|_| ok) else {
        lockout.failure_shared(&email, ip).await;
        if st.gateway.budget().log_limited("consent wrong password") {
            tracing::info!(login = %mailgate_auth::redact_login(&email), "consent: wrong email or password");
        }
        let line = refusal_line(
            &st,
            &conn,
            &headers,
            CredentialState::Invalid,
            "Wrong email or password.",
        )
        .await;
        return page(note(StatusCode::OK, line));
    };
    lockout.success_shared(&email, ip).await;
    match account_refusal(&st, &conn, &headers, &user, &client, &scopes).await {
        Ok(None) => {}
        Ok(Some(line)) => {
            tracing::info!(user = %user, "consent refused by the account's state");
            return page(note(StatusCode::FORBIDDEN, line));
        }
        Err(r) => return r,
    }
    let grant = Grant::Code {
        user,
        client_id: client.client_id.clone(),
        redirect_uri: redirect.clone(),
        code_challenge: p.code_challenge.clone(),
    };
    let code = match issue(
        &st,
        TokenKind::Code,
        &grant,
        &scopes,
        None,
        CODE_TTL_MS,
        "4/mg_",
    )
    .await
    {
        Ok(c) => c,
        Err(_) => return unavailable_page(),
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
    harden(Redirect::to(url.as_str()).into_response(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scope_the_door_checks_is_a_known_scope() {
        for s in mailgate_core::engine::SEND_SCOPES
            .iter()
            .chain(mailgate_core::engine::READ_SCOPES)
            .chain(mailgate_core::engine::SHARING_SCOPES)
            .chain(mailgate_core::engine::BASIC_SCOPES)
        {
            assert!(KNOWN_SCOPES.contains(s), "{s}");
        }
        assert!(parse_scopes(Some("openid email https://mail.google.com/")).is_ok());
        assert!(parse_scopes(Some("https://mail.google.com/ evil")).is_err());
        assert!(parse_scopes(Some("  ")).is_err());
    }

    #[test]
    fn the_cookie_is_read_only_when_well_formed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; mg_consent=AAAAAAAAAAAAAAAAAAAAAA; c=d"),
        );
        assert_eq!(cookie_nonce(&h).as_deref(), Some("AAAAAAAAAAAAAAAAAAAAAA"));
        h.insert(header::COOKIE, HeaderValue::from_static("mg_consent=short"));
        assert_eq!(cookie_nonce(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("mg_consentx=AAAAAAAAAAAAAAAAAAAAAA"),
        );
        assert_eq!(cookie_nonce(&h), None);
    }
}
