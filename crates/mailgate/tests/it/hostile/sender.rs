//! The send-as guarantee under attack (issue 12, items 9 and 10): a message that shows its
//! reader a From the sender may not use. Before, only the last of two From fields was checked
//! (`From: ceo@...` then `From: alice@...` went out as alice's), a From naming several
//! addresses was checked on its first one, and the relay listener never looked at the header
//! at all (envelope `<support@example.com>` with `From: ceo@evil.test`, a suspended user's or a
//! sending-revoked user's address, or no From at all: 250).
//!
//! Each test drives the real binary over loopback: SMTP submission over STARTTLS as alice
//! (rustls, AUTH PLAIN), the Gmail door with a token from the consent flow, the relay listener
//! from the trusted 127.0.0.1; it asserts the refusal with Mailgate's code and explanation, that
//! nothing refused was captured (a control message sent after it is), and the suite's memory
//! and latency bounds with a legitimate probe running on another door.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};

use super::{DEMO_PASSWORD, Probe, SmtpConn, assert_budget};
use crate::harness::{Gateway, Server, eventually};

/// Two From fields, the unowned one first: what a mail client shows its reader.
const TWO_FROM: &str = "From: ceo@example.com\r\nFrom: alice@example.com\r\n";

/// A message with `head` (header lines, each ending in CRLF) and a unique subject.
fn message(head: &str, subject: &str) -> String {
    format!("{head}To: x@example.org\r\nSubject: {subject}\r\n\r\nhello\r\n")
}

// ---------------------------------------------------------------------------------------------
// SMTP submission over STARTTLS

/// An SMTP session on the submission port: STARTTLS, then AUTH PLAIN as `user`.
struct Submission {
    s: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

/// Reads one (multi-line) reply from `r`; returns its last line.
fn reply(r: &mut impl BufRead) -> String {
    for _ in 0..100 {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return "(connection closed)".into();
        }
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line.trim_end().to_owned();
        }
    }
    "(endless reply)".into()
}

impl Submission {
    fn open(gw: &Gateway, server: &Server, user: &str) -> Submission {
        let tcp = TcpStream::connect(&server.smtp).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut plain = BufReader::new(tcp.try_clone().unwrap());
        let mut w = tcp.try_clone().unwrap();
        assert!(reply(&mut plain).starts_with("220"));
        w.write_all(b"EHLO client.example\r\n").unwrap();
        assert!(reply(&mut plain).starts_with("250"));
        w.write_all(b"STARTTLS\r\n").unwrap();
        assert!(reply(&mut plain).starts_with("220"));
        let conn = rustls::ClientConnection::new(
            super::tls_client(gw),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut s = Submission {
            s: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
        };
        assert!(s.cmd("EHLO client.example\r\n").starts_with("250"));
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{DEMO_PASSWORD}"));
        let r = s.cmd(&format!("AUTH PLAIN {plain}\r\n"));
        assert!(r.starts_with("235"), "AUTH: {r}");
        s
    }

    fn cmd(&mut self, line: &str) -> String {
        self.s.get_mut().write_all(line.as_bytes()).unwrap();
        self.s.get_mut().flush().unwrap();
        reply(&mut self.s)
    }

    /// One transaction from `envelope` to x@example.org with `raw`; the reply to the end of data.
    fn send(&mut self, envelope: &str, raw: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{envelope}>\r\n"));
        assert!(r.starts_with("250"), "MAIL FROM: {r}");
        let r = self.cmd("RCPT TO:<x@example.org>\r\n");
        assert!(r.starts_with("250"), "RCPT TO: {r}");
        let r = self.cmd("DATA\r\n");
        assert!(r.starts_with("354"), "DATA: {r}");
        self.cmd(&format!("{raw}.\r\n"))
    }
}

/// Asserts an SMTP refusal: reply code and Mailgate's code, and returns the line.
fn refused(line: &str, code: &str, reason: &str) -> String {
    assert!(
        line.starts_with(code) && line.contains(&format!("[mailgate: {reason}, decision ")),
        "expected {code} with {reason}, got: {line}"
    );
    line.to_owned()
}

// ---------------------------------------------------------------------------------------------
// The Gmail door (a token from the consent flow, like a browser)

const CLIENT_ID: &str = "demo-web-client";
const REDIRECT: &str = "http://127.0.0.1:8765/callback";

struct Resp {
    status: u16,
    head: String,
    body: String,
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One HTTP/1.1 request on its own connection (`Connection: close`, read to the end).
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, mut body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let mut decoded = String::new();
    if chunked {
        for _ in 0..10_000 {
            let Some((size, rest)) = body.split_once("\r\n") else {
                break;
            };
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || rest.len() < n {
                break;
            }
            decoded.push_str(&rest[..n]);
            body = rest[n..].trim_start_matches("\r\n");
        }
    } else {
        decoded = body.to_owned();
    }
    Resp {
        status,
        head: head.to_owned(),
        body: decoded,
    }
}

/// An access token for `email` through the authorization-code flow (sign-in page, form with
/// its CSRF token and cookie, code exchange).
fn gmail_token(server: &Server, email: &str) -> String {
    let params = [
        ("client_id", CLIENT_ID),
        ("redirect_uri", REDIRECT),
        ("response_type", "code"),
        ("scope", "https://www.googleapis.com/auth/gmail.send"),
        ("state", "xyz"),
    ];
    let page = http(
        &server.addr,
        "GET",
        &format!("/o/oauth2/auth?{}", form(&params)),
        &[],
        "",
    );
    assert_eq!(page.status, 200, "{}", page.body);
    let cookie = page
        .head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("set-cookie").then(|| v.trim())
        })
        .and_then(|c| c.split(';').next())
        .unwrap_or_default()
        .to_owned();
    let csrf = page
        .body
        .split("name=\"csrf_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned();
    let mut fields = params.to_vec();
    fields.extend([
        ("email", email),
        ("password", DEMO_PASSWORD),
        ("csrf_token", csrf.as_str()),
    ]);
    let signed = http(
        &server.addr,
        "POST",
        "/o/oauth2/auth",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &cookie),
        ],
        &form(&fields),
    );
    let code = signed
        .head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location").then(|| v.trim())
        })
        .and_then(|loc| loc.split_once('?'))
        .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("code=")))
        .map(|c| c.replace("%2F", "/"))
        .unwrap_or_else(|| panic!("no code: {} {}", signed.head, signed.body));
    let t = http(
        &server.addr,
        "POST",
        "/token",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", CLIENT_ID),
            ("client_secret", "demo-client-secret"),
        ]),
    );
    assert_eq!(t.status, 200, "{}", t.body);
    let j: Value = serde_json::from_str(&t.body).unwrap();
    j["access_token"].as_str().unwrap().to_owned()
}

/// `messages.send` with `raw`: (status, the error's `message`, the mailgate ErrorInfo).
fn gmail_send(server: &Server, token: &str, raw: &str) -> (u16, String, Value) {
    let body = json!({
        "raw": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    })
    .to_string();
    let r = http(
        &server.addr,
        "POST",
        "/gmail/v1/users/me/messages/send",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        &body,
    );
    let j: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    let info = j["error"]["details"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["domain"] == "mailgate"))
        .cloned()
        .unwrap_or(Value::Null);
    let message = j["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (r.status, message, info)
}

// ---------------------------------------------------------------------------------------------
// What was captured

/// The subjects of every captured message.
fn captured_subjects(gw: &Gateway) -> String {
    gw.ok(&["captured", "list", "--limit", "100000"])
}

/// Waits for the control message `control` to be captured, then asserts that no message whose
/// subject starts with `prefix` was (refused messages never reach the queue).
fn nothing_refused_was_captured(gw: &Gateway, control: &str, prefix: &str) {
    assert!(
        eventually(Duration::from_secs(20), || captured_subjects(gw)
            .contains(control)),
        "the control message {control} was never captured"
    );
    let all = captured_subjects(gw);
    let leaked: Vec<_> = all
        .lines()
        .filter(|l| l.contains(&format!("subject={prefix}")))
        .collect();
    assert!(
        leaked.is_empty(),
        "refused messages were captured: {leaked:?}"
    );
}

/// Repeats `attempt` (each round must be refused again) for at least [`ATTACK`] and at most
/// [`MAX_ROUNDS`] rounds, so the probe measures the door while it is being tried.
fn keep_trying(mut attempt: impl FnMut(usize)) {
    let start = Instant::now();
    for i in 0..MAX_ROUNDS {
        if start.elapsed() >= ATTACK {
            break;
        }
        attempt(i);
        std::thread::sleep(PAUSE);
    }
}

/// Between rounds: the point is that every try is refused, not a flood (floods have their own
/// tests).
const PAUSE: Duration = Duration::from_millis(10);

const ATTACK: Duration = Duration::from_millis(1500);
const MAX_ROUNDS: usize = 300;

// ---------------------------------------------------------------------------------------------
// The tests

/// Issue 12 item 9: `From: ceo@example.com` then `From: alice@example.com`, sent as alice, was
/// accepted on SMTP (250) and on the Gmail door (200): only the last From was checked, and mail
/// clients show the first. RFC 5322 allows exactly one From field: now both doors refuse it as
/// `message.invalid`, saying how many From fields there are and what to do.
#[test]
fn two_from_fields_are_refused_on_every_door() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let probe = Probe::relay(&server);

    let mut smtp = Submission::open(&gw, &server, "alice@example.com");
    let line = refused(
        &smtp.send(
            "alice@example.com",
            &message(TWO_FROM, "refused-two-from-smtp"),
        ),
        "554 5.6.0",
        "message.invalid",
    );
    assert!(
        line.contains("2 From header fields")
            && line.contains("remove every From header field but one"),
        "{line}"
    );
    // The other order too, and three fields.
    refused(
        &smtp.send(
            "alice@example.com",
            &message(
                "From: alice@example.com\r\nFrom: ceo@example.com\r\n",
                "refused-two-from-smtp-2",
            ),
        ),
        "554 5.6.0",
        "message.invalid",
    );
    refused(
        &smtp.send(
            "alice@example.com",
            &message(
                "From: alice@example.com\r\nFROM : alice@example.com\r\nfrom: al@example.com\r\n",
                "refused-three-from-smtp",
            ),
        ),
        "554 5.6.0",
        "message.invalid",
    );

    let token = gmail_token(&server, "alice@example.com");
    let (status, msg, info) = gmail_send(
        &server,
        &token,
        &message(TWO_FROM, "refused-two-from-gmail"),
    );
    assert_eq!(status, 400, "{msg} {info}");
    assert_eq!(info["reason"], "message.invalid", "{info}");
    assert!(msg.contains("2 From header fields"), "{msg}");
    assert!(
        info["metadata"]["remedy"]
            .as_str()
            .is_some_and(|r| r.contains("remove every From header field but one")),
        "{info}"
    );

    keep_trying(|i| {
        let raw = message(TWO_FROM, &format!("refused-two-from-{i}"));
        refused(
            &smtp.send("alice@example.com", &raw),
            "554 5.6.0",
            "message.invalid",
        );
        assert_eq!(gmail_send(&server, &token, &raw).0, 400);
    });

    // Legitimate mail still goes through both doors.
    let ok = smtp.send(
        "alice@example.com",
        &message("From: alice@example.com\r\n", "control-two-from-smtp"),
    );
    assert!(ok.starts_with("250 2.0.0 OK"), "{ok}");
    let (status, msg, _) = gmail_send(
        &server,
        &token,
        &message("From: alice@example.com\r\n", "control-two-from-gmail"),
    );
    assert_eq!(status, 200, "{msg}");
    let report = probe.finish();

    nothing_refused_was_captured(&gw, "control-two-from-smtp", "refused-");
    nothing_refused_was_captured(&gw, "control-two-from-gmail", "refused-");
    assert_budget(&server, &report);
}

/// Issue 12 item 9: `From: alice@example.com, ceo@example.com` was accepted (only the first
/// address was checked). Now every address of the From field (and Sender) must be alice's: with
/// a Sender (RFC 5322 requires one when From names several mailboxes) the unowned address is
/// refused as `sender.not_owned`; without one the message is malformed.
#[test]
fn from_with_an_unowned_second_address_is_refused() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let probe = Probe::relay(&server);

    let mut smtp = Submission::open(&gw, &server, "alice@example.com");
    let line = refused(
        &smtp.send(
            "alice@example.com",
            &message(
                "From: alice@example.com, ceo@example.com\r\nSender: alice@example.com\r\n",
                "refused-second-smtp",
            ),
        ),
        "553 5.7.1",
        "sender.not_owned",
    );
    assert!(line.contains("<ceo@example.com>"), "{line}");
    // In a group, in Sender, and without a Sender at all.
    refused(
        &smtp.send(
            "alice@example.com",
            &message(
                "From: board: alice@example.com, ceo@example.com;\r\nSender: alice@example.com\r\n",
                "refused-group-smtp",
            ),
        ),
        "553 5.7.1",
        "sender.not_owned",
    );
    refused(
        &smtp.send(
            "alice@example.com",
            &message(
                "From: alice@example.com\r\nSender: ceo@example.com\r\n",
                "refused-sender-smtp",
            ),
        ),
        "553 5.7.1",
        "sender.not_owned",
    );
    let line = refused(
        &smtp.send(
            "alice@example.com",
            &message(
                "From: alice@example.com, ceo@example.com\r\n",
                "refused-nosender-smtp",
            ),
        ),
        "554 5.6.0",
        "message.invalid",
    );
    assert!(line.contains("no Sender field"), "{line}");

    let token = gmail_token(&server, "alice@example.com");
    let (status, msg, info) = gmail_send(
        &server,
        &token,
        &message(
            "From: alice@example.com, ceo@example.com\r\nSender: alice@example.com\r\n",
            "refused-second-gmail",
        ),
    );
    assert_eq!(status, 403, "{msg} {info}");
    assert_eq!(info["reason"], "sender.not_owned", "{info}");
    assert_eq!(
        info["metadata"]["object_at_fault"], "address ceo@example.com",
        "{info}"
    );

    // The SendGrid door builds its own From, but a custom `Sender` header is the client's.
    let mail = json!({
        "personalizations": [{"to": [{"email": "x@example.org"}]}],
        "from": {"email": "alice@example.com"},
        "headers": {"Sender": "ceo@example.com"},
        "subject": "refused-sender-sendgrid",
        "content": [{"type": "text/plain", "value": "hello"}],
    });
    let r = http(
        &server.addr,
        "POST",
        "/v3/mail/send",
        &[
            ("Authorization", &format!("Bearer {}", super::DEMO_KEY)),
            ("Content-Type", "application/json"),
        ],
        &mail.to_string(),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("sender.not_owned"), "{}", r.body);

    keep_trying(|i| {
        let raw = message(
            "From: alice@example.com, ceo@example.com\r\nSender: alice@example.com\r\n",
            &format!("refused-second-{i}"),
        );
        refused(
            &smtp.send("alice@example.com", &raw),
            "553 5.7.1",
            "sender.not_owned",
        );
        assert_eq!(gmail_send(&server, &token, &raw).0, 403);
    });

    // Several addresses alice owns, with a Sender, are fine.
    let ok = smtp.send(
        "alice@example.com",
        &message(
            "From: alice@example.com, support@example.com\r\nSender: alice@example.com\r\n",
            "control-second-smtp",
        ),
    );
    assert!(ok.starts_with("250 2.0.0 OK"), "{ok}");
    let report = probe.finish();

    nothing_refused_was_captured(&gw, "control-second-smtp", "refused-");
    assert_budget(&server, &report);
}

/// Issue 12 item 10: the relay listener (trusted IP, no AUTH) took envelope
/// `<support@example.com>` with `From: ceo@evil.test`, with the suspended bob's or the
/// sending-revoked mallory's address, or with no From at all (250). Now the header answers to
/// the same rules as the envelope: `smtp_relay.allowed_senders` for every From and Sender
/// address, and the account state of every user the header names.
#[test]
fn relay_checks_header_from() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let probe = Probe::sendgrid(&server);

    let mut relay = SmtpConn::open(&server.smtp_relay).unwrap();
    let mut send = |head: &str, subject: &str| -> String {
        relay
            .expect("MAIL FROM:<support@example.com>\r\n", "250")
            .unwrap();
        relay.expect("RCPT TO:<x@example.org>\r\n", "250").unwrap();
        relay.expect("DATA\r\n", "354").unwrap();
        relay
            .w
            .write_all(format!("{}.\r\n", message(head, subject)).as_bytes())
            .unwrap();
        relay.reply().unwrap()
    };
    let line = refused(
        &send("From: ceo@evil.test\r\n", "refused-relay-evil"),
        "553 5.7.1",
        "sender.not_owned",
    );
    assert!(line.contains("smtp_relay.allowed_senders"), "{line}");
    refused(
        &send("From: bob@example.com\r\n", "refused-relay-suspended"),
        "550 5.7.0",
        "account.suspended",
    );
    refused(
        &send("From: mallory@example.com\r\n", "refused-relay-revoked"),
        "550 5.7.1",
        "account.sending_revoked",
    );
    let line = refused(
        &send("", "refused-relay-nofrom"),
        "554 5.6.0",
        "message.invalid",
    );
    assert!(line.contains("no From header field"), "{line}");
    // A Sender naming someone else's domain, and a second From, are refused too.
    refused(
        &send(
            "From: support@example.com\r\nSender: ceo@evil.test\r\n",
            "refused-relay-sender",
        ),
        "553 5.7.1",
        "sender.not_owned",
    );
    refused(
        &send(
            "From: support@example.com\r\nFrom: ceo@evil.test\r\n",
            "refused-relay-two",
        ),
        "554 5.6.0",
        "message.invalid",
    );
    let spoofs = [
        ("From: ceo@evil.test\r\n", "sender.not_owned"),
        ("From: bob@example.com\r\n", "account.suspended"),
        ("From: mallory@example.com\r\n", "account.sending_revoked"),
        ("", "message.invalid"),
    ];
    keep_trying(|i| {
        let (head, code) = spoofs[i % spoofs.len()];
        let line = send(head, &format!("refused-relay-{i}"));
        assert!(line.contains(&format!("[mailgate: {code}, ")), "{line}");
    });
    // The organisation's own addresses still relay.
    let ok = send("From: support@example.com\r\n", "control-relay");
    assert!(ok.starts_with("250 2.0.0 OK"), "{ok}");
    let report = probe.finish();

    nothing_refused_was_captured(&gw, "control-relay", "refused-");
    assert_budget(&server, &report);
}
