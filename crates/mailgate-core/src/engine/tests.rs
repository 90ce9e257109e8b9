//! Decision table (one case per code), properties, and a differential test against a deliberately
//! simple reference implementation over randomly generated directories and attempts.

#![allow(clippy::field_reassign_with_default)]

use std::net::IpAddr;

use super::checks::CHECKS;
use super::*;
use crate::directory::*;

mod reference;

pub(super) const NOW: u64 = 1_800_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn send_as(email: &str, status: SendAsStatus) -> SendAs {
    SendAs {
        email: email.into(),
        display_name: None,
        reply_to: None,
        status,
    }
}

fn ou(path: &str) -> OrgUnit {
    OrgUnit {
        path: path.into(),
        description: None,
        mail_enabled: None,
        api_access: None,
        external_recipients: None,
        limits: LimitSettings::default(),
    }
}

fn key(id: &str, owner: &str) -> ApiKey {
    ApiKey {
        id: id.into(),
        name: format!("{id} key"),
        secret: None,
        secret_sha256: String::new(),
        owner: owner.into(),
        project: Some("proj-a".into()),
        permissions: vec!["mail.send".into()],
        allowed_ips: vec![],
        allowed_referrers: vec![],
        allowed_apis: vec![],
        expires: None,
        revoked: false,
    }
}

fn user(email: &str) -> User {
    User::new(email)
}

/// The fixture directory of the decision table.
pub(super) fn fixture() -> Directory {
    let mut d = Directory::default();
    d.domains = vec![
        Domain {
            name: "example.com".into(),
            verified: true,
            verification_token: None,
        },
        Domain {
            name: "unverified.example".into(),
            verified: false,
            verification_token: None,
        },
    ];
    let mut nomail = ou("/nomail");
    nomail.mail_enabled = Some(false);
    let mut noapi = ou("/noapi");
    noapi.api_access = Some(false);
    let mut internal = ou("/internal");
    internal.external_recipients = Some(false);
    d.org_units = vec![ou("/"), nomail, noapi, internal];

    let mut alice = user("alice@example.com");
    alice.aliases = vec!["al@example.com".into()];
    alice.send_as = vec![
        send_as("support@example.com", SendAsStatus::Accepted),
        send_as("pending@example.com", SendAsStatus::Pending),
        send_as("sales@unverified.example", SendAsStatus::Accepted),
    ];
    let mut bob = user("bob@example.com");
    bob.delegates = vec!["alice@example.com".into()];
    let mut carol = user("carol@example.com");
    carol.status = UserStatus::Suspended;
    let mut dave = user("dave@example.com");
    dave.status = UserStatus::UnderReview;
    let mut erin = user("erin@example.com");
    erin.mail_enabled = false;
    let mut frank = user("frank@example.com");
    frank.org_unit = "/nomail".into();
    let mut gina = user("gina@example.com");
    gina.abuse = Abuse {
        state: AbuseState::Revoked,
        evidence: Some("5,000 bounces in 10 minutes".into()),
    };
    let mut hank = user("hank@example.com");
    hank.org_unit = "/noapi".into();
    let mut ivy = user("ivy@example.com");
    ivy.org_unit = "/internal".into();
    d.users = vec![alice, bob, carol, dave, erin, frank, gina, hank, ivy];
    d.groups = vec![Group {
        email: "team@example.com".into(),
        name: None,
        members: vec!["alice@example.com".into()],
        members_can_send_as: true,
    }];
    d.projects = vec![
        Project {
            id: "proj-a".into(),
            number: "111111111111".into(),
            enabled_apis: vec![GMAIL_API.into(), SENDGRID_API.into()],
        },
        Project {
            id: "proj-off".into(),
            number: "222222222222".into(),
            enabled_apis: vec![],
        },
    ];
    d.oauth_clients = vec![
        OAuthClient {
            client_id: "web-client".into(),
            name: None,
            secret: None,
            secret_sha256: None,
            secret_hash: None,
            project: "proj-a".into(),
            redirect_uris: vec![],
            disabled: false,
        },
        OAuthClient {
            client_id: "off-client".into(),
            name: None,
            secret: None,
            secret_sha256: None,
            secret_hash: None,
            project: "proj-a".into(),
            redirect_uris: vec![],
            disabled: true,
        },
    ];
    d.service_accounts = vec![ServiceAccount {
        email: "robot@proj-a.iam.gserviceaccount.com".into(),
        project: "proj-a".into(),
        client_id: "999".into(),
        display_name: None,
        keys: vec![],
        disabled: false,
    }];
    d.domain_wide_delegation = vec![DelegationGrant {
        client_id: "999".into(),
        scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
    }];
    let mut k2 = key("k2", "alice@example.com");
    k2.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
    k2.allowed_referrers = vec!["*.example.com/*".into()];
    let mut k3 = key("k3", "alice@example.com");
    k3.allowed_apis = vec![GMAIL_API.into()];
    let mut kexp = key("k-exp", "alice@example.com");
    kexp.expires = Some(time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap());
    let mut krev = key("k-rev", "alice@example.com");
    krev.revoked = true;
    let mut knoperm = key("k-noperm", "alice@example.com");
    knoperm.permissions = vec![];
    d.api_keys = vec![key("k1", "alice@example.com"), k2, k3, kexp, krev, knoperm];
    d.smtp_relay.allowed_ips = vec!["192.0.2.0/24".parse().unwrap()];
    d
}

fn oauth(user: &str) -> Credential {
    Credential::OauthUser {
        user: user.into(),
        client_id: "web-client".into(),
        project: "proj-a".into(),
        scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
    }
}

fn sa(subject: Option<&str>, scope: &str) -> Credential {
    Credential::ServiceAccount {
        email: "robot@proj-a.iam.gserviceaccount.com".into(),
        project: "proj-a".into(),
        scopes: vec![scope.into()],
        subject: subject.map(Into::into),
    }
}

fn api_key(id: &str) -> Credential {
    Credential::ApiKey { key_id: id.into() }
}

fn login(u: &str) -> Credential {
    Credential::SmtpLogin { user: u.into() }
}

/// An allowed Gmail send by alice.
pub(super) fn base() -> SendAttempt {
    SendAttempt::new(Door::Gmail, oauth("alice@example.com"))
        .from("alice@example.com")
        .to(["x@example.org"])
        .parsed(1_000)
}

fn as_user(a: SendAttempt, door: Door, cred: Credential, from: &str) -> SendAttempt {
    SendAttempt {
        door,
        credential: cred,
        ..a
    }
    .from(from)
}

type Setup = fn(&mut SendAttempt, &mut Directory, &MemoryCounters);

struct Case {
    code: Reason,
    fault: &'static str,
    remedy: &'static str,
    setup: Setup,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            code: Reason::TlsRequired,
            fault: "connection (listener requires TLS)",
            remedy: "STARTTLS",
            setup: |a, _, _| a.transport.tls = None,
        },
        Case {
            code: Reason::TlsRequired,
            fault: "smtp_relay.require_tls",
            remedy: "smtp_relay.require_tls: false",
            setup: |a, d, _| {
                d.smtp_relay.require_tls = true;
                *a = as_user(
                    a.clone(),
                    Door::SmtpRelay,
                    Credential::RelayIp,
                    "alice@example.com",
                );
                a.transport.tls = None;
                a.transport.listener_requires_tls = false;
                a.transport.client_ip = Some(ip("192.0.2.7"));
            },
        },
        Case {
            code: Reason::TlsVersion,
            fault: "connection (TLS version)",
            remedy: "TLS 1.2",
            setup: |a, _, _| a.transport.tls = Some(TlsVersion::Tls11),
        },
        Case {
            code: Reason::AuthMissing,
            fault: "credential none",
            remedy: "send a credential",
            setup: |a, _, _| a.credential = Credential::None,
        },
        Case {
            code: Reason::AuthMissing,
            fault: "smtp_relay.require_auth",
            remedy: "smtp_relay.require_auth: false",
            setup: |a, d, _| {
                d.smtp_relay.require_auth = true;
                *a = as_user(
                    a.clone(),
                    Door::SmtpRelay,
                    Credential::RelayIp,
                    "alice@example.com",
                );
                a.transport.client_ip = Some(ip("192.0.2.7"));
            },
        },
        Case {
            code: Reason::AuthInvalid,
            fault: "api_keys[nope]",
            remedy: "mailgate key create",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Sendgrid,
                    api_key("nope"),
                    "alice@example.com",
                )
            },
        },
        Case {
            code: Reason::AuthInvalid,
            fault: "credential alice@example.com",
            remedy: "check the credential",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    Credential::Refused {
                        state: CredentialState::Invalid,
                        presented: Some("alice@example.com".into()),
                    },
                    "alice@example.com",
                );
            },
        },
        Case {
            code: Reason::AuthExpired,
            fault: "api_keys[k-exp]",
            remedy: "api_keys[k-exp].expires",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Sendgrid,
                    api_key("k-exp"),
                    "alice@example.com",
                )
            },
        },
        Case {
            code: Reason::AuthRevoked,
            fault: "api_keys[k-rev]",
            remedy: "mailgate key create --owner alice@example.com",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Sendgrid,
                    api_key("k-rev"),
                    "alice@example.com",
                )
            },
        },
        Case {
            code: Reason::AuthLocked,
            fault: "credential alice@example.com",
            remedy: "wait for the lockout",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    Credential::Refused {
                        state: CredentialState::Locked,
                        presented: Some("alice@example.com".into()),
                    },
                    "alice@example.com",
                );
            },
        },
        Case {
            code: Reason::KeyUnsupported,
            fault: "api_keys[k1]",
            remedy: "OAuth access token",
            setup: |a, _, _| a.credential = api_key("k1"),
        },
        Case {
            code: Reason::KeyIpBlocked,
            fault: "api_keys[k2]",
            remedy: "add 203.0.113.5 to api_keys[k2].allowed_ips",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Sendgrid,
                    api_key("k2"),
                    "alice@example.com",
                );
                a.transport.client_ip = Some(ip("203.0.113.5"));
                a.transport.referrer = Some("https://app.example.com/send".into());
            },
        },
        Case {
            code: Reason::KeyReferrerBlocked,
            fault: "api_keys[k2]",
            remedy: "api_keys[k2].allowed_referrers",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Sendgrid,
                    api_key("k2"),
                    "alice@example.com",
                );
                a.transport.client_ip = Some(ip("10.1.2.3"));
                a.transport.referrer = Some("https://evil.org/".into());
            },
        },
        Case {
            code: Reason::KeyApiBlocked,
            fault: "api_keys[k3]",
            remedy: "add sendgrid.api to api_keys[k3].allowed_apis",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Sendgrid,
                    api_key("k3"),
                    "alice@example.com",
                )
            },
        },
        Case {
            code: Reason::RelayIpNotAllowed,
            fault: "smtp_relay.allowed_ips",
            remedy: "add 203.0.113.9 to smtp_relay.allowed_ips",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::SmtpRelay,
                    Credential::RelayIp,
                    "alice@example.com",
                );
                a.transport.client_ip = Some(ip("203.0.113.9"));
            },
        },
        Case {
            code: Reason::ClientDisabled,
            fault: "oauth_clients[off-client]",
            remedy: "oauth_clients[off-client].disabled: false",
            setup: |a, _, _| {
                a.credential = Credential::OauthUser {
                    user: "alice@example.com".into(),
                    client_id: "off-client".into(),
                    project: "proj-a".into(),
                    scopes: vec!["https://mail.google.com/".into()],
                };
            },
        },
        Case {
            code: Reason::ClientDisabled,
            fault: "service_accounts[robot@proj-a.iam.gserviceaccount.com]",
            remedy: "disabled: false",
            setup: |a, d, _| {
                d.service_accounts[0].disabled = true;
                a.credential = sa(
                    Some("alice@example.com"),
                    "https://www.googleapis.com/auth/gmail.send",
                );
            },
        },
        Case {
            code: Reason::ProjectApiDisabled,
            fault: "projects[proj-off]",
            remedy: "add gmail.googleapis.com to projects[proj-off].enabled_apis",
            setup: |a, _, _| {
                a.credential = Credential::OauthUser {
                    user: "alice@example.com".into(),
                    client_id: "web-client".into(),
                    project: "proj-off".into(),
                    scopes: vec!["https://mail.google.com/".into()],
                };
            },
        },
        Case {
            code: Reason::ScopeInsufficient,
            fault: "credential alice@example.com",
            remedy: "gmail.send",
            setup: |a, _, _| {
                a.credential = Credential::OauthUser {
                    user: "alice@example.com".into(),
                    client_id: "web-client".into(),
                    project: "proj-a".into(),
                    scopes: vec!["https://www.googleapis.com/auth/gmail.readonly".into()],
                };
            },
        },
        Case {
            code: Reason::PermissionMissing,
            fault: "api_keys[k-noperm]",
            remedy: "add mail.send to api_keys[k-noperm].permissions",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Sendgrid,
                    api_key("k-noperm"),
                    "alice@example.com",
                )
            },
        },
        Case {
            code: Reason::PermissionMissing,
            fault: "users[alice@example.com]",
            remedy: "users[alice@example.com].roles",
            setup: |_, d, _| d.organisation.default_permissions.clear(),
        },
        Case {
            code: Reason::DelegationNotConfigured,
            fault: "service_accounts[robot@proj-a.iam.gserviceaccount.com]",
            remedy: "`sub`",
            setup: |a, _, _| a.credential = sa(None, "https://www.googleapis.com/auth/gmail.send"),
        },
        Case {
            code: Reason::DelegationNotConfigured,
            fault: "service_accounts[robot@proj-a.iam.gserviceaccount.com]",
            remedy: "add domain_wide_delegation",
            setup: |a, d, _| {
                d.domain_wide_delegation.clear();
                a.credential = sa(
                    Some("alice@example.com"),
                    "https://www.googleapis.com/auth/gmail.send",
                );
            },
        },
        Case {
            code: Reason::DelegationScopeNotGranted,
            fault: "domain_wide_delegation[999]",
            // The scope the token asked for, not gmail.send (regression: the remedy always
            // named gmail.send, already granted, for a token asking for mail.google.com).
            remedy: "add https://mail.google.com/ to domain_wide_delegation[999].scopes",
            setup: |a, _, _| {
                a.credential = sa(Some("alice@example.com"), "https://mail.google.com/")
            },
        },
        Case {
            code: Reason::DelegationSubjectUnknown,
            fault: "users[nobody@example.com]",
            remedy: "add users[nobody@example.com]",
            setup: |a, _, _| {
                a.credential = sa(
                    Some("nobody@example.com"),
                    "https://www.googleapis.com/auth/gmail.send",
                )
            },
        },
        Case {
            code: Reason::ImpersonationDenied,
            fault: "mailbox zed@example.com",
            remedy: "add alice@example.com to users[zed@example.com].delegates",
            setup: |a, _, _| a.mailbox = Mailbox::Address("zed@example.com".into()),
        },
        Case {
            code: Reason::AccountSuspended,
            fault: "users[carol@example.com]",
            remedy: "mailgate user unsuspend carol@example.com",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    login("carol@example.com"),
                    "carol@example.com",
                )
            },
        },
        Case {
            code: Reason::AccountMailDisabled,
            fault: "users[erin@example.com]",
            remedy: "users[erin@example.com].mail_enabled: true",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    login("erin@example.com"),
                    "erin@example.com",
                )
            },
        },
        Case {
            code: Reason::AccountMailDisabled,
            fault: "org_units[/nomail]",
            remedy: "org_units[/nomail].mail_enabled: true",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    login("frank@example.com"),
                    "frank@example.com",
                )
            },
        },
        Case {
            code: Reason::AccountUnderReview,
            fault: "users[dave@example.com]",
            remedy: "users[dave@example.com].status: active",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    login("dave@example.com"),
                    "dave@example.com",
                )
            },
        },
        Case {
            code: Reason::AccountSendingRevoked,
            fault: "users[gina@example.com]",
            remedy: "users[gina@example.com].abuse.state: healthy",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    login("gina@example.com"),
                    "gina@example.com",
                )
            },
        },
        Case {
            code: Reason::SenderNotOwned,
            fault: "address mallory@example.com",
            remedy: "add mallory@example.com to users[alice@example.com].send_as",
            setup: |a, _, _| *a = a.clone().from("mallory@example.com"),
        },
        Case {
            code: Reason::SenderNotOwned,
            fault: "smtp_relay.allowed_senders",
            remedy: "smtp_relay.allowed_senders",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::SmtpRelay,
                    Credential::RelayIp,
                    "someone@elsewhere.org",
                );
                a.transport.client_ip = Some(ip("192.0.2.7"));
            },
        },
        Case {
            code: Reason::SenderUnverified,
            fault: "address pending@example.com",
            remedy: "users[alice@example.com].send_as[pending@example.com].status: accepted",
            setup: |a, _, _| *a = a.clone().from("pending@example.com"),
        },
        Case {
            code: Reason::SenderDomainUnverified,
            fault: "domains[unverified.example]",
            remedy: "domains[unverified.example].verified: true",
            setup: |a, _, _| *a = a.clone().from("sales@unverified.example"),
        },
        Case {
            code: Reason::PolicyDenied,
            fault: "policies[freeze]",
            remedy: "policies[freeze].applies_to",
            setup: |_, d, _| {
                d.policies.push(Policy {
                    id: "freeze".into(),
                    description: Some("incident 42".into()),
                    applies_to: PolicyScope {
                        users: vec!["alice@example.com".into()],
                        ..Default::default()
                    },
                    rule: PolicyRule::DenySend,
                })
            },
        },
        Case {
            code: Reason::PolicyDenied,
            fault: "org_units[/noapi]",
            remedy: "org_units[/noapi].api_access: true",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Gmail,
                    oauth("hank@example.com"),
                    "hank@example.com",
                )
            },
        },
        Case {
            code: Reason::PolicyRecipientRestricted,
            fault: "policies[partners-only]",
            remedy: "policies[partners-only]",
            setup: |_, d, _| {
                d.policies.push(Policy {
                    id: "partners-only".into(),
                    description: None,
                    applies_to: PolicyScope {
                        org_units: vec!["/".into()],
                        ..Default::default()
                    },
                    rule: PolicyRule::AllowRecipientDomains {
                        domains: vec!["partner.example".into()],
                    },
                })
            },
        },
        Case {
            code: Reason::PolicyRecipientRestricted,
            fault: "org_units[/internal]",
            remedy: "org_units[/internal].external_recipients: true",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::Smtp,
                    login("ivy@example.com"),
                    "ivy@example.com",
                )
            },
        },
        Case {
            code: Reason::PolicyTooManyRecipients,
            fault: "limits.recipients_per_message",
            remedy: "limits.recipients_per_message (now 100)",
            setup: |a, _, _| {
                a.recipients = Some((0..101).map(|i| format!("r{i}@example.org")).collect())
            },
        },
        Case {
            code: Reason::LimitRate,
            fault: "limits.rate_units_per_minute",
            remedy: "on_exceed.rate: hold",
            setup: |_, _, c| c.set_rate_and_in_flight("alice@example.com", Some(NOW + 60_000), 0),
        },
        Case {
            code: Reason::LimitDailyMessages,
            fault: "limits.messages_per_day",
            remedy: "raise limits.messages_per_day for alice@example.com",
            setup: |_, _, c| c.preload("alice@example.com", NOW - 3_600_000, 2_000, 1),
        },
        Case {
            code: Reason::LimitDailyRecipients,
            fault: "limits.recipients_per_day",
            remedy: "limits.recipients_per_day",
            setup: |_, _, c| c.preload("alice@example.com", NOW - 3_600_000, 1, 10_000),
        },
        Case {
            code: Reason::LimitConcurrency,
            fault: "limits.concurrent_sends",
            remedy: "when sends in flight finish",
            setup: |_, _, c| c.set_rate_and_in_flight("alice@example.com", None, 10),
        },
        Case {
            code: Reason::MessageInvalid,
            fault: "message (Invalid To header)",
            remedy: "base64url",
            setup: |a, _, _| {
                a.body = Body::Invalid {
                    detail: "Invalid To header".into(),
                    field: None,
                }
            },
        },
        Case {
            code: Reason::MessageInvalid,
            fault: "message (Invalid From header: the message has 2 From header fields; RFC 5322 allows exactly one)",
            remedy: "RFC 5322 allows exactly one: remove every From header field but one",
            setup: |a, _, _| {
                a.header = Some(Originator {
                    from: vec![
                        vec!["ceo@example.com".into()],
                        vec!["alice@example.com".into()],
                    ],
                    sender: vec![],
                })
            },
        },
        Case {
            code: Reason::MessageInvalid,
            fault: "message (Invalid From header: the message has no From header field; RFC 5322 requires exactly one)",
            remedy: "add one From header field",
            setup: |a, _, _| a.header = Some(Originator::default()),
        },
        Case {
            code: Reason::MessageInvalid,
            fault: "message (Invalid From header: From names 2 mailboxes and there is no Sender field; RFC 5322 requires a Sender naming the one that sends)",
            remedy: "add a Sender header field",
            setup: |a, _, _| {
                a.header = Some(Originator {
                    from: vec![vec!["alice@example.com".into(), "al@example.com".into()]],
                    sender: vec![],
                })
            },
        },
        Case {
            code: Reason::SenderNotOwned,
            fault: "address ceo@example.com",
            remedy: "add ceo@example.com to users[alice@example.com].send_as",
            setup: |a, _, _| {
                a.header = Some(Originator {
                    from: vec![vec!["alice@example.com".into(), "ceo@example.com".into()]],
                    sender: vec![vec!["alice@example.com".into()]],
                })
            },
        },
        Case {
            code: Reason::SenderNotOwned,
            fault: "smtp_relay.allowed_senders",
            remedy: "envelope sender, From and Sender alike",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::SmtpRelay,
                    Credential::RelayIp,
                    "support@example.com",
                );
                a.header = Some(Originator::from_address("ceo@evil.test"));
                a.transport.client_ip = Some(ip("192.0.2.7"));
            },
        },
        Case {
            code: Reason::AccountSuspended,
            fault: "users[carol@example.com]",
            remedy: "mailgate user unsuspend carol@example.com",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::SmtpRelay,
                    Credential::RelayIp,
                    "support@example.com",
                );
                a.header = Some(Originator::from_address("carol@example.com"));
                a.transport.client_ip = Some(ip("192.0.2.7"));
            },
        },
        Case {
            code: Reason::AccountSendingRevoked,
            fault: "users[gina@example.com]",
            remedy: "users[gina@example.com].abuse.state: healthy",
            setup: |a, _, _| {
                *a = as_user(
                    a.clone(),
                    Door::SmtpRelay,
                    Credential::RelayIp,
                    "support@example.com",
                );
                a.header = Some(Originator::from_address("gina@example.com"));
                a.transport.client_ip = Some(ip("192.0.2.7"));
            },
        },
        Case {
            code: Reason::MessageNoRecipients,
            fault: "message (recipients)",
            remedy: "add at least one recipient",
            setup: |a, _, _| a.recipients = Some(vec![]),
        },
        Case {
            code: Reason::MessageTooLarge,
            fault: "limits.max_message_bytes",
            remedy: "limits.max_message_bytes",
            setup: |a, _, _| a.size = Some(40_000_000),
        },
    ]
}

fn run_case(c: &Case, mode: Mode) -> (Decision, SendAttempt, Directory) {
    let mut a = base();
    let mut d = fixture();
    let counters = MemoryCounters::new();
    (c.setup)(&mut a, &mut d, &counters);
    let ix = DirectoryIndex::new(&d);
    (decide(&a, &ix, &counters, NOW, mode), a, d)
}

#[test]
fn base_attempt_is_allowed_on_every_door() {
    let ix = DirectoryIndex::new(&fixture());
    let c = MemoryCounters::new();
    let mut relay = as_user(
        base(),
        Door::SmtpRelay,
        Credential::RelayIp,
        "alice@example.com",
    );
    relay.transport.client_ip = Some(ip("192.0.2.7"));
    let mut k2 = as_user(base(), Door::Sendgrid, api_key("k2"), "support@example.com");
    k2.transport.client_ip = Some(ip("10.9.9.9"));
    k2.transport.referrer = Some("https://app.example.com/x".into());
    let attempts = [
        base(),
        as_user(base(), Door::Sendgrid, api_key("k1"), "team@example.com"),
        as_user(
            base(),
            Door::Smtp,
            login("alice@example.com"),
            "al@example.com",
        ),
        SendAttempt {
            mailbox: Mailbox::Address("bob@example.com".into()),
            ..base().from("bob@example.com")
        },
        as_user(
            base(),
            Door::Gmail,
            sa(
                Some("alice@example.com"),
                "https://www.googleapis.com/auth/gmail.send",
            ),
            "alice@example.com",
        ),
        relay,
        k2,
    ];
    for a in attempts {
        let d = decide(&a, &ix, &c, NOW, Mode::Explain);
        assert_eq!(
            d.verdict,
            Verdict::Allowed,
            "{:?}\n{:#?}",
            a.credential,
            d.denials
        );
        assert!(d.complete);
        assert_eq!(d.checks.len(), CHECKS.len());
    }
}

#[test]
fn decision_table_one_case_per_code() {
    for (i, c) in cases().iter().enumerate() {
        let (d, a, _) = run_case(c, Mode::Enforce);
        let den = d
            .denial()
            .unwrap_or_else(|| panic!("case {i} ({}) was not denied: {:#?}", c.code, d.checks));
        assert_eq!(den.code, c.code, "case {i}: {:#?}", d.checks);
        assert_eq!(
            den.object_at_fault.to_string(),
            c.fault,
            "case {i} ({})",
            c.code
        );
        assert!(
            den.remedy.contains(c.remedy),
            "case {i} ({}): remedy {:?} lacks {:?}",
            c.code,
            den.remedy,
            c.remedy
        );
        assert_eq!(d.verdict, Verdict::Denied);
        // Enforcement stops at the failure; explain agrees on the first one.
        assert_eq!(d.checks.last().map(|c| c.outcome), Some(Outcome::Fail));
        let ix = DirectoryIndex::new(&run_case(c, Mode::Explain).2);
        let _ = (a, ix);
        let (e, _, _) = run_case(c, Mode::Explain);
        assert_eq!(e.first_failure().map(|f| f.check), Some(c.code));
        // Every door can render it (or refuses the handshake).
        if c.code != Reason::TlsVersion {
            assert!(den.gmail().is_some() && den.smtp().is_some() && den.sendgrid().is_some());
        }
    }
}

#[test]
fn every_check_code_is_covered_by_the_table() {
    let covered: std::collections::BTreeSet<Reason> = cases().iter().map(|c| c.code).collect();
    for r in CHECKS {
        assert!(covered.contains(r), "no decision-table case for {r}");
    }
}

#[test]
fn limit_denials_carry_count_limit_and_reset() {
    let c = MemoryCounters::new();
    c.preload("alice@example.com", NOW - 3_600_000, 2_000, 1);
    let ix = DirectoryIndex::new(&fixture());
    let d = decide(&base(), &ix, &c, NOW, Mode::Enforce);
    let den = d.denial().unwrap();
    let l = den.limit.as_ref().unwrap();
    assert_eq!(
        (l.current, l.limit, l.action),
        (2_000, 2_000, ExceedAction::Reject)
    );
    assert_eq!(l.reset_at_ms, Some(NOW - 3_600_000 + counters::DAY_MS));
    assert_eq!(den.retry_after_secs(NOW), Some(23 * 3600));
    let g = den.gmail().unwrap();
    assert_eq!(g.spec.http_status, 429);
    assert!(
        g.message
            .starts_with("User-rate limit exceeded.  Retry after 2027-"),
        "{}",
        g.message
    );
    assert!(g.message.ends_with("Z (Mail sending)"));
    let s = den.smtp().unwrap();
    assert_eq!((s.code, s.enhanced), (550, "5.4.5"));
    assert_eq!(den.sendgrid().unwrap().message, "Maximum credits exceeded");
}

#[test]
fn hold_accepts_and_says_so() {
    let mut dir = fixture();
    dir.limits
        .on_exceed
        .insert(LimitName::DailyMessages, ExceedAction::Hold);
    let ix = DirectoryIndex::new(&dir);
    let c = MemoryCounters::new();
    c.preload("alice@example.com", NOW - 1_000, 2_000, 1);
    let d = decide(&base(), &ix, &c, NOW, Mode::Enforce);
    assert_eq!(d.verdict, Verdict::Held);
    assert_eq!(d.holds.len(), 1);
    assert_eq!(d.holds[0].name, LimitName::DailyMessages);
    assert_eq!(commit(&d, &c, NOW).unwrap(), CommitOutcome::Admitted);
    assert_eq!(c.usage("alice@example.com", NOW).messages_24h, 2_001);
}

#[test]
fn commit_counts_only_accepted_sends_and_detects_races() {
    let mut dir = fixture();
    dir.limits.messages_per_day = Some(1);
    let ix = DirectoryIndex::new(&dir);
    let c = MemoryCounters::new();
    let first = decide(&base(), &ix, &c, NOW, Mode::Enforce);
    let second = decide(&base(), &ix, &c, NOW, Mode::Enforce);
    assert!(first.accepted() && second.accepted());
    assert_eq!(commit(&first, &c, NOW).unwrap(), CommitOutcome::Admitted);
    // The second decision raced the first: nothing is consumed.
    assert_eq!(
        commit(&second, &c, NOW).unwrap(),
        CommitOutcome::Raced(LimitName::DailyMessages)
    );
    let u = c.usage("alice@example.com", NOW);
    assert_eq!((u.messages_24h, u.in_flight), (1, 1));
    c.release("alice@example.com");
    assert_eq!(c.usage("alice@example.com", NOW).in_flight, 0);
    // A denied decision consumes nothing.
    let denied = decide(&base(), &ix, &c, NOW, Mode::Enforce);
    assert_eq!(denied.verdict, Verdict::Denied);
    assert_eq!(
        commit(&denied, &c, NOW).unwrap(),
        CommitOutcome::NotAccepted
    );
    assert_eq!(c.usage("alice@example.com", NOW).messages_24h, 1);
    // A day later the window is empty again.
    assert_eq!(
        c.usage("alice@example.com", NOW + counters::DAY_MS)
            .messages_24h,
        0
    );
}

#[test]
fn rewrite_mode_replaces_unowned_from_and_records_it() {
    let mut dir = fixture();
    dir.organisation.on_unowned_from = UnownedFrom::Rewrite;
    let ix = DirectoryIndex::new(&dir);
    let c = MemoryCounters::new();
    let mut a = base();
    a.header = Some(Originator::from_address("ceo@bigcorp.example"));
    let d = decide(&a, &ix, &c, NOW, Mode::Explain);
    assert_eq!(d.verdict, Verdict::Allowed, "{:#?}", d.denials);
    assert_eq!(
        d.rewrites,
        vec![Rewrite {
            header: "From",
            original: "ceo@bigcorp.example".into(),
            replacement: "alice@example.com".into()
        }]
    );
    let check = d
        .checks
        .iter()
        .find(|c| c.check == Reason::SenderNotOwned)
        .unwrap();
    assert!(check.detail.contains("rewritten"), "{}", check.detail);
    // The envelope is never rewritten.
    a.envelope_from = Some("ceo@bigcorp.example".into());
    let d = decide(&a, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(d.denial().map(|d| d.code), Some(Reason::SenderNotOwned));
}

#[test]
fn rewrite_mode_rewrites_only_a_from_naming_one_address() {
    let mut dir = fixture();
    dir.organisation.on_unowned_from = UnownedFrom::Rewrite;
    let ix = DirectoryIndex::new(&dir);
    let c = MemoryCounters::new();
    // Several addresses, one unowned: refused, whatever the rewrite setting.
    let mut a = base();
    a.header = Some(Originator {
        from: vec![vec![
            "alice@example.com".into(),
            "ceo@bigcorp.example".into(),
        ]],
        sender: vec![vec!["alice@example.com".into()]],
    });
    let d = decide(&a, &ix, &c, NOW, Mode::Enforce);
    let den = d.denial().unwrap();
    assert_eq!(den.code, Reason::SenderNotOwned);
    assert_eq!(
        den.object_at_fault.to_string(),
        "address ceo@bigcorp.example"
    );
    assert!(
        den.message.contains("only a From that names one address"),
        "{}",
        den.message
    );
    assert!(d.rewrites.is_empty());
    // An unowned Sender is never rewritten either.
    a.header = Some(Originator {
        from: vec![vec!["alice@example.com".into()]],
        sender: vec![vec!["ceo@bigcorp.example".into()]],
    });
    let d = decide(&a, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(d.denial().map(|d| d.code), Some(Reason::SenderNotOwned));
    assert!(d.denial().unwrap().message.contains("never Sender"));
    // Several owned addresses with an owned Sender: allowed, nothing rewritten.
    a.header = Some(Originator {
        from: vec![vec!["alice@example.com".into(), "team@example.com".into()]],
        sender: vec![vec!["al@example.com".into()]],
    });
    let d = decide(&a, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(d.verdict, Verdict::Allowed, "{:#?}", d.denials);
    assert!(d.rewrites.is_empty());
}

#[test]
fn every_from_and_sender_address_is_checked() {
    let ix = DirectoryIndex::new(&fixture());
    let c = MemoryCounters::new();
    let with = |from: &[&str], sender: &[&str]| {
        let mut a = base();
        a.header = Some(Originator {
            from: vec![from.iter().map(|s| s.to_string()).collect()],
            sender: if sender.is_empty() {
                vec![]
            } else {
                vec![sender.iter().map(|s| s.to_string()).collect()]
            },
        });
        let d = decide(&a, &ix, &c, NOW, Mode::Enforce);
        d.denial().map(|d| (d.code, d.object_at_fault.to_string()))
    };
    // The unowned address is found wherever it stands.
    for (from, sender) in [
        (
            &["ceo@example.com", "alice@example.com"][..],
            &["alice@example.com"][..],
        ),
        (
            &["alice@example.com", "ceo@example.com"],
            &["alice@example.com"],
        ),
        (
            &["alice@example.com", "al@example.com"],
            &["ceo@example.com"],
        ),
        (&["alice@example.com"], &["ceo@example.com"]),
    ] {
        assert_eq!(
            with(from, sender),
            Some((Reason::SenderNotOwned, "address ceo@example.com".into())),
            "{from:?} {sender:?}"
        );
    }
    // A pending send-as address in second place, and an unverified domain in Sender.
    assert_eq!(
        with(
            &["alice@example.com", "pending@example.com"],
            &["al@example.com"]
        )
        .map(|d| d.0),
        Some(Reason::SenderUnverified)
    );
    assert_eq!(
        with(&["alice@example.com"], &["sales@unverified.example"]).map(|d| d.0),
        Some(Reason::SenderDomainUnverified)
    );
    assert_eq!(
        with(
            &["alice@example.com", "team@example.com"],
            &["alice@example.com"]
        ),
        None
    );
}

#[test]
fn originator_shapes() {
    let o = |from: &[&[&str]], sender: &[&[&str]]| Originator {
        from: from
            .iter()
            .map(|f| f.iter().map(|s| s.to_string()).collect())
            .collect(),
        sender: sender
            .iter()
            .map(|f| f.iter().map(|s| s.to_string()).collect())
            .collect(),
    };
    use OriginatorProblem as P;
    assert_eq!(o(&[&["a@x.com"]], &[]).problem(), None);
    assert_eq!(
        o(&[&["a@x.com", "b@x.com"]], &[&["a@x.com"]]).problem(),
        None
    );
    assert_eq!(o(&[], &[]).problem(), Some(P::NoFrom));
    assert_eq!(o(&[], &[&["a@x.com"]]).problem(), Some(P::NoFrom));
    assert_eq!(
        o(&[&["a@x.com"], &["a@x.com"]], &[]).problem(),
        Some(P::SeveralFrom { fields: 2 })
    );
    assert_eq!(
        o(&[&["a@x.com"]], &[&["a@x.com"], &["b@x.com"]]).problem(),
        Some(P::SeveralSender { fields: 2 })
    );
    assert_eq!(o(&[&[]], &[]).problem(), Some(P::EmptyFrom));
    assert_eq!(
        o(&[&["a@x.com", "b@x.com"]], &[]).problem(),
        Some(P::SenderRequired { addresses: 2 })
    );
    assert_eq!(
        o(&[&["a@x.com"]], &[&["a@x.com", "b@x.com"]]).problem(),
        Some(P::SenderNotOneMailbox { addresses: 2 })
    );
    assert_eq!(
        o(&[&["a@x.com"]], &[&[]]).problem(),
        Some(P::SenderNotOneMailbox { addresses: 0 })
    );
    assert_eq!(
        o(&[&["a@x.com", ""]], &[&["a@x.com"]]).problem(),
        Some(P::NotAnAddress {
            header: "From",
            value: String::new()
        })
    );
    let glued = o(&[&["a@x.com b@y.com"]], &[]).problem().unwrap();
    assert_eq!(
        glued.detail(),
        "Invalid From header: `a@x.com b@y.com` in the From field is not an address"
    );
    // What reaches an SMTP reply is printable ASCII, and short.
    let hostile = format!("\r\n250 ok{}@x.com", "é".repeat(100));
    let p = o(&[&[hostile.as_str()]], &[]).problem().unwrap();
    assert!(
        p.remedy().chars().all(|c| c.is_ascii_graphic() || c == ' '),
        "{}",
        p.remedy()
    );
    assert!(p.remedy().len() < 400);
}

#[test]
fn plausible_addresses() {
    for ok in [
        "a@x.com",
        "A.B+c@sub.x.com",
        "\"a b\"@x.com",
        "a@[192.0.2.1]",
        "ü@exämple.com",
    ] {
        assert!(plausible_address(ok), "{ok}");
    }
    for bad in [
        "",
        "a",
        "@x.com",
        "a@",
        "a@x.com b@y.com",
        "a@x.comb@y.com",
        "<a@x.com>",
        "a@x.com,b@y.com",
        "a@.x.com",
        "a@x.com.",
        "a\r\n@x.com",
        "a@x.com\t",
    ] {
        assert!(!plausible_address(bad), "{bad:?}");
    }
}

#[test]
fn relay_checks_every_header_address() {
    let ix = DirectoryIndex::new(&fixture());
    let c = MemoryCounters::new();
    let relay = |from: Option<Originator>| {
        let mut a = as_user(
            base(),
            Door::SmtpRelay,
            Credential::RelayIp,
            "support@example.com",
        );
        a.transport.client_ip = Some(ip("192.0.2.7"));
        a.header = from;
        decide(&a, &ix, &c, NOW, Mode::Enforce)
    };
    assert_eq!(
        relay(Some(Originator::from_address("alice@example.com"))).verdict,
        Verdict::Allowed
    );
    // A domain address that is nobody's is fine under domain_addresses.
    assert_eq!(
        relay(Some(Originator::from_address("noreply@example.com"))).verdict,
        Verdict::Allowed
    );
    let code = |o: Option<Originator>| relay(o).denial().map(|d| d.code);
    assert_eq!(
        code(Some(Originator::from_address("ceo@evil.test"))),
        Some(Reason::SenderNotOwned)
    );
    assert_eq!(
        code(Some(Originator::from_address("carol@example.com"))),
        Some(Reason::AccountSuspended)
    );
    assert_eq!(
        code(Some(Originator::from_address("gina@example.com"))),
        Some(Reason::AccountSendingRevoked)
    );
    assert_eq!(
        code(Some(Originator::from_address("dave@example.com"))),
        Some(Reason::AccountUnderReview)
    );
    // Through Sender too, and an alias of a user counts as the user.
    let o = Originator {
        from: vec![vec!["alice@example.com".into()]],
        sender: vec![vec!["ceo@evil.test".into()]],
    };
    assert_eq!(code(Some(o)), Some(Reason::SenderNotOwned));
    assert_eq!(
        code(Some(Originator::default())),
        Some(Reason::MessageInvalid)
    );
    // Before the header is known (MAIL FROM, RCPT TO) nothing is decided about it.
    let d = relay(None);
    assert!(d.accepted() && !d.complete);
    // An unverified organisation domain in the header is refused like in the envelope.
    assert_eq!(
        code(Some(Originator::from_address("x@unverified.example"))),
        Some(Reason::SenderDomainUnverified)
    );
}

#[test]
fn smtp_mail_from_time_leaves_later_checks_pending() {
    let ix = DirectoryIndex::new(&fixture());
    let c = MemoryCounters::new();
    let mut a = SendAttempt::new(Door::Smtp, login("alice@example.com"));
    a.envelope_from = Some("alice@example.com".into());
    let d = decide(&a, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(d.verdict, Verdict::Allowed);
    assert!(!d.complete);
    assert_eq!(commit(&d, &c, NOW).unwrap(), CommitOutcome::NotAccepted);
    let pending: Vec<_> = d
        .checks
        .iter()
        .filter(|c| c.outcome == Outcome::Pending)
        .map(|c| c.check)
        .collect();
    assert!(pending.contains(&Reason::MessageNoRecipients));
    assert!(pending.contains(&Reason::MessageInvalid));
    // ...but an unowned MAIL FROM is refused at once.
    a.envelope_from = Some("mallory@example.com".into());
    let d = decide(&a, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(d.denial().map(|d| d.code), Some(Reason::SenderNotOwned));
}

#[test]
fn explain_lists_every_failure_with_its_remedy() {
    // Suspended AND lacks the send-as address AND over the daily limit.
    let ix = DirectoryIndex::new(&fixture());
    let c = MemoryCounters::new();
    c.preload("carol@example.com", NOW - 1_000, 2_000, 1);
    let a = as_user(
        base(),
        Door::Smtp,
        login("carol@example.com"),
        "support@example.com",
    );
    let d = decide(&a, &ix, &c, NOW, Mode::Explain);
    let codes: Vec<_> = d.denials.iter().map(|d| d.code).collect();
    assert_eq!(
        codes,
        vec![
            Reason::AccountSuspended,
            Reason::SenderNotOwned,
            Reason::LimitDailyMessages
        ]
    );
    assert!(d.denials.iter().all(|d| !d.remedy.is_empty()));
    assert_eq!(d.checks.len(), CHECKS.len());
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["denials"][0]["code"], "account.suspended");
    assert_eq!(json["checks"][0]["check"], "tls.required");
    let enforce = decide(&a, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(enforce.denials.len(), 1);
}

/// `explain` without the client IP or referrer does not guess: a key restricted by IP or
/// referrer is "not checked" (neither pass nor fail, the verdict not denied by it), while a
/// real send without them is refused.
#[test]
fn explain_without_a_fact_does_not_check_what_needs_it() {
    let ix = DirectoryIndex::new(&fixture());
    let c = MemoryCounters::new();
    let a = as_user(base(), Door::Sendgrid, api_key("k2"), "alice@example.com");
    assert_eq!(a.transport.client_ip, None);
    let x = decide(&a, &ix, &c, NOW, Mode::Explain);
    let outcome = |d: &Decision, r: Reason| d.checks.iter().find(|c| c.check == r).unwrap().clone();
    for (r, give) in [
        (Reason::KeyIpBlocked, "give --ip"),
        (Reason::KeyReferrerBlocked, "give --referrer"),
    ] {
        let ch = outcome(&x, r);
        assert_eq!(ch.outcome, Outcome::NotChecked, "{ch:?}");
        assert!(ch.detail.starts_with("not checked: "), "{}", ch.detail);
        assert!(ch.detail.contains(give), "{}", ch.detail);
        assert!(ch.finding.is_none());
    }
    assert_eq!(x.verdict, Verdict::Allowed, "{:#?}", x.denials);
    assert!(x.denials.is_empty());
    assert!(!x.complete, "an explain with facts missing is not complete");
    let json = serde_json::to_value(&x).unwrap();
    let ipc = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "key.ip_blocked")
        .unwrap()
        .clone();
    assert_eq!(ipc["outcome"], "not_checked");

    // A real send without the facts is refused at the first of them.
    let e = decide(&a, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(e.verdict, Verdict::Denied);
    assert_eq!(e.denial().map(|d| d.code), Some(Reason::KeyIpBlocked));
    assert_eq!(commit(&e, &c, NOW).unwrap(), CommitOutcome::NotAccepted);

    // Given, they are checked in explain too.
    let mut given = a.clone();
    given.transport.client_ip = Some(ip("203.0.113.5"));
    given.transport.referrer = Some("https://app.example.com/x".into());
    let x = decide(&given, &ix, &c, NOW, Mode::Explain);
    assert_eq!(outcome(&x, Reason::KeyIpBlocked).outcome, Outcome::Fail);
    assert_eq!(
        outcome(&x, Reason::KeyReferrerBlocked).outcome,
        Outcome::Pass
    );
    assert!(x.complete);

    // No Referer exists on SMTP: its absence is a fact there, not a missing one.
    let mut smtp = as_user(base(), Door::Smtp, api_key("k2"), "alice@example.com");
    smtp.transport.client_ip = Some(ip("10.1.1.1"));
    let x = decide(&smtp, &ix, &c, NOW, Mode::Explain);
    assert_eq!(
        outcome(&x, Reason::KeyReferrerBlocked).outcome,
        Outcome::Fail
    );

    // The IP-trusted relay without an IP: not checked either.
    let relay = as_user(
        base(),
        Door::SmtpRelay,
        Credential::RelayIp,
        "alice@example.com",
    );
    let x = decide(&relay, &ix, &c, NOW, Mode::Explain);
    assert_eq!(
        outcome(&x, Reason::RelayIpNotAllowed).outcome,
        Outcome::NotChecked
    );
    let e = decide(&relay, &ix, &c, NOW, Mode::Enforce);
    assert_eq!(e.denial().map(|d| d.code), Some(Reason::RelayIpNotAllowed));
}

/// TLS versions read as people write them.
#[test]
fn tls_versions_display_as_numbers() {
    assert_eq!(TlsVersion::Tls11.to_string(), "TLS 1.1");
    let ix = DirectoryIndex::new(&fixture());
    let mut a = base();
    a.transport.tls = Some(TlsVersion::Tls11);
    let d = decide(&a, &ix, &MemoryCounters::new(), NOW, Mode::Enforce);
    assert!(
        d.denial()
            .unwrap()
            .message
            .contains("TLS 1.1, older than TLS 1.2"),
        "{}",
        d.denial().unwrap().message
    );
}

#[test]
fn referrer_globs() {
    use super::checks::referrer_matches as m;
    assert!(m("*.example.com/*", "https://app.example.com/page"));
    assert!(m("https://example.com/*", "http://example.com/"));
    assert!(!m("*.example.com/*", "https://example.org/"));
    assert!(m("*", "anything"));
}

// ---------------------------------------------------------------------------------------------
// Random directories and attempts (a tiny seeded RNG: fast enough for 100,000 cases per run).

pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub(super) fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(super) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub(super) fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    fn opt_bool(&mut self) -> Option<bool> {
        match self.below(4) {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
}

const ADDRS: &[&str] = &[
    "u0@example.com",
    "u1@example.com",
    "u2@example.com",
    "U3@Example.com",
    "a0@example.com",
    "s0@example.com",
    "s1@other.example",
    "g0@example.com",
    "x@example.org",
    "y@sub.example.com",
    "z@partner.example",
    "nobody@example.com",
];

const SCOPE_POOL: &[&str] = &[
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://www.googleapis.com/auth/gmail.compose",
];

fn some_addrs(r: &mut Rng, max: u64) -> Vec<String> {
    (0..r.below(max + 1))
        .map(|_| r.pick(ADDRS).to_string())
        .collect()
}

pub(super) fn random_directory(r: &mut Rng) -> Directory {
    let mut d = Directory::default();
    d.domains = vec![
        Domain {
            name: "example.com".into(),
            verified: r.chance(85),
            verification_token: None,
        },
        Domain {
            name: "other.example".into(),
            verified: r.chance(50),
            verification_token: None,
        },
    ];
    if r.chance(30) {
        d.organisation.default_permissions.clear();
    }
    if r.chance(30) {
        d.organisation.on_unowned_from = UnownedFrom::Rewrite;
    }
    d.org_units = ["/", "/a", "/a/b"]
        .iter()
        .map(|p| OrgUnit {
            mail_enabled: if r.chance(85) { None } else { r.opt_bool() },
            api_access: if r.chance(85) { None } else { r.opt_bool() },
            external_recipients: if r.chance(85) { None } else { r.opt_bool() },
            limits: LimitSettings {
                messages_per_day: r.chance(20).then(|| r.below(4)),
                ..Default::default()
            },
            ..ou(p)
        })
        .collect();
    d.roles = vec![
        Role {
            name: "sender".into(),
            permissions: vec!["mail.send".into()],
        },
        Role {
            name: "viewer".into(),
            permissions: vec![],
        },
    ];
    for i in 0..4 {
        let mut u = user(&format!("u{i}@example.com"));
        if r.chance(15) {
            u.status = *r.pick(&[UserStatus::Suspended, UserStatus::UnderReview]);
        }
        u.mail_enabled = r.chance(92);
        u.org_unit = r.pick(&["/", "/", "/a", "/a/b"]).to_string();
        if r.chance(40) {
            u.aliases = vec![format!("a{i}@example.com")];
        }
        let send_as_addr = ["s0@example.com", "s1@other.example"][r.below(2) as usize];
        if r.chance(50) {
            u.send_as = vec![send_as(
                send_as_addr,
                if r.chance(70) {
                    SendAsStatus::Accepted
                } else {
                    SendAsStatus::Pending
                },
            )];
        }
        if r.chance(30) {
            u.delegates = vec![format!("u{}@example.com", r.below(4))];
        }
        if r.chance(50) {
            u.roles = vec![r.pick(&["sender", "viewer"]).to_string()];
        }
        if r.chance(8) {
            u.abuse.state = AbuseState::Revoked;
        }
        if r.chance(15) {
            u.limits.recipients_per_message = Some(r.below(4));
        }
        if r.chance(10) {
            u.limits.max_message_bytes = Some(r.below(2_000));
        }
        d.users.push(u);
    }
    // "U3@Example.com" in ADDRS exercises case-insensitive lookups of u3.
    d.groups = vec![Group {
        email: "g0@example.com".into(),
        name: None,
        members: some_addrs(r, 2),
        members_can_send_as: r.chance(60),
    }];
    d.projects = vec![
        Project {
            id: "p0".into(),
            number: "100".into(),
            enabled_apis: [GMAIL_API, SENDGRID_API]
                .iter()
                .filter(|_| r.chance(80))
                .map(|s| s.to_string())
                .collect(),
        },
        Project {
            id: "p1".into(),
            number: "101".into(),
            enabled_apis: vec![],
        },
    ];
    d.oauth_clients = (0..2)
        .map(|i| OAuthClient {
            client_id: format!("c{i}"),
            name: None,
            secret: None,
            secret_sha256: None,
            secret_hash: None,
            project: "p0".into(),
            redirect_uris: vec![],
            disabled: r.chance(10),
        })
        .collect();
    d.service_accounts = vec![ServiceAccount {
        email: "sa@p0.iam.example".into(),
        project: "p0".into(),
        client_id: "900".into(),
        display_name: None,
        keys: vec![],
        disabled: r.chance(10),
    }];
    if r.chance(70) {
        d.domain_wide_delegation = vec![DelegationGrant {
            client_id: "900".into(),
            scopes: SCOPE_POOL
                .iter()
                .filter(|_| r.chance(50))
                .map(|s| s.to_string())
                .collect(),
        }];
    }
    d.api_keys = (0..3)
        .map(|i| {
            let mut k = key(&format!("k{i}"), &format!("u{}@example.com", r.below(5)));
            k.project = r
                .pick(&[Some("p0"), Some("p1"), Some("p9"), None])
                .map(str::to_owned);
            if r.chance(20) {
                k.permissions.clear();
            }
            if r.chance(25) {
                k.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
            }
            if r.chance(20) {
                k.allowed_referrers = vec!["*.example.com/*".into()];
            }
            if r.chance(20) {
                k.allowed_apis = vec![r.pick(&[GMAIL_API, SENDGRID_API, "smtp"]).to_string()];
            }
            if r.chance(10) {
                let t = (NOW / 1000) as i64 + *r.pick(&[-10i64, 10]);
                k.expires = Some(time::OffsetDateTime::from_unix_timestamp(t).unwrap());
            }
            k.revoked = r.chance(8);
            k
        })
        .collect();
    for i in 0..r.below(3) {
        let rule = match r.below(4) {
            0 => PolicyRule::DenySend,
            1 => PolicyRule::InternalRecipientsOnly,
            2 => PolicyRule::AllowRecipientDomains {
                domains: vec!["example.org".into(), "example.com".into()],
            },
            _ => PolicyRule::DenyRecipientDomains {
                domains: vec!["partner.example".into()],
            },
        };
        let applies_to = match r.below(4) {
            0 => PolicyScope::default(),
            1 => PolicyScope {
                users: vec![r.pick(ADDRS).to_string()],
                ..Default::default()
            },
            2 => PolicyScope {
                org_units: vec![r.pick(&["/a", "/a/b", "/"]).to_string()],
                ..Default::default()
            },
            _ => PolicyScope {
                groups: vec!["g0@example.com".into()],
                ..Default::default()
            },
        };
        d.policies.push(Policy {
            id: format!("pol{i}"),
            description: None,
            applies_to,
            rule,
        });
    }
    d.limits = LimitSettings {
        messages_per_day: r.chance(30).then(|| r.below(5)),
        recipients_per_day: r.chance(30).then(|| r.below(8)),
        recipients_per_message: r.chance(20).then(|| r.below(5)),
        rate_units_per_minute: r.chance(20).then(|| *r.pick(&[0, 50, 100, 300, 15_000])),
        concurrent_sends: r.chance(20).then(|| r.below(3)),
        max_message_bytes: None,
        on_exceed: [
            LimitName::Rate,
            LimitName::DailyMessages,
            LimitName::DailyRecipients,
            LimitName::Concurrency,
        ]
        .into_iter()
        .filter(|_| r.chance(25))
        .map(|l| (l, ExceedAction::Hold))
        .collect(),
    };
    d.smtp_relay = SmtpRelay {
        allowed_ips: if r.chance(70) {
            vec!["192.0.2.0/24".parse().unwrap()]
        } else {
            vec![]
        },
        allowed_senders: *r.pick(&[
            RelaySenders::RegisteredUsers,
            RelaySenders::DomainAddresses,
            RelaySenders::Any,
        ]),
        require_auth: r.chance(15),
        require_tls: r.chance(20),
    };
    d
}

/// Entries a broken From or Sender field yields: nothing, a bare name, two addresses a parser
/// glued together, a second `@`.
const NOT_ADDRESSES: &[&str] = &[
    "",
    "Chief Executive",
    "u0@example.com x@example.org",
    "u0@example.com@evil.example",
];

fn random_field(r: &mut Rng, first: Option<&str>) -> Vec<String> {
    let n = match r.below(100) {
        0..=1 => 0,
        2..=87 => 1,
        88..=96 => 2,
        _ => 3,
    };
    (0..n)
        .map(|i| match (i, first) {
            _ if r.chance(2) => r.pick(NOT_ADDRESSES).to_string(),
            (0, Some(f)) if r.chance(90) => f.to_owned(),
            _ => r.pick(ADDRS).to_string(),
        })
        .collect()
}

/// The header's From and Sender fields: mostly one From naming `from`, sometimes none or two
/// fields, several addresses (with or without a Sender), a Sender, broken entries.
fn random_originator(r: &mut Rng, from: Option<&str>) -> Originator {
    let from_fields = match r.below(100) {
        0..=3 => 0,
        4..=95 => 1,
        _ => 2,
    };
    let sender_fields = match r.below(100) {
        0..=87 => 0,
        88..=97 => 1,
        _ => 2,
    };
    Originator {
        from: (0..from_fields)
            .map(|i| random_field(r, from.filter(|_| i == 0)))
            .collect(),
        sender: (0..sender_fields).map(|_| random_field(r, from)).collect(),
    }
}

pub(super) fn random_attempt(r: &mut Rng) -> SendAttempt {
    let door = *r.pick(&[Door::Gmail, Door::Sendgrid, Door::Smtp, Door::SmtpRelay]);
    let user = |r: &mut Rng| {
        r.pick(&[
            "u0@example.com",
            "u1@example.com",
            "u2@example.com",
            "U3@Example.com",
            "a0@example.com",
            "nobody@example.com",
        ])
        .to_string()
    };
    let scopes = |r: &mut Rng| -> Vec<String> {
        SCOPE_POOL
            .iter()
            .filter(|_| r.chance(40))
            .map(|s| s.to_string())
            .collect()
    };
    let credential = match r.below(12) {
        0 => Credential::None,
        1 | 2 => Credential::OauthUser {
            user: user(r),
            client_id: r.pick(&["c0", "c1", "c9"]).to_string(),
            project: r.pick(&["p0", "p1", "100", "p9"]).to_string(),
            scopes: scopes(r),
        },
        3 | 4 => Credential::ServiceAccount {
            email: r
                .pick(&[
                    "sa@p0.iam.example",
                    "sa@p0.iam.example",
                    "ghost@p0.iam.example",
                ])
                .to_string(),
            project: "p0".into(),
            scopes: scopes(r),
            subject: r.chance(80).then(|| user(r)),
        },
        5 | 6 => Credential::ApiKey {
            key_id: r.pick(&["k0", "k1", "k2", "k9"]).to_string(),
        },
        7 | 8 => Credential::SmtpLogin { user: user(r) },
        9 | 10 => Credential::RelayIp,
        _ => Credential::Refused {
            state: *r.pick(&[
                CredentialState::Invalid,
                CredentialState::Expired,
                CredentialState::Revoked,
                CredentialState::Locked,
            ]),
            presented: Some("whoever".into()),
        },
    };
    let from = r.chance(85).then(|| r.pick(ADDRS).to_string());
    let envelope_from = if r.chance(80) {
        from.clone()
    } else if r.chance(35) {
        // A null reverse-path (`MAIL FROM:<>`, a bounce).
        Some(String::new())
    } else {
        r.chance(70).then(|| r.pick(ADDRS).to_string())
    };
    let header = if r.chance(5) {
        None
    } else {
        Some(random_originator(r, from.as_deref()))
    };
    SendAttempt {
        door,
        action: Action::Send,
        transport: Transport {
            tls: *r.pick(&[
                None,
                Some(TlsVersion::Tls11),
                Some(TlsVersion::Tls12),
                Some(TlsVersion::Tls13),
                Some(TlsVersion::Tls13),
            ]),
            listener_requires_tls: r.chance(50),
            client_ip: *r.pick(&[
                None,
                Some(ip("10.1.1.1")),
                Some(ip("192.0.2.5")),
                Some(ip("203.0.113.1")),
            ]),
            referrer: r
                .pick(&[
                    None,
                    Some("https://app.example.com/x"),
                    Some("https://evil.org/"),
                ])
                .map(Into::into),
        },
        credential,
        mailbox: if r.chance(75) {
            Mailbox::Me
        } else {
            Mailbox::Address(r.pick(ADDRS).to_string())
        },
        envelope_from,
        header,
        recipients: r.chance(90).then(|| some_addrs(r, 3)),
        size: r.chance(90).then(|| {
            // Now and then at a door's own size limit (the directory's default is 35 MiB).
            if r.chance(3) {
                *r.pick(&[
                    SENDGRID_MAX_REQUEST_BYTES,
                    SENDGRID_MAX_REQUEST_BYTES + 1,
                    GMAIL_MAX_MESSAGE_BYTES,
                    GMAIL_MAX_MESSAGE_BYTES + 1,
                ])
            } else {
                r.below(3_000)
            }
        }),
        body: match r.below(40) {
            0..4 => Body::Unknown,
            4..8 => Body::Invalid {
                detail: "Invalid To header".into(),
                field: None,
            },
            8 => Body::Unreadable {
                problem: *r.pick(&[
                    RequestProblem::NotJson,
                    RequestProblem::ContentType,
                    RequestProblem::TooManyItems { budget: 1 << 25 },
                ]),
                detail: "not JSON".into(),
            },
            _ => Body::Valid,
        },
    }
}

/// A random action other than a send (the key permissions are those the generator's keys may
/// hold, and one no key holds).
pub(super) fn random_non_send(r: &mut Rng) -> Action {
    *r.pick(&[
        Action::Authenticate,
        Action::ReadSettings,
        Action::UpdateSettings,
        Action::ManageSendAs,
        Action::Manage { permission: None },
        Action::Manage {
            permission: Some("mail.send"),
        },
        Action::Manage {
            permission: Some("api_keys.read"),
        },
        Action::IssueToken,
        Action::SignIn,
    ])
}

/// The checks whose outcome depends on the action itself (its scopes and permission), not only on
/// the facts.
fn action_dependent(r: Reason) -> bool {
    matches!(
        r,
        Reason::ScopeInsufficient
            | Reason::PermissionMissing
            | Reason::DelegationNotConfigured
            | Reason::DelegationScopeNotGranted
    )
}

/// Random usage for the principals the attempt may resolve to.
pub(super) fn random_counters(r: &mut Rng) -> MemoryCounters {
    let c = MemoryCounters::new();
    for p in [
        "u0@example.com",
        "u1@example.com",
        "u2@example.com",
        "u3@example.com",
        "sa:sa@p0.iam.example",
    ] {
        if r.chance(40) {
            c.preload(
                p,
                NOW - r.below(2 * counters::DAY_MS),
                r.below(4),
                r.below(4),
            );
        }
        if r.chance(30) {
            let tat = r.chance(50).then(|| NOW + r.below(120_000));
            c.set_rate_and_in_flight(p, tat, r.below(3));
        }
    }
    c
}

#[test]
fn differential_against_reference_100k() {
    let mut r = Rng::new(0x5EED_0001);
    let mut cases = 0u64;
    let mut allowed = 0u64;
    let mut seen = std::collections::BTreeSet::new();
    let (mut allowed_several_from, mut malformed_header) = (0u64, 0u64);
    let mut checked_guarantee = 0u64;
    let mut not_checked = 0u64;
    // Bounces on the relay decided with the header's sender; non-send actions refused and not.
    let (mut null_sender, mut non_send_refused, mut non_send_allowed) = (0u64, 0u64, 0u64);
    // A door's own size limit and a request's form, each refused as the first failure.
    let (mut door_limit, mut unreadable) = (0u64, 0u64);
    for _ in 0..1_000 {
        let dir = random_directory(&mut r);
        let ix = DirectoryIndex::new(&dir);
        for _ in 0..100 {
            let mut a = random_attempt(&mut r);
            if r.chance(20) {
                a.action = random_non_send(&mut r);
            }
            let counters = random_counters(&mut r);
            let d = decide(&a, &ix, &counters, NOW, Mode::Explain);
            let got: Vec<(Reason, Outcome)> =
                d.checks.iter().map(|c| (c.check, c.outcome)).collect();
            let want = reference::explain(&a, &dir, &counters, NOW);
            if got != want {
                let diff: Vec<_> = got.iter().zip(&want).filter(|(g, w)| g != w).collect();
                panic!(
                    "engine and reference disagree on case {cases}: {diff:?}\nattempt: {a:#?}\nchecks: {:#?}",
                    d.checks
                        .iter()
                        .filter(|c| c.outcome != Outcome::Pass)
                        .collect::<Vec<_>>()
                );
            }
            // Enforcement agrees with the first failure of the explain trace, where a check
            // explain could not evaluate (a fact not given) counts as failing: enforcement never
            // lets an absent fact through.
            let e = decide(&a, &ix, &counters, NOW, Mode::Enforce);
            assert_eq!(
                e.denial().map(|d| d.code),
                first_failure_or_unchecked(&d),
                "case {cases}"
            );
            assert!(e.checks.iter().all(|c| c.outcome != Outcome::NotChecked));
            let fails = |r: Reason| {
                d.checks
                    .iter()
                    .any(|c| c.check == r && c.outcome == Outcome::Fail)
            };
            let over_door = a
                .size
                .zip(a.door.max_message_bytes())
                .is_some_and(|(n, m)| n > m);
            if over_door && fails(Reason::MessageTooLarge) {
                door_limit += 1;
            }
            if matches!(a.body, Body::Unreadable { .. })
                && (fails(Reason::MessageInvalid) || fails(Reason::MessageTooLarge))
            {
                unreadable += 1;
            }
            if d.checks.iter().any(|c| c.outcome == Outcome::NotChecked) {
                not_checked += 1;
                assert_eq!(e.verdict, Verdict::Denied, "case {cases}");
                assert!(!d.complete || d.verdict == Verdict::Denied, "case {cases}");
            } else {
                assert_eq!(e.verdict, d.verdict);
            }
            if d.verdict != Verdict::Denied {
                allowed += 1;
            }
            if matches!(a.credential, Credential::RelayIp)
                && a.envelope_from.as_deref() == Some("")
                && a.body == Body::Valid
                && a.header.is_some()
                && e.complete
            {
                null_sender += 1;
            }
            if !a.action.is_send() {
                if e.accepted() {
                    non_send_allowed += 1;
                } else {
                    non_send_refused += 1;
                }
            }
            // The send-as guarantee, stated directly: an accepted message has one well-formed
            // From, and every From and Sender address is one the principal may send as (or the
            // single From is rewritten).
            if e.accepted() && e.complete && e.action.is_send() {
                let h = a.header.as_ref().expect("accepted without a header");
                assert_eq!(h.problem(), None, "case {cases}: {a:#?}");
                for addr in h.from_addresses().chain(h.sender_addresses()) {
                    let rewritten = e
                        .rewrites
                        .iter()
                        .any(|r| r.header == "From" && r.original == addr);
                    assert!(
                        rewritten || reference::header_address_allowed(&dir, &a, addr),
                        "case {cases}: {addr} accepted: {a:#?}"
                    );
                }
                checked_guarantee += 1;
            }
            if let Some(h) = &a.header {
                let several = h.from.len() == 1 && h.from[0].len() > 1;
                if several && d.verdict != Verdict::Denied {
                    allowed_several_from += 1;
                }
                if h.problem().is_some()
                    && d.first_failure().map(|c| c.check) == Some(Reason::MessageInvalid)
                {
                    malformed_header += 1;
                }
            }
            for c in &d.checks {
                if c.outcome == Outcome::Fail {
                    seen.insert(c.check);
                }
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 100_000);
    assert!(
        door_limit > 200,
        "only {door_limit} failures of a door's size limit"
    );
    assert!(
        unreadable > 200,
        "only {unreadable} unreadable requests failing"
    );
    // The generator must reach both verdicts and nearly every code to be worth anything (the
    // header shapes it generates since several From fields are refused cost some allowed cases).
    assert!(allowed > 250, "only {allowed} allowed cases");
    // ...and From fields naming several addresses both allowed (with a Sender) and refused.
    assert!(
        allowed_several_from > 0,
        "no allowed From with several addresses"
    );
    assert!(
        malformed_header > 50,
        "only {malformed_header} malformed headers refused"
    );
    assert!(
        checked_guarantee > 100,
        "the guarantee held on only {checked_guarantee} accepted cases"
    );
    assert!(
        not_checked > 1_000,
        "only {not_checked} explains with a fact not given"
    );
    assert!(null_sender > 50, "only {null_sender} relay bounces decided");
    assert!(
        non_send_allowed > 100 && non_send_refused > 1_000,
        "non-send actions: {non_send_allowed} allowed, {non_send_refused} refused"
    );
    let missing: Vec<_> = CHECKS.iter().filter(|c| !seen.contains(c)).collect();
    assert!(missing.is_empty(), "codes never produced: {missing:?}");
}

/// The first check of an explain trace that failed or could not be evaluated: where
/// enforcement, which has every fact a door knows, stops.
fn first_failure_or_unchecked(d: &Decision) -> Option<Reason> {
    d.checks
        .iter()
        .find(|c| matches!(c.outcome, Outcome::Fail | Outcome::NotChecked))
        .map(|c| c.check)
}

// ---------------------------------------------------------------------------------------------
// Actions other than a send, and the null-sender rule (issue 15 item 2).

fn with_scopes(c: Credential, scopes: &[&str]) -> Credential {
    match c {
        Credential::OauthUser {
            user,
            client_id,
            project,
            ..
        } => Credential::OauthUser {
            user,
            client_id,
            project,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        },
        other => other,
    }
}

/// What a Gmail settings method, SMTP AUTH or a key-management call gets, for the same facts.
fn decide_action(a: &SendAttempt, dir: &Directory, c: &MemoryCounters) -> Decision {
    decide(a, &DirectoryIndex::new(dir), c, NOW, Mode::Enforce)
}

#[test]
fn settings_methods_take_their_own_scopes_and_are_never_a_send() {
    const READONLY: &str = "https://www.googleapis.com/auth/gmail.readonly";
    const SEND: &str = "https://www.googleapis.com/auth/gmail.send";
    let dir = fixture();
    let c = MemoryCounters::new();
    let attempt = |scope: &str, action: Action| {
        SendAttempt::new(
            Door::Gmail,
            with_scopes(oauth("alice@example.com"), &[scope]),
        )
        .for_action(action)
    };
    // A send-only token reads no profile: scope.insufficient, the method's scopes in the remedy.
    let d = decide_action(&attempt(SEND, Action::ReadSettings), &dir, &c);
    let denial = d.denial().expect("refused");
    assert_eq!(denial.code, Reason::ScopeInsufficient);
    assert_eq!(denial.check(), "grant");
    assert!(denial.remedy.contains(READONLY), "{}", denial.remedy);
    assert_eq!(
        denial.object_at_fault.to_string(),
        "credential alice@example.com"
    );
    assert!(denial.gmail().is_some());
    // A read-only token reads it, and that decision is complete, charges nothing and cannot be
    // committed as a send; no check is pending and no limit is looked at.
    let d = decide_action(&attempt(READONLY, Action::ReadSettings), &dir, &c);
    assert_eq!(d.verdict, Verdict::Allowed, "{:?}", d.denial());
    assert!(d.complete && d.charge.is_none() && d.holds.is_empty());
    assert!(d.checks.iter().all(|x| x.outcome != Outcome::Pending));
    assert_eq!(
        commit(&d, &c, NOW).unwrap(),
        CommitOutcome::NotAccepted,
        "a settings read is never a send acceptance"
    );
    // ... but it cannot create a send-as address (settings.sharing), nor send.
    for action in [Action::ManageSendAs, Action::UpdateSettings, Action::Send] {
        let mut a = attempt(READONLY, action);
        if action == Action::Send {
            a = a.from("alice@example.com").to(["x@example.org"]).parsed(10);
        }
        let d = decide_action(&a, &dir, &c);
        assert_eq!(
            d.denial().map(|x| x.code),
            Some(Reason::ScopeInsufficient),
            "{action:?}"
        );
    }
    // The account's state still refuses a settings read (a suspended user reads nothing).
    let mut a = attempt(READONLY, Action::ReadSettings);
    a.credential = with_scopes(oauth("carol@example.com"), &[READONLY]);
    let d = decide_action(&a, &dir, &c);
    assert_eq!(d.denial().map(|x| x.code), Some(Reason::AccountSuspended));
    // A used-up limit does not (limits count sends).
    let mut limited = fixture();
    limited.users[0].limits.messages_per_day = Some(0);
    let d = decide_action(&attempt(READONLY, Action::ReadSettings), &limited, &c);
    assert_eq!(d.verdict, Verdict::Allowed, "{:?}", d.denial());
    let mut send = attempt(SEND, Action::Send);
    send = send
        .from("alice@example.com")
        .to(["x@example.org"])
        .parsed(10);
    assert_eq!(
        decide_action(&send, &limited, &c).denial().map(|x| x.code),
        Some(Reason::LimitDailyMessages)
    );
    // An injected limit fault refuses the send but not the settings read.
    let fault = InjectedFault {
        principal: "alice@example.com".into(),
        code: Reason::LimitDailyMessages,
        until_ms: NOW + 1,
    };
    let mut d = decide_action(&attempt(READONLY, Action::ReadSettings), &dir, &c);
    apply_injected(&mut d, std::slice::from_ref(&fault), NOW);
    assert_eq!(d.verdict, Verdict::Allowed);
    let mut d = decide_action(&send, &dir, &c);
    apply_injected(&mut d, std::slice::from_ref(&fault), NOW);
    assert_eq!(d.denial().map(|x| x.code), Some(Reason::LimitDailyMessages));
}

#[test]
fn authenticate_answers_for_the_credential_only() {
    let dir = fixture();
    let c = MemoryCounters::new();
    // A suspended user's valid password passes AUTH (the refusal comes at MAIL FROM) ...
    let a =
        SendAttempt::new(Door::Smtp, login("carol@example.com")).for_action(Action::Authenticate);
    let d = decide_action(&a, &dir, &c);
    assert_eq!(d.verdict, Verdict::Allowed, "{:?}", d.denial());
    assert!(d.complete && d.charge.is_none());
    let mut mail_from = SendAttempt::new(Door::Smtp, login("carol@example.com"));
    mail_from.envelope_from = Some("carol@example.com".into());
    assert_eq!(
        decide_action(&mail_from, &dir, &c).denial().map(|x| x.code),
        Some(Reason::AccountSuspended)
    );
    // ... a key without mail.send and a token without https://mail.google.com/ do not.
    let a = SendAttempt::new(Door::Smtp, api_key("k-noperm")).for_action(Action::Authenticate);
    assert_eq!(
        decide_action(&a, &dir, &c).denial().map(|x| x.code),
        Some(Reason::PermissionMissing)
    );
    let a =
        SendAttempt::new(Door::Smtp, oauth("alice@example.com")).for_action(Action::Authenticate);
    let d = decide_action(&a, &dir, &c);
    assert_eq!(d.denial().map(|x| x.code), Some(Reason::ScopeInsufficient));
    assert!(
        d.denial()
            .unwrap()
            .remedy
            .contains("https://mail.google.com/"),
        "{:?}",
        d.denial()
    );
}

#[test]
fn key_management_needs_the_keys_permission_not_mail_send() {
    let dir = fixture();
    let c = MemoryCounters::new();
    let manage = |key: &str, permission| {
        SendAttempt::new(Door::Sendgrid, api_key(key)).for_action(Action::Manage { permission })
    };
    // k1 holds mail.send only.
    let d = decide_action(&manage("k1", Some("api_keys.read")), &dir, &c);
    let denial = d.denial().expect("refused");
    assert_eq!(denial.code, Reason::PermissionMissing);
    assert_eq!(denial.object_at_fault.to_string(), "api_keys[k1]");
    assert!(
        denial
            .remedy
            .starts_with("add api_keys.read to api_keys[k1].permissions")
            && denial.remedy.ends_with("or use a key that has it"),
        "{}",
        denial.remedy
    );
    assert!(denial.sendgrid().is_some());
    assert!(decide_action(&manage("k1", Some("mail.send")), &dir, &c).accepted());
    // A key without mail.send may still call what needs no permission; a revoked one may not.
    let d = decide_action(&manage("k-noperm", None), &dir, &c);
    assert!(d.accepted() && d.charge.is_none(), "{:?}", d.denial());
    assert_eq!(
        decide_action(&manage("k-rev", None), &dir, &c)
            .denial()
            .map(|x| x.code),
        Some(Reason::AuthRevoked)
    );
}

#[test]
fn a_refusal_is_settled_before_the_message_only_when_nothing_before_it_waits() {
    let c = MemoryCounters::new();
    // Before the body: no sender, no recipients. A suspended account is settled ...
    let early = SendAttempt::new(Door::Gmail, oauth("carol@example.com"));
    let d = decide_action(&early, &fixture(), &c);
    assert_eq!(
        d.settled_denial().map(|x| x.code),
        Some(Reason::AccountSuspended)
    );
    // ... a used-up limit is not: the sender's checks, still waiting for the message, come
    // first, and the message decides which refusal is the answer.
    let mut limited = fixture();
    limited.users[0].limits.messages_per_day = Some(0);
    let early = SendAttempt::new(Door::Gmail, oauth("alice@example.com"));
    let d = decide_action(&early, &limited, &c);
    assert_eq!(d.denial().map(|x| x.code), Some(Reason::LimitDailyMessages));
    assert_eq!(d.settled_denial(), None);
    let unowned = early
        .clone()
        .from("ceo@evil.example")
        .to(["x@example.org"])
        .parsed(5);
    assert_eq!(
        decide_action(&unowned, &limited, &c)
            .denial()
            .map(|x| x.code),
        Some(Reason::SenderNotOwned)
    );
}

#[test]
fn the_gmail_api_limit_is_the_engines_whatever_the_organisation_allows() {
    let mut dir = fixture();
    dir.limits.max_message_bytes = Some(100 * 1024 * 1024);
    let c = MemoryCounters::new();
    let big = base().parsed(GMAIL_MAX_MESSAGE_BYTES + 1);
    let d = decide_action(&big, &dir, &c);
    let denial = d.denial().expect("refused");
    assert_eq!(denial.code, Reason::MessageTooLarge);
    assert_eq!(
        denial.object_at_fault.to_string(),
        "the Gmail API's message size limit"
    );
    assert!(denial.remedy.contains("use SMTP for larger ones"));
    assert_eq!(
        denial.args.limit.as_deref(),
        Some(GMAIL_MAX_MESSAGE_BYTES.to_string().as_str())
    );
    // SMTP takes what the organisation allows.
    let smtp = as_user(
        big,
        Door::Smtp,
        login("alice@example.com"),
        "alice@example.com",
    );
    assert!(decide_action(&smtp, &dir, &c).accepted());
    // Under the organisation's own lower limit, its remedy answers.
    let d = decide_action(&base().parsed(GMAIL_MAX_MESSAGE_BYTES + 1), &fixture(), &c);
    assert_eq!(
        d.denial().unwrap().object_at_fault.to_string(),
        "limits.max_message_bytes"
    );
}

#[test]
fn the_sendgrid_request_limit_is_the_engines_whatever_the_organisation_allows() {
    let dir = fixture();
    let c = MemoryCounters::new();
    let at = |n: u64| as_user(base(), Door::Sendgrid, api_key("k1"), "team@example.com").parsed(n);
    assert!(decide_action(&at(SENDGRID_MAX_REQUEST_BYTES), &dir, &c).accepted());
    // Over 30 MB and within the organisation's 35 MiB: the door's limit answers, in its terms.
    let d = decide_action(&at(SENDGRID_MAX_REQUEST_BYTES + 1), &dir, &c);
    let denial = d.denial().expect("refused");
    assert_eq!(denial.code, Reason::MessageTooLarge);
    assert_eq!(
        denial.object_at_fault.to_string(),
        "the SendGrid-compatible API's request size limit"
    );
    assert_eq!(
        denial.remedy,
        "send a smaller message or split it: the SendGrid-compatible API takes requests up to 31457280 bytes (30 MB), attachments included, whatever limits.max_message_bytes allows"
    );
    assert_eq!(denial.args.limit.as_deref(), Some("31457280"));
    // The same size is the Gmail API's to take.
    assert!(decide_action(&base().parsed(SENDGRID_MAX_REQUEST_BYTES + 1), &dir, &c).accepted());
}

#[test]
fn a_request_problem_is_refused_with_the_catalogues_remedy_for_it() {
    let dir = fixture();
    let c = MemoryCounters::new();
    let with = |problem| {
        let mut a = as_user(base(), Door::Sendgrid, api_key("k1"), "team@example.com");
        a.body = Body::Unreadable {
            problem,
            detail: "what the door saw".into(),
        };
        a
    };
    for problem in [
        RequestProblem::NotUtf8,
        RequestProblem::NotJson,
        RequestProblem::ContentType,
        RequestProblem::ContentEncoding,
    ] {
        let d = decide_action(&with(problem), &dir, &c);
        let denial = d.denial().expect("refused");
        assert_eq!(denial.code, Reason::MessageInvalid, "{problem:?}");
        assert_eq!(denial.remedy, problem.remedy());
        assert!(!denial.remedy.contains("raw"), "{}", denial.remedy);
        assert_eq!(denial.args.detail.as_deref(), Some("what the door saw"));
    }
    // Too costly to parse: message.too_large whatever the size, with its own remedy.
    let budget = RequestProblem::TooManyItems { budget: 1 << 25 };
    let mut small = with(budget);
    small.size = Some(10);
    let d = decide_action(&small, &dir, &c);
    let denial = d.denial().expect("refused");
    assert_eq!(denial.code, Reason::MessageTooLarge);
    assert_eq!(
        denial.remedy,
        "send fewer recipients, headers or substitutions per request"
    );
    // An earlier refusal still comes first.
    let mut revoked = with(RequestProblem::NotJson);
    revoked.credential = api_key("nope");
    assert_ne!(
        decide_action(&revoked, &dir, &c).denial().map(|d| d.code),
        Some(Reason::MessageInvalid)
    );
}

#[test]
fn issuing_a_token_checks_what_google_checks_then() {
    const SEND: &str = "https://www.googleapis.com/auth/gmail.send";
    const SETTINGS: &str = "https://www.googleapis.com/auth/gmail.settings.basic";
    let dir = fixture();
    let c = MemoryCounters::new();
    let token =
        |cred: Credential| SendAttempt::new(Door::Gmail, cred).for_action(Action::IssueToken);
    // A delegated token for a granted scope is issued; a scope the grant lacks is refused with
    // the grant at fault and the scope in the remedy.
    assert!(decide_action(&token(sa(Some("alice@example.com"), SEND)), &dir, &c).accepted());
    let d = decide_action(&token(sa(Some("alice@example.com"), SETTINGS)), &dir, &c);
    let denial = d.denial().expect("refused");
    assert_eq!(denial.code, Reason::DelegationScopeNotGranted);
    assert_eq!(
        denial.object_at_fault.to_string(),
        "domain_wide_delegation[999]"
    );
    assert!(
        denial.remedy.starts_with(&format!(
            "add {SETTINGS} to domain_wide_delegation[999].scopes"
        )),
        "{}",
        denial.remedy
    );
    assert!(denial.token().is_some());
    // A service account acting as itself gets its token (the API answers later); an unknown
    // subject and a suspended one do not.
    assert!(decide_action(&token(sa(None, SETTINGS)), &dir, &c).accepted());
    for (subject, code) in [
        ("nobody@example.com", Reason::DelegationSubjectUnknown),
        ("carol@example.com", Reason::AccountSuspended),
    ] {
        let d = decide_action(&token(sa(Some(subject), SEND)), &dir, &c);
        assert_eq!(d.denial().map(|x| x.code), Some(code), "{subject}");
    }
    // A user token without a send scope, or for a project without the Gmail API, is still
    // issued: those are answered when it is used.
    let mut dir_off = fixture();
    dir_off.oauth_clients[0].project = "proj-off".into();
    let user = with_scopes(oauth("alice@example.com"), &[SETTINGS]);
    let d = decide_action(&token(user), &dir_off, &c);
    assert!(d.accepted() && d.charge.is_none(), "{:?}", d.denial());
}

/// The consent page asks the engine whether the account's state lets it grant a code: a
/// suspended, under-review or sending-revoked account is refused, with the engine's remedy;
/// what is answered later (mail disabled, the organisation unit's policy, the client's project)
/// is not asked at sign-in.
#[test]
fn signing_in_checks_the_accounts_state_only() {
    let dir = fixture();
    let c = MemoryCounters::new();
    let sign_in =
        |user: &str| SendAttempt::new(Door::Gmail, oauth(user)).for_action(Action::SignIn);
    for (user, code) in [
        ("carol@example.com", Reason::AccountSuspended),
        ("dave@example.com", Reason::AccountUnderReview),
        ("gina@example.com", Reason::AccountSendingRevoked),
    ] {
        let d = decide_action(&sign_in(user), &dir, &c);
        let denial = d.denial().expect("refused");
        assert_eq!(denial.code, code, "{user}");
        assert!(!denial.remedy.is_empty());
        assert!(d.charge.is_none());
    }
    for user in ["alice@example.com", "erin@example.com", "frank@example.com"] {
        let d = decide_action(&sign_in(user), &dir, &c);
        assert!(d.accepted(), "{user}: {:?}", d.denial());
    }
}

/// The null-sender rule for bounces: `MAIL FROM:<>` on the IP-trusted relay is decided by the
/// header's sender once the message is known, never left pending (which made the SMTP door
/// answer `451` for good), and an authenticated principal's header From is checked as always.
#[test]
fn a_null_reverse_path_is_decided_by_the_header_sender() {
    let mut dir = fixture();
    dir.smtp_relay.allowed_senders = RelaySenders::DomainAddresses;
    let c = MemoryCounters::new();
    let bounce = |header: Option<Originator>, body: Body| {
        let mut a = SendAttempt::new(Door::SmtpRelay, Credential::RelayIp);
        a.transport.client_ip = Some(ip("192.0.2.7"));
        a.envelope_from = Some(String::new());
        a.recipients = Some(vec!["x@example.org".into()]);
        a.size = Some(100);
        a.header = header;
        a.body = body;
        a
    };
    // MAIL FROM:<>: nothing refused, the sender is still to come.
    let d = decide_action(&bounce(None, Body::Unknown), &dir, &c);
    assert!(d.accepted() && !d.complete, "{:?}", d.denial());
    // The organisation's bounce goes, counted as the header's sender.
    let from = |a: &str| Some(Originator::from_address(a));
    let d = decide_action(
        &bounce(from("MAILER-DAEMON@example.com"), Body::Valid),
        &dir,
        &c,
    );
    assert!(d.accepted() && d.complete, "{:?}", d.denial());
    assert_eq!(
        d.principal.as_deref(),
        Some("relay:mailer-daemon@example.com")
    );
    // One from elsewhere is refused by smtp_relay.allowed_senders; one naming no sender is
    // malformed (RFC 5322 requires a From).
    let d = decide_action(
        &bounce(from("someone@other.example"), Body::Valid),
        &dir,
        &c,
    );
    assert_eq!(d.denial().map(|x| x.code), Some(Reason::SenderNotOwned));
    let d = decide_action(&bounce(Some(Originator::default()), Body::Valid), &dir, &c);
    assert_eq!(d.denial().map(|x| x.code), Some(Reason::MessageInvalid));
    // Authenticated: the null envelope is skipped and the header From is checked.
    let mut a = as_user(
        base(),
        Door::Smtp,
        login("alice@example.com"),
        "ceo@evil.example",
    );
    a.envelope_from = Some(String::new());
    assert_eq!(
        decide_action(&a, &dir, &c).denial().map(|x| x.code),
        Some(Reason::SenderNotOwned)
    );
    a.header = from("alice@example.com");
    assert!(decide_action(&a, &dir, &c).accepted());
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// Marks the attempt's principal user (if any) with a fatal state.
fn poison(dir: &mut Directory, a: &SendAttempt, how: u64) -> bool {
    let principal = match &a.credential {
        Credential::OauthUser { user, .. } | Credential::SmtpLogin { user } => Some(user.clone()),
        Credential::ServiceAccount {
            subject: Some(s), ..
        } => Some(s.clone()),
        Credential::ApiKey { key_id } => {
            if how % 5 == 4 {
                if let Some(k) = dir.api_keys.iter_mut().find(|k| k.id == *key_id) {
                    k.revoked = true;
                    return true;
                }
                return false;
            }
            dir.api_keys
                .iter()
                .find(|k| k.id == *key_id)
                .map(|k| k.owner.clone())
        }
        _ => None,
    };
    let Some(p) = principal else { return false };
    let Some(u) = dir.users.iter_mut().find(|u| {
        u.email.eq_ignore_ascii_case(&p) || u.aliases.iter().any(|x| x.eq_ignore_ascii_case(&p))
    }) else {
        return false;
    };
    match how % 5 {
        0 => u.status = UserStatus::Suspended,
        1 => u.mail_enabled = false,
        2 => u.abuse.state = AbuseState::Revoked,
        _ => u.status = UserStatus::UnderReview,
    }
    true
}

/// Adds one failing condition to an attempt (and directory); returns false when not applicable.
fn add_failure(dir: &mut Directory, a: &mut SendAttempt, how: u64) -> bool {
    match how % 8 {
        0 => a.transport.tls = Some(TlsVersion::Tls10),
        1 => {
            a.credential = Credential::Refused {
                state: CredentialState::Revoked,
                presented: None,
            }
        }
        2 => a.recipients = Some(vec![]),
        3 => {
            a.body = Body::Invalid {
                detail: "bad".into(),
                field: None,
            }
        }
        4 => a.size = Some(u64::MAX),
        5 => {
            if matches!(a.credential, Credential::RelayIp)
                && dir.smtp_relay.allowed_senders == RelaySenders::Any
            {
                return false;
            }
            a.envelope_from = Some("intruder@evil.example".into());
        }
        6 if how % 16 == 6 => {
            // A second From field: refused as malformed.
            a.body = Body::Valid;
            a.header = Some(Originator {
                from: vec![
                    vec!["intruder@evil.example".into()],
                    a.header
                        .as_ref()
                        .and_then(|h| h.from.first().cloned())
                        .unwrap_or_default(),
                ],
                sender: vec![],
            });
        }
        6 if how % 32 == 14 => {
            // An unowned address beside the From's own, with a Sender: refused as not owned.
            if matches!(a.credential, Credential::RelayIp)
                && dir.smtp_relay.allowed_senders == RelaySenders::Any
            {
                return false;
            }
            let Some(first) = a
                .header
                .as_ref()
                .and_then(|h| h.from.first()?.first().cloned())
                .or_else(|| a.envelope_from.clone())
            else {
                return false;
            };
            a.body = Body::Valid;
            a.header = Some(Originator {
                from: vec![vec![first.clone(), "intruder@evil.example".into()]],
                sender: vec![vec![first]],
            });
        }
        6 => dir.policies.push(Policy {
            id: "stop".into(),
            description: None,
            applies_to: PolicyScope::default(),
            rule: PolicyRule::DenySend,
        }),
        _ => return poison(dir, a, how / 8),
    }
    true
}

mod props {
    use super::Rng;
    use super::*;
    use proptest::prelude::{ProptestConfig, any, prop_assert, prop_assert_eq, proptest};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        /// (a) A suspended, under-review, mail-disabled or sending-revoked principal, or a revoked
        /// key, is never allowed whatever else holds.
        #[test]
        fn fatal_principal_states_are_never_allowed(seed in any::<u64>(), how in any::<u64>()) {
            let mut r = Rng::new(seed);
            let mut dir = random_directory(&mut r);
            let a = random_attempt(&mut r);
            let counters = random_counters(&mut r);
            if poison(&mut dir, &a, how) {
                let ix = DirectoryIndex::new(&dir);
                for mode in [Mode::Enforce, Mode::Explain] {
                    let d = decide(&a, &ix, &counters, NOW, mode);
                    prop_assert_eq!(d.verdict, Verdict::Denied, "{:?}", d.checks);
                }
            }
        }

        /// (b) Enforcement's first failure is the first failing check of the explain trace, and
        /// enforcement's trace is a prefix of explain's.
        #[test]
        fn enforce_equals_first_explain_failure(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let dir = random_directory(&mut r);
            let a = random_attempt(&mut r);
            let counters = random_counters(&mut r);
            let ix = DirectoryIndex::new(&dir);
            let e = decide(&a, &ix, &counters, NOW, Mode::Enforce);
            let x = decide(&a, &ix, &counters, NOW, Mode::Explain);
            prop_assert_eq!(e.first_failure().map(|c| c.check), first_failure_or_unchecked(&x));
            if x.checks.iter().all(|c| c.outcome != Outcome::NotChecked) {
                prop_assert_eq!(e.denial(), x.denial());
                prop_assert_eq!(&x.checks[..e.checks.len()], &e.checks[..]);
            } else {
                // What explain could not check, enforcement refuses (the same check, failed).
                prop_assert_eq!(e.verdict, Verdict::Denied);
                for (xc, ec) in x.checks.iter().zip(&e.checks) {
                    if xc.outcome == Outcome::NotChecked {
                        prop_assert_eq!(ec.outcome, Outcome::Fail);
                        prop_assert_eq!(ec.check, xc.check);
                    } else {
                        prop_assert_eq!(xc, ec);
                    }
                }
            }
        }

        /// (d) "Not checked" exists only in explain, never denies by itself, and never lets a
        /// send through: an explain decision with a check not evaluated is incomplete (a door
        /// would not accept it), and enforcement of the same attempt is denied.
        #[test]
        fn not_checked_never_allows_a_send(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let dir = random_directory(&mut r);
            let a = random_attempt(&mut r);
            let counters = random_counters(&mut r);
            let ix = DirectoryIndex::new(&dir);
            let e = decide(&a, &ix, &counters, NOW, Mode::Enforce);
            prop_assert!(e.checks.iter().all(|c| c.outcome != Outcome::NotChecked));
            let x = decide(&a, &ix, &counters, NOW, Mode::Explain);
            if x.checks.iter().any(|c| c.outcome == Outcome::NotChecked) {
                prop_assert_eq!(e.verdict, Verdict::Denied);
                let fails = x.checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
                prop_assert_eq!(x.verdict == Verdict::Denied, fails > 0);
                if x.verdict != Verdict::Denied {
                    prop_assert!(!x.complete);
                    prop_assert_eq!(commit(&x, &counters, NOW).unwrap(), CommitOutcome::NotAccepted);
                }
            }
        }

        /// (e) An action other than a send is never a send acceptance: nothing pending, nothing
        /// held or charged, and `commit` refuses it, whatever the facts.
        #[test]
        fn non_send_actions_never_accept_a_send(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let dir = random_directory(&mut r);
            let mut a = random_attempt(&mut r);
            a.action = random_non_send(&mut r);
            let counters = random_counters(&mut r);
            let ix = DirectoryIndex::new(&dir);
            for mode in [Mode::Enforce, Mode::Explain] {
                let d = decide(&a, &ix, &counters, NOW, mode);
                prop_assert!(d.charge.is_none());
                prop_assert!(d.holds.is_empty());
                prop_assert!(d.verdict != Verdict::Held);
                prop_assert!(d.checks.iter().all(|c| c.outcome != Outcome::Pending));
                prop_assert_eq!(commit(&d, &counters, NOW).unwrap(), CommitOutcome::NotAccepted);
                for c in &d.checks {
                    if !a.action.applies(c.check) {
                        prop_assert_eq!(c.outcome, Outcome::NotApplicable);
                    }
                }
            }
        }

        /// (f) The same facts get the same refusal whatever is asked: the refusal of an action is
        /// the first failure, among the checks that action runs, of the send with the same facts
        /// (only the checks that read the action's own scopes and permission may differ).
        #[test]
        fn same_facts_same_refusal_for_every_action(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let dir = random_directory(&mut r);
            let a = random_attempt(&mut r);
            let counters = random_counters(&mut r);
            let ix = DirectoryIndex::new(&dir);
            let send = decide(&a, &ix, &counters, NOW, Mode::Explain);
            let action = random_non_send(&mut r);
            let d = decide(&a.clone().for_action(action), &ix, &counters, NOW, Mode::Enforce);
            let want = send
                .checks
                .iter()
                .filter(|c| action.applies(c.check) && !action_dependent(c.check))
                .find(|c| matches!(c.outcome, Outcome::Fail | Outcome::NotChecked))
                .map(|c| c.check);
            match d.denial().map(|x| x.code) {
                Some(got) if action_dependent(got) => {
                    prop_assert!(want.is_none_or(|w| w > got), "{:?} before {:?}", want, got);
                }
                got => prop_assert_eq!(got, want),
            }
        }

        /// (g) The same facts get the same outcome on every door: apart from the checks that
        /// read the door itself (its TLS rule, which APIs a key or project allows, the scopes
        /// it takes, organisation units' API access, the Gmail API's size limit, referrers only
        /// HTTP carries), every check of a send or another action ends the same on the Gmail,
        /// SendGrid and SMTP doors, so the refusal is the same code wherever it is asked.
        #[test]
        fn same_facts_same_outcome_on_every_door(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let dir = random_directory(&mut r);
            let mut a = random_attempt(&mut r);
            if matches!(a.credential, Credential::RelayIp) {
                // IP trust exists on the relay listener only.
                return Ok(());
            }
            if r.chance(30) {
                a.action = random_non_send(&mut r);
            }
            let counters = random_counters(&mut r);
            let ix = DirectoryIndex::new(&dir);
            let door_dependent = |c: Reason| {
                matches!(
                    c,
                    Reason::TlsRequired
                        | Reason::KeyUnsupported
                        | Reason::KeyReferrerBlocked
                        | Reason::KeyApiBlocked
                        | Reason::ProjectApiDisabled
                        | Reason::ScopeInsufficient
                        | Reason::DelegationScopeNotGranted
                        | Reason::PolicyDenied
                        | Reason::MessageTooLarge
                )
            };
            let outcomes = |door: Door| -> Vec<(Reason, Outcome)> {
                let mut x = a.clone();
                x.door = door;
                decide(&x, &ix, &counters, NOW, Mode::Explain)
                    .checks
                    .iter()
                    .filter(|c| !door_dependent(c.check))
                    .map(|c| (c.check, c.outcome))
                    .collect()
            };
            let gmail = outcomes(Door::Gmail);
            prop_assert_eq!(&gmail, &outcomes(Door::Sendgrid));
            prop_assert_eq!(&gmail, &outcomes(Door::Smtp));
        }

        /// (c) Adding a failing condition to an allowed attempt never yields allowed.
        #[test]
        fn adding_a_failure_never_allows(pick in 0usize..7, how in any::<u64>(), seed in any::<u64>()) {
            // Allowed attempts from the fixture, and random ones that happen to be allowed.
            let mut r = Rng::new(seed);
            let (mut dir, mut a) = if r.chance(50) {
                let ix = DirectoryIndex::new(&fixture());
                let c = MemoryCounters::new();
                let mut relay = as_user(base(), Door::SmtpRelay, Credential::RelayIp, "alice@example.com");
                relay.transport.client_ip = Some(ip("192.0.2.7"));
                let all = [
                    base(),
                    as_user(base(), Door::Sendgrid, api_key("k1"), "team@example.com"),
                    as_user(base(), Door::Smtp, login("alice@example.com"), "al@example.com"),
                    SendAttempt { mailbox: Mailbox::Address("bob@example.com".into()), ..base().from("bob@example.com") },
                    as_user(base(), Door::Gmail, sa(Some("alice@example.com"), "https://www.googleapis.com/auth/gmail.send"), "alice@example.com"),
                    relay,
                    base().from("support@example.com"),
                ];
                let a = all[pick].clone();
                prop_assert_eq!(decide(&a, &ix, &c, NOW, Mode::Enforce).verdict, Verdict::Allowed);
                (fixture(), a)
            } else {
                let mut found = None;
                let dir = random_directory(&mut r);
                let ix = DirectoryIndex::new(&dir);
                let none = MemoryCounters::new();
                for _ in 0..400 {
                    let a = random_attempt(&mut r);
                    if decide(&a, &ix, &none, NOW, Mode::Enforce).verdict == Verdict::Allowed {
                        found = Some((dir, a));
                        break;
                    }
                }
                match found { Some(x) => x, None => return Ok(()) }
            };
            if add_failure(&mut dir, &mut a, how) {
                let ix = DirectoryIndex::new(&dir);
                let d = decide(&a, &ix, &MemoryCounters::new(), NOW, Mode::Explain);
                prop_assert_eq!(d.verdict, Verdict::Denied, "{:?}", d.checks);
            }
        }
    }
}
