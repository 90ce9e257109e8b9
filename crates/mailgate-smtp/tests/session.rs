//! The session state machine fed bytes directly (no sockets): pipelining, STARTTLS then AUTH,
//! BDAT, every AUTH mechanism, the documented refusals, and arbitrary input never panicking.
//! The store is SQLite, or a PostgreSQL database of each test's own when
//! `MAILGATE_TEST_STORE=postgres` (`scripts/test`'s PostgreSQL pass): acceptance, lockout and
//! tokens go through it.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a failed test")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mailgate_core::engine::TlsVersion;
use mailgate_core::orgfile::OrgFile;
use mailgate_gateway::Gateway;
use mailgate_gateway::lockout::LockoutPolicy;
use mailgate_smtp::{BareNewline, Limits, Listener, Session, SmtpContext, Step};
use mailgate_store::testing::{TestDb, fresh_store};
use mailgate_store::{Changeset, Stores, TokenRecord};

const ORG: &str = r#"
domains: [{name: example.com, verified: true}]
users:
  - email: alice@example.com
    password: "pw-alice"
    aliases: [al@example.com]
  - email: bob@example.com
    password: "pw-bob"
    status: suspended
oauth_clients:
  - client_id: web
    name: Web
    secret: "s"
    project: p
    redirect_uris: [http://127.0.0.1:1/cb]
projects:
  - id: p
    number: 1
    enabled_apis: [gmail.googleapis.com]
limits:
  recipients_per_message: 3
smtp_relay:
  allowed_ips: [127.0.0.1/32]
  allowed_senders: domain_addresses
"#;

struct T {
    ctx: Arc<SmtpContext>,
    store: Stores,
    /// The PostgreSQL database's guard, on that backend.
    _db: Option<TestDb>,
}

/// A session context on a fresh store of the backend this run asks for.
async fn setup(limits: Limits) -> T {
    setup_on(fresh_store().await, limits).await
}

async fn setup_on((store, db): (Stores, Option<TestDb>), limits: Limits) -> T {
    let mut dir = OrgFile::parse(ORG).unwrap().directory;
    let issues = mailgate_auth::prepare_secrets(&mut dir, &Default::default()).unwrap();
    assert!(issues.is_empty(), "{issues:?}");
    store
        .directory
        .commit(0, &Changeset::between(&Default::default(), &dir), "t")
        .await
        .unwrap();
    let gateway = Gateway::open(store.directory.clone()).await.unwrap();
    gateway.lockout().set_policy(LockoutPolicy {
        login_threshold: 3,
        max_lock: Duration::from_secs(60),
        ..LockoutPolicy::default()
    });
    let ctx = Arc::new(SmtpContext {
        gateway,
        tokens: store.tokens.clone(),
        hostname: "mx.test".into(),
        limits,
        auth_without_tls: false,
    });
    T {
        ctx,
        store,
        _db: db,
    }
}

const PEER: &str = "127.0.0.1:40000";

impl T {
    fn session(&self, l: Listener, tls: Option<TlsVersion>) -> Session {
        self.session_from(l, tls, PEER)
    }
    fn session_from(&self, l: Listener, tls: Option<TlsVersion>, peer: &str) -> Session {
        let peer: SocketAddr = peer.parse().unwrap();
        let mut s = Session::new(self.ctx.clone(), l, peer, tls, true);
        s.greeting();
        let g = out(&mut s);
        assert!(g.starts_with("220 mx.test ESMTP"), "{g}");
        s
    }
}

fn out(s: &mut Session) -> String {
    String::from_utf8(s.take_output()).unwrap()
}

async fn say(s: &mut Session, input: &str) -> String {
    let step = s.ingest(input.as_bytes()).await;
    assert_ne!(step, Step::StartTls, "unexpected STARTTLS");
    out(s)
}

fn plain(user: &str, pw: &str) -> String {
    STANDARD.encode(format!("\0{user}\0{pw}"))
}

fn codes(replies: &str) -> Vec<&str> {
    replies
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| l.get(..3).unwrap_or(""))
        .collect()
}

const MSG: &str =
    "From: alice@example.com\r\nTo: x@example.org\r\nSubject: hi\r\n\r\nhello\r\n..dot\r\n.\r\n";

#[tokio::test]
async fn pipelined_submission_is_accepted_after_it_is_durable() {
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    let r = say(
        &mut s,
        &format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<alice@example.com> SIZE=100\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n",
            plain("alice@example.com", "pw-alice")
        ),
    )
    .await;
    assert_eq!(codes(&r), ["250", "235", "250", "250", "250", "354"], "{r}");
    assert!(
        r.contains("250-AUTH LOGIN PLAIN XOAUTH2 OAUTHBEARER"),
        "{r}"
    );
    for cap in [
        "SIZE 36700160",
        "8BITMIME",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "SMTPUTF8",
    ] {
        assert!(r.contains(cap), "EHLO lacks {cap}: {r}");
    }
    assert!(!r.contains("STARTTLS"), "no STARTTLS once TLS is up: {r}");
    let r = say(&mut s, MSG).await;
    assert!(r.starts_with("250 2.0.0 OK "), "{r}");
    let id = r.split_whitespace().nth(3).unwrap();
    let m = t.store.directory.message(id).await.unwrap().unwrap();
    assert_eq!(m.envelope_from, "alice@example.com");
    assert_eq!(m.recipients, ["x@example.org", "y@example.org"]);
    assert_eq!(
        m.size as usize,
        MSG.len() - 4,
        "dot-unstuffed, terminator removed"
    );
    let r = say(&mut s, "QUIT\r\n").await;
    assert!(r.starts_with("221 2.0.0"), "{r}");
    assert!(s.is_closed());
}

#[tokio::test]
async fn starttls_is_required_before_auth_and_resets_the_session() {
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Submission, None);
    let r = say(&mut s, "EHLO c\r\n").await;
    assert!(r.contains("250-STARTTLS"), "{r}");
    assert!(!r.contains("AUTH"), "AUTH only after TLS: {r}");
    let r = say(
        &mut s,
        &format!("AUTH PLAIN {}\r\n", plain("alice@example.com", "pw-alice")),
    )
    .await;
    assert!(
        r.starts_with(
            "530 5.7.0 Must issue a STARTTLS command first. [mailgate: tls.required, decision "
        ),
        "{r}"
    );
    let r = say(&mut s, "MAIL FROM:<alice@example.com>\r\n").await;
    assert!(
        r.starts_with("530 5.7.0 Must issue a STARTTLS command first."),
        "{r}"
    );
    // Commands pipelined after STARTTLS are discarded (RFC 3207).
    assert_eq!(
        s.ingest(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n").await,
        Step::StartTls
    );
    assert_eq!(out(&mut s), "220 2.0.0 Ready to start TLS\r\n");
    s.tls_started(TlsVersion::Tls13);
    let r = say(&mut s, "MAIL FROM:<alice@example.com>\r\n").await;
    assert!(r.starts_with("503 5.5.1 EHLO/HELO first."), "{r}");
    let r = say(&mut s, "EHLO c\r\n").await;
    assert!(
        r.contains("250-AUTH LOGIN PLAIN XOAUTH2 OAUTHBEARER") && !r.contains("STARTTLS"),
        "{r}"
    );
    let r = say(&mut s, "MAIL FROM:<alice@example.com>\r\n").await;
    assert!(
        r.starts_with("530 5.7.0 Authentication Required. [mailgate: auth.missing"),
        "{r}"
    );
    let r = say(&mut s, "AUTH LOGIN\r\n").await;
    assert_eq!(r, "334 VXNlcm5hbWU6\r\n");
    let r = say(
        &mut s,
        &format!("{}\r\n", STANDARD.encode("alice@example.com")),
    )
    .await;
    assert_eq!(r, "334 UGFzc3dvcmQ6\r\n");
    let r = say(&mut s, &format!("{}\r\n", STANDARD.encode("pw-alice"))).await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls12));
    let r = say(
        &mut s,
        &format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<al@example.com>\r\nRCPT TO:<x@example.org>\r\n",
            plain("alice@example.com", "pw-alice")
        ),
    )
    .await;
    assert_eq!(codes(&r), ["250", "235", "250", "250"], "{r}");
    let part1 = "From: al@example.com\r\nSubject: c\r\n";
    let part2 = "\r\nbody\r\n.\r\n";
    let r = say(&mut s, &format!("BDAT {}\r\n{part1}", part1.len())).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    // The last chunk split across two reads.
    let r = say(&mut s, &format!("BDAT {} LAST\r\n\r\nbo", part2.len())).await;
    assert_eq!(r, "");
    let r = say(&mut s, "dy\r\n.\r\n").await;
    assert!(r.starts_with("250 2.0.0 OK "), "{r}");
    let id = r.split_whitespace().nth(3).unwrap();
    let m = t.store.directory.message(id).await.unwrap().unwrap();
    assert_eq!(
        m.size as usize,
        part1.len() + part2.len(),
        "BDAT is not unstuffed"
    );
    // BDAT without a transaction: the chunk is consumed, then refused.
    let r = say(&mut s, "BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n").await;
    assert_eq!(codes(&r), ["503", "250"], "{r}");
}

#[tokio::test]
async fn refusals_carry_the_catalogue_text_the_code_and_the_decision() {
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    say(&mut s, "EHLO c\r\n").await;
    let r = say(
        &mut s,
        &format!("AUTH PLAIN {}\r\n", plain("alice@example.com", "nope")),
    )
    .await;
    assert!(
        r.starts_with(
            "535 5.7.8 Username and Password not accepted. [mailgate: auth.invalid, decision "
        ),
        "{r}"
    );
    let r = say(
        &mut s,
        &format!("AUTH PLAIN {}\r\n", plain("alice@example.com", "pw-alice")),
    )
    .await;
    assert!(r.starts_with("235"), "{r}");
    let r = say(&mut s, "MAIL FROM:<ceo@example.com>\r\n").await;
    assert!(
        r.starts_with("553 5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com [mailgate: sender.not_owned, decision "),
        "{r}"
    );
    assert!(r.contains("Remedy: "), "{r}");
    assert!(
        r.len() <= 512 && r.ends_with("]\r\n") || r.contains("Remedy"),
        "{r}"
    );
    // Header From not owned: refused after DATA.
    let r = say(&mut s, "MAIL FROM:<alice@example.com>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n").await;
    assert_eq!(codes(&r), ["250", "250", "250", "250", "452", "354"], "{r}");
    assert!(
        r.contains(
            "452 4.5.3 Your message has too many recipients. [mailgate: policy.too_many_recipients"
        ),
        "{r}"
    );
    let r = say(&mut s, "From: ceo@example.com\r\n\r\nx\r\n.\r\n").await;
    assert!(
        r.starts_with("553 5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com [mailgate: sender.not_owned"),
        "{r}"
    );

    // A suspended user authenticates, and is refused at MAIL FROM.
    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    let r = say(
        &mut s,
        &format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<bob@example.com>\r\n",
            plain("bob@example.com", "pw-bob")
        ),
    )
    .await;
    assert_eq!(codes(&r), ["250", "235", "550"], "{r}");
    assert!(
        r.contains("550 5.7.0 Mail Sending denied [mailgate: account.suspended, decision "),
        "{r}"
    );
}

#[tokio::test]
async fn failed_auth_locks_the_login() {
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    say(&mut s, "EHLO c\r\n").await;
    for _ in 0..3 {
        let r = say(
            &mut s,
            &format!("AUTH PLAIN {}\r\n", plain("alice@example.com", "bad")),
        )
        .await;
        assert!(r.starts_with("535 5.7.8"), "{r}");
    }
    let r = say(
        &mut s,
        &format!("AUTH PLAIN {}\r\n", plain("alice@example.com", "pw-alice")),
    )
    .await;
    assert!(
        r.starts_with("454 4.7.0") && r.contains("[mailgate: auth.locked"),
        "{r}"
    );
}

#[tokio::test]
async fn xoauth2_and_oauthbearer_with_access_tokens() {
    let t = setup(Limits::default()).await;
    let now = mailgate_gateway::now_ms() as i64;
    let token = |scope: &str| TokenRecord {
        token_sha256: mailgate_auth::sha256_hex(format!("tok-{scope}").as_bytes()),
        kind: mailgate_store::TokenKind::Access,
        grant: serde_json::json!({"type": "user", "user": "alice@example.com", "client_id": "web"}),
        scopes: vec![scope.into()],
        family: "f".into(),
        created_at_ms: now,
        expires_at_ms: now + 3_600_000,
        revoked: false,
        used: false,
    };
    t.store
        .tokens
        .insert_token(&token("https://mail.google.com/"))
        .await
        .unwrap();
    let xo = |tok: &str| {
        STANDARD.encode(format!(
            "user=alice@example.com\x01auth=Bearer {tok}\x01\x01"
        ))
    };

    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    say(&mut s, "EHLO c\r\n").await;
    let r = say(&mut s, &format!("AUTH XOAUTH2 {}\r\n", xo("wrong"))).await;
    let challenge = r.strip_prefix("334 ").unwrap().trim();
    assert_eq!(
        String::from_utf8(STANDARD.decode(challenge).unwrap()).unwrap(),
        r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#
    );
    let r = say(&mut s, "\r\n").await;
    assert!(
        r.starts_with("535 5.7.8 Username and Password not accepted. [mailgate: auth.invalid"),
        "{r}"
    );
    let r = say(&mut s, "AUTH XOAUTH2\r\n").await;
    assert_eq!(r, "334 \r\n");
    let r = say(
        &mut s,
        &format!("{}\r\n", xo("tok-https://mail.google.com/")),
    )
    .await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
    let r = say(
        &mut s,
        &format!("MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{MSG}"),
    )
    .await;
    assert_eq!(codes(&r), ["250", "250", "354", "250"], "{r}");

    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    say(&mut s, "EHLO c\r\n").await;
    let ob = STANDARD
        .encode("n,a=alice@example.com,\x01auth=Bearer tok-https://mail.google.com/\x01\x01");
    let r = say(&mut s, &format!("AUTH OAUTHBEARER {ob}\r\n")).await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
}

#[tokio::test]
async fn relay_listener_trusts_registered_ips_for_organisation_senders() {
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Relay, None);
    let r = say(&mut s, &format!("EHLO printer\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{MSG}")).await;
    assert_eq!(codes(&r), ["250", "250", "250", "354", "250"], "{r}");
    let r = say(&mut s, "MAIL FROM:<someone@else.org>\r\n").await;
    assert!(
        r.starts_with("550 5.7.1") || r.starts_with("553 5.7.1"),
        "{r}"
    );
    assert!(
        r.contains("[mailgate: sender.not_owned")
            || r.contains("[mailgate: sender.domain_unverified"),
        "{r}"
    );

    let mut s = t.session_from(Listener::Relay, None, "127.0.0.9:1234");
    let r = say(
        &mut s,
        "EHLO printer\r\nMAIL FROM:<scanner@example.com>\r\n",
    )
    .await;
    assert!(
        r.contains("550 5.7.1 Invalid credentials for relay [127.0.0.9]. [mailgate: relay.ip_not_allowed, decision "),
        "{r}"
    );
}

#[tokio::test]
async fn oversize_messages_are_counted_discarded_and_refused() {
    let t = setup(Limits {
        max_message_bytes: 1000,
        ..Limits::default()
    })
    .await;
    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    let r = say(
        &mut s,
        &format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<alice@example.com> SIZE=5000\r\n",
            plain("alice@example.com", "pw-alice")
        ),
    )
    .await;
    assert_eq!(codes(&r), ["250", "235", "552"], "{r}");
    let r = say(
        &mut s,
        "MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n",
    )
    .await;
    assert_eq!(codes(&r), ["250", "250", "354"], "{r}");
    let big = format!("Subject: x\r\n\r\n{}\r\n", "y".repeat(100));
    for _ in 0..50 {
        assert_eq!(say(&mut s, &big).await, "");
    }
    let r = say(&mut s, ".\r\nNOOP\r\n").await;
    assert_eq!(codes(&r), ["552", "250"], "{r}");
    // BDAT over the limit: the chunk is read and dropped, then refused.
    let r = say(
        &mut s,
        "MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@example.org>\r\n",
    )
    .await;
    assert_eq!(codes(&r), ["250", "250"], "{r}");
    let r = say(&mut s, &format!("BDAT 2000 LAST\r\n{}", "z".repeat(2000))).await;
    assert_eq!(codes(&r), ["552"], "{r}");
}

#[tokio::test]
async fn protocol_limits_close_the_connection() {
    let t = setup(Limits {
        hard_error_limit: 4,
        ..Limits::default()
    })
    .await;
    let mut s = t.session(Listener::Submission, None);
    let r = say(&mut s, "FOO\r\nBAR\r\nBAZ\r\n").await;
    assert_eq!(codes(&r), ["502", "502", "502"], "{r}");
    let step = s.ingest(b"QUUX\r\n").await;
    assert_eq!(step, Step::Close);
    let r = out(&mut s);
    assert_eq!(codes(&r), ["502", "421"], "{r}");
    assert!(
        r.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"),
        "{r}"
    );
    // Over-long lines are refused, not buffered.
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Submission, None);
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(10_000));
    let r = say(&mut s, &long).await;
    assert!(r.contains("500 5.5.2 Line too long."), "{r}");
}

mod arbitrary_input {
    use super::*;
    use proptest::prelude::*;

    fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let token = prop_oneof![
            Just(b"EHLO x\r\n".to_vec()),
            Just(b"STARTTLS\r\n".to_vec()),
            Just(b"AUTH PLAIN\r\n".to_vec()),
            Just(b"AUTH LOGIN\r\n".to_vec()),
            Just(b"AUTH XOAUTH2 dXNlcj14AWF1dGg9QmVhcmVyIHkBAQ==\r\n".to_vec()),
            Just(b"MAIL FROM:<alice@example.com>\r\n".to_vec()),
            Just(b"RCPT TO:<x@example.org>\r\n".to_vec()),
            Just(b"DATA\r\n".to_vec()),
            Just(b"BDAT 7\r\n".to_vec()),
            Just(b"BDAT 18446744073709551615 LAST\r\n".to_vec()),
            Just(b"\r\n.\r\n".to_vec()),
            Just(b".\r\n".to_vec()),
            Just(b"RSET\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..64),
        ];
        proptest::collection::vec(token, 0..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn never_panics_and_stays_bounded(input in chunks(), tls in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                // SQLite whatever the run's backend: this is the session's parser on arbitrary
                // input, not the store, and a PostgreSQL database for each of 48 cases would
                // only add a minute to the PostgreSQL pass.
                let sqlite = (mailgate_store::in_memory().await.unwrap(), None);
                let t = setup_on(sqlite, Limits { max_message_bytes: 4096, ..Limits::default() }).await;
                let (l, v) = if tls { (Listener::Smtps, Some(TlsVersion::Tls13)) } else { (Listener::Submission, None) };
                let mut s = t.session(l, v);
                for c in &input {
                    match s.ingest(c).await {
                        Step::StartTls => s.tls_started(TlsVersion::Tls13),
                        Step::Close => break,
                        Step::Continue => {}
                    }
                    let o = s.take_output();
                    prop_assert!(o.len() < 64 * 1024);
                }
                Ok(())
            })?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 13, item 5: bare LF / bare CR in a message (SMTP smuggling, CVE-2023-51764).

/// Feeds `input`; the replies and the driver's next step.
async fn say_step(s: &mut Session, input: &[u8]) -> (String, Step) {
    let step = s.ingest(input).await;
    (out(s), step)
}

/// Every message stored so far, as stored (leased from the queue).
async fn stored(t: &T) -> Vec<Vec<u8>> {
    let now = mailgate_gateway::now_ms() as i64 + 60_000;
    t.store
        .queue
        .lease_due("test", now, 60_000, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.raw)
        .collect()
}

fn bare_newline_in(raw: &[u8]) -> bool {
    raw.iter().enumerate().any(|(i, b)| match b {
        b'\n' => i == 0 || raw.get(i - 1) != Some(&b'\r'),
        b'\r' => raw.get(i + 1) != Some(&b'\n'),
        _ => false,
    })
}

/// A session on `l` inside a transaction, ready for DATA or BDAT.
async fn in_transaction(t: &T, l: Listener) -> Session {
    let (mut s, head) = match l {
        Listener::Relay => (
            t.session(l, None),
            "EHLO c\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\n".to_owned(),
        ),
        _ => (
            t.session(l, Some(TlsVersion::Tls13)),
            format!(
                "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<x@example.org>\r\n",
                plain("alice@example.com", "pw-alice")
            ),
        ),
    };
    let r = say(&mut s, &head).await;
    assert!(codes(&r).iter().all(|c| c.starts_with('2')), "{l:?}: {r}");
    s
}

const FROM_RELAY: &str = "From: scanner@example.com\r\n";
const FROM_ALICE: &str = "From: alice@example.com\r\n";

#[tokio::test]
async fn a_bare_lf_or_cr_is_refused_with_521_and_nothing_after_it_is_a_command() {
    let t = setup(Limits::default()).await;
    for l in [Listener::Submission, Listener::Smtps, Listener::Relay] {
        let from = if l == Listener::Relay {
            FROM_RELAY
        } else {
            FROM_ALICE
        };
        let cases = [
            // A line ended by LF alone.
            (format!("{from}\r\nline one\nline two\r\n.\r\n"), "<LF>"),
            // The smuggling patterns: LF . LF, and CR LF . LF, then a second transaction.
            (
                format!(
                    "{from}\r\nhi\n.\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n{from}\r\nsmuggled\r\n.\r\n"
                ),
                "<LF>",
            ),
            (
                format!(
                    "{from}\r\nhi\r\n.\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n{from}\r\nsmuggled\r\n.\r\n"
                ),
                "<LF>",
            ),
            // A CR alone, and CR LF . CR (no LF).
            (format!("{from}\r\nhi\rthere\r\n.\r\n"), "<CR>"),
            (
                format!("{from}\r\nhi\r\n.\rMAIL FROM:<alice@example.com>\r\n.\r\n"),
                "<CR>",
            ),
        ];
        for (body, kind) in cases {
            let mut s = in_transaction(&t, l).await;
            let (r, step) = say_step(&mut s, format!("DATA\r\n{body}QUIT\r\n").as_bytes()).await;
            assert_eq!(step, Step::Close, "{l:?} {body:?}: {r}");
            assert_eq!(codes(&r), ["354", "521"], "{l:?} {body:?}: {r}");
            let last = r.lines().last().unwrap();
            assert!(
                last.starts_with(&format!(
                    "521 5.5.2 Error: bare {kind} received [mailgate: message.bare_newline] Remedy: "
                )),
                "{l:?} {body:?}: {r}"
            );
            assert!(s.is_closed());
        }
        // Split across reads: the CR at the end of one read and the LF at the start of the next
        // are one CRLF.
        let mut s = in_transaction(&t, l).await;
        let (r, _) = say_step(&mut s, format!("DATA\r\n{from}\r\nhello\r").as_bytes()).await;
        assert_eq!(codes(&r), ["354"], "{r}");
        let (r, step) = say_step(&mut s, b"\nworld\r\n.\r\n").await;
        assert_eq!((codes(&r), step), (vec!["250"], Step::Continue), "{r}");
    }
    // BDAT: the same, as the chunk arrives.
    let mut s = in_transaction(&t, Listener::Smtps).await;
    let chunk = format!("{FROM_ALICE}\r\nbody\nmore\r\n");
    let (r, step) = say_step(
        &mut s,
        format!("BDAT {} LAST\r\n{chunk}", chunk.len()).as_bytes(),
    )
    .await;
    assert_eq!(step, Step::Close, "{r}");
    assert!(
        r.starts_with("521 5.5.2 Error: bare <LF> received [mailgate: message.bare_newline]"),
        "{r}"
    );
    // A bare CR ending the last chunk.
    let mut s = in_transaction(&t, Listener::Smtps).await;
    let chunk = format!("{FROM_ALICE}\r\nbody\r");
    let (r, step) = say_step(
        &mut s,
        format!("BDAT {} LAST\r\n{chunk}", chunk.len()).as_bytes(),
    )
    .await;
    assert_eq!(step, Step::Close, "{r}");
    assert!(r.starts_with("521 5.5.2 Error: bare <CR> received"), "{r}");
    // Only the CRLF messages of the split-read case were stored, without a bare newline.
    let kept = stored(&t).await;
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(kept.iter().all(|m| !bare_newline_in(m)), "{kept:?}");
}

#[tokio::test]
async fn with_normalize_bare_newlines_become_crlf_and_the_message_does_not_end_early() {
    let t = setup(Limits {
        bare_newline: BareNewline::Normalize,
        ..Limits::default()
    })
    .await;
    // LF-only lines, a stuffed dot after LF, and the smuggling pattern LF . LF followed by a
    // second transaction: one message, whose content it all is.
    let mut s = in_transaction(&t, Listener::Relay).await;
    let body = "From: scanner@example.com\nSubject: legacy\n\nline\n..dotted\n.\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n";
    let (r, step) = say_step(&mut s, format!("DATA\r\n{body}").as_bytes()).await;
    assert_eq!(step, Step::Continue, "{r}");
    assert_eq!(codes(&r), ["354", "250"], "{r}");
    let kept = stored(&t).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(&kept[0]),
        "From: scanner@example.com\r\nSubject: legacy\r\n\r\nline\r\n.dotted\r\n\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nsmuggled\r\n"
    );
    // CR LF . LF is not the end either; a bare CR becomes CRLF.
    let (r, _) = say_step(
        &mut s,
        b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nFrom: scanner@example.com\r\n\r\na\r\n.\nb\rc\r\n.\r\n",
    )
    .await;
    assert_eq!(codes(&r), ["250", "250", "354", "250"], "{r}");
    let kept = stored(&t).await;
    assert_eq!(
        String::from_utf8_lossy(&kept[0]),
        "From: scanner@example.com\r\n\r\na\r\n\r\nb\r\nc\r\n"
    );
    // BDAT: made CRLF, not unstuffed (BDAT has no dot-stuffing).
    let chunk = "From: scanner@example.com\nSubject: b\n\nx\n.y\r";
    let (r, _) = say_step(
        &mut s,
        format!(
            "MAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nBDAT {} LAST\r\n{chunk}",
            chunk.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(codes(&r), ["250", "250", "250"], "{r}");
    let kept = stored(&t).await;
    assert_eq!(
        String::from_utf8_lossy(&kept[0]),
        "From: scanner@example.com\r\nSubject: b\r\n\r\nx\r\n.y\r\n"
    );
    // An end of DATA that is not CR LF . CR LF (CR LF . CR CR LF, which smtp-proto would take as
    // the end) is refused whatever the setting.
    let (r, step) = say_step(
        &mut s,
        b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nFrom: scanner@example.com\r\n\r\nhi\r\n.\r\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(step, Step::Close, "{r}");
    assert_eq!(codes(&r), ["250", "250", "354", "521"], "{r}");
    assert!(stored(&t).await.is_empty());
}

/// Issue 13, item 11: a relay client trusted by its IP is not a user.
#[tokio::test]
async fn relay_refusals_speak_of_relay_clients_not_users() {
    let t = setup(Limits::default()).await;
    let mut s = t.session(Listener::Relay, None);
    let r = say(&mut s, "EHLO printer\r\nMAIL FROM:<someone@else.org>\r\n").await;
    let last = r.lines().last().unwrap();
    assert!(
        last.starts_with("553 5.7.1 <someone@else.org>: Sender address rejected: not an address relay clients from 127.0.0.1 may send as [mailgate: sender.not_owned, decision "),
        "{r}"
    );
    assert!(!last.contains("not owned by user"), "{r}");
    let r = say(
        &mut s,
        "MAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nFrom: ceo@evil.test\r\n\r\nhi\r\n.\r\n",
    )
    .await;
    let last = r.lines().last().unwrap();
    assert!(
        last.starts_with("553 5.7.1 <ceo@evil.test>: Sender address rejected: not an address relay clients from 127.0.0.1 may send as [mailgate: sender.not_owned"),
        "{r}"
    );
}

/// Issue 13, item 9: a token without https://mail.google.com/ is told both steps.
#[tokio::test]
async fn xoauth2_scope_refusal_names_the_scope_and_the_delegation() {
    let t = setup(Limits::default()).await;
    let now = mailgate_gateway::now_ms() as i64;
    t.store.tokens
        .insert_token(&TokenRecord {
            token_sha256: mailgate_auth::sha256_hex(b"tok-send-only"),
            kind: mailgate_store::TokenKind::Access,
            grant: serde_json::json!({"type": "user", "user": "alice@example.com", "client_id": "web"}),
            scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
            family: "f".into(),
            created_at_ms: now,
            expires_at_ms: now + 3_600_000,
            revoked: false,
            used: false,
        })
        .await
        .unwrap();
    let mut s = t.session(Listener::Smtps, Some(TlsVersion::Tls13));
    say(&mut s, "EHLO c\r\n").await;
    let xo = STANDARD.encode("user=alice@example.com\x01auth=Bearer tok-send-only\x01\x01");
    let r = say(&mut s, &format!("AUTH XOAUTH2 {xo}\r\n")).await;
    assert!(r.starts_with("334 "), "{r}");
    let r = say(&mut s, "\r\n").await;
    assert!(
        r.starts_with(
            "535 5.7.8 Username and Password not accepted. [mailgate: scope.insufficient, decision "
        ),
        "{r}"
    );
    let remedy = r.split_once("Remedy: ").map(|(_, x)| x).unwrap_or_default();
    assert!(remedy.contains("https://mail.google.com/"), "{r}");
    assert!(
        remedy.contains("domain-wide delegation must grant that scope too"),
        "{r}"
    );
    assert!(
        remedy.contains("domain_wide_delegation[<client_id>].scopes"),
        "{r}"
    );
}
