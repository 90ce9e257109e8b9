//! Decision-engine throughput on a realistic directory: 10,000 users, 1,000 API keys, groups,
//! roles, org units, policies and delegation grants.
//!
//! Run: `cargo bench -p mailgate-core --bench decide`
//!
//! Each benchmark cycles through 512 different attempts (different users and keys), so lookups are
//! not served from one hot cache line. "allowed" attempts run all 37 checks in both modes (the
//! worst case for enforcement, which stops early only on a failure).

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use mailgate_core::directory::*;
use mailgate_core::engine::{
    Credential, DirectoryIndex, Door, MemoryCounters, Mode, SendAttempt, Verdict, decide,
};

const NOW: u64 = 1_800_000_000_000;
const USERS: usize = 10_000;
const KEYS: usize = 1_000;

fn directory() -> Directory {
    let mut d = Directory {
        domains: vec![
            Domain {
                name: "example.com".into(),
                verified: true,
                verification_token: None,
            },
            Domain {
                name: "example.net".into(),
                verified: true,
                verification_token: None,
            },
        ],
        ..Default::default()
    };
    d.org_units.push(OrgUnit {
        path: "/".into(),
        description: None,
        mail_enabled: Some(true),
        api_access: Some(true),
        external_recipients: Some(true),
        limits: LimitSettings::default(),
    });
    for i in 0..20 {
        d.org_units.push(OrgUnit {
            path: format!("/dept{i}"),
            description: None,
            mail_enabled: None,
            api_access: None,
            external_recipients: None,
            limits: LimitSettings {
                messages_per_day: Some(5_000),
                ..Default::default()
            },
        });
    }
    d.roles = (0..50)
        .map(|i| Role {
            name: format!("role{i}"),
            permissions: vec!["mail.send".into(), "api_keys.read".into()],
        })
        .collect();
    for i in 0..USERS {
        let mut u = User::new(format!("user{i}@example.com"));
        u.org_unit = format!("/dept{}", i % 20);
        u.aliases = vec![format!("alias{i}@example.com")];
        if i % 3 == 0 {
            u.send_as = vec![SendAs {
                email: format!("team{i}@example.net"),
                display_name: None,
                reply_to: None,
                status: SendAsStatus::Accepted,
            }];
        }
        if i % 10 == 0 {
            u.delegates = vec![format!("user{}@example.com", (i + 1) % USERS)];
        }
        u.roles = vec![format!("role{}", i % 50)];
        d.users.push(u);
    }
    d.groups = (0..100)
        .map(|g| Group {
            email: format!("group{g}@example.com"),
            name: None,
            members: (0..50)
                .map(|m| format!("user{}@example.com", g * 50 + m))
                .collect(),
            members_can_send_as: g % 2 == 0,
        })
        .collect();
    d.projects = (0..5)
        .map(|p| Project {
            id: format!("proj{p}"),
            number: format!("10000000000{p}"),
            enabled_apis: vec![GMAIL_API.into(), SENDGRID_API.into()],
        })
        .collect();
    d.oauth_clients = (0..20)
        .map(|c| OAuthClient {
            client_id: format!("client{c}.apps.example"),
            name: None,
            secret: None,
            secret_sha256: None,
            secret_hash: None,
            project: format!("proj{}", c % 5),
            redirect_uris: vec![],
            disabled: false,
        })
        .collect();
    d.service_accounts = (0..5)
        .map(|s| ServiceAccount {
            email: format!("robot{s}@proj{s}.iam.example"),
            project: format!("proj{s}"),
            client_id: format!("90000000{s}"),
            display_name: None,
            keys: vec![],
            disabled: false,
        })
        .collect();
    d.domain_wide_delegation = (0..5)
        .map(|s| DelegationGrant {
            client_id: format!("90000000{s}"),
            scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
        })
        .collect();
    d.api_keys = (0..KEYS)
        .map(|k| ApiKey {
            id: format!("key{k:05}"),
            name: format!("service {k}"),
            secret: None,
            secret_sha256: String::new(),
            owner: format!("user{}@example.com", k * 7 % USERS),
            project: Some(format!("proj{}", k % 5)),
            permissions: vec!["mail.send".into()],
            allowed_ips: if k % 2 == 0 {
                vec!["10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!())]
            } else {
                vec![]
            },
            allowed_referrers: vec![],
            allowed_apis: vec![SENDGRID_API.into(), "smtp".into()],
            expires: None,
            revoked: false,
        })
        .collect();
    d.policies = (0..10)
        .map(|p| Policy {
            id: format!("policy{p}"),
            description: None,
            applies_to: PolicyScope {
                org_units: vec![format!("/dept{p}")],
                ..Default::default()
            },
            rule: PolicyRule::DenyRecipientDomains {
                domains: vec![format!("blocked{p}.example")],
            },
        })
        .collect();
    d
}

fn attempts(kind: usize) -> Vec<SendAttempt> {
    let ip: IpAddr = "10.1.2.3".parse().unwrap_or_else(|_| unreachable!());
    (0..512)
        .map(|i| {
            let u = (i * 19) % USERS;
            let (door, cred, from) = match kind {
                0 => (
                    Door::Gmail,
                    Credential::OauthUser {
                        user: format!("user{u}@example.com"),
                        client_id: format!("client{}.apps.example", i % 20),
                        project: format!("proj{}", i % 20 % 5),
                        scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
                    },
                    format!("user{u}@example.com"),
                ),
                1 => {
                    let k = i % KEYS;
                    (
                        Door::Sendgrid,
                        Credential::ApiKey {
                            key_id: format!("key{k:05}"),
                        },
                        format!("alias{}@example.com", k * 7 % USERS),
                    )
                }
                2 => (
                    Door::Smtp,
                    Credential::SmtpLogin {
                        user: format!("user{u}@example.com"),
                    },
                    format!("user{u}@example.com"),
                ),
                _ => (
                    Door::Gmail,
                    Credential::ServiceAccount {
                        email: format!("robot{}@proj{}.iam.example", i % 5, i % 5),
                        project: format!("proj{}", i % 5),
                        scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
                        subject: Some(format!("user{u}@example.com")),
                    },
                    format!("user{u}@example.com"),
                ),
            };
            let mut a = SendAttempt::new(door, cred)
                .from(from)
                .to(["customer@example.org", "ops@example.com"])
                .parsed(20_000);
            a.transport.client_ip = Some(ip);
            a
        })
        .collect()
}

fn counters() -> MemoryCounters {
    let c = MemoryCounters::new();
    for u in 0..USERS {
        c.preload(&format!("user{u}@example.com"), NOW - 3_600_000, 20, 2);
    }
    c
}

fn bench(c: &mut Criterion) {
    let dir = directory();
    let ix = DirectoryIndex::new(&dir);
    let counters = counters();
    let names = [
        "gmail_oauth",
        "sendgrid_key",
        "smtp_login",
        "gmail_sa_delegated",
    ];
    for (kind, name) in names.iter().enumerate() {
        let set = attempts(kind);
        for a in &set {
            let d = decide(a, &ix, &counters, NOW, Mode::Explain);
            assert_eq!(d.verdict, Verdict::Allowed, "{name}: {:?}", d.denials);
        }
        for (mode, label) in [(Mode::Enforce, "enforce"), (Mode::Explain, "explain")] {
            let mut i = 0usize;
            c.bench_function(&format!("decide/{label}/{name}"), |b| {
                b.iter(|| {
                    i = (i + 1) & 511;
                    black_box(decide(black_box(&set[i]), &ix, &counters, NOW, mode))
                })
            });
        }
    }
    // A denial found early (suspended user): enforcement stops at check 21.
    let mut dir2 = dir.clone();
    for u in dir2.users.iter_mut().step_by(19) {
        u.status = UserStatus::Suspended;
    }
    let ix2 = DirectoryIndex::new(&dir2);
    let set = attempts(2);
    let mut i = 0usize;
    c.bench_function("decide/enforce/smtp_suspended_denied", |b| {
        b.iter(|| {
            i = (i + 1) & 511;
            black_box(decide(
                black_box(&set[i]),
                &ix2,
                &counters,
                NOW,
                Mode::Enforce,
            ))
        })
    });
    let mut g = c.benchmark_group("index");
    g.sample_size(10);
    g.bench_function("build_10k_users_1k_keys", |b| {
        b.iter(|| black_box(DirectoryIndex::new(black_box(&dir))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
