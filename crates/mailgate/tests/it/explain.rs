//! `mailgate explain` and the explain/decision admin API.

use mailgate_store::UsageEntry;

use crate::harness::{Gateway, demo, example_org, http_get, stdout_json};

/// Records `n` accepted sends for `principal` in the store, as a door does on acceptance.
fn record_sends(gw: &Gateway, principal: &str, n: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = gw.open_store().await.directory;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for i in 0..n {
            store
                .record_usage(
                    principal,
                    UsageEntry {
                        at_ms: now - 60_000 + i as i64,
                        recipients: 1,
                    },
                    None,
                )
                .await
                .unwrap();
        }
    });
}

#[test]
fn explain_lists_every_failure_with_its_remedy() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    // frank may send 3 messages a day and has sent 3; now he is also suspended, and sends as an
    // address he does not own.
    record_sends(&gw, "frank@example.com", 3);
    gw.ok(&["user", "suspend", "frank@example.com"]);
    let args = [
        "explain",
        "--as",
        "frank@example.com",
        "--from",
        "support@example.com",
        "--to",
        "x@example.org",
        "--door",
        "smtp",
        "--tls",
        "1.2",
    ];
    let out = gw.cmd(&args);
    assert_eq!(out.status.code(), Some(3), "denied explains exit with 3");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("DENIED (3 problem(s))"), "{text}");
    for (code, remedy) in [
        (
            "account.suspended",
            "mailgate user unsuspend frank@example.com",
        ),
        ("sender.not_owned", "users[frank@example.com].send_as"),
        ("limit.daily_messages", "messages_per_day"),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("✘ {code}"))),
            "{code} not failed:\n{text}"
        );
        let fix = text
            .lines()
            .find(|l| l.contains(&format!(". {code} [")))
            .unwrap_or_else(|| panic!("no remedy line for {code}:\n{text}"));
        assert!(fix.contains(remedy), "{code}: {fix}");
    }

    let json_args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let out = gw.cmd(&json_args);
    assert_eq!(out.status.code(), Some(3));
    let v = stdout_json(&out, "explain --json");
    assert_eq!(v["allowed"], false);
    assert_eq!(v["denial"]["code"], "account.suspended");
    let failed: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == "fail")
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        [
            "account.suspended",
            "sender.not_owned",
            "limit.daily_messages"
        ]
    );
    for c in v["checks"].as_array().unwrap() {
        for key in ["check", "code", "outcome", "detail", "remedy"] {
            assert!(c.get(key).is_some(), "check lacks `{key}`: {c}");
        }
    }
    let limit = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"] == "limit.daily_messages")
        .unwrap();
    assert_eq!(limit["limit"]["current"], 3);
    assert_eq!(limit["limit"]["limit"], 3);
    assert!(limit["limit"]["reset_at_ms"].as_u64().is_some());

    // Allowed sends exit 0.
    gw.ok(&[
        "explain",
        "--as",
        "alice@example.com",
        "--to",
        "x@example.org",
    ]);
}

#[test]
fn explain_over_http_and_the_decision_trace_by_id() {
    let (gw, server) = demo();
    let token = gw.ok(&["admin-token", "create", "it"]).trim().to_owned();
    let body = r#"{"as": "carol@example.com", "to": ["x@example.org"], "door": "gmail"}"#;
    let (status, resp) =
        crate::harness::http_post(&server.addr, "/mailgate/v1/explain", &token, body);
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["denial"]["code"], "account.mail_disabled");
    assert!(
        v["denial"]["remedy"].as_str().unwrap().contains("/frozen"),
        "{v}"
    );
    let id = v["decision_id"].as_str().unwrap();

    let (status, trace) = http_get(
        &server.addr,
        &format!("/mailgate/v1/decisions/{id}"),
        Some(&token),
    );
    assert_eq!(status, 200, "{trace}");
    let t: serde_json::Value = serde_json::from_str(&trace).unwrap();
    assert_eq!(t["code"], "account.mail_disabled");
    assert_eq!(t["decision"]["checks"], v["checks"]);

    // Over HTTP too, a fact not given is not checked: the admin client's own address is not
    // taken for the sender's.
    let (status, resp) = crate::harness::http_post(
        &server.addr,
        "/mailgate/v1/explain",
        &token,
        r#"{"api_key_name": "billing", "to": ["x@example.org"]}"#,
    );
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["verdict"], "allowed", "{v}");
    assert_eq!(v["complete"], false, "{v}");
    let ip = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"] == "key.ip_blocked")
        .unwrap();
    assert_eq!(ip["outcome"], "not_checked", "{ip}");
    // Kept on the record as not checked, not as allowed.
    let id = v["decision_id"].as_str().unwrap();
    let (status, kept) = crate::harness::http_get(
        &server.addr,
        &format!("/mailgate/v1/decisions/{id}"),
        Some(&token),
    );
    assert_eq!(status, 200, "{kept}");
    let kept: serde_json::Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(kept["verdict"], "not_checked", "{kept}");
    assert!(v.get("hint").is_none(), "a principal was named: {v}");

    // No principal: the answer says which body fields name one.
    let (status, resp) = crate::harness::http_post(
        &server.addr,
        "/mailgate/v1/explain",
        &token,
        r#"{"to": ["x@example.org"]}"#,
    );
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["denial"]["code"], "auth.missing", "{v}");
    let hint = v["hint"].as_str().unwrap_or_else(|| panic!("no hint: {v}"));
    for field in [
        "\"as\"",
        "\"service_account\"",
        "\"api_key_name\"",
        "\"relay\"",
    ] {
        assert!(hint.contains(field), "{field}: {hint}");
    }

    // Bad input: a clear 400 in the admin API's JSON shape.
    let (status, resp) =
        crate::harness::http_post(&server.addr, "/mailgate/v1/explain", &token, r#"{"as": 5}"#);
    assert_eq!(status, 400, "{resp}");
    let e: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(e["error"]["code"], 400);
    let (status, _) = crate::harness::http_post(
        &server.addr,
        "/mailgate/v1/explain",
        &token,
        r#"{"door": "fax"}"#,
    );
    assert_eq!(status, 400);
    let (status, _) = http_get(&server.addr, "/mailgate/v1/decisions/nope", Some(&token));
    assert_eq!(status, 404);
}

/// Splits a command line on spaces, honouring double quotes.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The README's tour table is true: each row's explain gives the code it says.
#[test]
fn readme_tour_rows_hold() {
    let readme = std::fs::read_to_string(crate::harness::repo_root().join("README.md")).unwrap();
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let mut rows = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `explain ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let cmd = cells[1].trim_matches('`');
        let expected = if cells[2].starts_with("allowed") {
            None
        } else {
            Some(cells[2].split('`').nth(1).unwrap().to_owned())
        };
        let args: Vec<String> = shell_words(cmd)
            .into_iter()
            .chain(["--json".to_owned()])
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = gw.cmd(&args);
        let v = stdout_json(&out, cmd);
        let got = v["denial"]["code"].as_str().map(str::to_owned);
        assert_eq!(got, expected, "README row `{cmd}`");
        rows += 1;
    }
    assert!(rows >= 10, "README tour table not found");
}

/// `explain` does not guess a fact it was not given: a key restricted by IP, explained without
/// `--ip`, is "not checked" (neither pass nor fail) in text and JSON, and denies nothing by
/// itself; with `--ip` it is checked.
#[test]
fn a_fact_not_given_is_not_checked_rather_than_failed() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let args = [
        "explain",
        "--api-key-name",
        "billing",
        "--to",
        "x@example.org",
    ];
    let out = gw.cmd(&args);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "not denied by itself:\n{text}");
    assert!(!text.contains("(unknown)"), "{text}");
    assert!(!text.starts_with("DENIED"), "{text}");
    assert!(
        text.starts_with("ALLOWED if what was not checked holds (1 check not checked"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("key.ip_blocked"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("? key.ip_blocked"), "{line}");
    assert!(line.contains("not checked: give --ip"), "{line}");
    assert!(!text.contains("To fix:"), "nothing failed:\n{text}");

    let json: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let out = gw.cmd(&json);
    let v = stdout_json(&out, "explain --json");
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(
        v["complete"], false,
        "a decision with a check not made is not complete"
    );
    assert!(v["denial"].is_null(), "{v}");
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["code"] == "key.ip_blocked")
        .unwrap();
    assert_eq!(check["outcome"], "not_checked", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .starts_with("not checked: give --ip"),
        "{check}"
    );

    // Given, the fact is checked: allowed from 127.0.0.1, refused from elsewhere.
    let ok = gw.ok(&[
        "explain",
        "--api-key-name",
        "billing",
        "--ip",
        "127.0.0.1",
        "--to",
        "x@example.org",
    ]);
    assert!(ok.starts_with("ALLOWED   decision"), "{ok}");
    let out = gw.cmd(&[
        "explain",
        "--api-key-name",
        "billing",
        "--ip",
        "10.1.2.3",
        "--to",
        "x@example.org",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("✘ key.ip_blocked"), "{text}");
    assert!(text.contains("client IP 10.1.2.3 is outside"), "{text}");
}

/// `explain` with no principal says which flags name one; TLS versions read `TLS 1.1`.
#[test]
fn explain_without_a_principal_names_the_flags_and_tls_reads_as_a_number() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let out = gw.cmd(&["explain", "--to", "x@example.org"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("✘ auth.missing"), "{text}");
    let hint = text
        .lines()
        .find(|l| l.starts_with("no principal given"))
        .unwrap_or_else(|| panic!("no hint:\n{text}"));
    for flag in [
        "--as",
        "--service-account",
        "--api-key-name",
        "--api-key-id",
        "--relay",
    ] {
        assert!(hint.contains(flag), "{flag}: {hint}");
    }
    // Only the missing principal is wrong: no From nobody wrote is refused.
    assert!(text.starts_with("DENIED (1 problem(s))"), "{text}");
    let out = gw.cmd(&["explain", "--to", "x@example.org", "--json"]);
    let v = stdout_json(&out, "explain --json");
    assert!(
        v["hint"].as_str().unwrap().contains("--api-key-name"),
        "{v}"
    );
    // A principal given: no hint.
    let text = gw.ok(&[
        "explain",
        "--as",
        "alice@example.com",
        "--to",
        "x@example.org",
    ]);
    assert!(!text.contains("no principal given"), "{text}");

    let out = gw.cmd(&[
        "explain",
        "--as",
        "alice@example.com",
        "--tls",
        "1.1",
        "--to",
        "x@example.org",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("client negotiated TLS 1.1,"), "{text}");
    assert!(!text.contains("Tls11"), "{text}");
}
