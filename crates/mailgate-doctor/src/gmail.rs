//! `mailgate doctor gmail` (a service account with domain-wide delegation) and `mailgate doctor
//! oauth` (a user's consent: client id, secret, refresh token): the Gmail-API set-up probed as a
//! support engineer would, in order, every step run whatever the earlier ones found.
//!
//! 1. **Server**: is the endpoint a Mailgate (`GET /healthz` says `"service": "mailgate"`)? Then
//!    remedies are Mailgate's (org.yaml, `mailgate ...`) and a dry-run send is possible;
//!    otherwise remedies are phrased for Google's Admin console and Cloud Console.
//! 2. **Clock**: the local clock against the server's `Date` header (Google refuses assertions
//!    whose `iat`/`exp` are not "in a reasonable timeframe").
//! 3. **Key file** (`gmail`): a service-account JSON key with a usable RSA private key.
//! 4. **Token without `sub`** (`gmail`): is the key itself valid (signature, key not deleted,
//!    account not disabled)? / **Refresh** (`oauth`): is the refresh token still good?
//! 5. **Token with `sub`, one per scope** (`gmail`): domain-wide delegation per scope (GAM's
//!    `check serviceaccount` does this part). / **Scopes** (`oauth`): does the consent include a
//!    send scope?
//! 6. **Mailbox** (`users.getProfile`): is the Gmail API enabled for the project, does the user
//!    exist, is mail enabled, is the account in good standing? A send-only token is enough for
//!    the first answers (Google checks the project before the method's scope).
//! 7. **Send-as** (`settings.sendAs.list`): is `--from` the user's address or a verified send-as
//!    address? Needs a read or settings scope: the doctor asks for one; skipped if none is
//!    granted.
//! 8. **Send probe**: on a Mailgate, a dry run (`X-Mailgate-Dry-Run: true`: decided with every
//!    fact, nothing sent, nothing charged); Google's API has no dry run, so skipped with a note.
//! 9. **Quota**: the rate-limit headers any answer carried.
//!
//! A failed step is diagnosed from what Google's answer says (status, `reason`, message; the
//! table of [`mailgate_core::why`]), narrowed by the step; only when the table has no row for
//! the text and the server is a Mailgate is the reason code Mailgate's answer carries used.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use mailgate_core::catalogue::Reason;
use serde_json::{Value, json};

use crate::http::{Answer, Client};
use crate::{Diagnosis, DoctorError, Output, Report, Run, Step};

/// Google's Gmail API.
pub const GMAIL_ENDPOINT: &str = "https://gmail.googleapis.com";
/// Google's token endpoint.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The scope a sender needs.
pub const SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";

/// Scopes that allow `settings.sendAs.list` (and `users.getProfile`), least first: the doctor
/// asks for a token with the first one the delegation grants.
const READ_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/gmail.settings.basic",
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://mail.google.com/",
];

/// Scopes that allow `messages.send`.
const SEND_SCOPES: &[&str] = &[
    SEND_SCOPE,
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.modify",
];

/// Clock skew that is worth a warning, and one Google refuses assertions at.
const SKEW_WARN_S: i64 = 10;
const SKEW_FAIL_S: i64 = 60;

/// What `doctor gmail` probes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The service account's JSON key file.
    pub key_file: PathBuf,
    /// The user the service account acts for (`sub`).
    pub subject: String,
    /// The From address to check against the send-as addresses.
    pub from: Option<String>,
    /// The scopes to check delegation for, each on its own.
    pub scopes: Vec<String>,
    /// The Gmail API's base URL.
    pub endpoint: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// Deadline of each request.
    pub timeout: Duration,
}

/// What `doctor oauth` probes.
#[derive(Debug, Clone)]
pub struct OauthOptions {
    /// The OAuth client id.
    pub client_id: String,
    /// The OAuth client secret.
    pub client_secret: String,
    /// The user's refresh token.
    pub refresh_token: String,
    /// The From address to check against the send-as addresses.
    pub from: Option<String>,
    /// The token endpoint.
    pub token_uri: String,
    /// The Gmail API's base URL.
    pub endpoint: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// Deadline of each request.
    pub timeout: Duration,
}

/// A service-account key file's fields the doctor uses.
struct KeyFile {
    client_email: String,
    client_id: Option<String>,
    private_key_id: Option<String>,
    token_uri: String,
    key: jsonwebtoken::EncodingKey,
}

/// The state of a run.
struct Probe {
    run: Run,
    http: Client,
    endpoint: String,
    /// The endpoint is a Mailgate.
    mailgate: bool,
    /// Rate-limit and quota headers seen, as evidence lines.
    quota: Vec<String>,
}

fn client(ca_file: Option<&PathBuf>, timeout: Duration) -> Result<Client, DoctorError> {
    let ca = match ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| DoctorError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?),
        None => None,
    };
    Client::new(ca.as_deref(), timeout)
}

fn check_url(what: &str, url: &str) -> Result<String, DoctorError> {
    let u = url::Url::parse(url).map_err(|e| DoctorError::Usage(format!("{what} `{url}`: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(DoctorError::Usage(format!(
            "{what} `{url}`: use an http:// or https:// URL"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Runs every probe of `doctor gmail`.
pub async fn run(opts: &Options, output: Output) -> Result<Report, DoctorError> {
    let endpoint = check_url("--endpoint", &opts.endpoint)?;
    if !opts.subject.contains('@') {
        return Err(DoctorError::Usage(format!(
            "--subject `{}`: the user's email address",
            opts.subject
        )));
    }
    let raw = std::fs::read_to_string(&opts.key_file).map_err(|e| DoctorError::File {
        path: opts.key_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut run = Run::new(
        "gmail",
        format!("{} acting for {}", endpoint, opts.subject),
        output,
    );
    // The key file's private key (every line of it) is a secret, whatever shape the file has.
    if let Ok(v) = serde_json::from_str::<Value>(&raw)
        && let Some(k) = v["private_key"].as_str()
    {
        run.secret(k);
    }
    let mut p = Probe::start(run, client(opts.ca_file.as_ref(), opts.timeout)?, endpoint).await;
    let key = p.key_file(&raw, &opts.key_file.display().to_string());
    let from = opts.from.clone().unwrap_or_else(|| opts.subject.clone());

    let Some(key) = key else {
        for (id, what) in [
            ("token", "token for the service account itself"),
            ("delegation", "domain-wide delegation"),
            ("profile", "the mailbox"),
            ("send_as", "send-as addresses"),
            ("send_probe", "send probe"),
        ] {
            p.run
                .finish(Step::skip(id, what, "needs a usable key file (see above)"));
        }
        return Ok(p.end());
    };

    // 4. The key on its own.
    let scope_all = opts.scopes.join(" ");
    p.run.begin("token for the service account itself (no sub)");
    let own = p.sa_token(&key, None, &scope_all).await;
    let step = match own {
        Ok(_) => Step::pass(
            "token",
            format!("token for {} itself (no sub)", key.client_email),
        )
        .evidence("the key signs valid assertions and the account is enabled"),
        Err(e) => p.token_failure(
            "token",
            &format!("token for {} itself (no sub)", key.client_email),
            &e,
            &[
                Reason::AuthInvalid,
                Reason::ClientDisabled,
                Reason::AuthRevoked,
            ],
        ),
    };
    p.run.finish(step);

    // 5. Delegation, per scope.
    let mut tokens: Vec<(String, String)> = Vec::new();
    let mut refused = Vec::new();
    for scope in &opts.scopes {
        p.run
            .begin(&format!("token for {} with scope {scope}", opts.subject));
        match p.sa_token(&key, Some(&opts.subject), scope).await {
            Ok(t) => {
                tokens.push((scope.clone(), t));
                p.run.finish(Step::pass(
                    &format!("delegation:{scope}"),
                    format!("token for {} with scope {scope}", opts.subject),
                ));
            }
            Err(e) => refused.push((scope.clone(), e)),
        }
    }
    let granted: Vec<String> = tokens.iter().map(|(s, _)| s.clone()).collect();
    let send_token = tokens
        .iter()
        .find(|(s, _)| SEND_SCOPES.contains(&s.as_str()))
        .map(|(_, t)| t.clone());
    let id = key
        .client_id
        .clone()
        .unwrap_or_else(|| "<client_id>".into());
    for (scope, e) in refused {
        // Every scope refused: no delegation at all (or the subject is wrong); some granted:
        // this scope is missing from the delegation.
        let prefer: &[Reason] = if granted.is_empty() {
            &[
                Reason::DelegationSubjectUnknown,
                Reason::DelegationNotConfigured,
            ]
        } else {
            &[Reason::DelegationScopeNotGranted]
        };
        let mut step = p.token_failure(
            &format!("delegation:{scope}"),
            &format!("token for {} with scope {scope}", opts.subject),
            &e,
            prefer,
        );
        if let Some(d) = &mut step.diagnosis
            && !p.mailgate
            && matches!(
                d.code,
                Reason::DelegationNotConfigured | Reason::DelegationScopeNotGranted
            )
        {
            d.remedy = format!(
                "Google Admin console → Security → Access and data control → API controls → Manage Domain Wide Delegation: add (or edit) client ID {id} with the scope {scope}; changes can take up to 24 hours"
            );
        }
        p.run.finish(step);
    }
    if send_token.is_none()
        && !opts
            .scopes
            .iter()
            .any(|s| SEND_SCOPES.contains(&s.as_str()))
    {
        p.run.finish(Step::fail(
            "send_scope",
            "a send scope among the scopes checked",
            Diagnosis::new(
                Reason::ScopeInsufficient,
                "none of the scopes checked allows messages.send",
                format!("check (and delegate) {SEND_SCOPE}: pass --scope {SEND_SCOPE}"),
            ),
        ));
    }

    // A token that can read the mailbox's settings, for send-as: one of the scopes checked, or
    // the least of the read scopes the delegation grants (asked for here; a refusal is no
    // problem of the set-up, only a step the doctor cannot take).
    let mut read_token = tokens
        .iter()
        .find(|(s, _)| READ_SCOPES.contains(&s.as_str()))
        .map(|(_, t)| t.clone());
    let mut tried = Vec::new();
    if read_token.is_none() && !granted.is_empty() {
        for scope in READ_SCOPES {
            p.run
                .begin(&format!("token with {scope} (to read send-as settings)"));
            match p.sa_token(&key, Some(&opts.subject), scope).await {
                Ok(t) => {
                    read_token = Some(t);
                    break;
                }
                Err(_) => tried.push(*scope),
            }
        }
    }
    let read_note = (!tried.is_empty()).then(|| {
        format!(
            "no token with a scope that reads settings (tried {}): delegate https://www.googleapis.com/auth/gmail.settings.basic to let doctor check send-as addresses",
            tried.join(", ")
        )
    });
    p.mailbox(
        &opts.subject,
        Some(from),
        send_token.as_deref(),
        read_token.as_deref(),
        read_note,
    )
    .await;
    Ok(p.end())
}

/// Runs every probe of `doctor oauth`.
pub async fn run_oauth(opts: &OauthOptions, output: Output) -> Result<Report, DoctorError> {
    let endpoint = check_url("--endpoint", &opts.endpoint)?;
    let token_uri = check_url("--token-uri", &opts.token_uri)?;
    let mut run = Run::new(
        "oauth",
        format!("{endpoint} with client {}", opts.client_id),
        output,
    );
    run.secret(&opts.client_secret);
    run.secret(&opts.refresh_token);
    let mut p = Probe::start(run, client(opts.ca_file.as_ref(), opts.timeout)?, endpoint).await;

    // The refresh token.
    p.run.begin("refresh token → access token");
    let answer = p
        .http
        .post_form(
            &token_uri,
            &[],
            &[
                ("grant_type", "refresh_token"),
                ("client_id", &opts.client_id),
                ("client_secret", &opts.client_secret),
                ("refresh_token", &opts.refresh_token),
            ],
        )
        .await;
    let mut access = None;
    let mut scopes: Vec<String> = Vec::new();
    match answer {
        Ok(a) if a.ok() => {
            let v = a.json().unwrap_or(Value::Null);
            if let Some(t) = v["access_token"].as_str() {
                p.run.secret(t);
                access = Some(t.to_owned());
            }
            scopes = v["scope"]
                .as_str()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            p.run.finish(
                Step::pass("token", "refresh token → access token").evidence(format!(
                    "HTTP {}; scopes: {}",
                    a.status,
                    scopes.join(" ")
                )),
            );
        }
        Ok(a) => {
            let step = p.token_failure(
                "token",
                "refresh token → access token",
                &TokenFailure::Answer(a),
                &[
                    Reason::AuthRevoked,
                    Reason::AuthExpired,
                    Reason::AuthInvalid,
                    Reason::ClientDisabled,
                ],
            );
            p.run.finish(step);
        }
        Err(e) => {
            let step = p.unreachable("token", "refresh token → access token", &token_uri, &e);
            p.run.finish(step);
        }
    }

    // Who the token is for (tokeninfo), and its scopes.
    let mut user = None;
    if let Some(t) = &access {
        let info_url = match token_uri.strip_suffix("/token") {
            Some(base) => format!("{base}/tokeninfo"),
            None => "https://oauth2.googleapis.com/tokeninfo".to_owned(),
        };
        // Google's tokeninfo names the user only for a token with the email scope; else the
        // profile (below) does.
        let url = format!(
            "{info_url}?access_token={}",
            url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
        );
        if let Ok(a) = p.http.get(&url, &[]).await
            && a.ok()
        {
            let v = a.json().unwrap_or(Value::Null);
            user = v["email"].as_str().map(str::to_owned);
            if scopes.is_empty() {
                scopes = v["scope"]
                    .as_str()
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
            }
        }
    }
    let title = "the consent includes a send scope";
    if access.is_none() {
        p.run.finish(Step::skip(
            "scopes",
            title,
            "needs an access token (see above)",
        ));
    } else if scopes.iter().any(|s| SEND_SCOPES.contains(&s.as_str())) {
        p.run
            .finish(Step::pass("scopes", title).evidence(format!("granted: {}", scopes.join(" "))));
    } else {
        let remedy = if p.mailgate {
            Reason::ScopeInsufficient.spec().remedy.to_owned()
        } else {
            format!(
                "ask for {SEND_SCOPE} in the consent (the authorization URL's scope parameter), then have the user consent again to get a new refresh token; the OAuth consent screen (Cloud Console → APIs & Services → OAuth consent screen) must list it"
            )
        };
        p.run.finish(
            Step::fail(
                "scopes",
                title,
                Diagnosis::new(
                    Reason::ScopeInsufficient,
                    "the user consented to none of the scopes that allow messages.send",
                    remedy,
                ),
            )
            .evidence(format!("granted: {}", scopes.join(" "))),
        );
    }
    let who = user.clone().unwrap_or_else(|| "me".to_owned());
    let from = opts.from.clone().or(user);
    let read = access.clone().filter(|_| {
        scopes
            .iter()
            .any(|s| READ_SCOPES.contains(&s.as_str()) || s.ends_with("/gmail.modify"))
    });
    let read_note = (access.is_some() && read.is_none()).then(|| {
        "the consent has no scope that reads settings (gmail.settings.basic, gmail.readonly): send-as addresses not checked".to_owned()
    });
    let send = access.filter(|_| scopes.iter().any(|s| SEND_SCOPES.contains(&s.as_str())));
    p.mailbox(&who, from, send.as_deref(), read.as_deref(), read_note)
        .await;
    Ok(p.end())
}

/// Why no token came.
enum TokenFailure {
    /// The token endpoint refused.
    Answer(Answer),
    /// No answer.
    Unreachable(String, String),
    /// The assertion could not be signed.
    Sign(String),
}

/// Google's error fields of an answer, as one text for `why` (the `mailgate` extensions left
/// out, so the doctor reads Mailgate's answers as it reads Google's).
fn google_text(a: &Answer) -> String {
    let Some(v) = a.json() else {
        return a.text().chars().take(500).collect();
    };
    let mut parts: Vec<String> = Vec::new();
    let mut push = |x: &Value| {
        if let Some(s) = x.as_str()
            && !s.is_empty()
            && !parts.iter().any(|p| p == s)
        {
            parts.push(s.to_owned());
        }
    };
    // The token endpoint: {"error", "error_description"}.
    if v["error"].is_string() {
        push(&v["error"]);
        push(&v["error_description"]);
        return parts.join(": ");
    }
    let e = &v["error"];
    push(&e["status"]);
    push(&e["message"]);
    for x in e["errors"].as_array().into_iter().flatten() {
        push(&x["reason"]);
        push(&x["message"]);
    }
    for d in e["details"].as_array().into_iter().flatten() {
        if d["domain"].as_str() != Some("mailgate") {
            push(&d["reason"]);
        }
    }
    parts.join(" | ")
}

/// One evidence line for an answer: status and Google's fields.
fn evidence(a: &Answer) -> String {
    let text = google_text(a);
    if text.is_empty() {
        format!("HTTP {}", a.status)
    } else {
        format!("HTTP {}: {text}", a.status)
    }
}

fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Probe {
    /// A probe of `endpoint`, with the first two steps run: is it a Mailgate, and the clock.
    async fn start(run: Run, http: Client, endpoint: String) -> Self {
        let mut p = Probe {
            run,
            http,
            endpoint,
            mailgate: false,
            quota: Vec::new(),
        };
        p.server().await;
        p.clock().await;
        p
    }

    fn end(self) -> Report {
        self.run.end()
    }

    /// Step 1: is the endpoint a Mailgate?
    async fn server(&mut self) {
        self.run.begin("the server");
        let url = format!("{}/healthz", self.endpoint);
        let answer = self.http.get(&url, &[]).await;
        let step = match &answer {
            Ok(a) if a.json().is_some_and(|v| v["service"] == "mailgate") => {
                self.mailgate = true;
                let v = a.json().unwrap_or(Value::Null);
                Step::pass("server", "the server answers").evidence(format!(
                    "a Mailgate {} (status {}): remedies name its directory file and commands; a dry-run send probe is possible",
                    v["version"].as_str().unwrap_or("?"),
                    v["status"].as_str().unwrap_or("?")
                ))
            }
            Ok(a) => Step::pass("server", "the server answers").evidence(format!(
                "HTTP {} from {}: remedies are phrased for Google's consoles",
                a.status, self.endpoint
            )),
            Err(e) => Step::fail_unexplained(
                "server",
                format!("the server {}", self.endpoint),
                format!(
                    "no answer: {e}; check the URL, DNS, a proxy or firewall (every API call below will fail the same way)"
                ),
            ),
        };
        self.run.finish(step);
    }

    /// Step 2: the clock against the server's `Date`.
    async fn clock(&mut self) {
        self.run.begin("clock");
        let before = now_s();
        let answer = self.http.get(&format!("{}/", self.endpoint), &[]).await;
        let after = now_s();
        let date = answer
            .ok()
            .and_then(|a| a.header("date").map(str::to_owned));
        let Some(date) = date else {
            self.run.finish(Step::skip(
                "clock",
                "clock",
                "the server sent no Date header to compare with",
            ));
            return;
        };
        let parsed = time::OffsetDateTime::parse(
            &date.replace(" GMT", " +0000"),
            &time::format_description::well_known::Rfc2822,
        );
        let Ok(server) = parsed else {
            self.run.finish(Step::skip(
                "clock",
                "clock",
                format!("the server's Date `{date}` does not parse"),
            ));
            return;
        };
        let local = (before + after) / 2;
        let skew = local - server.unix_timestamp();
        let title = format!("clock: {skew:+} s against the server (Date: {date})");
        let step = if skew.abs() >= SKEW_FAIL_S {
            Step::fail(
                "clock",
                title,
                Diagnosis::new(
                    Reason::AuthInvalid,
                    format!(
                        "this machine's clock is {} s off: assertions it signs have iat/exp outside what the token endpoint accepts (\"Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe\")",
                        skew.abs()
                    ),
                    "synchronise the clock (NTP: `timedatectl set-ntp true`, or chrony)",
                ),
            )
        } else if skew.abs() >= SKEW_WARN_S {
            Step::warn(
                "clock",
                title,
                "tokens still work, but a clock this far off will fail once it drifts past a minute: enable NTP",
            )
        } else {
            Step::pass("clock", title)
        };
        self.run.finish(step);
    }

    /// Step 3: the key file's shape.
    fn key_file(&mut self, raw: &str, path: &str) -> Option<KeyFile> {
        let title = format!("key file {path}");
        let bad = |what: String| {
            Step::fail(
                "key_file",
                title.clone(),
                Diagnosis::new(
                    Reason::AuthInvalid,
                    format!("the file is not a usable service-account key: {what}"),
                    "download a new JSON key: Cloud Console → IAM & Admin → Service Accounts → the account → Keys → Add key → Create new key → JSON (behind Mailgate: `mailgate sa key create <account> -o key.json`)",
                ),
            )
        };
        let v: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                self.run.finish(bad(format!("not JSON ({e})")));
                return None;
            }
        };
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        if v["type"].as_str() != Some("service_account") {
            let t = v["type"].as_str().unwrap_or("missing");
            let what = if t == "authorized_user" {
                "type is `authorized_user` (a user's credentials: use `mailgate doctor oauth`)"
                    .to_owned()
            } else {
                format!("type is `{t}`, not `service_account`")
            };
            self.run.finish(bad(what));
            return None;
        }
        let (Some(email), Some(pem)) = (s("client_email"), s("private_key")) else {
            self.run
                .finish(bad("client_email or private_key is missing".into()));
            return None;
        };
        let key = match jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()) {
            Ok(k) => k,
            Err(e) => {
                self.run
                    .finish(bad(format!("private_key is not an RSA key in PEM ({e})")));
                return None;
            }
        };
        let token_uri = s("token_uri").unwrap_or_else(|| GOOGLE_TOKEN_URI.to_owned());
        let mut step = Step::pass("key_file", title)
            .evidence(format!("service account {email}"))
            .evidence(format!(
                "client_id {}, key id {}, token_uri {token_uri}",
                s("client_id").unwrap_or_else(|| "missing".into()),
                s("private_key_id").unwrap_or_else(|| "missing".into())
            ));
        if s("client_id").is_none() {
            step = step.note("client_id is missing: domain-wide delegation is granted to it, so find it in Cloud Console → IAM & Admin → Service Accounts → the account → Unique ID");
        }
        self.run.finish(step);
        Some(KeyFile {
            client_email: email,
            client_id: s("client_id"),
            private_key_id: s("private_key_id"),
            token_uri,
            key,
        })
    }

    /// A JWT-bearer token request (RFC 7523) as Google's client libraries make it.
    async fn sa_token(
        &mut self,
        key: &KeyFile,
        sub: Option<&str>,
        scope: &str,
    ) -> Result<String, TokenFailure> {
        let iat = now_s();
        let mut claims = json!({
            "iss": key.client_email,
            "scope": scope,
            "aud": key.token_uri,
            "iat": iat,
            "exp": iat + 3600,
        });
        if let Some(s) = sub {
            claims["sub"] = json!(s);
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid.clone_from(&key.private_key_id);
        let assertion = jsonwebtoken::encode(&header, &claims, &key.key)
            .map_err(|e| TokenFailure::Sign(e.to_string()))?;
        self.run.secret(&assertion);
        let answer = self
            .http
            .post_form(
                &key.token_uri,
                &[],
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", &assertion),
                ],
            )
            .await
            .map_err(|e| TokenFailure::Unreachable(key.token_uri.clone(), e))?;
        if !answer.ok() {
            return Err(TokenFailure::Answer(answer));
        }
        let token = answer
            .json()
            .and_then(|v| v["access_token"].as_str().map(str::to_owned));
        match token {
            Some(t) => {
                self.run.secret(&t);
                Ok(t)
            }
            None => Err(TokenFailure::Answer(answer)),
        }
    }

    /// A step for a refused token request.
    fn token_failure(&self, id: &str, title: &str, e: &TokenFailure, prefer: &[Reason]) -> Step {
        match e {
            TokenFailure::Answer(a) => self.refused(id, title, a, prefer),
            TokenFailure::Unreachable(url, e) => self.unreachable(id, title, url, e),
            TokenFailure::Sign(e) => Step::fail(
                id,
                title,
                Diagnosis::new(
                    Reason::AuthInvalid,
                    format!("the key cannot sign an assertion: {e}"),
                    "download a new JSON key for the service account",
                ),
            ),
        }
    }

    fn unreachable(&self, id: &str, title: &str, url: &str, e: &str) -> Step {
        Step::fail_unexplained(
            id,
            title,
            format!("no answer from {url}: {e}; check the URL, DNS, a proxy or firewall"),
        )
    }

    /// A step for a refused API call: the diagnosis from Google's words, narrowed by `prefer`.
    /// On a Mailgate, the reason code its answer carries is what the server decided: when it
    /// differs from what Google's words alone suggest (or they suggest nothing), it wins, and
    /// the evidence says so.
    fn refused(&self, id: &str, title: &str, a: &Answer, prefer: &[Reason]) -> Step {
        let text = google_text(a);
        let from_words = crate::diagnose(&text, prefer);
        let named = if self.mailgate {
            mailgate_named(a)
        } else {
            None
        };
        let mut extra = None;
        let diagnosis = match (from_words, named) {
            (Some(d), Some(m)) if d.code != m.code => {
                extra = Some(format!(
                    "Mailgate's answer names {} (decision {}); Google's words alone would suggest {}",
                    m.code.code(),
                    m.decision,
                    d.code.code()
                ));
                Some(Diagnosis::from(m))
            }
            (None, Some(m)) => {
                extra = Some(format!(
                    "Mailgate's answer names {} (decision {})",
                    m.code.code(),
                    m.decision
                ));
                Some(Diagnosis::from(m))
            }
            (Some(d), Some(m)) => {
                extra = Some(format!("decision {}", m.decision));
                Some(Diagnosis {
                    remedy: m.remedy,
                    ..d
                })
            }
            (d, None) => d.map(|d| self.in_terms(d)),
        };
        let step = match diagnosis {
            Some(d) => Step::fail(id, title, d),
            None => Step::fail_unexplained(
                id,
                title,
                "an answer Mailgate's table does not know: paste it into `mailgate why -` for the questions that narrow it down",
            ),
        };
        let step = step.evidence(evidence(a));
        match extra {
            Some(e) => step.evidence(e),
            None => step,
        }
    }

    /// On a Mailgate, its own remedy (the directory file, `mailgate ...`); else Google's.
    fn in_terms(&self, d: Diagnosis) -> Diagnosis {
        if self.mailgate {
            Diagnosis {
                remedy: d.code.spec().remedy.to_owned(),
                ..d
            }
        } else {
            d
        }
    }

    fn note_quota(&mut self, a: &Answer) {
        for (n, v) in &a.headers {
            if n.starts_with("x-ratelimit") || n == "retry-after" || n.contains("quota") {
                let line = format!("{n}: {v}");
                if !self.quota.contains(&line) {
                    self.quota.push(line);
                }
            }
        }
    }

    /// Steps 6-9 for the mailbox `user`.
    async fn mailbox(
        &mut self,
        user: &str,
        mut from: Option<String>,
        send_token: Option<&str>,
        read_token: Option<&str>,
        read_note: Option<String>,
    ) {
        let base = format!(
            "{}/gmail/v1/users/{}",
            self.endpoint,
            url::form_urlencoded::byte_serialize(user.as_bytes()).collect::<String>()
        );
        // 6. The mailbox: the project's API, the user, the account's state.
        let title = format!(
            "the mailbox {user} (users.getProfile: API enabled, mail service, account state)"
        );
        match read_token.or(send_token) {
            None => self.run.finish(Step::skip(
                "profile",
                title,
                "needs a token for the user (see above)",
            )),
            Some(t) => {
                self.run.begin("users.getProfile");
                let bearer = format!("Bearer {t}");
                match self
                    .http
                    .get(&format!("{base}/profile"), &[("authorization", &bearer)])
                    .await
                {
                    Ok(a) if a.ok() => {
                        self.note_quota(&a);
                        let v = a.json().unwrap_or(Value::Null);
                        let address = v["emailAddress"].as_str().map(str::to_owned);
                        self.run
                            .finish(Step::pass("profile", title).evidence(format!(
                                "emailAddress {}",
                                address.as_deref().unwrap_or("?")
                            )));
                        if from.is_none() {
                            from = address;
                        }
                    }
                    Ok(a) if a.status == 403 && scope_only(&a) => {
                        self.run.finish(
                            Step::pass("profile", title)
                                .evidence(evidence(&a))
                                .note("the API is enabled and the account usable as far as a send-only token can tell (the method needs a read scope)"),
                        );
                    }
                    Ok(a) => {
                        self.note_quota(&a);
                        let step = self.refused(
                            "profile",
                            &title,
                            &a,
                            &[
                                Reason::ProjectApiDisabled,
                                Reason::AccountMailDisabled,
                                Reason::AccountSuspended,
                                Reason::DelegationSubjectUnknown,
                            ],
                        );
                        self.run.finish(step);
                    }
                    Err(e) => {
                        let step = self.unreachable("profile", &title, &base, &e);
                        self.run.finish(step);
                    }
                }
            }
        }

        // 7. Send-as.
        let shown = from.clone().unwrap_or_else(|| "the From".to_owned());
        let title = format!("{shown} is the user's address or a verified send-as address");
        match (read_token, &from) {
            (Some(_), None) => self.run.finish(Step::skip(
                "send_as",
                title,
                "the user's address is unknown (the token can read neither tokeninfo's email nor the profile): pass --from",
            )),
            (None, _) => self.run.finish(Step::skip(
                "send_as",
                title,
                read_note.unwrap_or_else(|| "needs a token for the user (see above)".into()),
            )),
            (Some(t), Some(from)) => {
                self.run.begin("settings.sendAs.list");
                let bearer = format!("Bearer {t}");
                match self
                    .http
                    .get(
                        &format!("{base}/settings/sendAs"),
                        &[("authorization", &bearer)],
                    )
                    .await
                {
                    Ok(a) if a.ok() => {
                        let step = self.send_as(&title, from, &a);
                        self.run.finish(step);
                    }
                    Ok(a) => {
                        let step = self.refused("send_as", &title, &a, &[]);
                        self.run.finish(step);
                    }
                    Err(e) => {
                        let step = self.unreachable("send_as", &title, &base, &e);
                        self.run.finish(step);
                    }
                }
            }
        }

        // 8. The send probe (without a From when the address is unknown: Gmail fills it in).
        let title = format!("send probe from {shown} (dry run: nothing is delivered)");
        if !self.mailgate {
            self.run.finish(Step::skip(
                "send_probe",
                title,
                "Google's Gmail API has no dry run: a send would deliver. Send one message to yourself with your application to see the sending limits and policies at work",
            ));
        } else if let Some(t) = send_token {
            self.run.begin("dry-run send");
            let from_line = from
                .as_ref()
                .map(|f| format!("From: {f}\r\n"))
                .unwrap_or_default();
            let to = from.as_deref().unwrap_or(user);
            let message = format!(
                "{from_line}To: {to}\r\nSubject: mailgate doctor send probe (dry run)\r\n\r\nNot delivered: X-Mailgate-Dry-Run.\r\n"
            );
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(message);
            let bearer = format!("Bearer {t}");
            match self
                .http
                .send_json(
                    "POST",
                    &format!("{base}/messages/send"),
                    &[("authorization", &bearer), ("x-mailgate-dry-run", "true")],
                    &json!({ "raw": raw }),
                )
                .await
            {
                Ok(a) if a.ok() => {
                    self.note_quota(&a);
                    let v = a.json().unwrap_or(Value::Null);
                    let mut step = Step::pass("send_probe", title).evidence(format!(
                        "HTTP {}: would be accepted (decision {})",
                        a.status,
                        v["decision"].as_str().unwrap_or("?")
                    ));
                    if v["held"] == true {
                        step = step.note("accepted but held: a limit set to `hold` is reached, delivery waits for its reset");
                    }
                    self.run.finish(step);
                }
                Ok(a) => {
                    self.note_quota(&a);
                    let prefer = limit_kind(&a);
                    let step = self.refused("send_probe", &title, &a, &prefer);
                    self.run.finish(step);
                }
                Err(e) => {
                    let step = self.unreachable("send_probe", &title, &base, &e);
                    self.run.finish(step);
                }
            }
        } else {
            self.run.finish(Step::skip(
                "send_probe",
                title,
                "needs a token with a send scope (see above)",
            ));
        }

        // 9. Quota.
        let step = if self.quota.is_empty() {
            Step::pass("quota", "quota").note(if self.mailgate {
                "no limit was reached in these answers (`mailgate explain` shows every counter)"
            } else {
                "Google sends no quota headers: see Cloud Console → APIs & Services → Gmail API → Quotas & system limits, and the per-user sending limits (2,000 messages a day on Workspace)"
            })
        } else {
            let mut s = Step::warn(
                "quota",
                "quota",
                "a limit was met: see the refusal above for when it resets",
            );
            for q in std::mem::take(&mut self.quota) {
                s = s.evidence(q);
            }
            s
        };
        self.run.finish(step);
    }

    /// Is `from` in the send-as list, accepted?
    fn send_as(&self, title: &str, from: &str, a: &Answer) -> Step {
        let v = a.json().unwrap_or(Value::Null);
        let list: Vec<&Value> = v["sendAs"].as_array().into_iter().flatten().collect();
        let names: Vec<String> = list
            .iter()
            .map(|s| {
                format!(
                    "{} ({})",
                    s["sendAsEmail"].as_str().unwrap_or("?"),
                    if s["isPrimary"] == true {
                        "primary"
                    } else {
                        s["verificationStatus"].as_str().unwrap_or("accepted")
                    }
                )
            })
            .collect();
        let found = list.iter().find(|s| {
            s["sendAsEmail"]
                .as_str()
                .is_some_and(|e| e.eq_ignore_ascii_case(from))
        });
        let evidence = format!("send-as addresses: {}", names.join(", "));
        let step = match found {
            Some(s)
                if s["isPrimary"] == true
                    || s["verificationStatus"].as_str().is_none_or(|v| v == "accepted") =>
            {
                Step::pass("send_as", title)
            }
            Some(_) => Step::fail(
                "send_as",
                title,
                self.in_terms(Diagnosis::new(
                    Reason::SenderUnverified,
                    format!("{from} is a send-as address still awaiting verification"),
                    "open the verification mail sent to that address and confirm it (Gmail → Settings → Accounts → Send mail as shows it as unverified; resend it there)",
                )),
            ),
            None => Step::fail(
                "send_as",
                title,
                self.in_terms(Diagnosis::new(
                    Reason::SenderNotOwned,
                    format!("{from} is neither the user's address nor one of their send-as addresses"),
                    "send from the user's own address, or add the address: Gmail → Settings → Accounts → Send mail as → Add another email address (for the organisation's own addresses: Google Admin console → Directory → Users → the user → Alternate email addresses)",
                )),
            ),
        };
        step.evidence(evidence)
    }
}

/// What a Mailgate's answer says in its own extension: the code, its message, the remedy
/// rendered for the object at fault, and the decision id.
struct Named {
    code: Reason,
    cause: String,
    remedy: String,
    decision: String,
}

impl From<Named> for Diagnosis {
    fn from(n: Named) -> Self {
        Diagnosis::new(n.code, n.cause, n.remedy)
    }
}

/// A Mailgate's `mailgate` extension: `error.details[]` with `"domain": "mailgate"` (the Gmail
/// door) or the token endpoint's `mailgate` object.
fn mailgate_named(a: &Answer) -> Option<Named> {
    let v = a.json()?;
    let m = if v["mailgate"].is_object() {
        v["mailgate"].clone()
    } else {
        v["error"]["details"]
            .as_array()?
            .iter()
            .find(|d| d["domain"] == "mailgate")?["metadata"]
            .clone()
    };
    let code = Reason::from_code(m["code"].as_str()?)?;
    Some(Named {
        code,
        cause: code.spec().message.to_owned(),
        remedy: m["remedy"]
            .as_str()
            .map_or_else(|| code.spec().remedy.to_owned(), str::to_owned),
        decision: m["decision_id"].as_str().unwrap_or("?").to_owned(),
    })
}

/// A 403 that only says the token's scope does not cover the method.
fn scope_only(a: &Answer) -> bool {
    let t = google_text(a).to_lowercase();
    t.contains("insufficient authentication scopes")
        || t.contains("insufficientpermissions")
        || t.contains("access_token_scope_insufficient")
}

/// For a limit refusal, which limit: Google says "User-rate limit exceeded. Retry after <time>"
/// for both; a retry more than an hour away is the daily limit.
fn limit_kind(a: &Answer) -> Vec<Reason> {
    let text = google_text(a);
    let lower = text.to_lowercase();
    let Some(at) = lower.find("retry after ") else {
        return Vec::new();
    };
    let when: String = text[at + "retry after ".len()..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    let Ok(t) = time::OffsetDateTime::parse(
        when.trim_end_matches(['.', ',']),
        &time::format_description::well_known::Rfc3339,
    ) else {
        return Vec::new();
    };
    if t.unix_timestamp() - now_s() > 3600 {
        vec![Reason::LimitDailyMessages]
    } else {
        vec![Reason::LimitRate]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: Value) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: body.to_string().into_bytes(),
        }
    }

    #[test]
    fn google_text_leaves_out_mailgate_extensions() {
        let a = answer(
            403,
            json!({"error": {"code": 403, "message": "Delegation denied for a@b.c", "status": "PERMISSION_DENIED",
              "errors": [{"reason": "forbidden", "message": "Delegation denied for a@b.c"}],
              "details": [{"domain": "mailgate", "reason": "sender.not_owned", "remedy": "Precondition check failed."}]}}),
        );
        let t = google_text(&a);
        assert!(t.contains("Delegation denied"), "{t}");
        assert!(
            !t.contains("sender.not_owned") && !t.contains("Precondition"),
            "{t}"
        );
    }

    #[test]
    fn a_retry_a_day_away_is_the_daily_limit() {
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(20);
        let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(30);
        let fmt = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        let msg = |t| {
            answer(
                429,
                json!({"error": {"code": 429, "message": format!("User-rate limit exceeded.  Retry after {} (Mail sending)", fmt(t)), "status": "RESOURCE_EXHAUSTED"}}),
            )
        };
        assert_eq!(limit_kind(&msg(later)), vec![Reason::LimitDailyMessages]);
        assert_eq!(limit_kind(&msg(soon)), vec![Reason::LimitRate]);
    }
}
