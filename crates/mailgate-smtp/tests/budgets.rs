//! The session's resource budgets fed bytes directly (no sockets): error replies delayed past the
//! soft error limit and the session closed at the hard limit (Postfix's `smtpd_*_error_limit`),
//! RCPTs past the limit counted as errors, commands without a mail transaction capped, when a
//! session becomes trusted (long idle timeout), and message bodies reserved from the process's
//! DATA memory budget (`452 4.3.1` when it is spent, the connection going on). The messages are
//! stored in SQLite, or in a PostgreSQL database of each test's own when
//! `MAILGATE_TEST_STORE=postgres` (`scripts/test`'s PostgreSQL pass): what is stored is checked
//! byte for byte.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a failed test")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mailgate_core::engine::TlsVersion;
use mailgate_core::orgfile::OrgFile;
use mailgate_gateway::Gateway;
use mailgate_gateway::budget;
use mailgate_smtp::{Limits, Listener, Session, SmtpContext, Step};
use mailgate_store::testing::{TestDb, fresh_store};
use mailgate_store::{Changeset, Stores};

const ORG: &str = r#"
domains: [{name: example.com, verified: true}]
users:
  - email: alice@example.com
    password: "pw-alice"
smtp_relay:
  allowed_ips: [127.0.0.1/32]
  allowed_senders: domain_addresses
"#;

/// A session context and the guard of its store's PostgreSQL database (on that backend): the
/// context as long as the database.
struct Ctx {
    ctx: Arc<SmtpContext>,
    _db: Option<TestDb>,
}

impl std::ops::Deref for Ctx {
    type Target = Arc<SmtpContext>;
    fn deref(&self) -> &Arc<SmtpContext> {
        &self.ctx
    }
}

async fn context(limits: Limits, budgets: budget::Limits) -> Ctx {
    context_and_store(limits, budgets).await.0
}

async fn context_and_store(limits: Limits, budgets: budget::Limits) -> (Ctx, Stores) {
    let (store, db) = fresh_store().await;
    let mut dir = OrgFile::parse(ORG).unwrap().directory;
    let issues = mailgate_auth::prepare_secrets(&mut dir, &Default::default()).unwrap();
    assert!(issues.is_empty(), "{issues:?}");
    store
        .directory
        .commit(0, &Changeset::between(&Default::default(), &dir), "t")
        .await
        .unwrap();
    let gateway = Gateway::open_with_limits(store.directory.clone(), budgets)
        .await
        .unwrap();
    let ctx = Arc::new(SmtpContext {
        gateway,
        tokens: store.tokens.clone(),
        hostname: "mx.test".into(),
        limits,
        auth_without_tls: false,
    });
    (Ctx { ctx, _db: db }, store)
}

fn session(ctx: &Arc<SmtpContext>, l: Listener, tls: Option<TlsVersion>) -> Session {
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut s = Session::new(ctx.clone(), l, peer, tls, true);
    s.greeting();
    let g = out(&mut s);
    assert!(g.starts_with("220 mx.test ESMTP"), "{g}");
    s
}

fn out(s: &mut Session) -> String {
    String::from_utf8(s.take_output()).unwrap()
}

/// The reply codes of the final lines of `replies`.
fn codes(replies: &str) -> Vec<&str> {
    replies
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| l.get(..3).unwrap_or(""))
        .collect()
}

const MSG: &str = "From: scanner@example.com\r\nTo: x@example.org\r\nSubject: hi\r\n\r\nhello\r\n";

/// The refusal flood of issue 12 item 3: EHLO then MAIL FROM after MAIL FROM on a plaintext
/// submission connection (each refused: TLS is required), all in one write.
#[tokio::test]
async fn refusals_are_delayed_past_the_soft_limit_and_cut_at_the_hard_limit() {
    let ctx = context(Limits::default(), budget::Limits::default()).await;
    let mut s = session(&ctx, Listener::Submission, None);
    let flood = format!(
        "EHLO c\r\n{}",
        "MAIL FROM:<alice@example.com>\r\n".repeat(1000)
    );
    assert_eq!(s.ingest(flood.as_bytes()).await, Step::Close);
    let r = out(&mut s);
    let c = codes(&r);
    assert_eq!(c.len(), 22, "{r}");
    assert_eq!(c[0], "250");
    assert!(c[1..21].iter().all(|c| *c == "530"), "{r}");
    assert!(
        r.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"),
        "{r}"
    );
    assert!(s.is_closed());
    // Errors 10 to 19 were each delayed by a second; the 20th closed the session.
    assert_eq!(s.take_delay(), Duration::from_secs(10));
    assert_eq!(s.take_delay(), Duration::ZERO);

    // Unknown commands and syntax errors count the same way, with the configured numbers.
    let ctx = context(
        Limits {
            soft_error_limit: 2,
            hard_error_limit: 4,
            error_sleep: Duration::from_millis(7),
            ..Limits::default()
        },
        budget::Limits::default(),
    )
    .await;
    let mut s = session(&ctx, Listener::Submission, None);
    assert_eq!(s.ingest(b"FOO\r\n").await, Step::Continue);
    assert_eq!(s.take_delay(), Duration::ZERO);
    assert_eq!(s.ingest(b"MAIL FROM:<<<\r\nNOOP\r\n").await, Step::Continue);
    assert_eq!(s.take_delay(), Duration::from_millis(7));
    assert_eq!(s.ingest(b"BAR\r\nNOOP\r\nBAZ\r\n").await, Step::Close);
    let r = out(&mut s);
    assert_eq!(
        codes(&r),
        ["502", "501", "250", "502", "250", "502", "421"],
        "{r}"
    );
    assert_eq!(s.take_delay(), Duration::from_millis(7));
}

/// RCPTs past the per-transaction limit are answered 452 and count as errors, so a flood of
/// them ends the connection instead of running forever.
#[tokio::test]
async fn rcpts_past_the_limit_count_as_errors() {
    let ctx = context(
        Limits {
            max_recipients: 2,
            ..Limits::default()
        },
        budget::Limits::default(),
    )
    .await;
    let mut s = session(&ctx, Listener::Relay, None);
    let mut input = String::from("EHLO printer\r\nMAIL FROM:<scanner@example.com>\r\n");
    for i in 0..500 {
        input.push_str(&format!("RCPT TO:<r{i}@example.org>\r\n"));
    }
    assert_eq!(s.ingest(input.as_bytes()).await, Step::Close);
    let r = out(&mut s);
    let c = codes(&r);
    assert_eq!(c[..4], ["250", "250", "250", "250"], "{r}");
    assert_eq!(c.iter().filter(|c| **c == "452").count(), 20, "{r}");
    assert_eq!(c.last(), Some(&"421"), "{r}");
}

/// A message stored is what a client is for: the error count starts again, so a long-lived
/// relay connection with an occasional refusal is not cut.
#[tokio::test]
async fn a_stored_message_starts_the_error_count_again() {
    let ctx = context(Limits::default(), budget::Limits::default()).await;
    let mut s = session(&ctx, Listener::Relay, None);
    let bad = "FOO\r\n".repeat(15);
    let r = {
        s.ingest(b"EHLO printer\r\n").await;
        s.ingest(bad.as_bytes()).await;
        out(&mut s)
    };
    assert_eq!(codes(&r).iter().filter(|c| **c == "502").count(), 15);
    assert_eq!(s.take_delay(), Duration::from_secs(6));
    let send =
        format!("MAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{MSG}.\r\n");
    assert_eq!(s.ingest(send.as_bytes()).await, Step::Continue);
    let r = out(&mut s);
    assert_eq!(codes(&r), ["250", "250", "354", "250"], "{r}");
    assert_eq!(s.ingest(bad.as_bytes()).await, Step::Continue);
    assert!(!s.is_closed());
    assert_eq!(s.take_delay(), Duration::from_secs(6));
}

/// Commands outside a mail transaction are capped (100 by default): NOOP or RSET forever is
/// not a use of a mail server.
#[tokio::test]
async fn commands_without_a_mail_transaction_are_capped() {
    let ctx = context(Limits::default(), budget::Limits::default()).await;
    let mut s = session(&ctx, Listener::Relay, None);
    assert_eq!(
        s.ingest("NOOP\r\n".repeat(100).as_bytes()).await,
        Step::Continue
    );
    assert_eq!(codes(&out(&mut s)).len(), 100);
    assert_eq!(s.ingest(b"NOOP\r\n").await, Step::Close);
    let r = out(&mut s);
    assert!(
        r.starts_with("421 4.7.0 Too many commands without a mail transaction"),
        "{r}"
    );

    // A transaction started starts the count again.
    let mut s = session(&ctx, Listener::Relay, None);
    let mut input = "NOOP\r\n".repeat(90);
    input.push_str("EHLO printer\r\nMAIL FROM:<scanner@example.com>\r\nRSET\r\n");
    input.push_str(&"NOOP\r\n".repeat(90));
    assert_eq!(s.ingest(input.as_bytes()).await, Step::Continue);
    assert!(!s.is_closed());
}

/// Untrusted sessions (the short idle timeouts apply) until AUTH succeeds or a mail
/// transaction starts (the relay's IP trust is decided at MAIL FROM).
#[tokio::test]
async fn sessions_are_trusted_after_auth_or_a_transaction() {
    let ctx = context(Limits::default(), budget::Limits::default()).await;
    let mut s = session(&ctx, Listener::Smtps, Some(TlsVersion::Tls13));
    s.ingest(b"EHLO c\r\nAUTH PLAIN d3Jvbmc=\r\nMAIL FROM:<alice@example.com>\r\n")
        .await;
    let r = out(&mut s);
    assert!(!s.trusted(), "{r}");
    let auth = STANDARD.encode("\0alice@example.com\0pw-alice");
    s.ingest(format!("AUTH PLAIN {auth}\r\n").as_bytes()).await;
    let r = out(&mut s);
    assert!(r.starts_with("235"), "{r}");
    assert!(s.trusted());

    let mut s = session(&ctx, Listener::Relay, None);
    s.ingest(b"EHLO printer\r\nMAIL FROM:<someone@other.example>\r\n")
        .await;
    let r = out(&mut s);
    assert!(!s.trusted(), "{r}");
    s.ingest(b"MAIL FROM:<scanner@example.com>\r\n").await;
    let r = out(&mut s);
    assert!(s.trusted(), "{r}");
}

/// Sends `n` bytes of message body in 16 KiB reads (like the server does).
async fn body(s: &mut Session, n: usize) {
    let line = format!("{}\r\n", "x".repeat(1022));
    let read = line.repeat(16);
    let mut sent = 0;
    while sent < n {
        assert_eq!(s.ingest(read.as_bytes()).await, Step::Continue);
        sent += read.len();
    }
}

/// Bodies are reserved from the process-wide budget as they grow: while one connection holds
/// part of it, another's large message is refused with `452 4.3.1` (its body dropped), its
/// connection goes on, and once the first is stored the budget is whole again.
#[tokio::test]
async fn data_memory_is_reserved_from_the_process_budget() {
    let max = 3 * 1024 * 1024;
    let ctx = context(
        Limits::default(),
        budget::Limits {
            data_memory_bytes: max,
            ..budget::Limits::default()
        },
    )
    .await;
    let memory = ctx.gateway.budget().data_memory().clone();
    let start = "EHLO printer\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\n";
    let mut a = session(&ctx, Listener::Relay, None);
    a.ingest(format!("{start}DATA\r\n{MSG}").as_bytes()).await;
    body(&mut a, 600 * 1024).await;
    assert!(
        memory.used() >= 600 * 1024 && memory.used() <= max,
        "a's body is reserved: {} bytes",
        memory.used()
    );

    let mut b = session(&ctx, Listener::Relay, None);
    b.ingest(format!("{start}DATA\r\n{MSG}").as_bytes()).await;
    body(&mut b, 2500 * 1024).await;
    assert!(memory.used() <= max);
    assert_eq!(b.ingest(b".\r\nNOOP\r\n").await, Step::Continue);
    let r = out(&mut b);
    assert!(r.contains("452 4.3.1 Insufficient system storage"), "{r}");
    assert!(r.ends_with("250 2.0.0 OK\r\n"), "{r}");

    // BDAT the same way, chunk by chunk.
    b.ingest(b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\n")
        .await;
    let chunk = "y".repeat(1000 * 1024);
    b.ingest(format!("BDAT {}\r\n{chunk}", chunk.len()).as_bytes())
        .await;
    b.ingest(format!("BDAT {}\r\n{chunk}", chunk.len()).as_bytes())
        .await;
    let r = out(&mut b);
    assert_eq!(codes(&r), ["250", "250", "250", "452"], "{r}");

    // The first message is stored; its reservation is returned with it.
    a.ingest(b".\r\n").await;
    let r = out(&mut a);
    assert!(r.contains("250 2.0.0 OK "), "{r}");
    assert_eq!(memory.used(), 0);

    // Now the second connection's message fits.
    b.ingest(format!("RSET\r\n{start}DATA\r\n{MSG}").as_bytes())
        .await;
    body(&mut b, 600 * 1024).await;
    b.ingest(b".\r\n").await;
    let r = out(&mut b);
    assert!(r.contains("250 2.0.0 OK "), "{r}");
    assert_eq!(memory.used(), 0);
}

/// Storing a message copies it twice more (SQLite's bound copy and the row it builds): the
/// copies are reserved too, so a body that fits the budget but whose copies do not is refused
/// with `452 4.3.1`.
#[tokio::test]
async fn storing_a_message_reserves_its_copy() {
    let ctx = context(
        Limits::default(),
        budget::Limits {
            data_memory_bytes: 1024 * 1024,
            ..budget::Limits::default()
        },
    )
    .await;
    let mut s = session(&ctx, Listener::Relay, None);
    let start = "EHLO printer\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\n";
    s.ingest(format!("{start}DATA\r\n{MSG}").as_bytes()).await;
    body(&mut s, 600 * 1024).await;
    s.ingest(b".\r\n").await;
    let r = out(&mut s);
    assert!(
        r.contains(
            "452 4.3.1 Insufficient system storage, try again later. [mailgate: server.busy]"
        ),
        "{r}"
    );
    assert_eq!(ctx.gateway.budget().data_memory().used(), 0);
    s.ingest(
        format!("MAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{MSG}.\r\n")
            .as_bytes(),
    )
    .await;
    let r = out(&mut s);
    assert!(r.contains("250 2.0.0 OK "), "{r}");
}

/// A body reserves about what it holds (chunks of 64 KiB doubling to 1 MiB), never more than
/// the size limit allows, and nothing once it is over the limit.
#[tokio::test]
async fn a_body_reserves_about_what_it_holds() {
    let ctx = context(
        Limits {
            max_message_bytes: 2 * 1024 * 1024,
            ..Limits::default()
        },
        budget::Limits::default(),
    )
    .await;
    let memory = ctx.gateway.budget().data_memory().clone();
    let mut s = session(&ctx, Listener::Relay, None);
    s.ingest(
        format!(
            "EHLO p\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{MSG}"
        )
        .as_bytes(),
    )
    .await;
    let mut sent = 0;
    for kib in [100, 500, 1000, 1900] {
        body(&mut s, (kib - sent) * 1024).await;
        sent = kib;
        let used = memory.used();
        assert!(used >= kib * 1024, "{used} reserved for {kib} KiB");
        // Chunks double from 64 KiB to 1 MiB: at most one chunk ahead of the body.
        let bound = (kib * 1024 * 2).min(kib * 1024 + 1024 * 1024) + 64 * 1024;
        assert!(
            used <= bound.min(2 * 1024 * 1024 + 2),
            "{used} reserved for {kib} KiB"
        );
    }
    // Over the size limit: the body is dropped, and so is its reservation.
    body(&mut s, 400 * 1024).await;
    assert_eq!(memory.used(), 0);
    s.ingest(b".\r\n").await;
    assert!(out(&mut s).contains("552 5.3.4"));
}

/// The stored body is the received one with Bcc removed (the header rewritten in place, the
/// rest untouched), and the reservation for storing it is returned once it is stored.
#[tokio::test]
async fn the_stored_body_drops_bcc_and_keeps_the_rest() {
    let (ctx, store) = context_and_store(Limits::default(), budget::Limits::default()).await;
    let mut s = session(&ctx, Listener::Relay, None);
    let text = "line of the body\r\n".repeat(20_000);
    let msg = format!(
        "From: scanner@example.com\r\nBcc: hidden@example.org,\r\n  other@example.org\r\nTo: x@example.org\r\nSubject: s\r\n\r\n{text}"
    );
    s.ingest(
        format!("EHLO p\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{msg}.\r\n")
            .as_bytes(),
    )
    .await;
    let r = out(&mut s);
    assert!(r.contains("250 2.0.0 OK "), "{r}");
    assert_eq!(ctx.gateway.budget().data_memory().used(), 0);
    let leased = store
        .queue
        .lease_due("t", i64::MAX / 2, 1000, 10)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    let raw = String::from_utf8(leased[0].raw.clone()).unwrap();
    assert_eq!(
        raw,
        format!("From: scanner@example.com\r\nTo: x@example.org\r\nSubject: s\r\n\r\n{text}")
    );
}

/// The end of DATA removes the CR it wrote last: when that CR filled a chunk, it moved with the
/// next one, so the stored body is exactly what was sent, whatever the reads' boundaries.
#[tokio::test]
async fn the_end_of_data_across_a_chunk_boundary() {
    let (ctx, store) = context_and_store(Limits::default(), budget::Limits::default()).await;
    let mut s = session(&ctx, Listener::Relay, None);
    s.ingest(b"EHLO p\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
        .await;
    let head = "From: scanner@example.com\r\nSubject: s\r\n\r\n";
    // 65,535 bytes, then the CR after the final dot is the 65,536th: the first chunk is full.
    let fill = 65_535 - head.len() - 2;
    let msg = format!("{head}{}\r\n", "b".repeat(fill));
    assert_eq!(msg.len(), 65_535);
    for piece in [msg.as_str(), ".", "\r", "\n"] {
        assert_eq!(s.ingest(piece.as_bytes()).await, Step::Continue);
    }
    let r = out(&mut s);
    assert!(
        r.ends_with("250 2.0.0 OK ") || r.contains("250 2.0.0 OK "),
        "{r}"
    );
    let leased = store
        .queue
        .lease_due("t", i64::MAX / 2, 1000, 10)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert!(
        leased[0].raw == msg.as_bytes(),
        "the stored body differs at its end"
    );
}
