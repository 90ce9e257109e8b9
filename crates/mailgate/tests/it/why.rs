//! `mailgate why` and `POST /mailgate/v1/why`: the real binary, the real server, the same table
//! (crates/mailgate-core/src/why.rs, docs/why.md).

use serde_json::Value;

use crate::harness::{BIN, demo, http_post};

/// Runs `mailgate why args...` with no configuration at all (`why` needs none): (exit code,
/// stdout).
fn why(args: &[&str], stdin: &str) -> (Option<i32>, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .arg("why")
        .args(args)
        .current_dir(dir.path())
        .env_remove("MAILGATE_CONFIG")
        .env_remove("MAILGATE_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was created where it ran: no data directory, no store.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn the_cli_names_the_causes_and_exits_0() {
    let (code, out) = why(&["Delegation denied for alice@example.com"], "");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("Gmail API (gmail.delegation_denied"),
        "{out}"
    );
    assert!(out.contains("  1. impersonation.denied: "), "{out}");
    assert!(out.contains("     confirm: "), "{out}");
    assert!(out.contains("     remedy:  Use `userId` `me`"), "{out}");
    assert!(out.contains("  source: https://"), "{out}");
}

#[test]
fn the_cli_reads_a_whole_body_from_stdin_and_speaks_json() {
    let body = r#"{
  "error": {
    "code": 400,
    "message": "Precondition check failed.",
    "errors": [{"message": "Precondition check failed.", "domain": "global", "reason": "failedPrecondition"}],
    "status": "FAILED_PRECONDITION"
  }
}"#;
    let (code, out) = why(&["--json", "-"], body);
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["understood"], true);
    assert_eq!(v["matches"][0]["id"], "gmail.precondition_failed");
    assert_eq!(v["matches"][0]["service"], "Gmail API");
    let causes = v["matches"][0]["causes"].as_array().unwrap();
    assert_eq!(causes[0]["code"], "delegation.not_configured");
    assert!(
        causes
            .iter()
            .all(|c| c["confirm"].is_string() && c["remedy"].is_string())
    );
    assert_eq!(v["questions"], serde_json::json!([]));
}

#[test]
fn the_cli_says_unknown_with_the_questions_and_exits_3() {
    for text in ["hello world", ""] {
        let (code, out) = why(&[text], "");
        assert_eq!(code, Some(3), "{text:?}: {out}");
        assert!(out.starts_with("Unknown: "), "{out}");
        assert!(out.contains("Which service answered"), "{out}");
        let (code, out) = why(&["--json", text], "");
        assert_eq!(code, Some(3), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["understood"], false);
        assert_eq!(v["matches"], serde_json::json!([]));
        assert!(v["questions"].as_array().unwrap().len() >= 5, "{out}");
    }
}

/// A refusal from Mailgate's own SMTP door, as a client shows it, maps to its code.
#[test]
fn the_cli_maps_mailgates_own_refusal_to_its_code() {
    let reply = "smtplib.SMTPSenderRefused: (550, b'5.7.0 Mail Sending denied [mailgate: account.suspended, decision 01M8NTDMNZ9AJHT3SB8TFP6RNP] Remedy: run `mailgate user unsuspend bob@example.com`', 'bob@example.com')";
    let (code, out) = why(&["--json", reply], "");
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["matches"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(v["matches"][0]["service"], "Mailgate");
    assert_eq!(v["matches"][0]["causes"][0]["code"], "account.suspended");
}

/// The HTTP API answers exactly what `mailgate why --json` prints, behind the admin token; a
/// real refusal of the running server's SendGrid door is understood as its own code.
#[test]
fn the_http_api_answers_as_the_cli_does() {
    let (gw, server) = demo();
    let token = gw.demo_admin_token();

    for text in [
        "535-5.7.8 Username and Password not accepted.",
        "hello world",
        "550 5.7.0 Mail relay denied [203.0.113.10]. Invalid credentials for relay for one of the domains in: example.com (as obtained from HELO and MAIL FROM).",
    ] {
        let body = serde_json::json!({ "text": text }).to_string();
        let (status, answer) = http_post(&server.addr, "/mailgate/v1/why", &token, &body);
        assert_eq!(status, 200, "{answer}");
        let api: Value = serde_json::from_str(&answer).unwrap();
        let (_, cli) = why(&["--json", text], "");
        let cli: Value = serde_json::from_str(&cli).unwrap();
        assert_eq!(api, cli, "{text}");
    }

    // A refusal of this very server: alice's API key sending as an address she does not own is
    // refused by the SendGrid door; its whole body maps to the code the door names.
    let (status, refusal) = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
        let body = r#"{"personalizations":[{"to":[{"email":"x@example.org"}]}],"from":{"email":"nobody@example.net"},"subject":"s","content":[{"type":"text/plain","value":"v"}]}"#;
        write!(
            s,
            "POST /v3/mail/send HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            server.addr,
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let status: u16 = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, raw)
    };
    assert_eq!(status, 403, "{refusal}");
    let code = refusal
        .lines()
        .find_map(|l| l.strip_prefix("x-mailgate-code: "))
        .unwrap_or_else(|| panic!("no X-Mailgate-Code in {refusal}"))
        .trim()
        .to_owned();
    let body = refusal.split_once("\r\n\r\n").unwrap().1;
    let (status, answer) = http_post(
        &server.addr,
        "/mailgate/v1/why",
        &token,
        &serde_json::json!({ "text": body }).to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["matches"][0]["service"], "Mailgate", "{answer}");
    assert_eq!(
        v["matches"][0]["causes"][0]["code"],
        code.as_str(),
        "{answer}"
    );

    // No admin token, no answer; a body that is not `{"text": ...}` is the admin API's 400.
    let (status, _) = http_post(&server.addr, "/mailgate/v1/why", "nope", r#"{"text": "x"}"#);
    assert_eq!(status, 401);
    let (status, answer) = http_post(&server.addr, "/mailgate/v1/why", &token, r#"{"txt": "x"}"#);
    assert_eq!(status, 400, "{answer}");
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().starts_with("why: "),
        "{answer}"
    );
}
