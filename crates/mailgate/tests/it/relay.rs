//! The durable queue and the delivery worker inside `mailgate serve`, against a real SMTP sink on
//! loopback (`mailgate_relay::testing::Sink`). Messages enter the queue through the gateway's
//! service layer (`decide` + `accept`, every rule applied), exactly as a door hands them over.

use std::time::Duration;

use mailgate_core::engine::{Credential, Door, SendAttempt};
use mailgate_gateway::{Accepted, Message};
use mailgate_relay::testing::{Sink, SinkConfig};
use serde_json::Value;

use crate::harness::{
    FAST_RELAY, Gateway, Server, eventually, example_org, http_get, smarthost_yaml, start_sink,
};

/// A free loopback port (bound, then released: the smarthost that is down until a sink takes it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// The example organisation, relaying through the smarthost `sink` at 127.0.0.1:`port`.
fn with_smarthost(gw: &Gateway, port: u16) {
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    gw.apply("smarthost.yaml", &smarthost_yaml(port));
}

/// Accepts a message from alice through the gateway, as a door would; returns its id.
fn accept(rt: &tokio::runtime::Runtime, gw: &Gateway, to: &[&str], subject: &str) -> String {
    let raw = format!(
        "From: alice@example.com\r\nTo: {}\r\nSubject: {subject}\r\n\r\nHello.\r\n",
        to.join(", ")
    );
    accept_raw(rt, gw, to, raw)
}

/// Accepts `raw` from alice through the gateway, as a door would; returns its id.
fn accept_raw(rt: &tokio::runtime::Runtime, gw: &Gateway, to: &[&str], raw: String) -> String {
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
        .to(to.iter().copied())
        .parsed(raw.len() as u64);
        let d = gw.decide("smtp", &attempt).await.unwrap();
        assert!(d.decision.accepted(), "{:?}", d.decision.denial());
        let msg = Message {
            envelope_from: "alice@example.com".into(),
            recipients: to.iter().map(|s| (*s).to_owned()).collect(),
            raw: raw.into_bytes(),
        };
        match gw.accept("smtp", &attempt, &d, msg).await.unwrap() {
            Accepted::Stored { message_id, .. } => message_id,
            Accepted::Refused(r) => panic!("refused: {:?}", r.decision.denial()),
        }
    })
}

fn status(server: &Server, token: &str, id: &str) -> Value {
    let (code, body) = http_get(
        &server.addr,
        &format!("/mailgate/v1/messages/{id}"),
        Some(token),
    );
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn recipient<'a>(st: &'a Value, rcpt: &str) -> &'a Value {
    st["recipient_status"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["recipient"] == rcpt)
        .unwrap_or_else(|| panic!("{rcpt} not in {st}"))
}

#[test]
fn smarthost_down_then_up_messages_wait_then_are_delivered_and_each_deferral_is_shown() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = free_port();
    let gw = Gateway::new();
    with_smarthost(&gw, port);
    let server = gw.serve_with(FAST_RELAY, &[]);
    let token = gw.ok(&["admin-token", "create", "it"]).trim().to_owned();

    let ids: Vec<String> = (0..3)
        .map(|i| accept(&rt, &gw, &["bob@example.org"], &format!("wait {i}")))
        .collect();
    // Down: every message waits, each deferral with its reason and next attempt.
    assert!(
        eventually(Duration::from_secs(20), || ids.iter().all(|id| {
            status(&server, &token, id)["history"]
                .as_array()
                .is_some_and(|h| h.len() >= 2)
        })),
        "messages were not retried while the smarthost was down"
    );
    for id in &ids {
        let st = status(&server, &token, id);
        assert_eq!(st["state"], "deferred", "{st}");
        assert!(st["next_attempt_at"].is_string(), "{st}");
        assert_eq!(st["decision_id"].as_str().map(str::len), Some(26), "{st}");
        for h in st["history"].as_array().unwrap() {
            assert_eq!(h["outcome"], "deferred", "{h}");
            assert_eq!(h["code"], "upstream.deferred", "{h}");
            assert!(h["reply"].as_str().unwrap().contains("unreachable"), "{h}");
            assert!(h["next_attempt_ms"].is_i64(), "{h}");
        }
    }
    let shown = gw.ok(&["queue", "show", &ids[0]]);
    assert!(shown.contains("upstream.deferred"), "{shown}");
    assert!(
        gw.ok(&["queue", "list", "--state", "deferred"])
            .contains(&ids[0])
    );
    // A state that is none is an error naming the states, not an empty list.
    let out = gw.cmd(&["queue", "list", "--state", "stuck"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "unknown state `stuck`: one of held, queued, deferred, delivered, failed, captured"
        ),
        "{err}"
    );

    // Up: all are delivered.
    let sink = rt
        .block_on(Sink::start(
            &format!("127.0.0.1:{port}"),
            SinkConfig::default(),
        ))
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || sink.received().len() == 3),
        "not delivered after the smarthost came back: {:?}",
        sink.received().len()
    );
    assert!(eventually(Duration::from_secs(10), || ids
        .iter()
        .all(|id| status(&server, &token, id)["state"] == "delivered")));
    let st = status(&server, &token, &ids[0]);
    assert_eq!(recipient(&st, "bob@example.org")["state"], "delivered");
    assert!(
        recipient(&st, "bob@example.org")["last_reply"]
            .as_str()
            .unwrap()
            .starts_with("250 ")
    );
    let (clean, _, logs) = server.stop();
    assert!(clean, "{logs}");
}

#[test]
fn a_550_fails_that_recipient_only_bounces_to_the_sender_and_delivers_the_others() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(
        &rt,
        SinkConfig {
            refuse: vec![(
                "nobody@example.org".into(),
                "550 5.1.1 <nobody@example.org>: Recipient address rejected".into(),
            )],
            ..SinkConfig::default()
        },
    );
    let gw = Gateway::new();
    with_smarthost(&gw, sink.addr.port());
    let server = gw.serve_with(FAST_RELAY, &[]);
    let token = gw.ok(&["admin-token", "create", "it"]).trim().to_owned();
    let id = accept(
        &rt,
        &gw,
        &["bob@example.org", "nobody@example.org", "carol@example.org"],
        "partly refused",
    );
    // The message, then the DSN to the sender.
    assert!(
        eventually(Duration::from_secs(20), || sink.received().len() >= 2),
        "received {:?}",
        sink.received()
    );
    let got = sink.received();
    assert_eq!(
        got[0].recipients,
        vec!["bob@example.org", "carol@example.org"]
    );
    let st = status(&server, &token, &id);
    assert_eq!(st["state"], "failed", "{st}");
    let nobody = recipient(&st, "nobody@example.org");
    assert_eq!(nobody["state"], "failed");
    assert_eq!(nobody["code"], "upstream.refused");
    assert_eq!(
        nobody["last_reply"],
        "550 5.1.1 <nobody@example.org>: Recipient address rejected"
    );
    for ok in ["bob@example.org", "carol@example.org"] {
        assert_eq!(recipient(&st, ok)["state"], "delivered", "{st}");
    }
    let dsn = &got[1];
    assert_eq!(dsn.from, "", "a DSN comes from the null sender");
    assert_eq!(dsn.recipients, vec!["alice@example.com"]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@example.org"),
        "{text}"
    );
    assert!(
        text.contains(
            "Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected"
        ),
        "{text}"
    );
    assert!(text.contains("Subject: partly refused"), "{text}");
    drop(server);
}

#[test]
fn demo_mode_captures_mail_and_lists_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gw = Gateway::new();
    let server = gw.serve_with("[relay]\npoll_interval_ms = 50\n", &["--demo"]);
    let token = gw.ok(&["admin-token", "create", "it"]).trim().to_owned();
    let id = accept(&rt, &gw, &["bob@example.org"], "Captured hello");
    assert!(
        eventually(Duration::from_secs(10), || gw
            .ok(&["captured", "list"])
            .contains(&id)),
        "not captured"
    );
    let list = gw.ok(&["captured", "list"]);
    let line = list.lines().find(|l| l.contains(&id)).unwrap();
    for part in [
        "from=alice@example.com",
        "to=bob@example.org",
        "subject=Captured hello",
    ] {
        assert!(line.contains(part), "{line}");
    }
    let show = gw.ok(&["captured", "show", &id]);
    assert!(show.contains("Subject: Captured hello"), "{show}");
    assert!(show.contains("text/plain"), "{show}");
    assert_eq!(
        gw.ok(&["captured", "show", &id, "--raw"]).lines().count(),
        5
    );

    let (code, body) = http_get(&server.addr, "/mailgate/v1/captured", Some(&token));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["messages"][0]["id"], id.as_str());
    assert_eq!(v["messages"][0]["subject"], "Captured hello");
    let (code, body) = http_get(
        &server.addr,
        &format!("/mailgate/v1/captured/{id}"),
        Some(&token),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["parsed"]["headers"][2]["name"], "Subject");
    assert_eq!(v["parsed"]["parts"][0]["text"], "Hello.\r\n");
    assert!(
        v["raw"]
            .as_str()
            .unwrap()
            .starts_with("From: alice@example.com")
    );
    assert_eq!(status(&server, &token, &id)["state"], "captured");
    // The admin API needs a token like every admin route.
    assert_eq!(http_get(&server.addr, "/mailgate/v1/captured", None).0, 401);
    assert_eq!(
        http_get(&server.addr, "/mailgate/v1/messages/nope", Some(&token)).0,
        404
    );
    // Captured mail is final: nothing to retry; delete removes it.
    let out = gw.cmd(&["queue", "retry", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("captured"));
    gw.ok(&["queue", "delete", &id]);
    assert!(!gw.ok(&["captured", "list"]).contains(&id));
}

#[test]
fn simulate_makes_the_next_sends_fail_with_that_reason_marked_injected() {
    let gw = Gateway::new();
    let server = gw.serve_with("[relay]\npoll_interval_ms = 50\n", &["--demo"]);
    let token = gw.ok(&["admin-token", "create", "it"]).trim().to_owned();
    let explain = || {
        let (code, body) = crate::harness::http_post(
            &server.addr,
            "/mailgate/v1/explain",
            &token,
            r#"{"as": "alice@example.com", "to": ["x@example.org"]}"#,
        );
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    assert_eq!(explain()["allowed"], true);

    let out = gw.ok(&[
        "simulate",
        "alice@example.com",
        "limit.daily_messages",
        "--for",
        "10m",
    ]);
    assert!(out.contains("limit.daily_messages"), "{out}");
    assert!(gw.ok(&["simulate", "--list"]).contains("alice@example.com"));
    // The running server picks it up; the trace says it is injected.
    assert!(
        eventually(Duration::from_secs(10), || explain()["allowed"] == false),
        "the running server did not pick up the injected fault"
    );
    let d = explain();
    assert_eq!(d["denial"]["code"], "limit.daily_messages", "{d}");
    assert!(
        d["denial"]["message"]
            .as_str()
            .unwrap()
            .starts_with("injected fault")
    );
    let injected = d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["outcome"] == "fail")
        .unwrap();
    assert!(
        injected["detail"]
            .as_str()
            .unwrap()
            .starts_with("injected fault"),
        "{injected}"
    );
    // The CLI's explain sees it too.
    let out = gw.cmd(&[
        "explain",
        "--as",
        "alice@example.com",
        "--to",
        "x@example.org",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("injected fault"));

    // The admin API clears it (and sets others: a delivery outcome is refused).
    let (code, body) = crate::harness::http_post(
        &server.addr,
        "/mailgate/v1/simulate",
        &token,
        r#"{"principal": "alice@example.com", "code": "upstream.refused"}"#,
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = crate::harness::http_post(
        &server.addr,
        "/mailgate/v1/simulate",
        &token,
        r#"{"principal": "alice@example.com", "clear": true}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(explain()["allowed"], true);
    let (code, body) = crate::harness::http_post(
        &server.addr,
        "/mailgate/v1/simulate",
        &token,
        r#"{"principal": "alice@example.com", "code": "account.suspended", "for": "1m"}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(explain()["denial"]["code"], "account.suspended");
}

/// Issue 13, item 5: whatever a door stored (the HTTP doors keep a message's own line endings),
/// the delivery worker never writes a bare LF or CR to the smarthost.
#[test]
fn a_message_stored_with_bare_newlines_is_relayed_with_crlf_only() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(&rt, SinkConfig::default());
    let gw = Gateway::new();
    with_smarthost(&gw, sink.addr.port());
    let server = gw.serve_with(FAST_RELAY, &[]);
    let raw = "From: alice@example.com\nTo: bob@example.org\nSubject: lf\n\nline\n.\nMAIL FROM:<alice@example.com>\r\nstray\rcr\n";
    accept_raw(&rt, &gw, &["bob@example.org"], raw.to_owned());
    assert!(
        eventually(Duration::from_secs(20), || !sink.received().is_empty()),
        "not delivered"
    );
    std::thread::sleep(Duration::from_millis(300));
    let got = sink.received();
    // The sink takes LF . LF as the end of data, as the servers smuggling abuses do: one
    // message arrived, whole.
    assert_eq!(got.len(), 1, "{got:?}");
    let data = &got[0].data;
    let bare = data.iter().enumerate().any(|(i, b)| match b {
        b'\n' => i == 0 || data.get(i - 1) != Some(&b'\r'),
        b'\r' => data.get(i + 1) != Some(&b'\n'),
        _ => false,
    });
    assert!(!bare, "{:?}", String::from_utf8_lossy(data));
    assert!(
        data.starts_with(
            b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: lf\r\n\r\nline\r\n.\r\nMAIL FROM:<alice@example.com>\r\nstray\r\ncr\r\n"
        ),
        "{:?}",
        String::from_utf8_lossy(data)
    );
    let (clean, _, logs) = server.stop();
    assert!(clean, "{logs}");
}

/// A message's delivery status as stored (with its lease, which the API does not show).
fn stored_status(
    rt: &tokio::runtime::Runtime,
    gw: &Gateway,
    id: &str,
) -> mailgate_store::MessageStatus {
    rt.block_on(async {
        gw.open_store()
            .await
            .queue
            .message_status(id)
            .await
            .unwrap()
            .unwrap()
    })
}

/// Regression (issue 16): a restart left leased messages untouched until `relay.lease_ms`. The
/// server is killed (SIGKILL) while a smarthost that never answers holds a message's delivery,
/// under a 120 s lease; started again on the same data directory, with the smarthost now a
/// working one, it delivers the message within seconds: the node knows the lease as its own
/// (`<node id>/...`, the id kept in `<data dir>/node-id`) and takes it back at start.
#[test]
fn a_restart_left_leased_messages_untouched_until_the_lease_expired() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let rt = tokio::runtime::Runtime::new().unwrap();
    // A smarthost that accepts the connection and never says a word (no greeting).
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let silent_port = listener.local_addr().unwrap().port();
    let connected = Arc::new(AtomicUsize::new(0));
    let count = connected.clone();
    rt.spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    let gw = Gateway::new();
    with_smarthost(&gw, silent_port);
    // The smarthost timeout outlasts the test: the delivery is stuck, not deferred.
    let relay = "[relay]\nlease_ms = 120000\ntimeout_secs = 600\npoll_interval_ms = 50\nretry_initial_ms = 200\n";
    let mut server = gw.serve_with(relay, &[]);
    let node_file = gw.data_dir().join("node-id");
    let node = std::fs::read_to_string(&node_file).unwrap();
    let id = accept(&rt, &gw, &["bob@example.org"], "leased when killed");
    assert!(
        eventually(Duration::from_secs(20), || connected.load(Ordering::SeqCst)
            >= 1),
        "the worker never connected to the smarthost"
    );
    let leased = stored_status(&rt, &gw, &id);
    let owner = leased.lease_owner.clone().unwrap_or_default();
    assert!(
        owner.starts_with(&format!("{}/", node.trim())),
        "lease owner {owner:?} is not of node {node:?}"
    );
    let now = mailgate_gateway::now_ms() as i64;
    assert!(
        leased.lease_until_ms.unwrap_or(0) > now + 60_000,
        "{leased:?}"
    );
    server.kill9();

    // The smarthost `sink` now points at one that works.
    let sink = start_sink(&rt, SinkConfig::default());
    gw.apply("smarthost.yaml", &smarthost_yaml(sink.addr.port()));
    let server = gw.serve_with(relay, &[]);
    assert!(
        eventually(Duration::from_secs(15), || sink.received().len() == 1),
        "the message waited for its old lease (until {:?}, relay.lease_ms = 120000) instead of being delivered at once: {:?}",
        leased.lease_until_ms,
        stored_status(&rt, &gw, &id)
    );
    let subject_seen =
        String::from_utf8_lossy(&sink.received()[0].data).contains("Subject: leased when killed");
    assert!(subject_seen);
    assert!(eventually(Duration::from_secs(10), || stored_status(
        &rt, &gw, &id
    )
    .entry
    .state
        == mailgate_store::MessageState::Delivered));
    assert_eq!(
        std::fs::read_to_string(&node_file).unwrap(),
        node,
        "the node identity changed across the restart"
    );
    let (clean, _, logs) = server.stop();
    assert!(clean, "{logs}");
    assert!(logs.contains("took back"), "{logs}");
}
