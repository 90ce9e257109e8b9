//! `mailgate doctor gmail` and `mailgate doctor oauth` pointed at Mailgate's Gmail door (which
//! speaks Google's API byte for byte): every demo persona and service account is diagnosed to
//! its cause, alice via mailer is all good, and no secret (private key, assertion, access or
//! refresh token, client secret) is printed, in text or JSON.

use std::process::Output;

use serde_json::{Value, json};

use crate::harness::{BIN, Gateway, demo, free_port, http_post, stdout_json};

const SEND: &str = "https://www.googleapis.com/auth/gmail.send";
const SETTINGS: &str = "https://www.googleapis.com/auth/gmail.settings.basic";
const READONLY: &str = "https://www.googleapis.com/auth/gmail.readonly";

/// Runs `mailgate doctor <args>` (no config, no store: it needs neither).
fn doctor(args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .arg("doctor")
        .args(args)
        .env_remove("MAILGATE_CONFIG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run mailgate doctor")
}

/// `doctor ... --json`: the exit status and the report.
fn doctor_json(args: &[&str]) -> (i32, Value, String) {
    let mut a = args.to_vec();
    a.push("--json");
    let out = doctor(&a);
    let v = stdout_json(&out, &format!("doctor {args:?}"));
    (
        out.status.code().unwrap_or(-1),
        v,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The distinct problem codes of a report, in order.
fn codes(v: &Value) -> Vec<String> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap_or("unexplained").to_owned())
        .collect()
}

/// Every line of the key file's private key, and the key itself: none may be printed.
fn key_secrets(key_file: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(key_file).unwrap()).unwrap();
    let pem = v["private_key"].as_str().unwrap().to_owned();
    let mut out: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect();
    out.push(pem);
    out
}

fn assert_no_secret(output: &str, secrets: &[String], what: &str) {
    for s in secrets {
        assert!(
            !output.contains(s.as_str()),
            "{what}: a secret was printed ({}...)",
            &s[..s.len().min(12)]
        );
    }
    // Access tokens Mailgate issues, and JWT assertions (a base64url JSON header).
    assert!(
        !output.contains("ya29.mg_"),
        "{what}: an access token was printed"
    );
    assert!(
        !output.contains("eyJhbGciOi"),
        "{what}: an assertion was printed"
    );
}

#[test]
fn doctor_gmail_names_the_cause_for_every_demo_persona_and_alice_is_all_good() {
    let (gw, server) = demo();
    let endpoint = format!("http://{}", server.addr);
    let mailer = gw.sa_key("mailer@acme-app.iam.example.com");
    let reporter = gw.sa_key("reporter@acme-app.iam.example.com");
    let legacy = gw.sa_key("legacy@legacy-app.iam.example.com");
    let mut secrets = key_secrets(&mailer);
    secrets.extend(key_secrets(&reporter));
    secrets.extend(key_secrets(&legacy));

    // alice via mailer: every step passes, in text as in JSON.
    let out = doctor(&[
        "gmail",
        "--key",
        &mailer,
        "--subject",
        "alice@example.com",
        "--endpoint",
        &endpoint,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    for line in [
        "ok    the server answers",
        "ok    key file",
        "ok    token for mailer@acme-app.iam.example.com itself (no sub)",
        &format!("ok    token for alice@example.com with scope {SEND}"),
        "ok    the mailbox alice@example.com",
        "ok    alice@example.com is the user's address or a verified send-as address",
        "ok    send probe from alice@example.com (dry run: nothing is delivered)",
        "All good:",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
    assert_no_secret(&text, &secrets, "text");
    // The dry run delivered nothing.
    let listed = gw.ok(&["queue", "list"]);
    assert!(!listed.contains("alice@example.com"), "{listed}");

    // (key, subject, extra args, the problem's code, the step that finds it)
    let cases: Vec<(&str, &str, Vec<&str>, &str, &str)> = vec![
        (
            &reporter,
            "alice@example.com",
            vec![],
            "delegation.not_configured",
            "delegation:",
        ),
        (
            &mailer,
            "alice@example.com",
            vec!["--scope", SEND, "--scope", SETTINGS],
            "delegation.scope_not_granted",
            "delegation:https://www.googleapis.com/auth/gmail.settings.basic",
        ),
        (
            &mailer,
            "nobody@example.com",
            vec![],
            "delegation.subject_unknown",
            "delegation:",
        ),
        (
            &mailer,
            "carol@example.com",
            vec![],
            "account.mail_disabled",
            "profile",
        ),
        (
            &mailer,
            "bob@example.com",
            vec![],
            "account.suspended",
            "delegation:",
        ),
        (
            &mailer,
            "dave@example.com",
            vec![],
            "account.under_review",
            "profile",
        ),
        (
            &mailer,
            "mallory@example.com",
            vec![],
            "account.sending_revoked",
            "delegation:",
        ),
        (
            &mailer,
            "alice@example.com",
            vec!["--from", "alice@gmail.test"],
            "sender.unverified",
            "send_as",
        ),
        (
            &mailer,
            "alice@example.com",
            vec!["--from", "ceo@example.com"],
            "sender.not_owned",
            "send_as",
        ),
        (
            &mailer,
            "alice@example.com",
            vec!["--from", "alice@example.net"],
            "sender.domain_unverified",
            "send_probe",
        ),
        (
            &legacy,
            "alice@example.com",
            vec![],
            "project.api_disabled",
            "profile",
        ),
    ];
    for (key, subject, extra, code, step) in cases {
        let mut args = vec![
            "gmail",
            "--key",
            key,
            "--subject",
            subject,
            "--endpoint",
            &endpoint,
        ];
        args.extend(extra.iter().copied());
        let (status, v, all) = doctor_json(&args);
        assert_eq!(status, 3, "{args:?}: {v:#}");
        assert_eq!(codes(&v), vec![code], "{args:?}: {v:#}");
        let p = &v["problems"][0];
        assert!(
            p["step"].as_str().unwrap().starts_with(step),
            "{args:?}: found at {} not {step}",
            p["step"]
        );
        assert!(p["remedy"].as_str().is_some_and(|r| !r.is_empty()), "{p}");
        assert_no_secret(&all, &secrets, &format!("{args:?}"));
    }

    // frank's daily limit (3): three real sends, then the dry run meets the limit.
    let key_out = gw.ok(&[
        "key",
        "create",
        "--owner",
        "frank@example.com",
        "--name",
        "frank",
        "--permission",
        "mail.send",
        "--project",
        "acme-app",
    ]);
    let key = key_out
        .split_whitespace()
        .find(|w| w.starts_with("SG."))
        .unwrap()
        .to_owned();
    let mail = json!({"personalizations": [{"to": [{"email": "bob@example.com"}]}],
        "from": {"email": "frank@example.com"}, "subject": "x",
        "content": [{"type": "text/plain", "value": "x"}]})
    .to_string();
    for _ in 0..3 {
        let (status, body) = http_post(&server.addr, "/v3/mail/send", &key, &mail);
        assert_eq!(status, 202, "{body}");
    }
    let (status, v, _) = doctor_json(&[
        "gmail",
        "--key",
        &mailer,
        "--subject",
        "frank@example.com",
        "--endpoint",
        &endpoint,
    ]);
    assert_eq!(status, 3, "{v:#}");
    assert_eq!(codes(&v), vec!["limit.daily_messages"], "{v:#}");
    let quota = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "quota")
        .unwrap();
    assert_eq!(quota["status"], "warn", "{quota}");
}

#[test]
fn doctor_oauth_checks_a_users_refresh_token_and_its_scopes() {
    let (_gw, server) = demo();
    let endpoint = format!("http://{}", server.addr);
    let token_uri = format!("{endpoint}/token");
    let refresh_token = |scopes: &[&str]| -> String {
        let r = crate::gmail::client(
            &server,
            crate::gmail::user("alice@example.com", scopes),
            json!([{"do": "refresh_token"}]),
        );
        r[0]["refresh_token"].as_str().unwrap().to_owned()
    };
    let oauth = |refresh: &str, secret: &str| {
        doctor_json(&[
            "oauth",
            "--client-id",
            "demo-web-client",
            "--client-secret",
            secret,
            "--refresh-token",
            refresh,
            "--token-uri",
            &token_uri,
            "--endpoint",
            &endpoint,
        ])
    };
    let good = refresh_token(&[SEND, SETTINGS]);
    let secrets = vec![good.clone(), "demo-client-secret".to_owned()];
    let (status, v, all) = oauth(&good, "demo-client-secret");
    assert_eq!(status, 0, "{v:#}");
    let steps: Vec<(&str, &str)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    for (id, status) in [
        ("token", "pass"),
        ("scopes", "pass"),
        ("profile", "pass"),
        ("send_as", "pass"),
        ("send_probe", "pass"),
    ] {
        assert!(steps.contains(&(id, status)), "{id} {status} in {steps:?}");
    }
    assert_no_secret(&all, &secrets, "oauth all good");

    // A consent without a send scope.
    let read_only = refresh_token(&[READONLY]);
    let (status, v, all) = oauth(&read_only, "demo-client-secret");
    assert_eq!(status, 3, "{v:#}");
    assert_eq!(codes(&v), vec!["scope.insufficient"], "{v:#}");
    assert_no_secret(&all, &[read_only], "oauth read-only");

    // A wrong client secret, and a refresh token that was revoked.
    let (status, v, all) = oauth(&good, "not-the-secret");
    assert_eq!(status, 3, "{v:#}");
    assert_eq!(codes(&v), vec!["auth.invalid"], "{v:#}");
    assert!(
        !all.contains("not-the-secret"),
        "the wrong secret was printed"
    );
    let (revoked, _) = http_post(&server.addr, &format!("/revoke?token={good}"), "", "");
    assert_eq!(revoked, 200);
    let (status, v, all) = oauth(&good, "demo-client-secret");
    assert_eq!(status, 3, "{v:#}");
    assert_eq!(codes(&v), vec!["auth.revoked"], "{v:#}");
    assert_no_secret(&all, &secrets, "oauth revoked");
}

#[test]
fn doctor_reports_an_unreachable_server_and_exits_1_when_it_cannot_run() {
    // Nothing listens there: a finding (exit 3), with the step saying so.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    std::fs::write(&key, "{\"type\": \"authorized_user\"}").unwrap();
    let (status, v, _) = doctor_json(&[
        "gmail",
        "--key",
        key.to_str().unwrap(),
        "--subject",
        "alice@example.com",
        "--endpoint",
        &endpoint,
    ]);
    assert_eq!(status, 3, "{v:#}");
    let first = &v["problems"][0];
    assert_eq!(first["step"], "server", "{v:#}");
    assert!(
        first["cause"].as_str().unwrap().contains("no answer"),
        "{first}"
    );
    // The key file is a user's credentials, not a service account's: said so, with the verb.
    let key_step = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "key_file")
        .unwrap();
    assert_eq!(key_step["status"], "fail");
    assert!(
        key_step["diagnosis"]["cause"]
            .as_str()
            .unwrap()
            .contains("doctor oauth"),
        "{key_step}"
    );
    // No key file at all: the doctor cannot run.
    let out = doctor(&[
        "gmail",
        "--key",
        "/nonexistent/key.json",
        "--subject",
        "alice@example.com",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/key.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stand-in for Google (not a Mailgate: no `/healthz`, no `mailgate` extension in its
/// errors): answers each request on its own connection with Google's own error bodies, as
/// `answer(method, path, body)` says, and a `Date` header `skew_s` seconds off.
fn fake_google(
    skew_s: i64,
    answer: impl Fn(&str, &str, &str) -> (u16, String) + Send + 'static,
) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        // Bounded: a doctor run makes a dozen requests.
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .ok();
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_owned(),
                parts.next().unwrap_or("").to_owned(),
            );
            let mut length = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = r.read_exact(&mut body);
            let (status, text) = answer(&method, &path, &String::from_utf8_lossy(&body));
            let date = time::OffsetDateTime::now_utc() + time::Duration::seconds(skew_s);
            let date = date
                .format(&time::format_description::well_known::Rfc2822)
                .unwrap()
                .replace("+0000", "GMT");
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nDate: {date}\r\nContent-Type: application/json; charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    format!("http://{addr}")
}

/// Whether a token request's assertion names a subject.
fn assertion_has_sub(form: &str) -> bool {
    use base64::Engine as _;
    let assertion = form
        .split('&')
        .find_map(|kv| kv.strip_prefix("assertion="))
        .unwrap_or("");
    let payload = assertion.split('.').nth(1).unwrap_or("");
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_default();
    serde_json::from_slice::<Value>(&claims).is_ok_and(|c| c.get("sub").is_some())
}

/// A key file for `fake` (a real RSA key from `mailgate sa key create`, token_uri moved).
fn key_for(gw: &Gateway, fake: &str) -> String {
    let path = gw.sa_key("reporter@acme-app.iam.example.com");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["token_uri"] = json!(format!("{fake}/token"));
    std::fs::write(&path, v.to_string()).unwrap();
    path
}

#[test]
fn doctor_gmail_diagnoses_googles_own_answers_with_remedies_for_googles_consoles() {
    let gw = Gateway::new();
    gw.ok(&[
        "apply",
        "-f",
        crate::harness::example_org().to_str().unwrap(),
    ]);

    // No domain-wide delegation: Google's token endpoint refuses every token with `sub`.
    let fake = fake_google(0, |method, path, body| {
        match (method, path) {
        ("POST", "/token") if assertion_has_sub(body) => (
            401,
            json!({"error": "unauthorized_client", "error_description": "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."}).to_string(),
        ),
        ("POST", "/token") => (200, json!({"access_token": "ya29.c.fake-token-0123456789", "expires_in": 3599, "token_type": "Bearer"}).to_string()),
        _ => (404, json!({"error": {"code": 404, "message": "Not Found", "status": "NOT_FOUND"}}).to_string()),
    }
    });
    let key = key_for(&gw, &fake);
    let (status, v, all) = doctor_json(&[
        "gmail",
        "--key",
        &key,
        "--subject",
        "alice@example.com",
        "--endpoint",
        &fake,
    ]);
    assert_eq!(status, 3, "{v:#}");
    assert_eq!(codes(&v), vec!["delegation.not_configured"], "{v:#}");
    let remedy = v["problems"][0]["remedy"].as_str().unwrap();
    assert!(
        remedy.contains("Manage Domain Wide Delegation")
            && remedy.contains("104500000000000000002"),
        "{remedy}"
    );
    let probe = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "send_probe")
        .unwrap();
    assert_eq!(probe["status"], "skip");
    assert!(
        probe["note"].as_str().unwrap().contains("no dry run"),
        "{probe}"
    );
    assert_no_secret(&all, &key_secrets(&key), "fake google");
    assert!(
        !all.contains("ya29.c.fake-token"),
        "an access token was printed"
    );

    // Delegation works, but the user has no Gmail, and this machine's clock is 5 minutes off.
    let fake = fake_google(300, |method, path, _| {
        match (method, path) {
        ("POST", "/token") => (200, json!({"access_token": "ya29.c.fake-token-0123456789", "expires_in": 3599, "token_type": "Bearer"}).to_string()),
        ("GET", p) if p.ends_with("/profile") => (
            400,
            json!({"error": {"code": 400, "message": "Mail service not enabled", "errors": [{"message": "Mail service not enabled", "domain": "global", "reason": "failedPrecondition"}], "status": "FAILED_PRECONDITION"}}).to_string(),
        ),
        ("GET", p) if p.ends_with("/settings/sendAs") => (
            200,
            json!({"sendAs": [{"sendAsEmail": "alice@example.com", "isPrimary": true, "isDefault": true}]}).to_string(),
        ),
        _ => (404, json!({"error": {"code": 404, "message": "Not Found", "status": "NOT_FOUND"}}).to_string()),
    }
    });
    let key = key_for(&gw, &fake);
    let (status, v, _) = doctor_json(&[
        "gmail",
        "--key",
        &key,
        "--subject",
        "alice@example.com",
        "--endpoint",
        &fake,
    ]);
    assert_eq!(status, 3, "{v:#}");
    assert_eq!(
        codes(&v),
        vec!["auth.invalid", "account.mail_disabled"],
        "{v:#}"
    );
    assert_eq!(v["problems"][0]["step"], "clock", "{v:#}");
    let remedy = v["problems"][1]["remedy"].as_str().unwrap();
    assert!(remedy.contains("Turn Gmail on"), "{remedy}");
    let profile = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "profile")
        .unwrap();
    let confirm = profile["diagnosis"]["confirm"].as_str().unwrap();
    assert!(
        confirm.contains("Google Admin console"),
        "where to look, in Google's console: {confirm}"
    );
}
