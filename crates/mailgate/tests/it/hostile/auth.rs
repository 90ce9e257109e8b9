//! Authentication as a weapon (issue 12, items 8, 12, 13 and 14, the SMTP door): a lockout that
//! an attacker elsewhere cannot turn against the user and that backs off exponentially, secrets
//! typed into the login field kept out of logs and decisions, password checks that neither tell
//! which users exist nor stall the other doors, and a full password pool answered with a
//! temporary refusal.
//!
//! The SMTP clients are Python's smtplib (`tests/python/smtp_auth_probe.py`, STARTTLS on the
//! submission listener), which can bind any loopback source address: 127.0.0.0/8 is all
//! loopback, so 127.0.0.2 and 127.1.0.1 are two client networks (two /24s) to the gateway.
//! Every loop is bounded by the attempt list's length and the helper's socket timeouts.

use serde_json::{Value, json};

use super::{DEMO_KEY, DEMO_PASSWORD, Probe, assert_budget, sendgrid_send};
use crate::harness::{Gateway, Server, http_get, json_lines, python_driver};

/// One AUTH attempt for the helper.
fn plain(user: &str, secret: &str) -> Value {
    json!({"mechanism": "PLAIN", "user": user, "secret": secret})
}

fn login(user: &str, secret: &str) -> Value {
    json!({"mechanism": "LOGIN", "user": user, "secret": secret})
}

/// What the helper saw for one attempt.
#[derive(Debug, Clone)]
struct Seen {
    thread: u64,
    code: u64,
    message: String,
    ms: f64,
}

/// Runs the attempts over STARTTLS on the submission listener, `threads` clients at once, from
/// `source` (may contain `{thread}`); one [`Seen`] per attempt and thread.
fn probe(
    gw: &Gateway,
    server: &Server,
    source: &str,
    threads: usize,
    attempts: Vec<Value>,
) -> Vec<Seen> {
    let (host, port) = server.smtp.rsplit_once(':').unwrap();
    let spec = json!({
        "host": host, "port": port.parse::<u16>().unwrap(), "tls": "starttls",
        "ca": gw.data_dir().join("tls/cert.pem"), "source": source,
        "threads": threads, "per_connection": 5, "attempts": attempts,
    });
    let mut seen: Vec<(u64, u64, Seen)> =
        json_lines(&mut python_driver("smtp_auth_probe.py", &spec))
            .into_iter()
            .map(|v| {
                let s = Seen {
                    thread: v["thread"].as_u64().unwrap(),
                    code: v["code"].as_u64().unwrap(),
                    message: v["message"].as_str().unwrap().to_owned(),
                    ms: v["ms"].as_f64().unwrap(),
                };
                (s.thread, v["i"].as_u64().unwrap(), s)
            })
            .collect();
    seen.sort_by_key(|(t, i, _)| (*t, *i));
    let seen: Vec<Seen> = seen.into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(
        seen.len(),
        threads * spec["attempts"].as_array().unwrap().len(),
        "one answer per attempt: {seen:?}"
    );
    for s in &seen {
        assert!(s.code != 0, "client error: {s:?}");
    }
    seen
}

fn codes(seen: &[Seen]) -> Vec<u64> {
    seen.iter().map(|s| s.code).collect()
}

fn is_locked(s: &Seen) -> bool {
    s.code == 454 && s.message.contains("[mailgate: auth.locked")
}

fn is_wrong_password(s: &Seen) -> bool {
    s.code == 535 && s.message.contains("[mailgate: auth.invalid")
}

/// A server for these tests, with one legitimate send done (the first send on a fresh server
/// warms its store and pools; its latency is no attack's effect).
fn serve(gw: &Gateway) -> Server {
    let server = super::serve_demo(gw, "");
    sendgrid_send(&server.addr).expect("a warm-up send");
    server
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[test]
fn attacker_cannot_lock_out_a_user_from_another_network() {
    let gw = Gateway::new();
    let server = serve(&gw);
    let probe_sg = Probe::sendgrid(&server);

    // The attacker, on 127.0.0.0/24, tries 8 wrong passwords for frank.
    let wrong: Vec<Value> = (0..8)
        .map(|i| plain("frank@example.com", &format!("guess-{i}")))
        .collect();
    let attack = probe(&gw, &server, "127.0.0.2", 1, wrong);
    assert!(
        attack[..5].iter().all(is_wrong_password),
        "{:?}",
        codes(&attack)
    );
    assert!(
        attack[5..].iter().all(is_locked),
        "the attacker's network is locked after 5 failures: {attack:?}"
    );

    // The attacker's own network stays locked for frank, even with the right password...
    let same_net = probe(
        &gw,
        &server,
        "127.0.0.3",
        1,
        vec![plain("frank@example.com", DEMO_PASSWORD)],
    );
    assert!(is_locked(&same_net[0]), "{same_net:?}");

    // ...but frank, on another network, signs in.
    let frank = probe(
        &gw,
        &server,
        "127.1.0.1",
        1,
        vec![plain("frank@example.com", DEMO_PASSWORD)],
    );
    assert_eq!(frank[0].code, 235, "frank was locked out: {frank:?}");
    // And another user on the attacker's network is not locked by frank's failures.
    let alice = probe(
        &gw,
        &server,
        "127.0.0.4",
        1,
        vec![plain("alice@example.com", DEMO_PASSWORD)],
    );
    assert_eq!(alice[0].code, 235, "{alice:?}");

    let report = probe_sg.finish();
    assert_budget(&server, &report);
}

#[test]
fn lockout_backs_off_exponentially() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let user = "frank@example.com";
    let mut attempts: Vec<Value> = (0..5).map(|_| plain(user, "wrong")).collect();
    // 5 failures: locked for 1 s.
    attempts.push(plain(user, DEMO_PASSWORD));
    // After the 1 s lock, a 6th failure: locked for 2 s.
    let mut after_first = plain(user, "wrong");
    after_first["sleep_ms"] = json!(1_200);
    attempts.push(after_first);
    // 1.2 s into the 2 s lock: still locked (a fixed 1 s lock would have ended).
    let mut inside_second = plain(user, DEMO_PASSWORD);
    inside_second["sleep_ms"] = json!(1_200);
    attempts.push(inside_second);
    // 2.4 s after the 6th failure: the lock is over and the right password works (and resets).
    let mut after_second = plain(user, DEMO_PASSWORD);
    after_second["sleep_ms"] = json!(1_200);
    attempts.push(after_second);
    let seen = probe(&gw, &server, "127.0.0.2", 1, attempts);
    assert!(seen[..5].iter().all(is_wrong_password), "{seen:?}");
    assert!(
        is_locked(&seen[5]),
        "locked after 5 failures even with the right password: {seen:?}"
    );
    assert!(
        is_wrong_password(&seen[6]),
        "the first lock lasts 1 s, not 15 min: {seen:?}"
    );
    assert!(is_locked(&seen[7]), "the second lock lasts 2 s: {seen:?}");
    assert_eq!(seen[8].code, 235, "the second lock is over: {seen:?}");
}

/// A decision id from a reply `... [mailgate: <code>, decision <id>] ...`.
fn decision_id(message: &str) -> String {
    let at = message.find(", decision ").expect("decision id in reply") + ", decision ".len();
    message[at..at + 26].to_owned()
}

#[test]
fn secret_in_login_field_is_redacted_in_log_and_decision() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let jwt = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJlLXNlY3JldA";
    let token = "ya29.a0AfH6SMBsecret-access-token-value-0123456789";
    let seen = probe(
        &gw,
        &server,
        "127.0.0.2",
        1,
        vec![
            // The SendGrid key typed as the username, a wrong password.
            plain(DEMO_KEY, "not the password"),
            login(jwt, "whatever"),
            plain(token, "whatever"),
        ],
    );
    let secret_part = DEMO_KEY.rsplit('.').next().unwrap();
    let admin = gw.demo_admin_token();
    for (s, kind, secret) in [
        (&seen[0], "looks like an API key", secret_part),
        (&seen[1], "looks like a JWT", "c2lnbmF0dXJlLXNlY3JldA"),
        (&seen[2], "looks like an OAuth token", "secret-access-token"),
    ] {
        assert!(is_wrong_password(s), "{s:?}");
        assert!(!s.message.contains(secret), "reply leaks the secret: {s:?}");
        let id = decision_id(&s.message);
        let (status, body) = http_get(
            &server.addr,
            &format!("/mailgate/v1/decisions/{id}"),
            Some(&admin),
        );
        assert_eq!(status, 200, "{body}");
        assert!(
            !body.contains(secret),
            "the kept decision holds the secret: {body}"
        );
        let d: Value = serde_json::from_str(&body).unwrap();
        let text = d.to_string();
        assert!(
            text.contains(&format!("[redacted: {kind}]")),
            "the trace says what was redacted: {text}"
        );
    }
    let (_, _, log) = server.stop();
    assert!(!log.is_empty());
    assert!(!log.contains(secret_part), "the log holds the API key");
    assert!(
        !log.contains("c2lnbmF0dXJlLXNlY3JldA"),
        "the log holds the JWT"
    );
    assert!(
        !log.contains("secret-access-token"),
        "the log holds the token"
    );
    assert!(
        log.contains("[redacted: looks like an API key]"),
        "the log says a secret was redacted:\n{log}"
    );
}

#[test]
fn smtp_auth_timing_does_not_reveal_users() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    // Known (frank, wrong password) and unknown users, interleaved; each attempt from its own
    // /24 so the lockout never answers early.
    let mut attempts = Vec::new();
    for i in 0..10 {
        let mut known = plain("frank@example.com", "wrong password");
        known["source"] = json!(format!("127.2.{i}.1"));
        attempts.push(known);
        let mut unknown = plain(&format!("nobody{i}@example.com"), "wrong password");
        unknown["source"] = json!(format!("127.3.{i}.1"));
        attempts.push(unknown);
    }
    let seen = probe(&gw, &server, "", 1, attempts);
    assert!(
        seen.iter().all(is_wrong_password),
        "same answer for both: {:?}",
        codes(&seen)
    );
    let known = median(seen.iter().step_by(2).map(|s| s.ms).collect());
    let unknown = median(seen.iter().skip(1).step_by(2).map(|s| s.ms).collect());
    let ratio = unknown / known;
    eprintln!("AUTH median: known {known:.1} ms, unknown {unknown:.1} ms, ratio {ratio:.2}");
    assert!(
        (0.5..=2.0).contains(&ratio),
        "an unknown user answers in {unknown:.1} ms, a known one in {known:.1} ms"
    );
}

#[test]
fn wrong_passwords_do_not_stall_other_listeners() {
    let gw = Gateway::new();
    let server = serve(&gw);
    let probe_sg = Probe::sendgrid(&server);
    // 32 clients at once, each from its own network, 4 wrong passwords for a known user each
    // (under the lockout's threshold: every one is checked with argon2).
    let attempts: Vec<Value> = (0..4)
        .map(|i| plain("frank@example.com", &format!("wrong {i}")))
        .collect();
    let seen = probe(&gw, &server, "127.4.{thread}.1", 32, attempts);
    let report = probe_sg.finish();
    assert!(
        seen.iter()
            .all(|s| is_wrong_password(s) || s.message.contains("server.busy")),
        "{:?}",
        codes(&seen)
    );
    assert!(
        seen.iter().filter(|s| is_wrong_password(s)).count() >= 32,
        "most attempts were checked: {:?}",
        codes(&seen)
    );
    assert_budget(&server, &report);
}

#[test]
fn a_full_password_pool_is_a_temporary_refusal() {
    let gw = Gateway::new();
    // One hash at a time and no queue: concurrent AUTHs find the pool full.
    let server = super::serve_demo(
        &gw,
        "\n[limits]\npassword_concurrency = 1\npassword_queue = 0\n",
    );
    let attempts: Vec<Value> = (0..3)
        .map(|i| plain("frank@example.com", &format!("wrong {i}")))
        .collect();
    let seen = probe(&gw, &server, "127.5.{thread}.1", 16, attempts);
    let busy: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.code == 454 && s.message.contains("[mailgate: server.busy]"))
        .collect();
    assert!(
        !busy.is_empty(),
        "no temporary refusal under pressure: {:?}",
        codes(&seen)
    );
    assert!(
        busy.iter().all(|s| s
            .message
            .starts_with("4.7.0 Temporary authentication failure")),
        "{busy:?}"
    );
    assert!(
        seen.iter().all(|s| is_wrong_password(s) || s.code == 454),
        "{:?}",
        codes(&seen)
    );
    // The busy refusals were not counted as failures: frank still signs in from one of those
    // networks after them (3 failures at most there, under the threshold of 5).
    let after = probe(
        &gw,
        &server,
        "127.5.0.9",
        1,
        vec![plain("frank@example.com", DEMO_PASSWORD)],
    );
    assert_eq!(after[0].code, 235, "{after:?}");
}
