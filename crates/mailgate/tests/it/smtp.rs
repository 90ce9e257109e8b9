//! The SMTP doors driven by Python's smtplib over real sockets: submission with STARTTLS,
//! implicit TLS, the relay listener; AUTH PLAIN, LOGIN and XOAUTH2 (token from the OAuth server);
//! and the documented reply for every refusal, with Mailgate's code and decision id.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Gateway, demo, eventually, json_lines, python, python_driver};

pub(crate) const PW: &str = "correct horse battery staple";

/// Runs tests/python/smtp_client.py; one JSON value per step.
pub(crate) fn smtplib(gw: &Gateway, addr: &str, tls: &str, steps: Value) -> Vec<Value> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let spec = json!({
        "host": host, "port": port.parse::<u16>().unwrap(), "tls": tls,
        "ca": gw.data_dir().join("tls/cert.pem"), "steps": steps,
    });
    json_lines(&mut python_driver("smtp_client.py", &spec))
}

pub(crate) fn step<'a>(r: &'a [Value], name: &str) -> &'a Value {
    r.iter()
        .rev()
        .find(|x| x["step"] == name)
        .unwrap_or_else(|| panic!("no {name} step in {r:?}"))
}

fn last(r: &[Value]) -> &Value {
    r.last().expect("at least one step")
}

/// Asserts a reply: code and the start of its text, then `[mailgate: <code>, decision <26 chars>]`.
fn assert_reply(x: &Value, code: u16, text: &str, reason: &str) {
    assert_eq!(x["code"], code, "{x}");
    let m = x["message"].as_str().unwrap();
    assert!(m.starts_with(text), "`{m}` does not start with `{text}`");
    let tag = format!("[mailgate: {reason}, decision ");
    let at = m
        .find(&tag)
        .unwrap_or_else(|| panic!("`{m}` lacks `{tag}`"));
    let id = &m[at + tag.len()..];
    assert!(
        id.len() > 26 && id.as_bytes()[26] == b']',
        "decision id in `{m}`"
    );
}

pub(crate) fn auth(mechanism: &str, user: &str, secret: &str) -> Value {
    json!({"do": "auth", "mechanism": mechanism, "user": user, "secret": secret})
}

pub(crate) fn send(from: &str, header_from: &str, to: &[&str]) -> Vec<Value> {
    let mut v = vec![json!({"do": "mail", "from": from})];
    for t in to {
        v.push(json!({"do": "rcpt", "to": t}));
    }
    v.push(json!({"do": "data", "from": header_from, "to": to}));
    v
}

pub(crate) fn steps(parts: Vec<Vec<Value>>) -> Value {
    Value::Array(parts.into_iter().flatten().collect())
}

fn starttls() -> Vec<Value> {
    vec![json!({"do": "starttls"})]
}

/// The message id of a `250 2.0.0 OK <id> ...` reply.
fn accepted_id(x: &Value) -> String {
    assert_eq!(x["code"], 250, "{x}");
    let m = x["message"].as_str().unwrap();
    assert!(m.starts_with("2.0.0 OK "), "{m}");
    m.split_whitespace().nth(2).unwrap().to_owned()
}

fn captured(gw: &Gateway, id: &str) -> bool {
    eventually(Duration::from_secs(20), || {
        gw.ok(&["captured", "list"]).contains(id)
    })
}

#[test]
fn smtplib_sends_over_starttls_and_implicit_tls_with_plain_login_and_xoauth2() {
    let (gw, server) = demo();

    // Submission: AUTH is offered only after STARTTLS; PLAIN; the message is captured.
    let r = smtplib(
        &gw,
        &server.smtp,
        "starttls",
        steps(vec![
            starttls(),
            vec![auth("PLAIN", "alice@example.com", PW)],
            send("alice@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    );
    let first_ehlo = &r[0]["features"];
    assert!(
        first_ehlo.as_array().unwrap().contains(&json!("starttls")),
        "{r:?}"
    );
    assert!(
        !first_ehlo.as_array().unwrap().contains(&json!("auth")),
        "{r:?}"
    );
    let after = step(&r, "ehlo")["features"].as_array().unwrap().clone();
    for f in [
        "auth",
        "size",
        "8bitmime",
        "smtputf8",
        "pipelining",
        "enhancedstatuscodes",
        "chunking",
    ] {
        assert!(
            after.contains(&json!(f)),
            "EHLO after TLS lacks {f}: {after:?}"
        );
    }
    assert_eq!(step(&r, "auth")["code"], 235, "{r:?}");
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id), "message {id} not captured");

    // Implicit TLS with AUTH LOGIN and an alias as envelope sender.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("LOGIN", "alice@example.com", PW)],
            send("al@example.com", "support@example.com", &["x@example.org"]),
        ]),
    );
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id));

    // XOAUTH2 with an access token from Mailgate's OAuth server (auth code + PKCE).
    let token = json!({"do": "oauth_token", "endpoint": format!("http://{}", server.addr),
        "user": "alice@example.com", "password": PW, "client_id": "demo-web-client",
        "client_secret": "demo-client-secret", "redirect_uri": "http://127.0.0.1:8765/callback",
        "scopes": ["https://mail.google.com/"]});
    let r = smtplib(
        &gw,
        &server.smtp,
        "starttls",
        steps(vec![
            starttls(),
            vec![
                token,
                json!({"do": "auth", "mechanism": "XOAUTH2", "user": "alice@example.com"}),
            ],
            send("alice@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    );
    assert_eq!(step(&r, "auth")["code"], 235, "{r:?}");
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id));

    // A bad token: Google's JSON challenge, then 535 5.7.8.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([auth("XOAUTH2", "alice@example.com", "ya29.not-a-token")]),
    );
    let a = step(&r, "auth");
    assert_eq!(
        a["challenge"],
        r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#
    );
    assert_reply(
        a,
        535,
        "5.7.8 Username and Password not accepted.",
        "auth.invalid",
    );

    // The relay listener: 127.0.0.1 is registered in the demo; organisation senders need no AUTH.
    let r = smtplib(
        &gw,
        &server.smtp_relay,
        "none",
        steps(vec![send(
            "printer@example.com",
            "printer@example.com",
            &["x@example.org"],
        )]),
    );
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id));
    let r = smtplib(
        &gw,
        &server.smtp_relay,
        "none",
        steps(vec![send(
            "someone@elsewhere.org",
            "someone@elsewhere.org",
            &["x@example.org"],
        )]),
    );
    assert_eq!(last(&r)["step"], "mail", "{r:?}");
    assert!(last(&r)["code"].as_u64().unwrap() >= 550, "{r:?}");
}

#[test]
fn smtplib_gets_the_documented_refusals() {
    let (gw, server) = demo();
    let alice = || auth("PLAIN", "alice@example.com", PW);

    // AUTH before STARTTLS.
    let r = smtplib(&gw, &server.smtp, "none", json!([alice()]));
    assert_reply(
        step(&r, "auth"),
        530,
        "5.7.0 Must issue a STARTTLS command first.",
        "tls.required",
    );
    // Bad password.
    let r = smtplib(
        &gw,
        &server.smtp,
        "starttls",
        steps(vec![
            starttls(),
            vec![auth("PLAIN", "alice@example.com", "wrong")],
        ]),
    );
    assert_reply(
        step(&r, "auth"),
        535,
        "5.7.8 Username and Password not accepted.",
        "auth.invalid",
    );
    // Unowned envelope sender, at MAIL FROM.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![alice()],
            send("ceo@example.com", "ceo@example.com", &["x@example.org"]),
        ]),
    );
    assert_reply(
        step(&r, "mail"),
        553,
        "5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com",
        "sender.not_owned",
    );
    assert!(
        step(&r, "mail")["message"]
            .as_str()
            .unwrap()
            .contains("Remedy: ")
    );
    // Unowned header From, after DATA.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![alice()],
            send("alice@example.com", "ceo@example.com", &["x@example.org"]),
        ]),
    );
    assert_reply(
        step(&r, "data"),
        553,
        "5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com",
        "sender.not_owned",
    );
    // Pending send-as.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![alice()],
            send("alice@gmail.test", "alice@gmail.test", &["x@example.org"]),
        ]),
    );
    assert_reply(
        step(&r, "mail"),
        553,
        "5.7.1 <alice@gmail.test>: Sender address rejected: not verified",
        "sender.unverified",
    );
    // A recipient barred by policy, at RCPT TO.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([alice(), {"do": "mail", "from": "alice@example.com"}, {"do": "rcpt", "to": "a@competitor.test"}]),
    );
    assert_reply(
        step(&r, "rcpt"),
        550,
        "5.7.1 <a@competitor.test>: Recipient address rejected",
        "policy.recipient_restricted",
    );
    // Suspended user: authenticates, refused at MAIL FROM.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("PLAIN", "bob@example.com", PW)],
            send("bob@example.com", "bob@example.com", &["x@example.org"]),
        ]),
    );
    assert_eq!(step(&r, "auth")["code"], 235, "{r:?}");
    assert_reply(
        step(&r, "mail"),
        550,
        "5.7.0 Mail Sending denied",
        "account.suspended",
    );
    // Too many recipients: the organisation allows 100 per message.
    let rcpts: Vec<String> = (0..101).map(|i| format!("r{i}@example.org")).collect();
    let mut s = vec![alice(), json!({"do": "mail", "from": "alice@example.com"})];
    s.extend(rcpts.iter().map(|t| json!({"do": "rcpt", "to": t})));
    let r = smtplib(&gw, &server.smtps, "implicit", Value::Array(s));
    let rcpt_codes: Vec<u64> = r
        .iter()
        .filter(|x| x["step"] == "rcpt")
        .map(|x| x["code"].as_u64().unwrap())
        .collect();
    assert_eq!(rcpt_codes.len(), 101, "{r:?}");
    assert!(
        rcpt_codes[..100].iter().all(|c| *c == 250),
        "{rcpt_codes:?}"
    );
    assert_reply(
        last(&r),
        452,
        "4.5.3 Your message has too many recipients.",
        "policy.too_many_recipients",
    );
    // Message too large: refused at MAIL FROM from its declared SIZE.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([alice(), {"do": "mail", "from": "alice@example.com", "size": 36_700_161}]),
    );
    assert_reply(step(&r, "mail"), 552, "5.3.4", "message.too_large");
    // Daily limit: frank may send 3 messages a day.
    let frank = || auth("PLAIN", "frank@example.com", PW);
    for _ in 0..3 {
        let r = smtplib(
            &gw,
            &server.smtps,
            "implicit",
            steps(vec![
                vec![frank()],
                send("frank@example.com", "frank@example.com", &["x@example.org"]),
            ]),
        );
        accepted_id(last(&r));
    }
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![frank()],
            send("frank@example.com", "frank@example.com", &["x@example.org"]),
        ]),
    );
    assert_reply(
        last(&r),
        550,
        "5.4.5 Daily user sending limit exceeded.",
        "limit.daily_messages",
    );
}

#[test]
fn relay_from_an_unlisted_ip_is_refused() {
    let gw = Gateway::new();
    let org = std::fs::read_to_string(crate::harness::example_org())
        .unwrap()
        .replace("allowed_ips: [127.0.0.1/32]", "allowed_ips: [192.0.2.0/24]");
    gw.apply("org.yaml", &org);
    let server = gw.serve(&["--demo"]);
    let r = smtplib(
        &gw,
        &server.smtp_relay,
        "none",
        steps(vec![send(
            "alice@example.com",
            "alice@example.com",
            &["x@example.org"],
        )]),
    );
    assert_reply(
        step(&r, "mail"),
        550,
        "5.7.1 Invalid credentials for relay [127.0.0.1].",
        "relay.ip_not_allowed",
    );
    // Authenticated relay works from anywhere.
    let r = smtplib(
        &gw,
        &server.smtp_relay,
        "starttls",
        steps(vec![
            starttls(),
            vec![auth("PLAIN", "alice@example.com", PW)],
            send("alice@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    );
    accepted_id(last(&r));
}

#[test]
fn the_same_denial_has_the_same_code_over_smtp_and_the_gmail_api() {
    let (gw, server) = demo();
    let gmail = &crate::gmail::client(
        &server,
        crate::gmail::user(
            "alice@example.com",
            &["https://www.googleapis.com/auth/gmail.send"],
        ),
        json!([{"do": "send", "from": "ceo@example.com", "to": ["x@example.org"]}]),
    )[0];
    let detail = gmail["details"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["domain"] == "mailgate"))
        .unwrap_or_else(|| panic!("no mailgate detail in {gmail}"));
    let gmail_code = detail["reason"].as_str().unwrap().to_owned();

    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("PLAIN", "alice@example.com", PW)],
            send("alice@example.com", "ceo@example.com", &["x@example.org"]),
        ]),
    );
    assert_eq!(gmail_code, "sender.not_owned");
    assert_reply(step(&r, "data"), 553, "5.7.1", &gmail_code);
}

/// Runs Debian's swaks against `addr`; returns (success, transcript).
fn swaks(addr: &str, args: &[&str]) -> (bool, String) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = std::process::Command::new("swaks")
        .args([
            "--server",
            host,
            "--port",
            port,
            "--timeout",
            "30",
            "--helo",
            "swaks.test",
        ])
        .args(args)
        .output()
        .expect(
            "swaks is not installed: run ./scripts/test, which installs it from Debian's packages",
        );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn swaks_sends_and_gets_the_documented_refusals() {
    let (gw, server) = demo();
    let alice = [
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice@example.com",
        "--auth-password",
        PW,
    ];
    // STARTTLS + AUTH PLAIN: accepted and captured.
    let mut args = vec![
        "-tls",
        "--from",
        "alice@example.com",
        "--to",
        "x@example.org",
    ];
    args.extend(alice);
    let (ok, t) = swaks(&server.smtp, &args);
    assert!(ok, "{t}");
    let line = t
        .lines()
        .find(|l| l.contains("<~  250 2.0.0 OK "))
        .unwrap_or_else(|| panic!("{t}"));
    let id = line.split_whitespace().nth(4).unwrap();
    assert!(captured(&gw, id), "{id} not captured");
    // Implicit TLS with AUTH LOGIN.
    let (ok, t) = swaks(
        &server.smtps,
        &[
            "--tls-on-connect",
            "--from",
            "alice@example.com",
            "--to",
            "x@example.org",
            "--auth",
            "LOGIN",
            "--auth-user",
            "alice@example.com",
            "--auth-password",
            PW,
        ],
    );
    assert!(ok, "{t}");
    // Without STARTTLS, AUTH is not offered (swaks then gives up on its own) and MAIL is refused.
    let mut args = vec!["--from", "alice@example.com", "--to", "x@example.org"];
    args.extend(alice);
    let (ok, t) = swaks(&server.smtp, &args);
    assert!(
        !ok && t.contains("Host did not advertise authentication"),
        "{t}"
    );
    let (ok, t) = swaks(
        &server.smtp,
        &["--from", "alice@example.com", "--to", "x@example.org"],
    );
    assert!(!ok);
    assert!(
        t.contains(
            "530 5.7.0 Must issue a STARTTLS command first. [mailgate: tls.required, decision "
        ),
        "{t}"
    );
    // Bad password.
    let (ok, t) = swaks(
        &server.smtp,
        &[
            "-tls",
            "--from",
            "alice@example.com",
            "--to",
            "x@example.org",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.com",
            "--auth-password",
            "wrong",
        ],
    );
    assert!(!ok);
    assert!(
        t.contains(
            "535 5.7.8 Username and Password not accepted. [mailgate: auth.invalid, decision "
        ),
        "{t}"
    );
    // Unowned envelope sender.
    let mut args = vec!["-tls", "--from", "ceo@example.com", "--to", "x@example.org"];
    args.extend(alice);
    let (ok, t) = swaks(&server.smtp, &args);
    assert!(!ok);
    assert!(t.contains("553 5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com [mailgate: sender.not_owned, decision "), "{t}");
    // Unowned header From.
    let mut args = vec![
        "-tls",
        "--from",
        "alice@example.com",
        "--to",
        "x@example.org",
        "--h-From",
        "<ceo@example.com>",
    ];
    args.extend(alice);
    let (ok, t) = swaks(&server.smtp, &args);
    assert!(!ok);
    assert!(t.contains("553 5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com [mailgate: sender.not_owned"), "{t}");
    // Suspended user.
    let (ok, t) = swaks(
        &server.smtp,
        &[
            "-tls",
            "--from",
            "bob@example.com",
            "--to",
            "x@example.org",
            "--auth",
            "PLAIN",
            "--auth-user",
            "bob@example.com",
            "--auth-password",
            PW,
        ],
    );
    assert!(!ok);
    assert!(
        t.contains("550 5.7.0 Mail Sending denied [mailgate: account.suspended"),
        "{t}"
    );
    // The relay listener without AUTH for an organisation sender.
    let (ok, t) = swaks(
        &server.smtp_relay,
        &["--from", "scanner@example.com", "--to", "x@example.org"],
    );
    assert!(ok, "{t}");
}

#[test]
fn with_on_unowned_from_rewrite_the_from_header_is_replaced_and_bcc_dropped() {
    let (gw, server) = demo();
    gw.apply(
        "rewrite.yaml",
        "organisation:\n  name: Example Corp\n  on_unowned_from: rewrite\n",
    );
    std::thread::sleep(Duration::from_millis(600)); // the server's reload interval is 100 ms
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("PLAIN", "alice@example.com", PW)],
            send("alice@example.com", "ceo@example.com", &["x@example.org"]),
        ]),
    );
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id), "message {id} not captured");
    let raw = gw.ok(&["captured", "show", &id, "--raw"]);
    assert!(raw.contains("From: alice@example.com"), "{raw}");
    assert!(!raw.contains("ceo@example.com"), "{raw}");
}

/// The demo's API keys (docs/examples/org.yaml): `billing` may send (from 127.0.0.1), the
/// read-only one lacks `mail.send`. Both belong to alice@example.com.
const BILLING_KEY: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";
const READ_ONLY_KEY: &str = "SG.demo-reports-key-0001.fyYQT3enzkd1Rs0eqZtsmbXrB54-ySOFgzFOzOoARAo";

/// docs/smtp.md: an API key is an SMTP password with the user `apikey`, as on SendGrid's SMTP
/// service; it sends as its owner, with its permissions.
#[test]
fn an_api_key_is_the_smtp_password_of_user_apikey() {
    let (gw, server) = demo();
    // STARTTLS, AUTH PLAIN: accepted and captured.
    let r = smtplib(
        &gw,
        &server.smtp,
        "starttls",
        steps(vec![
            starttls(),
            vec![auth("PLAIN", "apikey", BILLING_KEY)],
            send("alice@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    );
    assert_eq!(step(&r, "auth")["code"], 235, "{r:?}");
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id), "message {id} not captured");
    // Implicit TLS, AUTH LOGIN, the owner's alias.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("LOGIN", "apikey", BILLING_KEY)],
            send("al@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    );
    accepted_id(last(&r));
    // The key sends as its owner: another user's address is not alice's.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("PLAIN", "apikey", BILLING_KEY)],
            send("bob@example.com", "bob@example.com", &["x@example.org"]),
        ]),
    );
    assert_reply(
        step(&r, "mail"),
        553,
        "5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice@example.com",
        "sender.not_owned",
    );
    // A key without mail.send is refused at AUTH.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([auth("PLAIN", "apikey", READ_ONLY_KEY)]),
    );
    assert_reply(
        step(&r, "auth"),
        550,
        "5.7.1 The user is not permitted to send mail.",
        "permission.missing",
    );
    // A wrong secret for a real key id.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([auth(
            "PLAIN",
            "apikey",
            "SG.demo-billing-key-0001.not-the-secret-of-this-key-0000000000000"
        )]),
    );
    assert_reply(
        step(&r, "auth"),
        535,
        "5.7.8 Username and Password not accepted.",
        "auth.invalid",
    );
}

/// docs/smtp.md: the key's `allowed_ips` apply over SMTP too.
#[test]
fn an_api_key_used_over_smtp_from_outside_its_allowed_ips_is_refused() {
    let gw = Gateway::new();
    let org = std::fs::read_to_string(crate::harness::example_org())
        .unwrap()
        .replace(
            "    allowed_ips: [127.0.0.1/32]\n  - name: reports",
            "    allowed_ips: [192.0.2.0/24]\n  - name: reports",
        );
    assert!(org.contains("[192.0.2.0/24]\n  - name: reports"), "{org}");
    gw.apply("org.yaml", &org);
    let server = gw.serve(&["--demo"]);
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([auth("PLAIN", "apikey", BILLING_KEY)]),
    );
    assert_reply(
        step(&r, "auth"),
        550,
        "5.7.1 The IP you're using to send mail is not authorized to use this key.",
        "key.ip_blocked",
    );
}

/// An access token for `key` (a service-account key file) acting for `subject`, from Mailgate's
/// token endpoint through google-auth, as docs/smtp.md does: `{"token"}` or `{"error": body}`.
pub(crate) fn service_account_token(key: &str, scope: &str, subject: &str) -> Value {
    const SCRIPT: &str = r#"
import json, sys
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request
from google.oauth2 import service_account
creds = service_account.Credentials.from_service_account_file(
    sys.argv[1], scopes=[sys.argv[2]], subject=sys.argv[3])
try:
    creds.refresh(Request())
    print(json.dumps({"token": creds.token}))
except RefreshError as e:
    print(json.dumps({"error": e.args[1] if len(e.args) > 1 else str(e)}))
"#;
    let answer = json_lines(
        std::process::Command::new(python())
            .args(["-c", SCRIPT])
            .args([key, scope, subject]),
    );
    let [answer] =
        <[Value; 1]>::try_from(answer).unwrap_or_else(|a| panic!("not one JSON line: {a:?}"));
    answer
}

/// docs/smtp.md: XOAUTH2 with a delegated service-account token for `https://mail.google.com/`
/// (the demo's delegation grants it); `gmail.send` alone is refused on SMTP, as on Gmail; the
/// login must be the token's subject; a delegation without the scope gets no token.
#[test]
fn xoauth2_with_a_delegated_service_account_token_for_mail_google_com() {
    let (gw, server) = demo();
    let key = gw.sa_key("mailer@acme-app.iam.example.com");
    const MAIL: &str = "https://mail.google.com/";
    // The new key is live once the server has reloaded the directory.
    let mut token = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            token = service_account_token(&key, MAIL, "alice@example.com");
            token["error"]["mailgate"]["code"] != "auth.invalid"
        }),
        "{token}"
    );
    let token = token["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token for {MAIL}: {token}"))
        .to_owned();
    let r = smtplib(
        &gw,
        &server.smtp,
        "starttls",
        steps(vec![
            starttls(),
            vec![auth("XOAUTH2", "alice@example.com", &token)],
            send("alice@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    );
    assert_eq!(step(&r, "auth")["code"], 235, "{r:?}");
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id), "message {id} not captured");

    // The same token with OAUTHBEARER (RFC 7628), over implicit TLS, with smtplib.
    const OAUTHBEARER: &str = r#"
import smtplib, ssl, sys
host, port, ca, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tls = ssl.create_default_context(cafile=ca)
with smtplib.SMTP_SSL(host, port, context=tls) as smtp:
    smtp.ehlo()
    code, _ = smtp.auth("OAUTHBEARER",
                        lambda c=None: "" if c is not None else
                        "n,a=alice@example.com,\x01auth=Bearer %s\x01\x01" % token,
                        initial_response_ok=True)
    print(code)
    smtp.sendmail("alice@example.com", ["x@example.org"],
                  "From: alice@example.com\r\nSubject: oauthbearer\r\n\r\nhi\r\n")
    print("sent")
"#;
    let (host, port) = server.smtps.rsplit_once(':').unwrap();
    let out = std::process::Command::new(python())
        .args(["-c", OAUTHBEARER, host, port])
        .arg(gw.data_dir().join("tls/cert.pem"))
        .arg(&token)
        .output()
        .expect("run python");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed == "235\nsent\n",
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The login is the token's subject, nobody else.
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([auth("XOAUTH2", "bob@example.com", &token)]),
    );
    assert_reply(
        step(&r, "auth"),
        535,
        "5.7.8 Username and Password not accepted.",
        "auth.invalid",
    );

    // A gmail.send token is refused at AUTH, after Google's JSON challenge.
    let send_only = service_account_token(
        &key,
        "https://www.googleapis.com/auth/gmail.send",
        "alice@example.com",
    );
    let send_only = send_only["token"].as_str().expect("gmail.send token");
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([auth("XOAUTH2", "alice@example.com", send_only)]),
    );
    let a = step(&r, "auth");
    assert_eq!(
        a["challenge"],
        r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#
    );
    assert_reply(
        a,
        535,
        "5.7.8 Username and Password not accepted.",
        "scope.insufficient",
    );

    // The remedy names both steps: the token's scope and the delegation that must grant it.
    let remedy = a["message"].as_str().unwrap();
    assert!(
        remedy.contains("Remedy: request a token with the scope https://mail.google.com/")
            && remedy.contains("domain_wide_delegation[<client_id>].scopes"),
        "{remedy}"
    );

    // A delegation that grants only gmail.send (the demo's `legacy` account) gets no token for
    // https://mail.google.com/.
    let legacy = gw.sa_key("legacy@legacy-app.iam.example.com");
    let mut refused = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            refused = service_account_token(&legacy, MAIL, "alice@example.com");
            refused["error"]["mailgate"]["code"] != "auth.invalid"
        }),
        "{refused}"
    );
    assert_eq!(
        refused["error"]["error"], "unauthorized_client",
        "{refused}"
    );
    assert_eq!(
        refused["error"]["mailgate"]["code"], "delegation.scope_not_granted",
        "{refused}"
    );
    // The remedy names the scope the token asked for, not gmail.send (already granted).
    let remedy = refused["error"]["mailgate"]["remedy"]
        .as_str()
        .unwrap_or_default();
    assert!(
        remedy.contains("https://mail.google.com/") && !remedy.contains("gmail.send"),
        "{refused}"
    );
}

// ---------------------------------------------------------------------------------------------
// Issue 13, items 5 and 11, over a real socket to the relay listener (127.0.0.1 is allowlisted in
// the demo organisation, so no TLS or AUTH is needed to reach DATA).

/// A raw SMTP conversation over a real socket: reads the greeting, writes `input` at once (as a
/// smuggler pipelines it), then reads every reply until the server closes the connection or is
/// quiet for 3 s. Returns the transcript and whether the server closed the connection.
fn raw_conversation(addr: &str, input: &[u8]) -> (String, bool) {
    use std::io::{ErrorKind, Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    got.extend_from_slice(buf.get(..n).unwrap());
    s.write_all(input).unwrap();
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(buf.get(..n).unwrap()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false;
            }
            Err(_) => break true,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

fn bare_newline_in(raw: &[u8]) -> bool {
    raw.iter().enumerate().any(|(i, b)| match b {
        b'\n' => i == 0 || raw.get(i - 1) != Some(&b'\r'),
        b'\r' => raw.get(i + 1) != Some(&b'\n'),
        _ => false,
    })
}

/// The smuggling attempt: a message ended by LF . LF, then a second transaction that a server
/// taking LF . LF as the end would run.
const SMUGGLE: &str = "EHLO smuggler.test\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nFrom: scanner@example.com\nSubject: first\n\nhi\n.\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<smuggled@example.org>\r\nDATA\r\nFrom: scanner@example.com\r\nSubject: second\r\n\r\nsmuggled\r\n.\r\nQUIT\r\n";

#[test]
fn a_bare_lf_is_refused_with_521_and_the_smuggled_transaction_never_runs() {
    let (gw, server) = demo();
    let (t, closed) = raw_conversation(&server.smtp_relay, SMUGGLE.as_bytes());
    assert!(
        t.contains("\r\n354 ")
            && t.contains(
                "\r\n521 5.5.2 Error: bare <LF> received [mailgate: message.bare_newline] Remedy: "
            ),
        "{t}"
    );
    assert!(t.contains("bare_newline = \"normalize\""), "{t}");
    assert!(closed, "the connection stays open after the 521: {t}");
    // Nothing after the bare LF was read as a command, and nothing was accepted.
    assert!(!t.contains("250 2.0.0 OK"), "{t}");
    assert!(!t.contains("221 "), "{t}");
    assert_eq!(t.matches("\r\n354 ").count(), 1, "{t}");
    std::thread::sleep(Duration::from_millis(500));
    let list = gw.ok(&["captured", "list"]);
    assert!(!list.contains("scanner@example.com"), "{list}");
}

#[test]
fn with_bare_newline_normalize_the_message_is_kept_with_crlf_only_and_not_split() {
    let gw = Gateway::new();
    let config = gw.config("");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[smtp]\n",
        "[smtp]\nbare_newline = \"normalize\"\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let server = gw.serve(&["--demo"]);
    let (t, closed) = raw_conversation(&server.smtp_relay, SMUGGLE.as_bytes());
    assert!(closed && t.contains("\r\n221 "), "{t}");
    // One message: LF . LF did not end it, so the "second transaction" is its content.
    assert_eq!(t.matches("250 2.0.0 OK ").count(), 1, "{t}");
    assert_eq!(t.matches("\r\n354 ").count(), 1, "{t}");
    let id = t
        .lines()
        .find(|l| l.starts_with("250 2.0.0 OK "))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_owned();
    assert!(captured(&gw, &id), "{id} not captured");
    let out = gw.cmd(&["captured", "show", &id, "--raw"]);
    assert!(out.status.success());
    let raw = out.stdout;
    assert!(
        !bare_newline_in(&raw),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    let raw = String::from_utf8_lossy(&raw);
    assert!(
        raw.starts_with("From: scanner@example.com\r\nSubject: first\r\n\r\nhi\r\n\r\nMAIL FROM:<scanner@example.com>\r\nRCPT TO:<smuggled@example.org>\r\n"),
        "{raw:?}"
    );
    let list = gw.ok(&["captured", "list"]);
    assert!(!list.contains("smuggled@example.org"), "{list}");
}

#[test]
fn a_relay_client_is_not_called_a_user_in_a_refusal() {
    let (_gw, server) = demo();
    let (t, _) = raw_conversation(
        &server.smtp_relay,
        b"EHLO printer.test\r\nMAIL FROM:<someone@else.org>\r\nQUIT\r\n",
    );
    assert!(
        t.contains("\r\n553 5.7.1 <someone@else.org>: Sender address rejected: not an address relay clients from 127.0.0.1 may send as [mailgate: sender.not_owned, decision "),
        "{t}"
    );
    assert!(!t.contains("not owned by user"), "{t}");
}

/// Issue 13, item 9: the 535 for a token without https://mail.google.com/ names both steps, the
/// token's scope and the domain-wide delegation that must grant it, as smtplib reports it.
#[test]
fn the_xoauth2_scope_refusal_names_the_token_scope_and_the_delegation() {
    let (gw, server) = demo();
    let key = gw.sa_key("mailer@acme-app.iam.example.com");
    const SEND: &str = "https://www.googleapis.com/auth/gmail.send";
    let mut token = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            token = service_account_token(&key, SEND, "alice@example.com");
            token["error"]["mailgate"]["code"] != "auth.invalid"
        }),
        "{token}"
    );
    let token = token["token"]
        .as_str()
        .expect("gmail.send token")
        .to_owned();
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        json!([auth("XOAUTH2", "alice@example.com", &token)]),
    );
    let a = step(&r, "auth");
    assert_reply(
        a,
        535,
        "5.7.8 Username and Password not accepted.",
        "scope.insufficient",
    );
    let m = a["message"].as_str().unwrap();
    let remedy = m.split_once("Remedy: ").map(|(_, x)| x).unwrap_or_default();
    assert!(
        remedy.contains("request a token with the scope https://mail.google.com/"),
        "{m}"
    );
    assert!(
        remedy.contains("its domain-wide delegation must grant that scope too")
            && remedy.contains("domain_wide_delegation[<client_id>].scopes"),
        "{m}"
    );
}

/// docs/smtp.md: the login of AUTH PLAIN/LOGIN is the user's primary address or an alias; either
/// way the session sends as the user.
#[test]
fn an_alias_is_a_login_for_the_users_password() {
    let (gw, server) = demo();
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("LOGIN", "al@example.com", PW)],
            send("alice@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    );
    assert_eq!(step(&r, "auth")["code"], 235, "{r:?}");
    let id = accepted_id(last(&r));
    assert!(captured(&gw, &id), "message {id} not captured");
}
