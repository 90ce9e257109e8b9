//! A deliberately simple reference implementation of the rules: no index, linear scans over the
//! directory, one plain function per check, outcomes only. The differential test compares it with
//! the engine on random directories and attempts.

use crate::catalogue::{Reason, RequestProblem};
use crate::directory::*;
use crate::engine::checks::CHECKS;
use crate::engine::{
    Action, Body, Counters, Credential, CredentialState, Door, Mailbox, Originator, Outcome,
    SendAttempt, TlsVersion,
};

use Outcome::{Fail, Hold, NotApplicable as Na, NotChecked, Pass, Pending};

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn domain(a: &str) -> &str {
    a.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

fn user_by_primary<'d>(dir: &'d Directory, e: &str) -> Option<&'d User> {
    dir.users.iter().find(|u| same(&u.email, e))
}

fn user_by_address<'d>(dir: &'d Directory, e: &str) -> Option<&'d User> {
    dir.users
        .iter()
        .find(|u| same(&u.email, e) || u.aliases.iter().any(|a| same(a, e)))
}

fn org_domain(dir: &Directory, d: &str) -> Option<bool> {
    dir.domains
        .iter()
        .find(|x| same(&x.name, d))
        .map(|x| x.verified)
}

fn within(d: &str, parent: &str) -> bool {
    same(d, parent)
        || d.to_ascii_lowercase()
            .ends_with(&format!(".{}", parent.to_ascii_lowercase()))
}

fn org_domain_or_sub(dir: &Directory, d: &str) -> bool {
    dir.domains.iter().any(|x| within(d, &x.name))
}

/// Whether scope `s` lets a token do `action` at `door` (Google's discovery document).
fn scope_for(s: &str, door: Door, action: Action) -> bool {
    const FULL: &str = "https://mail.google.com/";
    const G: &str = "https://www.googleapis.com/auth/gmail.";
    let short = s.strip_prefix(G);
    match action {
        Action::Send | Action::Authenticate => match door {
            Door::Smtp | Door::SmtpRelay => s == FULL,
            _ => {
                s == FULL
                    || matches!(
                        short,
                        Some("modify" | "compose" | "send" | "addons.current.action.compose")
                    )
            }
        },
        Action::ReadSettings => {
            s == FULL
                || matches!(
                    short,
                    Some("modify" | "compose" | "readonly" | "metadata" | "settings.basic")
                )
        }
        Action::UpdateSettings => {
            s == FULL || matches!(short, Some("settings.basic" | "settings.sharing"))
        }
        Action::ManageSendAs => s == FULL || short == Some("settings.sharing"),
        Action::Manage { .. } | Action::IssueToken | Action::SignIn => false,
    }
}

/// The checks each action runs, written out by row (docs/reasons.md): every check for a send;
/// rows 1-20 (transport to delegation) for AUTH; rows 1-24 (through the account's state) and
/// `policy.denied` for the Gmail settings methods; transport, authentication and the
/// credential's restrictions (rows 1-13) and `permission.missing` for a key-management call;
/// for issuing a token, what Google checks then; at sign-in, the account's state.
fn runs(action: Action, r: Reason) -> bool {
    let row = r.spec().row;
    match action {
        Action::Send => true,
        Action::Authenticate => row <= 20,
        Action::ReadSettings | Action::UpdateSettings | Action::ManageSendAs => {
            row <= 24 || r == Reason::PolicyDenied
        }
        Action::Manage { .. } => row <= 13 || r == Reason::PermissionMissing,
        // The token endpoint: who asks (3-7), the client (13), the delegation (17-19), the
        // states that stop an account for good (21, 24) and policy.denied (28).
        Action::IssueToken => matches!(row, 3..=7 | 13 | 17..=19 | 21 | 24 | 28),
        // The consent page: the account's states that refuse a code (21, 23, 24).
        Action::SignIn => matches!(row, 21 | 23 | 24),
    }
}

fn api(door: Door) -> &'static str {
    match door {
        Door::Gmail => GMAIL_API,
        Door::Sendgrid => SENDGRID_API,
        _ => "smtp",
    }
}

/// `local@domain`, nothing around it (the generator's malformed entries are a bare name, two
/// addresses glued by a space, and a second `@`).
fn looks_like_address(s: &str) -> bool {
    let parts: Vec<&str> = s.split('@').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty())
        && !s.contains(|c: char| c.is_whitespace() || "<>,;:\"()[]\\".contains(c))
}

/// RFC 5322 §3.6: one From field naming at least one address; at most one Sender field, naming
/// exactly one; a Sender whenever From names several; every entry an address.
fn well_formed(h: &Originator) -> bool {
    h.from.len() == 1
        && h.sender.len() <= 1
        && h.from
            .iter()
            .chain(&h.sender)
            .flatten()
            .all(|x| looks_like_address(x))
        && !h.from[0].is_empty()
        && match h.sender.first() {
            None => h.from[0].len() == 1,
            Some(s) => s.len() == 1,
        }
}

#[derive(PartialEq)]
enum Own {
    Owned,
    Pending,
    Unowned,
}

fn classify(dir: &Directory, u: &User, addr: &str) -> Own {
    let owned = same(&u.email, addr)
        || u.aliases.iter().any(|a| same(a, addr))
        || u.send_as
            .iter()
            .any(|s| same(&s.email, addr) && s.status == SendAsStatus::Accepted)
        || dir.groups.iter().any(|g| {
            g.members_can_send_as
                && same(&g.email, addr)
                && g.members.iter().any(|m| same(m, &u.email))
        })
        || dir.users.iter().any(|m| {
            m.delegates.iter().any(|d| same(d, &u.email))
                && (same(&m.email, addr) || m.aliases.iter().any(|a| same(a, addr)))
        });
    if owned {
        Own::Owned
    } else if u.send_as.iter().any(|s| same(&s.email, addr)) {
        Own::Pending
    } else {
        Own::Unowned
    }
}

fn policy_applies(dir: &Directory, p: &Policy, u: Option<&User>) -> bool {
    let s = &p.applies_to;
    let everyone = s.users.is_empty() && s.groups.is_empty() && s.org_units.is_empty();
    match u {
        None => everyone,
        Some(u) => {
            everyone
                || s.users.iter().any(|x| same(x, &u.email))
                || s.org_units.iter().any(|ou| {
                    ou == "/" || u.org_unit == *ou || u.org_unit.starts_with(&format!("{ou}/"))
                })
                || s.groups.iter().any(|g| {
                    dir.groups
                        .iter()
                        .any(|x| same(&x.email, g) && x.members.iter().any(|m| same(m, &u.email)))
                })
        }
    }
}

/// The send-as guarantee stated directly: may an accepted attempt carry `addr` in its header?
/// A user principal: only an address it owns (primary, alias, accepted send-as, group, delegated
/// mailbox). The IP-trusted relay: an address `smtp_relay.allowed_senders` accepts, whose user
/// (if any) is active, has mail and may send.
pub(super) fn header_address_allowed(dir: &Directory, a: &SendAttempt, addr: &str) -> bool {
    if matches!(a.credential, Credential::RelayIp) {
        let rule = match dir.smtp_relay.allowed_senders {
            RelaySenders::Any => true,
            RelaySenders::RegisteredUsers => user_by_address(dir, addr).is_some(),
            RelaySenders::DomainAddresses => org_domain_or_sub(dir, domain(addr)),
        };
        let state_ok = user_by_address(dir, addr).is_none_or(|u| {
            u.status == UserStatus::Active
                && u.mail_enabled
                && dir.effective_org_unit(&u.org_unit).mail_enabled
                && u.abuse.state != AbuseState::Revoked
        });
        return rule && state_ok;
    }
    let user = match &a.credential {
        Credential::OauthUser { user, .. } | Credential::SmtpLogin { user } => {
            user_by_primary(dir, user)
        }
        Credential::ServiceAccount {
            subject: Some(s), ..
        } => user_by_address(dir, s),
        Credential::ApiKey { key_id } => dir
            .api_keys
            .iter()
            .find(|k| k.id == *key_id)
            .and_then(|k| user_by_primary(dir, &k.owner)),
        _ => None,
    };
    user.is_some_and(|u| classify(dir, u, addr) == Own::Owned)
}

/// The outcome of every check, in order, in explain mode: a restriction whose fact the attempt
/// does not carry (no client IP; no referrer on an HTTP door) is not checked.
pub(super) fn explain(
    a: &SendAttempt,
    dir: &Directory,
    counters: &dyn Counters,
    now: u64,
) -> Vec<(Reason, Outcome)> {
    // --- who is it?
    let mut failure: Option<Reason> = None;
    let mut user: Option<&User> = None;
    let mut key: Option<&ApiKey> = None;
    let mut client: Option<&OAuthClient> = None;
    let mut sa: Option<&ServiceAccount> = None;
    let mut scopes: Option<&Vec<String>> = None;
    let mut project: Option<&str> = None;
    let mut subject_unknown = false;
    let send_scope = |s: &str, door: Door| scope_for(s, door, a.action);
    // The null-sender rule: `MAIL FROM:<>` on the IP-trusted relay, once the message is known,
    // stands for the header's first From (else Sender) address, malformed header or not.
    let relay_null = a.envelope_from.as_deref() == Some("")
        && a.body == Body::Valid
        && matches!(a.credential, Credential::RelayIp);
    let envelope_from: Option<&str> = match &a.header {
        Some(h) if relay_null => h
            .from
            .iter()
            .flatten()
            .chain(h.sender.iter().flatten())
            .map(String::as_str)
            .find(|x| !x.is_empty())
            .or(Some("")),
        _ => a.envelope_from.as_deref(),
    };
    match &a.credential {
        Credential::None => failure = Some(Reason::AuthMissing),
        Credential::Refused { state, .. } => {
            failure = Some(match state {
                CredentialState::Invalid => Reason::AuthInvalid,
                CredentialState::Expired => Reason::AuthExpired,
                CredentialState::Revoked => Reason::AuthRevoked,
                CredentialState::Locked => Reason::AuthLocked,
            })
        }
        Credential::OauthUser {
            user: u,
            client_id,
            project: p,
            scopes: s,
        } => {
            client = dir.oauth_clients.iter().find(|c| c.client_id == *client_id);
            scopes = Some(s);
            project = Some(p);
            user = user_by_primary(dir, u);
            if client.is_none() || user.is_none() {
                failure = Some(Reason::AuthInvalid);
            }
        }
        Credential::ServiceAccount {
            email,
            project: p,
            scopes: s,
            subject,
        } => {
            scopes = Some(s);
            project = Some(p);
            sa = dir.service_accounts.iter().find(|x| same(&x.email, email));
            if sa.is_none() {
                failure = Some(Reason::AuthInvalid);
            } else if let Some(s) = subject {
                user = user_by_address(dir, s);
                subject_unknown = user.is_none();
            }
        }
        Credential::ApiKey { key_id } => {
            key = dir.api_keys.iter().find(|k| k.id == *key_id);
            match key {
                None => failure = Some(Reason::AuthInvalid),
                Some(k) => {
                    project = k.project.as_deref();
                    let expired = k
                        .expires
                        .is_some_and(|e| (e.unix_timestamp() as u64) * 1000 <= now);
                    if k.revoked {
                        failure = Some(Reason::AuthRevoked);
                    } else if expired {
                        failure = Some(Reason::AuthExpired);
                    } else {
                        user = user_by_primary(dir, &k.owner);
                        if user.is_none() {
                            failure = Some(Reason::AuthInvalid);
                        }
                    }
                }
            }
        }
        Credential::SmtpLogin { user: u } => {
            user = user_by_primary(dir, u);
            if user.is_none() {
                failure = Some(Reason::AuthInvalid);
            }
        }
        Credential::RelayIp => {
            if a.door != Door::SmtpRelay || dir.smtp_relay.require_auth {
                failure = Some(Reason::AuthMissing);
            } else if let Some(e) = envelope_from {
                user = user_by_address(dir, e);
            }
        }
    }
    let authed = failure.is_none();
    if !authed {
        user = None;
    }
    let relay = matches!(a.credential, Credential::RelayIp);

    // Mailbox acted for: Ok(None) own, Ok(Some) delegated, Err no right.
    let mut mailbox: Result<Option<&User>, ()> = Ok(None);
    if let (Mailbox::Address(m), Some(u)) = (&a.mailbox, user)
        && !same(m, &u.email)
    {
        mailbox = match user_by_primary(dir, m) {
            Some(mb) if mb.delegates.iter().any(|d| same(d, &u.email)) => Ok(Some(mb)),
            _ => Err(()),
        };
    }
    let limits = match user {
        Some(u) => dir.effective_limits(u),
        None => dir.limits.resolve(),
    };
    let counter_key = if !authed {
        None
    } else if let Some(u) = user {
        Some(u.email.to_ascii_lowercase())
    } else if let Some(s) = sa {
        Some(format!("sa:{}", s.email.to_ascii_lowercase()))
    } else if relay {
        match (envelope_from, a.transport.client_ip) {
            (Some(e), _) if !e.is_empty() => Some(format!("relay:{}", e.to_ascii_lowercase())),
            (_, Some(ip)) => Some(format!("relay-ip:{ip}")),
            _ => None,
        }
    } else {
        None
    };
    let usage = counter_key.as_ref().map(|k| counters.usage(k, now));
    let nrcpt = a.recipients.as_ref().map_or(0, |r| r.len() as u64);
    let rewrite = dir.organisation.on_unowned_from == UnownedFrom::Rewrite;
    // The header counts only when its From/Sender fields are well-formed (else message.invalid).
    let header = a.header.as_ref().filter(|h| well_formed(h));
    let envelope = envelope_from.filter(|s| !s.is_empty());
    // (role, address): 0 envelope, 1 From, 2 Sender.
    let mut senders: Vec<(u8, &str)> = envelope.into_iter().map(|e| (0, e)).collect();
    if let Some(h) = header {
        senders.extend(h.from.iter().flatten().map(|x| (1, x.as_str())));
        senders.extend(h.sender.iter().flatten().map(|x| (2, x.as_str())));
    }
    let no_sender = senders.is_empty();
    // Only a From naming one address is rewritten, and only for a user principal.
    let rewritable =
        |role: u8| role == 1 && rewrite && !relay && header.is_some_and(|h| h.from[0].len() == 1);
    let mut accounts: Vec<&User> = user.into_iter().chain(mailbox.ok().flatten()).collect();
    if relay && authed {
        // The relay sends as every header address: their users' states count.
        accounts.extend(
            senders
                .iter()
                .filter(|(role, _)| *role > 0)
                .filter_map(|(_, s)| user_by_address(dir, s)),
        );
    }
    let account = |bad: &dyn Fn(&User) -> bool| -> Outcome {
        if accounts.is_empty() {
            Na
        } else if accounts.iter().any(|u| bad(u)) {
            Fail
        } else {
            Pass
        }
    };
    let key_rule = |ok: &dyn Fn(&ApiKey) -> bool| -> Outcome {
        match key {
            Some(k) if authed => {
                if ok(k) {
                    Pass
                } else {
                    Fail
                }
            }
            _ => Na,
        }
    };
    let limit = |over: bool, name: LimitName| -> Outcome {
        if !over {
            Pass
        } else if limits.on_exceed.get(&name) == Some(&ExceedAction::Hold) {
            Hold
        } else {
            Fail
        }
    };

    let mut out = Vec::new();
    for &r in CHECKS {
        let o = match r {
            Reason::TlsRequired => {
                if a.transport.tls.is_some() {
                    Pass
                } else if a.transport.listener_requires_tls
                    || (a.door == Door::SmtpRelay && dir.smtp_relay.require_tls)
                {
                    Fail
                } else {
                    Pass
                }
            }
            Reason::TlsVersion => match a.transport.tls {
                None => Na,
                Some(TlsVersion::Tls10 | TlsVersion::Tls11) => Fail,
                Some(_) => Pass,
            },
            Reason::AuthMissing
            | Reason::AuthInvalid
            | Reason::AuthExpired
            | Reason::AuthRevoked
            | Reason::AuthLocked => match failure {
                Some(f) if f == r => Fail,
                Some(_) => Na,
                None => Pass,
            },
            Reason::KeyUnsupported => match key {
                None => Na,
                Some(_) if a.door == Door::Gmail => Fail,
                Some(_) => Pass,
            },
            Reason::KeyIpBlocked => match key {
                Some(k)
                    if authed && !k.allowed_ips.is_empty() && a.transport.client_ip.is_none() =>
                {
                    NotChecked
                }
                _ => key_rule(&|k| {
                    k.allowed_ips.is_empty()
                        || a.transport
                            .client_ip
                            .is_some_and(|ip| k.allowed_ips.iter().any(|n| n.contains(&ip)))
                }),
            },
            Reason::KeyReferrerBlocked
                if key.is_some_and(|k| !k.allowed_referrers.is_empty())
                    && authed
                    && a.transport.referrer.is_none()
                    && matches!(a.door, Door::Gmail | Door::Sendgrid) =>
            {
                NotChecked
            }
            Reason::KeyReferrerBlocked => key_rule(&|k| {
                k.allowed_referrers.is_empty()
                    || a.transport.referrer.as_deref().is_some_and(|rf| {
                        // The only pattern the generator uses is `*.example.com/*`.
                        k.allowed_referrers.iter().all(|p| p == "*.example.com/*")
                            && rf
                                .trim_start_matches("https://")
                                .trim_start_matches("http://")
                                .split_once('/')
                                .is_some_and(|(host, _)| {
                                    host.to_ascii_lowercase().ends_with(".example.com")
                                })
                    })
            }),
            Reason::KeyApiBlocked => key_rule(&|k| {
                k.allowed_apis.is_empty() || k.allowed_apis.iter().any(|x| x == api(a.door))
            }),
            Reason::RelayIpNotAllowed => {
                if authed && relay && a.transport.client_ip.is_none() {
                    NotChecked
                } else if authed && relay {
                    let ok = a.transport.client_ip.is_some_and(|ip| {
                        dir.smtp_relay.allowed_ips.iter().any(|n| n.contains(&ip))
                    });
                    if ok { Pass } else { Fail }
                } else {
                    Na
                }
            }
            Reason::ClientDisabled => match (client, sa) {
                (Some(c), _) if authed => {
                    if c.disabled {
                        Fail
                    } else {
                        Pass
                    }
                }
                (_, Some(s)) if authed => {
                    if s.disabled {
                        Fail
                    } else {
                        Pass
                    }
                }
                _ => Na,
            },
            Reason::ProjectApiDisabled => {
                if !authed || matches!(a.door, Door::Smtp | Door::SmtpRelay) {
                    Na
                } else {
                    match project {
                        None => Na,
                        Some(p) => {
                            let found = dir.projects.iter().find(|x| x.id == p || x.number == p);
                            match found {
                                Some(x) if x.enabled_apis.iter().any(|e| e == api(a.door)) => Pass,
                                _ => Fail,
                            }
                        }
                    }
                }
            }
            Reason::ScopeInsufficient => match scopes {
                Some(s) if authed => {
                    if s.iter().any(|x| send_scope(x, a.door)) {
                        Pass
                    } else {
                        Fail
                    }
                }
                _ => Na,
            },
            Reason::PermissionMissing => {
                if !authed {
                    Na
                } else if let Action::Manage { permission } = a.action {
                    match (key, permission) {
                        (Some(k), Some(p)) if !k.permissions.iter().any(|x| x == p) => Fail,
                        _ => Pass,
                    }
                } else if key.is_some_and(|k| !k.permissions.iter().any(|p| p == "mail.send")) {
                    Fail
                } else {
                    match user {
                        None => Na,
                        Some(u) => {
                            let by_default = dir
                                .organisation
                                .default_permissions
                                .iter()
                                .any(|p| p == "mail.send");
                            let by_role = u.roles.iter().any(|rn| {
                                dir.roles.iter().any(|ro| {
                                    ro.name == *rn
                                        && ro.permissions.iter().any(|p| p == "mail.send")
                                })
                            });
                            if by_default || by_role { Pass } else { Fail }
                        }
                    }
                }
            }
            Reason::DelegationNotConfigured => match (&a.credential, sa) {
                (Credential::ServiceAccount { subject, .. }, Some(s)) if authed => {
                    let grant = dir
                        .domain_wide_delegation
                        .iter()
                        .any(|g| g.client_id == s.client_id);
                    if subject.is_none() && a.action == Action::IssueToken {
                        Na
                    } else if subject.is_none() || !grant {
                        Fail
                    } else {
                        Pass
                    }
                }
                _ => Na,
            },
            Reason::DelegationScopeNotGranted => match (&a.credential, sa) {
                (
                    Credential::ServiceAccount {
                        subject: Some(_),
                        scopes,
                        ..
                    },
                    Some(s),
                ) if authed => {
                    match dir
                        .domain_wide_delegation
                        .iter()
                        .find(|g| g.client_id == s.client_id)
                    {
                        None => Na,
                        Some(g) if a.action == Action::IssueToken => {
                            // Issuing a delegated token: every requested scope is granted.
                            if scopes.iter().all(|x| g.scopes.contains(x)) {
                                Pass
                            } else {
                                Fail
                            }
                        }
                        Some(g) => {
                            let wanted: Vec<_> =
                                scopes.iter().filter(|x| send_scope(x, a.door)).collect();
                            if wanted.is_empty() {
                                Na
                            } else if wanted.iter().any(|w| g.scopes.contains(w)) {
                                Pass
                            } else {
                                Fail
                            }
                        }
                    }
                }
                _ => Na,
            },
            Reason::DelegationSubjectUnknown => match (&a.credential, sa) {
                (
                    Credential::ServiceAccount {
                        subject: Some(_), ..
                    },
                    Some(_),
                ) if authed => {
                    if subject_unknown {
                        Fail
                    } else {
                        Pass
                    }
                }
                _ => Na,
            },
            Reason::ImpersonationDenied => match (&a.mailbox, user) {
                (Mailbox::Me, _) | (_, None) => Na,
                _ => {
                    if mailbox.is_err() {
                        Fail
                    } else {
                        Pass
                    }
                }
            },
            Reason::AccountSuspended => account(&|u| u.status == UserStatus::Suspended),
            Reason::AccountMailDisabled => {
                account(&|u| !u.mail_enabled || !dir.effective_org_unit(&u.org_unit).mail_enabled)
            }
            Reason::AccountUnderReview => account(&|u| u.status == UserStatus::UnderReview),
            Reason::AccountSendingRevoked => account(&|u| u.abuse.state == AbuseState::Revoked),
            Reason::SenderNotOwned => {
                if !authed {
                    Na
                } else if no_sender {
                    Pending
                } else if relay {
                    let ok = senders
                        .iter()
                        .all(|(_, e)| match dir.smtp_relay.allowed_senders {
                            RelaySenders::Any => true,
                            RelaySenders::RegisteredUsers => user_by_address(dir, e).is_some(),
                            RelaySenders::DomainAddresses => org_domain_or_sub(dir, domain(e)),
                        });
                    if !ok {
                        Fail
                    } else if envelope.is_none() {
                        Pending
                    } else {
                        Pass
                    }
                } else {
                    match user {
                        None => Na,
                        Some(u) => {
                            let bad = senders.iter().any(|(role, s)| {
                                classify(dir, u, s) == Own::Unowned && !rewritable(*role)
                            });
                            if bad { Fail } else { Pass }
                        }
                    }
                }
            }
            Reason::SenderUnverified => {
                if !authed || relay {
                    Na
                } else {
                    match user {
                        None => Na,
                        Some(_) if no_sender => Pending,
                        Some(u) => {
                            let bad = senders.iter().any(|(role, s)| {
                                classify(dir, u, s) == Own::Pending && !rewritable(*role)
                            });
                            if bad { Fail } else { Pass }
                        }
                    }
                }
            }
            Reason::SenderDomainUnverified => {
                if !authed {
                    Na
                } else if no_sender {
                    Pending
                } else if !relay && user.is_none() {
                    Na
                } else {
                    let bad = senders.iter().any(|(role, s)| {
                        let eff = match user {
                            Some(u) if rewritable(*role) && classify(dir, u, s) != Own::Owned => {
                                u.email.as_str()
                            }
                            _ => s,
                        };
                        org_domain(dir, domain(eff)) == Some(false)
                    });
                    if bad { Fail } else { Pass }
                }
            }
            Reason::PolicyDenied => {
                if !authed {
                    Na
                } else {
                    let api_off = user.is_some_and(|u| {
                        matches!(a.door, Door::Gmail | Door::Sendgrid)
                            && !dir.effective_org_unit(&u.org_unit).api_access
                    });
                    let denied = dir
                        .policies
                        .iter()
                        .any(|p| p.rule == PolicyRule::DenySend && policy_applies(dir, p, user));
                    if api_off || denied { Fail } else { Pass }
                }
            }
            Reason::PolicyRecipientRestricted => {
                if !authed {
                    Na
                } else {
                    match &a.recipients {
                        None => Pending,
                        Some(rs) => {
                            let internal_only = user.is_some_and(|u| {
                                !dir.effective_org_unit(&u.org_unit).external_recipients
                            });
                            let bad = rs.iter().any(|rc| {
                                let d = domain(rc);
                                let internal = org_domain(dir, d).is_some();
                                (internal_only && !internal)
                                    || dir
                                        .policies
                                        .iter()
                                        .filter(|p| policy_applies(dir, p, user))
                                        .any(|p| match &p.rule {
                                            PolicyRule::DenySend => false,
                                            PolicyRule::InternalRecipientsOnly => !internal,
                                            PolicyRule::AllowRecipientDomains { domains } => {
                                                !domains.iter().any(|x| within(d, x))
                                            }
                                            PolicyRule::DenyRecipientDomains { domains } => {
                                                domains.iter().any(|x| within(d, x))
                                            }
                                        })
                            });
                            if bad { Fail } else { Pass }
                        }
                    }
                }
            }
            Reason::PolicyTooManyRecipients => match &a.recipients {
                None => Pending,
                Some(_) if nrcpt > limits.recipients_per_message => Fail,
                Some(_) => Pass,
            },
            Reason::LimitRate => match usage {
                None => Na,
                Some(u) => {
                    let over = if limits.rate_units_per_minute == 0 {
                        true
                    } else {
                        let t = (60_000 * 100u64)
                            .div_ceil(limits.rate_units_per_minute)
                            .max(1);
                        let tau = 60_000u64.saturating_sub(t);
                        let tat = u.rate_tat_ms.unwrap_or(0).max(now);
                        tat - now > tau
                    };
                    limit(over, LimitName::Rate)
                }
            },
            Reason::LimitDailyMessages => match usage {
                None => Na,
                Some(u) => limit(
                    u.messages_24h + 1 > limits.messages_per_day,
                    LimitName::DailyMessages,
                ),
            },
            Reason::LimitDailyRecipients => match usage {
                None => Na,
                Some(_) if a.recipients.is_none() => Pending,
                Some(u) => limit(
                    u.recipients_24h + nrcpt > limits.recipients_per_day,
                    LimitName::DailyRecipients,
                ),
            },
            Reason::LimitConcurrency => match usage {
                None => Na,
                Some(u) => limit(
                    u.in_flight + 1 > limits.concurrent_sends,
                    LimitName::Concurrency,
                ),
            },
            Reason::MessageInvalid => match (&a.body, &a.header) {
                (Body::Unknown, _) => Pending,
                (Body::Invalid { .. }, _) => Fail,
                (Body::Unreadable { problem, .. }, _) => {
                    if matches!(problem, RequestProblem::TooManyItems { .. }) {
                        Pass
                    } else {
                        Fail
                    }
                }
                (Body::Valid, None) => Pending,
                (Body::Valid, Some(h)) => {
                    if well_formed(h) {
                        Pass
                    } else {
                        Fail
                    }
                }
            },
            Reason::MessageNoRecipients => match &a.recipients {
                None => Pending,
                Some(r) if r.is_empty() => Fail,
                Some(_) => Pass,
            },
            Reason::MessageTooLarge => match a.size {
                _ if matches!(
                    a.body,
                    Body::Unreadable {
                        problem: RequestProblem::TooManyItems { .. },
                        ..
                    }
                ) =>
                {
                    Fail
                }
                None => Pending,
                Some(n) if n > limits.max_message_bytes => Fail,
                Some(n) if a.door == Door::Gmail && n > 35 * 1024 * 1024 => Fail,
                Some(n) if a.door == Door::Sendgrid && n > 30 * 1024 * 1024 => Fail,
                Some(_) => Pass,
            },
            _ => Na,
        };
        let o = if runs(a.action, r) { o } else { Na };
        out.push((r, o));
    }
    out
}
