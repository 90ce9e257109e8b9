//! `mailgate serve`: health, live directory changes, graceful shutdown.

use std::time::Duration;

use crate::harness::{Gateway, demo, eventually, http_get, smarthost_yaml};

#[test]
fn demo_serves_health_and_sees_a_suspension_without_restart() {
    let (gw, server) = demo();
    let (status, body) = http_get(&server.addr, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");

    let token = gw.ok(&["admin-token", "create", "it"]).trim().to_owned();
    let user = |email: &str| {
        let (status, body) = http_get(
            &server.addr,
            &format!("/mailgate/v1/users/{email}"),
            Some(&token),
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert_eq!(user("alice@example.com")["user"]["status"], "active");

    gw.ok(&["user", "suspend", "alice@example.com"]);
    assert!(
        eventually(
            Duration::from_secs(10),
            || user("alice@example.com")["user"]["status"] == "suspended"
        ),
        "the running server did not pick up the suspension"
    );

    let (clean, _out, logs) = server.stop();
    assert!(clean, "serve did not exit cleanly on SIGTERM:\n{logs}");
    assert!(logs.contains("directory reloaded"), "{logs}");
}

#[test]
fn admin_api_requires_a_known_token() {
    let (_gw, server) = demo();
    let (status, body) = http_get(&server.addr, "/mailgate/v1/users/alice@example.com", None);
    assert_eq!(status, 401);
    assert!(body.contains("admin-token create"), "{body}");
    let (status, _) = http_get(
        &server.addr,
        "/mailgate/v1/users/alice@example.com",
        Some("mga_not-a-real-token"),
    );
    assert_eq!(status, 401);
}

#[test]
fn plain_http_refuses_a_non_loopback_address() {
    let gw = Gateway::new();
    let cfg = gw.dir.path().join("bad.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"0.0.0.0:7080\"\n").unwrap();
    let out = std::process::Command::new(crate::harness::BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn demo_banner_tells_a_newcomer_where_everything_is() {
    let (gw, server) = demo();
    let addr = server.addr.clone();
    let (_, banner, _) = server.stop();
    assert!(
        banner.contains(&format!("http://{addr}/healthz")),
        "{banner}"
    );
    assert!(banner.contains("demo-credentials.txt"), "{banner}");
    let creds = std::fs::read_to_string(gw.data_dir().join("demo-credentials.txt")).unwrap();
    assert!(creds.contains("admin_token = mga_"), "{creds}");
}

/// Every command treats a closed standard output as a normal end: `| head -1` gets exit 0 and
/// no panic message (std's `println!` panicked with "Broken pipe", exit 101).
#[test]
fn a_closed_stdout_ends_a_command_normally() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let gw = Gateway::new();
    gw.ok(&[
        "apply",
        "-f",
        crate::harness::example_org().to_str().unwrap(),
    ]);
    let config = gw.config("");
    for args in [
        &["export"][..],
        &["user", "list"],
        &["key", "list"],
        &[
            "explain",
            "--as",
            "alice@example.com",
            "--to",
            "x@example.org",
        ],
        &["--help"],
    ] {
        let mut child = Command::new(crate::harness::BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("MAILGATE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before the command writes: every write meets a closed pipe.
        drop(child.stdout.take());
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {status}\n{err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

/// Empty lists say so (on standard error: standard output stays one line per item).
#[test]
fn empty_lists_say_they_are_empty() {
    let gw = Gateway::new();
    for (args, says) in [
        (&["queue", "list"][..], "queue is empty"),
        (
            &["queue", "list", "--state", "deferred"],
            "no message in the queue is deferred",
        ),
        (&["captured", "list"], "no captured message"),
        (&["user", "list"], "no user in the directory"),
        (&["key", "list"], "no API key"),
        (&["simulate", "--list"], "no injected fault in force"),
    ] {
        let out = gw.cmd(args);
        assert!(out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// The delivery mode logged at start is kept true: adding a smarthost to a capturing server
/// logs that it now relays.
#[test]
fn the_delivery_mode_log_follows_the_directory() {
    let gw = Gateway::new();
    let server = gw.serve(&[]);
    std::thread::sleep(Duration::from_millis(500));
    gw.apply("smarthost.yaml", &smarthost_yaml(2525));
    // The server reloads within 100 ms here and the mode is looked at every 250 ms; the logs are
    // read when the server stops, so leave it ample time on a loaded machine.
    std::thread::sleep(Duration::from_millis(3_000));
    let (_, _, logs) = server.stop();
    let capture = logs
        .find("delivery: capture mode")
        .unwrap_or_else(|| panic!("{logs}"));
    let relaying = logs
        .find("delivery: relaying through the directory's smarthosts (sink)")
        .unwrap_or_else(|| panic!("no relaying line after the smarthost was added:\n{logs}"));
    assert!(capture < relaying, "{logs}");
    // Log lines carry the one time format (RFC 3339 UTC, milliseconds), no colour codes in a
    // pipe.
    let line = logs
        .lines()
        .find(|l| l.contains("delivery: relaying"))
        .unwrap();
    let stamp = line.split(' ').next().unwrap();
    assert_eq!(stamp.len(), "2027-01-15T08:00:00.000Z".len(), "{line:?}");
    assert!(
        stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
        "{line:?}"
    );
    assert!(!logs.contains('\u{1b}'), "ANSI escapes in a piped log");
}

/// docs/config.md describes `https.listen` as what it is: served (not "reserved").
#[test]
fn config_doc_says_https_is_served() {
    let doc = std::fs::read_to_string(crate::harness::repo_root().join("docs/config.md")).unwrap();
    let row = doc
        .lines()
        .find(|l| l.starts_with("| `https.listen`"))
        .unwrap();
    assert!(!row.to_ascii_lowercase().contains("reserved"), "{row}");
    assert!(row.contains("https.cert"), "{row}");
    // ...and it is: the demo banner lists the HTTPS listener.
    let (_gw, server) = demo();
    let https = server.https.clone();
    let (_, banner, _) = server.stop();
    assert!(
        banner.contains(&format!("HTTPS API           https://{https}")),
        "{banner}"
    );
}

/// demo-credentials.txt names each secret as client libraries call it: the OAuth client's is a
/// `client_secret` (beside its `client_id`), the SendGrid keys are `api_key`s.
#[test]
fn demo_credentials_name_each_secret() {
    let (gw, server) = demo();
    drop(server);
    let creds = std::fs::read_to_string(gw.data_dir().join("demo-credentials.txt")).unwrap();
    let value = |key: &str| -> Vec<String> {
        creds
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key} = ")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(value("client_id"), ["demo-web-client"], "{creds}");
    assert_eq!(value("client_secret"), ["demo-client-secret"], "{creds}");
    let keys = value("api_key");
    assert_eq!(keys.len(), 2, "{creds}");
    assert!(keys.iter().all(|k| k.starts_with("SG.")), "{creds}");
}

/// Accepts `raw` from alice through the gateway, as a door would; returns its id.
fn accept_raw(gw: &Gateway, to: &str, raw: &str) -> String {
    use mailgate_core::engine::{Credential, Door, SendAttempt};
    use mailgate_gateway::{Accepted, Message};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = gw.open_store().await.directory;
        let gw = mailgate_gateway::Gateway::open(store).await.unwrap();
        let attempt = SendAttempt::new(
            Door::Smtp,
            Credential::SmtpLogin {
                user: "alice@example.com".into(),
            },
        )
        .from("alice@example.com")
        .to([to])
        .parsed(raw.len() as u64);
        let d = gw.decide("smtp", &attempt).await.unwrap();
        assert!(d.decision.accepted(), "{:?}", d.decision.denial());
        let msg = Message {
            envelope_from: "alice@example.com".into(),
            recipients: vec![to.to_owned()],
            raw: raw.as_bytes().to_vec(),
        };
        match gw.accept("smtp", &attempt, &d, msg).await.unwrap() {
            Accepted::Stored { message_id, .. } => message_id,
            Accepted::Refused(r) => panic!("refused: {:?}", r.decision.denial()),
        }
    })
}

/// `captured show` prints a folded header with its continuation lines (indented, no CR), and
/// the listings print one timestamp format (RFC 3339 UTC, milliseconds).
#[test]
fn captured_show_keeps_folded_headers_and_times_have_one_format() {
    let gw = Gateway::new();
    let server = gw.serve_with("[relay]\npoll_interval_ms = 50\n", &["--demo"]);
    let raw = "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: a subject long enough\r\n  to be folded\r\n\tagain\r\n\r\nHello.\r\n";
    let id = accept_raw(&gw, "bob@example.org", raw);
    assert!(
        eventually(Duration::from_secs(10), || gw
            .ok(&["captured", "list"])
            .contains(&id)),
        "not captured"
    );
    let show = gw.ok(&["captured", "show", &id]);
    assert!(!show.contains('\r'), "{show:?}");
    assert!(
        show.contains("  Subject: a subject long enough\n    to be folded\n  \tagain\n"),
        "{show}"
    );
    let ms = |line: &str| {
        line.split(|c: char| c.is_whitespace())
            .filter(|w| w.len() >= 20 && w.as_bytes()[4] == b'-' && w.ends_with('Z'))
            .all(|w| w.len() == "2027-01-15T08:00:00.000Z".len() && w.as_bytes()[19] == b'.')
    };
    let list = gw.ok(&["captured", "list"]);
    assert!(list.lines().all(ms), "{list}");
    let queue = gw.ok(&["queue", "list"]);
    assert!(queue.lines().all(ms), "{queue}");
    assert!(show.lines().all(ms), "{show}");
    drop(server);
}
