//! `mailgate doctor sendgrid` against `serve --demo`: the real binary probes Mailgate's SendGrid
//! door as it would probe SendGrid, and must name each demo key's state by its reason code,
//! exiting 0 when all is well and 3 when it found problems, never printing a key.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::harness::{BIN, Gateway, demo, free_port, http_get, http_post, stdout_json};

/// The demo keys (docs/examples/org.yaml).
const BILLING: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";
const REPORTS: &str = "SG.demo-reports-key-0001.fyYQT3enzkd1Rs0eqZtsmbXrB54-ySOFgzFOzOoARAo";

/// Runs `mailgate doctor sendgrid --key <key> --endpoint <endpoint> extra...`, with no
/// configuration and no SendGrid key in the environment.
fn doctor(key: &str, endpoint: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args([
            "doctor",
            "sendgrid",
            "--key",
            key,
            "--endpoint",
            endpoint,
            "--timeout",
            "10",
        ])
        .args(extra)
        .env_remove("MAILGATE_CONFIG")
        .env_remove("SENDGRID_API_KEY")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run mailgate doctor sendgrid")
}

/// The key, and its secret part alone, appear nowhere in what the run printed.
fn assert_no_secret(out: &Output, key: &str, what: &str) {
    let secret = key.rsplit('.').next().unwrap();
    for (stream, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let text = String::from_utf8_lossy(text);
        assert!(
            !text.contains(key),
            "{what}: the key is in {stream}:\n{text}"
        );
        assert!(
            secret.len() < 6 || !text.contains(secret),
            "{what}: the key's secret is in {stream}:\n{text}"
        );
    }
}

/// Runs the doctor in JSON and text mode; checks the exit status, the problem codes (JSON) and
/// that no secret leaks in either; returns the JSON report.
fn check(
    key: &str,
    endpoint: &str,
    extra: &[&str],
    exit: i32,
    codes: &[&str],
    what: &str,
) -> Value {
    let mut args = extra.to_vec();
    args.push("--json");
    let out = doctor(key, endpoint, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(exit),
        "{what}: exit status\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_secret(&out, key, what);
    let v = stdout_json(&out, what);
    assert_eq!(v["doctor"], "sendgrid", "{what}");
    assert_eq!(v["ok"], exit == 0, "{what}: {stdout}");
    let found: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["code"].as_str())
        .collect();
    for c in codes {
        assert!(
            found.contains(c),
            "{what}: {c} not among {found:?}\n{stdout}"
        );
    }
    if codes.is_empty() {
        assert!(
            found.is_empty(),
            "{what}: unexpected problems {found:?}\n{stdout}"
        );
    }
    // Every problem has a remedy, and every failed step names a cause.
    for p in v["problems"].as_array().unwrap() {
        assert!(
            p["remedy"].as_str().is_some_and(|r| !r.is_empty()),
            "{what}: {p}"
        );
    }
    // The same run as text: the same exit status, no secret either.
    let text = doctor(key, endpoint, extra);
    assert_eq!(text.status.code(), Some(exit), "{what} (text)");
    assert_no_secret(&text, key, &format!("{what} (text)"));
    let t = String::from_utf8_lossy(&text.stdout);
    for c in codes {
        assert!(t.contains(c), "{what} (text): {c} missing:\n{t}");
    }
    v
}

fn step<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {v}"))
}

/// Creates a key with `mailgate key create args...`; returns (secret, id).
fn create_key(gw: &Gateway, args: &[&str]) -> (String, String) {
    let mut all = vec!["key", "create"];
    all.extend_from_slice(args);
    let out = gw.cmd(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let id = key.split('.').nth(1).unwrap().to_owned();
    (key, id)
}

#[test]
fn doctor_sendgrid_names_every_demo_key_state() {
    let (gw, server) = demo();
    let endpoint = format!("http://{}", server.addr);

    // The door serves the sender identities the doctor reads, in SendGrid's shapes.
    let (status, body) = http_get(&server.addr, "/v3/verified_senders", Some(BILLING));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let senders: Vec<(String, bool)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["from_email"].as_str().unwrap().to_owned(),
                s["verified"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        senders.first(),
        Some(&("alice@example.com".to_owned(), true)),
        "{body}"
    );
    for (addr, verified) in [
        ("al@example.com", true),
        ("support@example.com", true),
        ("alice@gmail.test", false),
        ("alice@example.net", false),
    ] {
        assert!(
            senders.contains(&(addr.to_owned(), verified)),
            "{addr}: {senders:?}"
        );
    }
    let (status, body) = http_get(&server.addr, "/v3/whitelabel/domains", Some(BILLING));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let domains: Vec<(String, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["domain"].as_str().unwrap().to_owned(),
                d["valid"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        domains,
        vec![
            ("example.com".to_owned(), true),
            ("example.net".to_owned(), false)
        ]
    );
    // A key without mail.send may not read them: SendGrid's 403.
    let (status, body) = http_get(&server.addr, "/v3/verified_senders", Some(REPORTS));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("access forbidden"), "{body}");

    // billing: everything passes, the sandbox send included (from alice, the first verified
    // sender), and nothing was queued.
    let v = check(BILLING, &endpoint, &[], 0, &[], "billing");
    assert_eq!(step(&v, "scopes")["status"], "pass");
    assert_eq!(step(&v, "ip_access")["status"], "pass");
    assert_eq!(step(&v, "sender")["status"], "pass");
    assert_eq!(step(&v, "send")["status"], "pass");
    assert!(
        step(&v, "send")["title"]
            .as_str()
            .unwrap()
            .contains("alice@example.com"),
        "{v}"
    );
    let queue = gw.ok(&["queue", "list"]);
    assert!(
        !queue.contains("alice@example.com"),
        "the sandbox probe was queued: {queue}"
    );

    // reports (read-only): no mail.send.
    let v = check(
        REPORTS,
        &endpoint,
        &[],
        3,
        &["permission.missing"],
        "reports",
    );
    assert_eq!(
        step(&v, "scopes")["diagnosis"]["code"],
        "permission.missing"
    );
    assert_eq!(step(&v, "send")["status"], "skip");

    // A key nobody issued.
    check(
        "SG.x.y",
        &endpoint,
        &[],
        3,
        &["auth.invalid"],
        "unknown key",
    );

    // A revoked key.
    let (revoked, id) = create_key(
        &gw,
        &[
            "--owner",
            "alice@example.com",
            "--name",
            "old",
            "--permission",
            "mail.send",
        ],
    );
    gw.ok(&["key", "revoke", &id]);
    let v = check(
        &revoked,
        &endpoint,
        &[],
        3,
        &["auth.revoked"],
        "revoked key",
    );
    assert_eq!(step(&v, "send")["status"], "skip");

    // A key limited to another range: this machine (127.0.0.1) is outside it.
    let (ip_key, _) = create_key(
        &gw,
        &[
            "--owner",
            "alice@example.com",
            "--name",
            "office-only",
            "--permission",
            "mail.send",
            "--allow-ip",
            "10.0.0.0/8",
        ],
    );
    let v = check(
        &ip_key,
        &endpoint,
        &[],
        3,
        &["key.ip_blocked"],
        "IP-limited key",
    );
    assert_eq!(step(&v, "ip_access")["diagnosis"]["code"], "key.ip_blocked");
    assert!(
        step(&v, "ip_access")["diagnosis"]["remedy"]
            .as_str()
            .unwrap()
            .contains("Settings → IP Access Management"),
        "{v}"
    );

    // A key of bob, who is suspended.
    let (bob, _) = create_key(
        &gw,
        &[
            "--owner",
            "bob@example.com",
            "--name",
            "bob",
            "--permission",
            "mail.send",
        ],
    );
    let v = check(
        &bob,
        &endpoint,
        &[],
        3,
        &["account.suspended"],
        "suspended owner",
    );
    assert_eq!(step(&v, "scopes")["status"], "pass");

    // From addresses billing may not use.
    check(
        BILLING,
        &endpoint,
        &["--from", "ceo@example.com"],
        3,
        &["sender.not_owned"],
        "unowned From",
    );
    let v = check(
        BILLING,
        &endpoint,
        &["--from", "alice@example.net"],
        3,
        &["sender.domain_unverified"],
        "From in an unverified domain",
    );
    assert_eq!(
        step(&v, "sender")["diagnosis"]["code"],
        "sender.domain_unverified"
    );
    assert_eq!(
        step(&v, "send")["diagnosis"]["code"],
        "sender.domain_unverified"
    );
    assert!(
        step(&v, "sender")["diagnosis"]["remedy"]
            .as_str()
            .unwrap()
            .contains("Settings → Sender Authentication"),
        "{v}"
    );
    check(
        BILLING,
        &endpoint,
        &["--from", "alice@gmail.test"],
        3,
        &["sender.unverified"],
        "pending send-as From",
    );

    // A key of a project whose API is not enabled.
    let (legacy, _) = create_key(
        &gw,
        &[
            "--owner",
            "alice@example.com",
            "--name",
            "legacy",
            "--permission",
            "mail.send",
            "--project",
            "legacy-app",
        ],
    );
    check(
        &legacy,
        &endpoint,
        &[],
        3,
        &["project.api_disabled"],
        "legacy-app key",
    );

    // frank's daily limit (3 messages), used up by three real sends: SendGrid's "Maximum
    // credits exceeded".
    let (frank, _) = create_key(
        &gw,
        &[
            "--owner",
            "frank@example.com",
            "--name",
            "frank",
            "--permission",
            "mail.send",
        ],
    );
    let mail = r#"{"personalizations":[{"to":[{"email":"alice@example.com"}]}],"from":{"email":"frank@example.com"},"subject":"s","content":[{"type":"text/plain","value":"x"}]}"#;
    for i in 0..3 {
        let (status, body) = http_post(&server.addr, "/v3/mail/send", &frank, mail);
        assert_eq!(status, 202, "send {i}: {body}");
    }
    let v = check(
        &frank,
        &endpoint,
        &[],
        3,
        &["limit.daily_messages"],
        "daily limit used up",
    );
    assert_eq!(step(&v, "sender")["status"], "pass");

    drop(server);
}

#[test]
fn doctor_sendgrid_without_a_server_or_with_a_malformed_key() {
    // Nothing listens: the doctor still runs, says so, and exits 3 (a finding, not a crash).
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let out = doctor(BILLING, &endpoint, &["--json"]);
    assert_eq!(out.status.code(), Some(3));
    assert_no_secret(&out, BILLING, "no server");
    let v = stdout_json(&out, "doctor sendgrid --json");
    let scopes = step(&v, "scopes");
    assert_eq!(scopes["status"], "fail");
    assert!(
        scopes["note"].as_str().unwrap().contains("did not answer"),
        "{v}"
    );

    // A key that is not SendGrid's shape: named without a request being needed.
    let bad = "\"SG.quoted-key-value.secretsecretsecret\"";
    let out = doctor(bad, &endpoint, &["--json"]);
    assert_eq!(out.status.code(), Some(3));
    assert_no_secret(&out, bad, "quoted key");
    let v = stdout_json(&out, "doctor sendgrid --json");
    assert_eq!(step(&v, "key")["diagnosis"]["code"], "auth.invalid");

    // A bad endpoint is a usage error: exit 1.
    let out = doctor(BILLING, "not a url", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_no_secret(&out, BILLING, "bad endpoint");
}
