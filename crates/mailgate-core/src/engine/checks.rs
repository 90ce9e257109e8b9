//! The checks of the catalogue's rows (docs/reasons.md), in order. Each check is a pure function of the resolved
//! context ([`Ctx`]), never of an earlier check's outcome, so enforcement (stop at the first
//! failure) and explain (run all) agree on the first failure by construction.

use std::borrow::Cow;

use super::counters::{Charge, Counters, Usage, exceeds};
use super::index::{DirectoryIndex, Ownership};
use super::{
    Action, Body, CheckResult, Credential, CredentialState, Decision, Denial, Door, Fault,
    FaultKind, Finding, LimitState, Mailbox, Mode, Originator, OriginatorProblem, Outcome, Rewrite,
    SendAttempt, TlsVersion, Verdict, rfc3339_ms,
};
use crate::catalogue::{Reason, RenderArgs};
use crate::directory::{
    AbuseState, ApiKey, EffectiveLimits, ExceedAction, LimitName, OAuthClient, PolicyRule,
    RelaySenders, SEND_COST_UNITS, ServiceAccount, UnownedFrom, UserStatus,
};
use crate::gcra::{Gcra, GcraOutcome};

/// The checks, in evaluation order (rows 1–37 of docs/reasons.md; 38–40 are delivery outcomes).
pub(super) const CHECKS: &[Reason] = {
    let (checks, _) = Reason::ALL.split_at(37);
    checks
};

const APPLY: &str = "in org.yaml and run `mailgate apply -f org.yaml`";

/// A check's answer before it is turned into a [`CheckResult`].
struct R {
    outcome: Outcome,
    detail: Cow<'static, str>,
    remedy: Option<String>,
    fault: Option<Fault>,
    limit: Option<LimitState>,
}

fn pass(detail: &'static str) -> R {
    R {
        outcome: Outcome::Pass,
        detail: Cow::Borrowed(detail),
        remedy: None,
        fault: None,
        limit: None,
    }
}

fn pass_owned(detail: String) -> R {
    R {
        outcome: Outcome::Pass,
        detail: Cow::Owned(detail),
        remedy: None,
        fault: None,
        limit: None,
    }
}

/// What a check that does not apply to the attempt's action says.
fn not_for(action: Action) -> R {
    na(match action {
        Action::Send => "applies to sends",
        Action::Authenticate => "answered by the send that follows, not when authenticating",
        Action::ReadSettings | Action::UpdateSettings | Action::ManageSendAs => {
            "a settings method sends nothing"
        }
        Action::Manage { .. } => "a management call sends nothing",
        Action::IssueToken => "answered when the token is used, not when it is issued",
        Action::SignIn => "answered when the code is exchanged or the token used, not at sign-in",
    })
}

fn na(detail: &'static str) -> R {
    R {
        outcome: Outcome::NotApplicable,
        detail: Cow::Borrowed(detail),
        remedy: None,
        fault: None,
        limit: None,
    }
}

fn pending(detail: &'static str) -> R {
    R {
        outcome: Outcome::Pending,
        detail: Cow::Borrowed(detail),
        remedy: None,
        fault: None,
        limit: None,
    }
}

/// Explain mode: the fact the check needs was not given, so nothing was evaluated; `detail`
/// says which request field gives it (`not checked: give --ip ...`).
fn not_checked(detail: String) -> R {
    R {
        outcome: Outcome::NotChecked,
        detail: Cow::Owned(detail),
        remedy: None,
        fault: None,
        limit: None,
    }
}

fn fail(detail: String, fault: Fault, remedy: String) -> R {
    R {
        outcome: Outcome::Fail,
        detail: Cow::Owned(detail),
        remedy: Some(remedy),
        fault: Some(fault),
        limit: None,
    }
}

/// Which authentication check failed while resolving the credential.
struct AuthFailure {
    reason: Reason,
    detail: String,
    fault: Fault,
    remedy: String,
}

/// Sender classification of one address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Own {
    Owned,
    Pending,
    Unowned,
}

/// Which sender address: the envelope's or a header field's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Envelope,
    From,
    Sender,
}

impl Role {
    fn what(self) -> &'static str {
        match self {
            Role::Envelope => "envelope sender",
            Role::From => "From",
            Role::Sender => "Sender",
        }
    }
}

/// Everything resolved once per decision.
struct Ctx<'a> {
    a: &'a SendAttempt,
    ix: &'a DirectoryIndex,
    now: u64,
    /// Explain mode: a fact the request did not give is "not checked" rather than a failure
    /// (in enforcement every door knows its facts, and an absent one fails).
    explain: bool,
    /// IP-trusted relay (no AUTH).
    relay: bool,
    /// The envelope sender as the checks see it: the attempt's, except for a null
    /// reverse-path (`MAIL FROM:<>`, what bounces use) on the IP-trusted relay, which names no
    /// sender: once the message is known, the header's first From (else Sender) address stands
    /// for it ([`null_sender`]).
    envelope: Option<&'a str>,
    /// The header's originator fields when they are well-formed (`None` too while unknown).
    header: Option<&'a Originator>,
    /// What is wrong with them, when something is.
    header_problem: Option<OriginatorProblem>,
    auth_failure: Option<AuthFailure>,
    /// The principal is identified (authentication passed).
    authenticated: bool,
    /// The sending account.
    user: Option<usize>,
    /// The mailbox acted for when it is not the caller's own (`Ok(None)`: own mailbox;
    /// `Err(())`: no right to it).
    mailbox: Result<Option<usize>, ()>,
    key: Option<&'a ApiKey>,
    client: Option<&'a OAuthClient>,
    sa: Option<&'a ServiceAccount>,
    scopes: Option<&'a [String]>,
    project: Option<&'a str>,
    /// SA subject not found.
    subject_unknown: Option<&'a str>,
    caller: Cow<'a, str>,
    counter_key: Option<Cow<'a, str>>,
    limits: &'a EffectiveLimits,
    usage: Option<Usage>,
    recipients: u64,
}

impl<'a> Ctx<'a> {
    fn resolve(a: &'a SendAttempt, ix: &'a DirectoryIndex, now: u64, mode: Mode) -> Ctx<'a> {
        let header_problem = a.header.as_ref().and_then(Originator::problem);
        let mut c = Ctx {
            a,
            ix,
            now,
            explain: mode == Mode::Explain,
            relay: matches!(a.credential, Credential::RelayIp),
            envelope: null_sender(a),
            header: a.header.as_ref().filter(|_| header_problem.is_none()),
            header_problem,
            auth_failure: None,
            authenticated: false,
            user: None,
            mailbox: Ok(None),
            key: None,
            client: None,
            sa: None,
            scopes: None,
            project: None,
            subject_unknown: None,
            caller: Cow::Borrowed(""),
            counter_key: None,
            limits: ix.org_limits(),
            usage: None,
            recipients: a.recipients.as_ref().map_or(0, |r| r.len() as u64),
        };
        let invalid = |what: &str, fault: Fault| AuthFailure {
            reason: Reason::AuthInvalid,
            detail: format!("{what} is not known"),
            fault,
            remedy: Reason::AuthInvalid.spec().remedy.to_owned(),
        };
        match &a.credential {
            Credential::None => {
                c.auth_failure = Some(AuthFailure {
                    reason: Reason::AuthMissing,
                    detail: "no credential presented".into(),
                    fault: Fault::new(FaultKind::Credential, "none"),
                    remedy: Reason::AuthMissing.spec().remedy.to_owned(),
                })
            }
            Credential::Refused { state, presented } => {
                let reason = match state {
                    CredentialState::Invalid => Reason::AuthInvalid,
                    CredentialState::Expired => Reason::AuthExpired,
                    CredentialState::Revoked => Reason::AuthRevoked,
                    CredentialState::Locked => Reason::AuthLocked,
                };
                let what = presented.clone().unwrap_or_else(|| "credential".into());
                c.caller = Cow::Owned(what.clone());
                c.auth_failure = Some(AuthFailure {
                    reason,
                    detail: format!("the door refused {what}: {}", reason.spec().message),
                    fault: Fault::new(FaultKind::Credential, what),
                    remedy: reason.spec().remedy.to_owned(),
                });
            }
            Credential::OauthUser {
                user,
                client_id,
                project,
                scopes,
            } => {
                c.caller = Cow::Borrowed(user);
                c.client = ix.client(client_id);
                c.scopes = Some(scopes);
                c.project = Some(project);
                match (c.client, ix.user_by_primary(user)) {
                    (None, _) => {
                        c.auth_failure = Some(invalid(
                            &format!("OAuth client `{client_id}`"),
                            Fault::new(FaultKind::OauthClient, client_id.clone()),
                        ))
                    }
                    (_, None) => {
                        c.auth_failure = Some(invalid(
                            &format!("user `{user}`"),
                            Fault::new(FaultKind::User, user.clone()),
                        ))
                    }
                    (Some(_), Some(u)) => c.user = Some(u),
                }
            }
            Credential::ServiceAccount {
                email,
                project,
                scopes,
                subject,
            } => {
                c.caller = Cow::Borrowed(email);
                c.scopes = Some(scopes);
                c.project = Some(project);
                c.sa = ix.service_account(email);
                if c.sa.is_none() {
                    c.auth_failure = Some(invalid(
                        &format!("service account `{email}`"),
                        Fault::new(FaultKind::ServiceAccount, email.clone()),
                    ));
                } else if let Some(s) = subject {
                    match ix.user_by_address(s) {
                        Some(u) => {
                            c.user = Some(u);
                            c.caller = Cow::Borrowed(&ix.user(u).email);
                        }
                        None => c.subject_unknown = Some(s),
                    }
                }
            }
            Credential::ApiKey { key_id } => {
                c.caller = Cow::Borrowed(key_id);
                match ix.key(key_id) {
                    None => {
                        c.auth_failure = Some(invalid(
                            &format!("API key `{key_id}`"),
                            Fault::new(FaultKind::ApiKey, key_id.clone()),
                        ))
                    }
                    Some(k) => {
                        c.key = Some(k);
                        c.project = k.project.as_deref();
                        if k.revoked {
                            c.auth_failure = Some(AuthFailure {
                                reason: Reason::AuthRevoked,
                                detail: format!("API key `{key_id}` ({}) is revoked", k.name),
                                fault: Fault::new(FaultKind::ApiKey, key_id.clone()),
                                remedy: format!(
                                    "create a new key with `mailgate key create --owner {}` and delete this one; revoked keys never come back",
                                    k.owner
                                ),
                            });
                        } else if let Some(exp) = k.expires {
                            let exp_ms = (exp.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                            if exp_ms <= now {
                                c.auth_failure = Some(AuthFailure {
                                    reason: Reason::AuthExpired,
                                    detail: format!(
                                        "API key `{key_id}` ({}) expired at {}",
                                        k.name,
                                        rfc3339_ms(exp_ms)
                                    ),
                                    fault: Fault::new(FaultKind::ApiKey, key_id.clone()),
                                    remedy: format!(
                                        "extend api_keys[{key_id}].expires {APPLY}, or create a new key"
                                    ),
                                });
                            }
                        }
                        if c.auth_failure.is_none() {
                            match ix.user_by_primary(&k.owner) {
                                Some(u) => {
                                    c.user = Some(u);
                                    c.caller = Cow::Borrowed(&ix.user(u).email);
                                }
                                None => {
                                    c.auth_failure = Some(invalid(
                                        &format!("the owner `{}` of API key `{key_id}`", k.owner),
                                        Fault::new(FaultKind::ApiKey, key_id.clone()),
                                    ))
                                }
                            }
                        }
                    }
                }
            }
            Credential::SmtpLogin { user } => {
                c.caller = Cow::Borrowed(user);
                match ix.user_by_primary(user) {
                    Some(u) => c.user = Some(u),
                    None => {
                        c.auth_failure = Some(invalid(
                            &format!("login `{user}`"),
                            Fault::new(FaultKind::User, user.clone()),
                        ))
                    }
                }
            }
            Credential::RelayIp => {
                c.caller = Cow::Owned(
                    a.transport
                        .client_ip
                        .map(|ip| ip.to_string())
                        .unwrap_or_default(),
                );
                if a.door != Door::SmtpRelay {
                    c.auth_failure = Some(AuthFailure {
                        reason: Reason::AuthMissing,
                        detail: "no credential presented (IP authentication only exists on the SMTP relay listener)".into(),
                        fault: Fault::new(FaultKind::Credential, "none"),
                        remedy: Reason::AuthMissing.spec().remedy.to_owned(),
                    });
                } else if ix.directory().smtp_relay.require_auth {
                    c.auth_failure = Some(AuthFailure {
                        reason: Reason::AuthMissing,
                        detail: "the relay listener requires SMTP AUTH (smtp_relay.require_auth)"
                            .into(),
                        fault: Fault::new(FaultKind::SmtpRelay, "require_auth"),
                        remedy: format!(
                            "authenticate with SMTP AUTH, or set smtp_relay.require_auth: false {APPLY}"
                        ),
                    });
                } else if let Some(env) = c.envelope {
                    c.user = ix.user_by_address(env);
                }
            }
        }
        c.authenticated = c.auth_failure.is_none();
        if !c.authenticated {
            c.user = None;
        }

        // The mailbox acted for (Gmail userId).
        if let (Mailbox::Address(addr), Some(u)) = (&a.mailbox, c.user) {
            let f = ix.facts(u);
            if !addr.eq_ignore_ascii_case(&f.primary) {
                c.mailbox = match ix.user_by_primary(addr) {
                    Some(m) if ix.facts(m).delegates.contains(&f.primary) => Ok(Some(m)),
                    _ => Err(()),
                };
            }
        }

        // Counter key and limits.
        if c.authenticated {
            if let Some(u) = c.user {
                let f = ix.facts(u);
                c.counter_key = Some(Cow::Borrowed(&f.primary));
                c.limits = &f.limits;
            } else if let Some(sa) = c.sa {
                c.counter_key = Some(Cow::Owned(format!("sa:{}", sa.email.to_ascii_lowercase())));
            } else if matches!(a.credential, Credential::RelayIp) {
                c.counter_key = match (c.envelope, a.transport.client_ip) {
                    (Some(env), _) if !env.is_empty() => {
                        Some(Cow::Owned(format!("relay:{}", env.to_ascii_lowercase())))
                    }
                    (_, Some(ip)) => Some(Cow::Owned(format!("relay-ip:{ip}"))),
                    _ => None,
                };
            }
        }
        c
    }

    fn user_remedy_name(&self) -> &str {
        self.user.map_or("<user>", |u| &self.ix.user(u).email)
    }

    /// Users whose account state matters: the sender, and the mailbox acted for; on the relay
    /// under IP trust, also every user a header From or Sender address belongs to (the relay
    /// sends as them: a suspended or revoked user's address is refused with that state).
    fn accounts(&self) -> impl Iterator<Item = usize> + '_ {
        let named = self
            .header
            .filter(|_| self.relay && self.authenticated)
            .into_iter()
            .flat_map(|h| h.from_addresses().chain(h.sender_addresses()))
            .filter_map(|addr| self.ix.user_by_address(addr));
        self.user
            .into_iter()
            .chain(self.mailbox.ok().flatten())
            .chain(named)
    }

    fn classify(&self, addr: &str) -> (Own, Option<&'a Ownership>) {
        let Some(u) = self.user else {
            return (Own::Unowned, None);
        };
        let mut best = (Own::Unowned, None);
        for (a, how) in &self.ix.facts(u).owned {
            if a.eq_ignore_ascii_case(addr) {
                if *how == Ownership::PendingSendAs {
                    best = (Own::Pending, Some(how));
                } else {
                    return (Own::Owned, Some(how));
                }
            }
        }
        best
    }

    fn policies(&self) -> &'a [usize] {
        match self.user {
            Some(u) => &self.ix.facts(u).policies,
            None => self.ix.everyone_policies(),
        }
    }

    #[inline(always)]
    fn check(&self, r: Reason, rewrites: &mut Vec<Rewrite>) -> R {
        let a = self.a;
        let ix = self.ix;
        match r {
            Reason::TlsRequired => {
                if a.transport.tls.is_some() {
                    return pass("connection uses TLS");
                }
                if a.transport.listener_requires_tls {
                    fail(
                        "plaintext connection on a listener that requires TLS".into(),
                        Fault::new(FaultKind::Connection, "listener requires TLS"),
                        Reason::TlsRequired.spec().remedy.to_owned(),
                    )
                } else if a.door == Door::SmtpRelay && ix.directory().smtp_relay.require_tls {
                    fail(
                        "plaintext connection to the relay listener, which requires TLS".into(),
                        Fault::new(FaultKind::SmtpRelay, "require_tls"),
                        format!(
                            "use STARTTLS, or set smtp_relay.require_tls: false {APPLY}"
                        ),
                    )
                } else {
                    pass("plaintext allowed on this listener")
                }
            }
            Reason::TlsVersion => match a.transport.tls {
                None => na("plaintext"),
                Some(v) if v < TlsVersion::Tls12 => fail(
                    format!("client negotiated {v}, older than TLS 1.2"),
                    Fault::new(FaultKind::Connection, "TLS version"),
                    Reason::TlsVersion.spec().remedy.to_owned(),
                ),
                Some(_) => pass("TLS 1.2 or newer"),
            },
            Reason::AuthMissing
            | Reason::AuthInvalid
            | Reason::AuthExpired
            | Reason::AuthRevoked
            | Reason::AuthLocked => match &self.auth_failure {
                Some(f) if f.reason == r => fail(f.detail.clone(), f.fault.clone(), f.remedy.clone()),
                Some(_) => na("authentication failed on another check"),
                None if r == Reason::AuthMissing => pass("credential presented"),
                None => pass("credential accepted"),
            },
            Reason::KeyUnsupported => match (self.key, a.door) {
                (None, _) => na("not an API key"),
                (Some(k), Door::Gmail) => fail(
                    format!("API key `{}` used on the Gmail-compatible API", k.id),
                    Fault::new(FaultKind::ApiKey, k.id.clone()),
                    Reason::KeyUnsupported.spec().remedy.to_owned(),
                ),
                (Some(_), _) => pass("API keys are accepted on this door"),
            },
            Reason::KeyIpBlocked => match self.key {
                Some(k) if self.authenticated => {
                    if k.allowed_ips.is_empty() {
                        return pass("key has no IP restriction");
                    }
                    match a.transport.client_ip {
                        None if self.explain => not_checked(format!(
                            "not checked: give --ip (api_keys[{}].allowed_ips: {})",
                            k.id,
                            k.allowed_ips
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                        Some(ip) if k.allowed_ips.iter().any(|n| n.contains(&ip)) => {
                            pass("client IP within the key's allowed ranges")
                        }
                        ip => fail(
                            format!(
                                "client IP {} is outside api_keys[{}].allowed_ips",
                                ip.map_or("(unknown)".to_owned(), |i| i.to_string()),
                                k.id
                            ),
                            Fault::new(FaultKind::ApiKey, k.id.clone()),
                            format!(
                                "add {} to api_keys[{}].allowed_ips {APPLY}",
                                ip.map_or("the caller's range".to_owned(), |i| i.to_string()),
                                k.id
                            ),
                        ),
                    }
                }
                _ => na("not an API key"),
            },
            Reason::KeyReferrerBlocked => match self.key {
                Some(k) if self.authenticated => {
                    if k.allowed_referrers.is_empty() {
                        return pass("key has no referrer restriction");
                    }
                    match a.transport.referrer.as_deref() {
                        // Only HTTP requests carry a Referer: on SMTP its absence is a fact.
                        None if self.explain && a.door.is_api() => not_checked(format!(
                            "not checked: give --referrer (api_keys[{}].allowed_referrers: {})",
                            k.id,
                            k.allowed_referrers.join(", ")
                        )),
                        Some(rf) if k.allowed_referrers.iter().any(|p| referrer_matches(p, rf)) => {
                            pass("referrer matches the key's patterns")
                        }
                        rf => fail(
                            format!(
                                "referrer {} matches none of api_keys[{}].allowed_referrers",
                                rf.unwrap_or("<empty>"),
                                k.id
                            ),
                            Fault::new(FaultKind::ApiKey, k.id.clone()),
                            format!(
                                "send a matching Referer, or add a pattern to api_keys[{}].allowed_referrers {APPLY}",
                                k.id
                            ),
                        ),
                    }
                }
                _ => na("not an API key"),
            },
            Reason::KeyApiBlocked => match self.key {
                Some(k) if self.authenticated => {
                    let api = a.door.api();
                    if k.allowed_apis.is_empty() || k.allowed_apis.iter().any(|x| x == api) {
                        pass("key may call this API")
                    } else {
                        fail(
                            format!("api_keys[{}].allowed_apis does not include {api}", k.id),
                            Fault::new(FaultKind::ApiKey, k.id.clone()),
                            format!("add {api} to api_keys[{}].allowed_apis {APPLY}", k.id),
                        )
                    }
                }
                _ => na("not an API key"),
            },
            Reason::RelayIpNotAllowed => {
                if !(self.authenticated && matches!(a.credential, Credential::RelayIp)) {
                    return na("not IP-authenticated relay");
                }
                match a.transport.client_ip {
                    None if self.explain => {
                        not_checked("not checked: give --ip (smtp_relay.allowed_ips decides)".into())
                    }
                    Some(ip)
                        if ix
                            .directory()
                            .smtp_relay
                            .allowed_ips
                            .iter()
                            .any(|n| n.contains(&ip)) =>
                    {
                        pass("client IP is registered for relay")
                    }
                    ip => {
                        let ip = ip.map_or("(unknown)".to_owned(), |i| i.to_string());
                        fail(
                            format!("{ip} is not in smtp_relay.allowed_ips and did not authenticate"),
                            Fault::new(FaultKind::SmtpRelay, "allowed_ips"),
                            format!(
                                "add {ip} to smtp_relay.allowed_ips {APPLY}, or authenticate with SMTP AUTH"
                            ),
                        )
                    }
                }
            }
            Reason::ClientDisabled => {
                if let Some(cl) = self.client.filter(|_| self.authenticated) {
                    if cl.disabled {
                        return fail(
                            format!("OAuth client `{}` is disabled", cl.client_id),
                            Fault::new(FaultKind::OauthClient, cl.client_id.clone()),
                            format!(
                                "set oauth_clients[{}].disabled: false {APPLY}",
                                cl.client_id
                            ),
                        );
                    }
                    return pass("OAuth client enabled");
                }
                if let Some(sa) = self.sa.filter(|_| self.authenticated) {
                    if sa.disabled {
                        return fail(
                            format!("service account `{}` is disabled", sa.email),
                            Fault::new(FaultKind::ServiceAccount, sa.email.clone()),
                            format!(
                                "set service_accounts[{}].disabled: false {APPLY}",
                                sa.email
                            ),
                        );
                    }
                    return pass("service account enabled");
                }
                na("no OAuth client")
            }
            Reason::ProjectApiDisabled => {
                if !self.authenticated || a.door.is_smtp() {
                    return na("no API project involved");
                }
                let Some(p) = self.project else {
                    return na("credential has no project");
                };
                let api = a.door.api();
                match ix.project(p) {
                    Some(proj) if proj.enabled_apis.iter().any(|x| x == api) => {
                        pass("API enabled for the project")
                    }
                    Some(proj) => fail(
                        format!("{api} is not enabled for project `{}`", proj.id),
                        Fault::new(FaultKind::Project, proj.id.clone()),
                        format!("add {api} to projects[{}].enabled_apis {APPLY}", proj.id),
                    ),
                    None => fail(
                        format!("project `{p}` does not exist"),
                        Fault::new(FaultKind::Project, p),
                        format!("add project `{p}` with {api} in enabled_apis {APPLY}"),
                    ),
                }
            }
            Reason::ScopeInsufficient => match self.scopes {
                Some(scopes)
                    if self.authenticated
                        && !matches!(a.action, Action::Send | Action::Authenticate) =>
                {
                    let wanted = a.action.scopes(a.door);
                    if scopes.iter().any(|s| wanted.contains(&s.as_str())) {
                        pass("token has a scope this method takes")
                    } else {
                        fail(
                            format!(
                                "token scopes [{}] include none of the scopes this method takes",
                                scopes.join(" ")
                            ),
                            Fault::new(FaultKind::Credential, self.caller.to_string()),
                            format!(
                                "this method needs one of: {}; request it when obtaining the token",
                                wanted.join(", ")
                            ),
                        )
                    }
                }
                Some(scopes) if self.authenticated => {
                    if has_scope_for(scopes, a) {
                        pass("token has a send scope")
                    } else {
                        // SMTP needs https://mail.google.com/, which a service account's
                        // delegation must grant too: the remedy names both steps.
                        let remedy = if a.door.is_smtp() {
                            crate::catalogue::SMTP_SCOPE_REMEDY.to_owned()
                        } else {
                            "request the scope https://www.googleapis.com/auth/gmail.send and obtain a new token".to_owned()
                        };
                        fail(
                            format!(
                                "token scopes [{}] include no scope that allows sending",
                                scopes.join(" ")
                            ),
                            Fault::new(FaultKind::Credential, self.caller.to_string()),
                            remedy,
                        )
                    }
                }
                _ => na("not an OAuth token"),
            },
            Reason::PermissionMissing => {
                if !self.authenticated {
                    return na("not authenticated");
                }
                let needed = a.action.permission();
                if let (Some(k), Some(p)) = (self.key, needed)
                    && !k.permissions.iter().any(|x| x == p)
                {
                    return fail(
                        format!("API key `{}` lacks the {p} permission", k.id),
                        Fault::new(FaultKind::ApiKey, k.id.clone()),
                        if matches!(a.action, Action::Send | Action::Authenticate) {
                            format!("add {p} to api_keys[{}].permissions {APPLY}", k.id)
                        } else {
                            format!(
                                "add {p} to api_keys[{}].permissions {APPLY}, or use a key that has it",
                                k.id
                            )
                        },
                    );
                }
                if let Action::Manage { .. } = a.action {
                    return match (self.key, needed) {
                        (Some(_), Some(p)) => pass_owned(format!("the key holds {p}")),
                        _ => pass("no permission needed"),
                    };
                }
                match self.user {
                    Some(u) => match &ix.facts(u).send_permission {
                        Some(_) => pass("mail.send granted"),
                        None => {
                            let e = &ix.user(u).email;
                            fail(
                                format!(
                                    "{e} has mail.send neither from organisation.default_permissions nor from a role"
                                ),
                                Fault::new(FaultKind::User, e.clone()),
                                format!(
                                    "add a role with mail.send to users[{e}].roles (or mail.send to organisation.default_permissions) {APPLY}"
                                ),
                            )
                        }
                    },
                    None => na("no user principal"),
                }
            }
            Reason::DelegationNotConfigured => match (self.sa, &a.credential) {
                (Some(sa), Credential::ServiceAccount { subject, .. }) if self.authenticated => {
                    if subject.is_none() && a.action == Action::IssueToken {
                        return na("acts as itself: no delegation to issue its token");
                    }
                    if subject.is_none() {
                        return fail(
                            format!(
                                "service account `{}` acts as itself (no `sub`) and has no mailbox",
                                sa.email
                            ),
                            Fault::new(FaultKind::ServiceAccount, sa.email.clone()),
                            "request the token with `sub` set to the user to send as, after adding a domain_wide_delegation entry for the service account".to_owned(),
                        );
                    }
                    if ix.grant(&sa.client_id).is_some() {
                        pass("domain-wide delegation configured")
                    } else {
                        fail(
                            format!(
                                "no domain_wide_delegation entry for client_id {} ({})",
                                sa.client_id, sa.email
                            ),
                            Fault::new(FaultKind::ServiceAccount, sa.email.clone()),
                            format!(
                                "add domain_wide_delegation: [{{client_id: \"{}\", scopes: [https://www.googleapis.com/auth/gmail.send]}}] {APPLY}",
                                sa.client_id
                            ),
                        )
                    }
                }
                _ => na("not a service account"),
            },
            Reason::DelegationScopeNotGranted => match (self.sa, &a.credential) {
                (Some(sa), Credential::ServiceAccount { subject: Some(_), scopes, .. })
                    if self.authenticated =>
                {
                    let Some(g) = ix.grant(&sa.client_id) else {
                        return na("no delegation grant");
                    };
                    if a.action == Action::IssueToken {
                        // Google's rule for issuing a delegated token: every requested scope is
                        // granted (each use checks its own scopes again).
                        return match scopes.iter().find(|s| !g.scopes.contains(s)) {
                            None => pass("delegation grants every requested scope"),
                            Some(missing) => fail(
                                format!(
                                    "scope {missing} is not in domain_wide_delegation[{}].scopes",
                                    sa.client_id
                                ),
                                Fault::new(FaultKind::DelegationGrant, sa.client_id.clone()),
                                format!(
                                    "add {missing} to domain_wide_delegation[{}].scopes {APPLY}, or request only granted scopes",
                                    sa.client_id
                                ),
                            ),
                        };
                    }
                    let wanted: Vec<&String> =
                        scopes.iter().filter(|s| scope_for(s, a)).collect();
                    let Some(first) = wanted.first() else {
                        return na("token has no send scope");
                    };
                    if wanted.iter().any(|s| g.scopes.iter().any(|x| x == *s)) {
                        pass("delegation grants the send scope")
                    } else {
                        fail(
                            format!(
                                "domain_wide_delegation[{}].scopes grants none of the token's send scopes",
                                sa.client_id
                            ),
                            Fault::new(FaultKind::DelegationGrant, sa.client_id.clone()),
                            // The scope the token asked for (on SMTP, https://mail.google.com/:
                            // a grant of gmail.send alone does not cover it).
                            format!(
                                "add {first} to domain_wide_delegation[{}].scopes {APPLY}",
                                sa.client_id
                            ),
                        )
                    }
                }
                _ => na("no delegated subject"),
            },
            Reason::DelegationSubjectUnknown => match (self.sa, &a.credential) {
                (Some(_), Credential::ServiceAccount { subject: Some(s), .. })
                    if self.authenticated =>
                {
                    match self.subject_unknown {
                        None => pass("subject is a user of the organisation"),
                        Some(_) => {
                            let why = if ix.is_org_domain_or_sub(domain_of(s)) {
                                "is not a user of the organisation"
                            } else {
                                "is not in any of the organisation's domains"
                            };
                            fail(
                                format!("delegated subject `{s}` {why}"),
                                Fault::new(FaultKind::User, s.clone()),
                                format!(
                                    "set `sub` to an existing user's primary address, or add users[{s}] {APPLY}"
                                ),
                            )
                        }
                    }
                }
                _ => na("no delegated subject"),
            },
            Reason::ImpersonationDenied => match (&a.mailbox, self.user) {
                (Mailbox::Me, _) => na("acts for its own mailbox"),
                (Mailbox::Address(_), None) => na("no user principal"),
                (Mailbox::Address(m), Some(u)) => match self.mailbox {
                    Ok(None) => pass("acts for its own mailbox"),
                    Ok(Some(_)) => pass("caller is a delegate of the mailbox"),
                    Err(()) => {
                        let e = &ix.user(u).email;
                        fail(
                            format!("{e} acts for mailbox {m} without delegated access"),
                            Fault::new(FaultKind::Mailbox, m.clone()),
                            format!(
                                "use userId `me`, or add {e} to users[{m}].delegates {APPLY}"
                            ),
                        )
                    }
                },
            },
            Reason::AccountSuspended => self.account_check(
                |_, u| {
                    (ix.user(u).status == UserStatus::Suspended).then(|| {
                        let e = &ix.user(u).email;
                        fail(
                            format!("{e} is suspended"),
                            Fault::new(FaultKind::User, e.clone()),
                            format!(
                                "run `mailgate user unsuspend {e}` (or set users[{e}].status: active {APPLY})"
                            ),
                        )
                    })
                },
                "account active",
            ),
            Reason::AccountMailDisabled => self.account_check(
                |_, u| {
                    let user = ix.user(u);
                    let e = &user.email;
                    if !user.mail_enabled {
                        return Some(fail(
                            format!("{e} has mail_enabled: false"),
                            Fault::new(FaultKind::User, e.clone()),
                            format!("set users[{e}].mail_enabled: true {APPLY}"),
                        ));
                    }
                    let ou = &ix.facts(u).org_unit;
                    (!ou.mail_enabled).then(|| {
                        let p = ou.decided_by.mail_enabled.clone().unwrap_or_else(|| "/".into());
                        fail(
                            format!("mail is disabled for {e} by org unit {p}"),
                            Fault::new(FaultKind::OrgUnit, p.clone()),
                            format!(
                                "set org_units[{p}].mail_enabled: true, or move {e} to a unit with mail, {APPLY}"
                            ),
                        )
                    })
                },
                "mail service enabled",
            ),
            Reason::AccountUnderReview => self.account_check(
                |_, u| {
                    (ix.user(u).status == UserStatus::UnderReview).then(|| {
                        let e = &ix.user(u).email;
                        fail(
                            format!("{e} is under review; sending is not yet enabled"),
                            Fault::new(FaultKind::User, e.clone()),
                            format!(
                                "approve the account: set users[{e}].status: active {APPLY}"
                            ),
                        )
                    })
                },
                "account not under review",
            ),
            Reason::AccountSendingRevoked => self.account_check(
                |_, u| {
                    let user = ix.user(u);
                    (user.abuse.state == AbuseState::Revoked).then(|| {
                        let e = &user.email;
                        fail(
                            format!(
                                "the abuse guard revoked sending for {e}{}",
                                user.abuse
                                    .evidence
                                    .as_deref()
                                    .map(|ev| format!(" (evidence: {ev})"))
                                    .unwrap_or_default()
                            ),
                            Fault::new(FaultKind::User, e.clone()),
                            format!(
                                "review the evidence, then set users[{e}].abuse.state: healthy {APPLY}"
                            ),
                        )
                    })
                },
                "sending not revoked",
            ),
            Reason::SenderNotOwned => self.sender_owned(rewrites),
            Reason::SenderUnverified => self.sender_unverified(rewrites),
            Reason::SenderDomainUnverified => self.sender_domain(),
            Reason::PolicyDenied => {
                if !self.authenticated {
                    return na("not authenticated");
                }
                if let Some(u) = self.user {
                    let ou = &ix.facts(u).org_unit;
                    if a.door.is_api() && !ou.api_access {
                        let p = ou.decided_by.api_access.clone().unwrap_or_else(|| "/".into());
                        let e = &ix.user(u).email;
                        return fail(
                            format!("API access is off for {e} (org unit {p})"),
                            Fault::new(FaultKind::OrgUnit, p.clone()),
                            format!("set org_units[{p}].api_access: true {APPLY}, or send over SMTP"),
                        );
                    }
                }
                for &pi in self.policies() {
                    let p = ix.policy(pi);
                    if p.rule == PolicyRule::DenySend {
                        return fail(
                            format!(
                                "policy `{}` forbids sending{}",
                                p.id,
                                p.description
                                    .as_deref()
                                    .map(|d| format!(": {d}"))
                                    .unwrap_or_default()
                            ),
                            Fault::new(FaultKind::Policy, p.id.clone()),
                            format!(
                                "remove {} from policies[{}].applies_to, or delete the policy, {APPLY}",
                                self.user_remedy_name(),
                                p.id
                            ),
                        );
                    }
                }
                pass("no policy forbids sending")
            }
            Reason::PolicyRecipientRestricted => {
                if !self.authenticated {
                    return na("not authenticated");
                }
                let Some(rcpts) = &a.recipients else {
                    return pending("recipients not known yet");
                };
                let internal_only_unit = self
                    .user
                    .map(|u| &ix.facts(u).org_unit)
                    .filter(|ou| !ou.external_recipients);
                for rc in rcpts {
                    let d = domain_of(rc);
                    let internal = ix.domain(d).is_some();
                    if let Some(ou) = internal_only_unit
                        && !internal
                    {
                            let p = ou
                                .decided_by
                                .external_recipients
                                .clone()
                                .unwrap_or_else(|| "/".into());
                            return fail(
                                format!("{rc} is external and org unit {p} allows internal recipients only"),
                                Fault::new(FaultKind::OrgUnit, p.clone()),
                                format!(
                                    "remove {rc}, or set org_units[{p}].external_recipients: true {APPLY}"
                                ),
                            );
                        }
                    for &pi in self.policies() {
                        let p = ix.policy(pi);
                        let bad = match &p.rule {
                            PolicyRule::DenySend => false,
                            PolicyRule::InternalRecipientsOnly => !internal,
                            PolicyRule::AllowRecipientDomains { domains } => {
                                !domains.iter().any(|x| domain_within(d, x))
                            }
                            PolicyRule::DenyRecipientDomains { domains } => {
                                domains.iter().any(|x| domain_within(d, x))
                            }
                        };
                        if bad {
                            return fail(
                                format!("policy `{}` does not allow recipient {rc}", p.id),
                                Fault::new(FaultKind::Policy, p.id.clone()),
                                format!(
                                    "remove {rc}, or change policies[{}] {APPLY}",
                                    p.id
                                ),
                            );
                        }
                    }
                }
                pass("every recipient allowed by policy")
            }
            Reason::PolicyTooManyRecipients => {
                if a.recipients.is_none() {
                    return pending("recipients not known yet");
                }
                let max = self.limits.recipients_per_message;
                if self.recipients > max {
                    fail(
                        format!("{} recipients, more than the {max} allowed per message", self.recipients),
                        Fault::new(FaultKind::Limit, "recipients_per_message"),
                        format!(
                            "split the message, or raise limits.recipients_per_message (now {max}) for {} {APPLY}",
                            self.user_remedy_name()
                        ),
                    )
                } else {
                    pass("recipient count within the per-message cap")
                }
            }
            Reason::LimitRate
            | Reason::LimitDailyMessages
            | Reason::LimitDailyRecipients
            | Reason::LimitConcurrency => self.limit_check(r),
            Reason::MessageInvalid => match (&a.body, &a.header, &self.header_problem) {
                (Body::Unknown, _, _) => pending("message not received yet"),
                (Body::Invalid { detail, .. }, _, _) => fail(
                    format!("message is malformed: {detail}"),
                    Fault::new(FaultKind::Message, detail.clone()),
                    Reason::MessageInvalid.spec().remedy.to_owned(),
                ),
                (Body::Unreadable { problem, detail }, _, _)
                    if problem.reason() == Reason::MessageInvalid =>
                {
                    fail(
                        format!("message is malformed: {detail}"),
                        Fault::new(FaultKind::Message, detail.clone()),
                        problem.remedy().to_owned(),
                    )
                }
                (Body::Unreadable { .. }, _, _) => pass("the request's form is valid"),
                (Body::Valid, None, _) => pending("header From not known yet"),
                (Body::Valid, Some(_), Some(p)) => {
                    let detail = p.detail();
                    fail(
                        format!("message is malformed: {detail}"),
                        Fault::new(FaultKind::Message, detail),
                        p.remedy(),
                    )
                }
                (Body::Valid, Some(_), None) => pass("message parsed; one From field"),
            },
            Reason::MessageNoRecipients => match &a.recipients {
                None => pending("recipients not known yet"),
                Some(r) if r.is_empty() => fail(
                    "the message has no recipient".into(),
                    Fault::new(FaultKind::Message, "recipients"),
                    Reason::MessageNoRecipients.spec().remedy.to_owned(),
                ),
                Some(_) => pass("has recipients"),
            },
            Reason::MessageTooLarge => match a.size {
                _ if let Body::Unreadable { problem, detail } = &a.body
                    && problem.reason() == Reason::MessageTooLarge =>
                {
                    fail(
                        format!("the request is too costly to read: {detail}"),
                        Fault::new(FaultKind::DoorLimit, "the door's memory budget for one request"),
                        problem.remedy().to_owned(),
                    )
                }
                None => pending("size not known yet"),
                Some(n) if n > self.limits.max_message_bytes => fail(
                    format!(
                        "message is {n} bytes, over the {} byte limit",
                        self.limits.max_message_bytes
                    ),
                    Fault::new(FaultKind::Limit, "max_message_bytes"),
                    format!(
                        "send a smaller message, or raise limits.max_message_bytes for {} {APPLY}",
                        self.user_remedy_name()
                    ),
                ),
                Some(n) if a.door.max_message_bytes().is_some_and(|d| n > d) => {
                    let d = a.door.max_message_bytes().unwrap_or_default();
                    let (whose, object, remedy) = a.door.size_limit(d);
                    fail(
                        format!("message is {n} bytes, over {whose} {d} byte limit"),
                        Fault::new(FaultKind::DoorLimit, object),
                        remedy,
                    )
                }
                Some(_) => pass("size within the limit"),
            },
            Reason::UpstreamRefused | Reason::UpstreamDeferred | Reason::UpstreamAuthFailed => {
                na("delivery outcome, not a check")
            }
            Reason::StoreUnavailable | Reason::ServerBusy => {
                na("a fault of the gateway, not a check")
            }
            Reason::MessageBareNewline => na("refused by the SMTP door as the message arrives"),
        }
    }

    fn account_check(&self, f: impl Fn(&Self, usize) -> Option<R>, ok: &'static str) -> R {
        let mut any = false;
        for u in self.accounts() {
            any = true;
            if let Some(r) = f(self, u) {
                return r;
            }
        }
        if any { pass(ok) } else { na("no user account") }
    }

    /// The addresses to check, in order: the envelope sender (when not null), then every
    /// address of the header's From field and of its Sender field. A header whose originator
    /// fields are malformed contributes nothing here: `message.invalid` refuses it.
    fn sender_addrs(&self) -> impl Iterator<Item = (Role, &'a str)> + 'a {
        let env = self
            .envelope
            .filter(|s| !s.is_empty())
            .map(|e| (Role::Envelope, e));
        let header = self.header;
        env.into_iter()
            .chain(
                header
                    .into_iter()
                    .flat_map(|h| h.from_addresses().map(|x| (Role::From, x))),
            )
            .chain(
                header
                    .into_iter()
                    .flat_map(|h| h.sender_addresses().map(|x| (Role::Sender, x))),
            )
    }

    fn no_sender(&self) -> bool {
        self.sender_addrs().next().is_none()
    }

    fn rewrite_mode(&self) -> bool {
        self.ix.directory().organisation.on_unowned_from == UnownedFrom::Rewrite
    }

    /// `on_unowned_from: rewrite` replaces a From field that names exactly one address, for a
    /// user principal. Nothing else is rewritten: an unowned address in a From that names
    /// several, in Sender, or in the envelope is refused.
    fn rewritable(&self, role: Role) -> bool {
        role == Role::From
            && !self.relay
            && self.rewrite_mode()
            && self.header.is_some_and(|h| h.single_from().is_some())
    }

    fn sender_owned(&self, rewrites: &mut Vec<Rewrite>) -> R {
        if !self.authenticated {
            return na("not authenticated");
        }
        if self.no_sender() {
            return pending("no sender known yet");
        }
        if self.relay {
            return self.relay_senders();
        }
        let Some(u) = self.user else {
            return na("no user principal");
        };
        let primary = &self.ix.user(u).email;
        let mut rewrote = false;
        for (role, addr) in self.sender_addrs() {
            if self.classify(addr).0 != Own::Unowned {
                continue;
            }
            if self.rewritable(role) {
                rewrites.push(Rewrite {
                    header: "From",
                    original: addr.to_owned(),
                    replacement: primary.clone(),
                });
                rewrote = true;
                continue;
            }
            let why = match role {
                Role::From if self.rewrite_mode() => {
                    " (organisation.on_unowned_from: rewrite replaces only a From that names one address)"
                }
                Role::Sender if self.rewrite_mode() => {
                    " (organisation.on_unowned_from: rewrite replaces only From, never Sender)"
                }
                _ => "",
            };
            let also = if self.rewrite_mode() {
                ""
            } else {
                " (or set organisation.on_unowned_from: rewrite)"
            };
            return fail(
                format!(
                    "{} {addr} is not an address {primary} may send as{why}",
                    role.what()
                ),
                Fault::new(FaultKind::Address, addr),
                format!(
                    "send as {primary} or one of its aliases; or add {addr} to users[{primary}].send_as with status: accepted {APPLY}{also}"
                ),
            );
        }
        if rewrote {
            R {
                outcome: Outcome::Pass,
                detail: Cow::Owned(format!(
                    "unowned header From rewritten to {primary} (organisation.on_unowned_from: rewrite)"
                )),
                remedy: None,
                fault: None,
                limit: None,
            }
        } else {
            pass("every sender address is owned")
        }
    }

    /// The relay under IP trust: the envelope sender and every header From and Sender address
    /// must be allowed by `smtp_relay.allowed_senders`.
    ///
    /// Every address known is judged, so a header address the relay refuses is refused even
    /// while the envelope sender is still unknown (adding a failure never allows).
    fn relay_senders(&self) -> R {
        let rule = self.ix.directory().smtp_relay.allowed_senders;
        for (role, addr) in self.sender_addrs() {
            let ok = match rule {
                RelaySenders::Any => true,
                RelaySenders::RegisteredUsers => self.ix.user_by_address(addr).is_some(),
                RelaySenders::DomainAddresses => self.ix.is_org_domain_or_sub(domain_of(addr)),
            };
            if ok {
                continue;
            }
            let what = match rule {
                RelaySenders::RegisteredUsers => "registered users only",
                _ => "addresses in the organisation's domains only",
            };
            return fail(
                format!(
                    "{} {addr} is not allowed on the relay ({what})",
                    role.what()
                ),
                Fault::new(FaultKind::SmtpRelay, "allowed_senders"),
                format!(
                    "send from an address the relay accepts (envelope sender, From and Sender alike), or change smtp_relay.allowed_senders {APPLY}"
                ),
            );
        }
        if self.envelope.is_none_or(|s| s.is_empty()) {
            return pending("envelope sender not known yet");
        }
        pass("envelope sender and header addresses allowed by smtp_relay.allowed_senders")
    }

    fn sender_unverified(&self, rewrites: &mut Vec<Rewrite>) -> R {
        if !self.authenticated || self.relay {
            return na("no send-as addresses involved");
        }
        let Some(u) = self.user else {
            return na("no user principal");
        };
        if self.no_sender() {
            return pending("no sender known yet");
        }
        let primary = &self.ix.user(u).email;
        for (role, addr) in self.sender_addrs() {
            if self.classify(addr).0 != Own::Pending {
                continue;
            }
            if self.rewritable(role) {
                rewrites.push(Rewrite {
                    header: "From",
                    original: addr.to_owned(),
                    replacement: primary.clone(),
                });
                continue;
            }
            return fail(
                format!(
                    "{} {addr} is a send-as address of {primary} still pending verification",
                    role.what()
                ),
                Fault::new(FaultKind::Address, addr),
                format!("set users[{primary}].send_as[{addr}].status: accepted {APPLY}"),
            );
        }
        pass("no pending send-as address used")
    }

    fn sender_domain(&self) -> R {
        if !self.authenticated {
            return na("not authenticated");
        }
        if self.no_sender() {
            return pending("no sender known yet");
        }
        if !self.relay && self.user.is_none() {
            return na("no user principal");
        }
        for (role, addr) in self.sender_addrs() {
            // A header address that is rewritten is replaced by the primary address.
            let effective = match self.user {
                Some(u) if self.rewritable(role) && self.classify(addr).0 != Own::Owned => {
                    self.ix.user(u).email.as_str()
                }
                _ => addr,
            };
            let d = domain_of(effective);
            if self.ix.domain(d) == Some(false) {
                return fail(
                    format!("sender domain {d} ({effective}) is not verified"),
                    Fault::new(FaultKind::Domain, d),
                    format!(
                        "publish the verification TXT record of {d}, then set domains[{d}].verified: true {APPLY}"
                    ),
                );
            }
        }
        pass("sender domains verified")
    }

    fn limit_check(&self, r: Reason) -> R {
        let (Some(key), Some(usage)) = (&self.counter_key, &self.usage) else {
            return na("no principal to count");
        };
        let l = self.limits;
        let action_of = |n: LimitName| l.on_exceed.get(&n).copied().unwrap_or_default();
        let (name, setting, current, limit, over, reset) = match r {
            Reason::LimitRate => {
                let g = Gcra::per_minute(l.rate_units_per_minute, SEND_COST_UNITS);
                let (over, reset, current) = match g {
                    None => (true, None, 0),
                    Some(g) => match g.check(usage.rate_tat_ms, self.now) {
                        GcraOutcome::Allowed { .. } => (false, None, 0),
                        GcraOutcome::Limited { retry_at } => (
                            true,
                            Some(retry_at),
                            g.in_use(usage.rate_tat_ms, self.now) * SEND_COST_UNITS,
                        ),
                    },
                };
                (
                    LimitName::Rate,
                    "rate_units_per_minute",
                    current,
                    l.rate_units_per_minute,
                    over,
                    reset,
                )
            }
            Reason::LimitDailyMessages => (
                LimitName::DailyMessages,
                "messages_per_day",
                usage.messages_24h,
                l.messages_per_day,
                usage.messages_24h.saturating_add(1) > l.messages_per_day,
                usage.oldest_expires_ms,
            ),
            Reason::LimitDailyRecipients => {
                if self.a.recipients.is_none() {
                    return pending("recipients not known yet");
                }
                (
                    LimitName::DailyRecipients,
                    "recipients_per_day",
                    usage.recipients_24h,
                    l.recipients_per_day,
                    usage.recipients_24h.saturating_add(self.recipients) > l.recipients_per_day,
                    usage.oldest_expires_ms,
                )
            }
            _ => (
                LimitName::Concurrency,
                "concurrent_sends",
                usage.in_flight,
                l.concurrent_sends,
                usage.in_flight.saturating_add(1) > l.concurrent_sends,
                None,
            ),
        };
        if !over {
            return pass("within the limit");
        }
        let action = action_of(name);
        let state = LimitState {
            name,
            current,
            limit,
            reset_at_ms: reset,
            action,
        };
        let when = reset.map_or("when sends in flight finish".to_owned(), |t| {
            format!("at {}", rfc3339_ms(t))
        });
        let who = self
            .user
            .map_or(key.as_ref(), |u| self.ix.user(u).email.as_str());
        let detail =
            format!("{who}: {current} used of limits.{setting} = {limit}; frees up {when}");
        let fault = Fault::new(FaultKind::Limit, setting);
        match action {
            ExceedAction::Reject => R {
                outcome: Outcome::Fail,
                detail: Cow::Owned(detail),
                remedy: Some(format!(
                    "retry {when}, or raise limits.{setting} for {who} (or set limits.on_exceed.{}: hold) {APPLY}",
                    limit_key(name)
                )),
                fault: Some(fault),
                limit: Some(state),
            },
            ExceedAction::Hold => R {
                outcome: Outcome::Hold,
                detail: Cow::Owned(format!("{detail}; accepted and held (on_exceed: hold)")),
                remedy: Some(format!(
                    "delivery resumes {when}; raise limits.{setting} for {who} {APPLY} to avoid holds"
                )),
                fault: Some(fault),
                limit: Some(state),
            },
        }
    }

    fn render_args(&self, r: &R, code: Reason) -> RenderArgs {
        let a = self.a;
        RenderArgs {
            caller: (!self.caller.is_empty()).then(|| self.caller.to_string()),
            project: self.project.map(|p| {
                self.ix
                    .project(p)
                    .map_or(p, |pr| pr.number.as_str())
                    .to_owned()
            }),
            ip: a.transport.client_ip.map(|i| i.to_string()),
            referrer: a.transport.referrer.clone(),
            retry_at: r.limit.as_ref().and_then(|l| l.reset_at_ms).map(rfc3339_ms),
            limit: match code {
                Reason::PolicyTooManyRecipients => {
                    Some(self.limits.recipients_per_message.to_string())
                }
                Reason::MessageTooLarge => Some(
                    match a.door.max_message_bytes() {
                        Some(d) if a.size.is_some_and(|n| n <= self.limits.max_message_bytes) => d,
                        _ => self.limits.max_message_bytes,
                    }
                    .to_string(),
                ),
                _ => r.limit.as_ref().map(|l| l.limit.to_string()),
            },
            detail: match (&a.body, &self.header_problem) {
                (Body::Invalid { detail, .. }, _) => Some(detail.clone()),
                (Body::Unreadable { detail, .. }, _) => Some(detail.clone()),
                (_, Some(p)) if code == Reason::MessageInvalid => Some(p.detail()),
                _ => None,
            },
            field: match (&a.body, &self.header_problem) {
                (Body::Invalid { field, .. }, _) => field.clone(),
                (_, Some(p)) if code == Reason::MessageInvalid => {
                    Some(p.header().to_ascii_lowercase())
                }
                _ => None,
            },
        }
    }
}

fn limit_key(n: LimitName) -> &'static str {
    match n {
        LimitName::Rate => "rate",
        LimitName::DailyMessages => "daily_messages",
        LimitName::DailyRecipients => "daily_recipients",
        LimitName::Concurrency => "concurrency",
    }
}

/// `s` is one of the scopes the attempt's action takes at its door ([`Action::scopes`]).
fn scope_for(s: &str, a: &SendAttempt) -> bool {
    a.action.scopes(a.door).contains(&s)
}

fn has_scope_for(scopes: &[String], a: &SendAttempt) -> bool {
    scopes.iter().any(|s| scope_for(s, a))
}

/// The null-sender rule for bounces. A null reverse-path (`MAIL FROM:<>`) names no sender, so
/// the header must: on the IP-trusted relay, whose rule (`smtp_relay.allowed_senders`) is about
/// the envelope sender, the header's first From (else Sender) address stands for the envelope
/// sender once the message is known (and is the user and the counter the relay sends as). A
/// message that names no sender anywhere has no From field, which `message.invalid` refuses
/// (RFC 5322 §3.6 requires one): without this rule the decision could never complete. An
/// authenticated principal needs no stand-in: the null envelope sender is skipped and every
/// header address is checked (`sender_addrs`).
fn null_sender(a: &SendAttempt) -> Option<&str> {
    let env = a.envelope_from.as_deref();
    if env != Some("")
        || !matches!(a.body, Body::Valid)
        || !matches!(a.credential, Credential::RelayIp)
    {
        return env;
    }
    a.header
        .as_ref()
        .and_then(|h| {
            h.from_addresses()
                .chain(h.sender_addresses())
                .find(|s| !s.is_empty())
        })
        .or(env)
}

/// The domain part of an address (after the last `@`); a byte scan, as this runs several times
/// per decision.
#[inline]
fn domain_of(addr: &str) -> &str {
    match addr.bytes().rposition(|b| b == b'@') {
        Some(i) => &addr[i + 1..],
        None => "",
    }
}

/// `d` is `parent` or a subdomain of it (case-insensitive).
pub(crate) fn domain_within(d: &str, parent: &str) -> bool {
    d.eq_ignore_ascii_case(parent)
        || (d.len() > parent.len()
            && d.as_bytes()[d.len() - parent.len() - 1] == b'.'
            && d[d.len() - parent.len()..].eq_ignore_ascii_case(parent))
}

/// Referrer patterns as in Google API key restrictions: `*` matches any run of characters; the
/// scheme of both pattern and referrer is ignored.
pub(crate) fn referrer_matches(pattern: &str, referrer: &str) -> bool {
    fn strip(s: &str) -> &str {
        s.strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s)
    }
    glob(strip(pattern).as_bytes(), strip(referrer).as_bytes())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&s[si]) {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The trace being built.
struct Trace {
    checks: Vec<CheckResult>,
    denials: Vec<Denial>,
    holds: Vec<LimitState>,
    complete: bool,
    mode: Mode,
}

impl Trace {
    /// Records one check; true when enforcement stops here. Passing checks take the short path.
    #[inline(always)]
    fn record(&mut self, ctx: &Ctx<'_>, r: Reason, res: R) -> bool {
        match res.outcome {
            Outcome::Pass | Outcome::NotApplicable | Outcome::Pending | Outcome::NotChecked
                if res.remedy.is_none() =>
            {
                if matches!(res.outcome, Outcome::Pending | Outcome::NotChecked) {
                    self.complete = false;
                }
                self.checks.push(CheckResult {
                    check: r,
                    stage: r.stage(),
                    outcome: res.outcome,
                    detail: res.detail,
                    finding: None,
                });
                false
            }
            _ => self.record_finding(ctx, r, res),
        }
    }

    #[cold]
    #[inline(never)]
    fn record_finding(&mut self, ctx: &Ctx<'_>, r: Reason, res: R) -> bool {
        let stop = res.outcome == Outcome::Fail && self.mode == Mode::Enforce;
        match res.outcome {
            Outcome::Fail => complete_failure(ctx, r, &res, &mut self.denials),
            Outcome::Hold => {
                if let Some(l) = &res.limit {
                    self.holds.push(l.clone());
                }
            }
            Outcome::Pending | Outcome::NotChecked => self.complete = false,
            Outcome::Pass | Outcome::NotApplicable => {}
        }
        let finding = match (res.remedy, res.fault) {
            (Some(remedy), Some(object_at_fault)) => Some(Box::new(Finding {
                remedy,
                object_at_fault,
                limit: res.limit,
            })),
            _ => None,
        };
        self.checks.push(CheckResult {
            check: r,
            stage: r.stage(),
            outcome: res.outcome,
            detail: res.detail,
            finding,
        });
        stop
    }
}

fn complete_failure(ctx: &Ctx<'_>, r: Reason, res: &R, denials: &mut Vec<Denial>) {
    denials.push(Denial {
        code: r,
        stage: r.stage(),
        object_at_fault: res
            .fault
            .clone()
            .unwrap_or_else(|| Fault::new(FaultKind::Credential, "unknown")),
        message: res.detail.to_string(),
        remedy: res.remedy.clone().unwrap_or_default(),
        limit: res.limit.clone(),
        args: ctx.render_args(res, r),
    });
}

pub(super) fn run(
    a: &SendAttempt,
    ix: &DirectoryIndex,
    counters: &dyn Counters,
    now: u64,
    mode: Mode,
) -> Decision {
    let mut ctx = Ctx::resolve(a, ix, now, mode);
    let mut st = Trace {
        checks: Vec::with_capacity(CHECKS.len()),
        denials: Vec::new(),
        holds: Vec::new(),
        complete: true,
        mode,
    };
    let mut rewrites = Vec::new();
    // The checks are unrolled (one call per reason with a constant argument), so each inlined
    // `check` folds to its own arm: no 37-way dispatch per decision.
    macro_rules! steps {
        ($($r:ident)*) => {
            'checks: {
                $(
                    let res = if !a.action.applies(Reason::$r) {
                        not_for(a.action)
                    } else {
                        if Reason::$r == Reason::LimitRate
                            && let Some(k) = &ctx.counter_key
                        {
                            ctx.usage = Some(counters.usage(k, now));
                        }
                        ctx.check(Reason::$r, &mut rewrites)
                    };
                    if st.record(&ctx, Reason::$r, res) {
                        break 'checks;
                    }
                )*
            }
            debug_assert_eq!(&[$(Reason::$r),*][..], CHECKS);
        };
    }
    steps!(
        TlsRequired TlsVersion AuthMissing AuthInvalid AuthExpired AuthRevoked AuthLocked
        KeyUnsupported KeyIpBlocked KeyReferrerBlocked KeyApiBlocked RelayIpNotAllowed
        ClientDisabled ProjectApiDisabled ScopeInsufficient PermissionMissing
        DelegationNotConfigured DelegationScopeNotGranted DelegationSubjectUnknown
        ImpersonationDenied AccountSuspended AccountMailDisabled AccountUnderReview
        AccountSendingRevoked SenderNotOwned SenderUnverified SenderDomainUnverified
        PolicyDenied PolicyRecipientRestricted PolicyTooManyRecipients LimitRate
        LimitDailyMessages LimitDailyRecipients LimitConcurrency MessageInvalid
        MessageNoRecipients MessageTooLarge
    );
    let Trace {
        checks,
        denials,
        holds,
        complete,
        ..
    } = st;
    let verdict = if !denials.is_empty() {
        Verdict::Denied
    } else if !holds.is_empty() {
        Verdict::Held
    } else {
        Verdict::Allowed
    };
    let charge = match (&ctx.counter_key, verdict) {
        (Some(k), Verdict::Allowed | Verdict::Held) if a.action.is_send() => {
            let l = ctx.limits;
            let action = |n: LimitName| l.on_exceed.get(&n).copied().unwrap_or_default();
            Some(Charge {
                principal: k.to_string(),
                rate: Gcra::per_minute(l.rate_units_per_minute, SEND_COST_UNITS),
                recipients: ctx.recipients,
                messages_per_day: l.messages_per_day,
                recipients_per_day: l.recipients_per_day,
                concurrent_sends: l.concurrent_sends,
                actions: [
                    (LimitName::Rate, action(LimitName::Rate)),
                    (LimitName::DailyMessages, action(LimitName::DailyMessages)),
                    (
                        LimitName::DailyRecipients,
                        action(LimitName::DailyRecipients),
                    ),
                    (LimitName::Concurrency, action(LimitName::Concurrency)),
                ],
            })
        }
        _ => None,
    };
    // Keep the shared arithmetic honest: an allowed charge must pass the admission re-check.
    debug_assert!(
        charge
            .as_ref()
            .zip(ctx.usage.as_ref())
            .is_none_or(|(c, u)| {
                !complete || verdict == Verdict::Denied || exceeds(u, c, now).is_none()
            })
    );
    Decision {
        action: a.action,
        verdict,
        mode,
        complete: complete || verdict == Verdict::Denied,
        denials,
        checks,
        holds,
        rewrites,
        principal: ctx.counter_key.map(Cow::into_owned),
        charge,
    }
}
