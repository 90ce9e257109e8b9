//! The worker against a real SMTP sink on loopback and a real queue: SQLite, or a PostgreSQL
//! database of each test's own when `MAILGATE_TEST_STORE=postgres` (`scripts/test`'s PostgreSQL
//! pass; `mailgate_store::testing::fresh_store`).

#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailgate_core::directory::{Smarthost, SmarthostTls};
use mailgate_relay::testing::{Sink, SinkConfig};
use mailgate_relay::{Relay, RelayConfig};
use mailgate_store::testing::{TestDb, fresh_store};
use mailgate_store::{MessageState, NewMessage, RecipientState, Stores};

fn message(id: &str, rcpts: &[&str]) -> NewMessage {
    NewMessage {
        id: id.into(),
        decision_id: format!("D-{id}"),
        accepted_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
        door: "test".into(),
        principal: "alice@example.com".into(),
        envelope_from: "alice@example.com".into(),
        recipients: rcpts.iter().map(|s| (*s).to_owned()).collect(),
        raw: b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nHi.\r\n.leading dot\r\n"
            .to_vec(),
        state: MessageState::Queued,
        hold_until_ms: None,
    }
}

fn smarthost(port: u16, tls: SmarthostTls) -> Smarthost {
    Smarthost {
        name: "up".into(),
        host: "127.0.0.1".into(),
        port,
        tls,
        domains: vec![],
        username: None,
        password_ref: None,
    }
}

fn config() -> RelayConfig {
    RelayConfig {
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        helo_name: "mailgate.test".into(),
        ..RelayConfig::default()
    }
}

fn relay(store: &Stores, hosts: Vec<Smarthost>, config: RelayConfig) -> Relay {
    Relay::new(store.queue.clone(), Arc::new(move || hosts.clone()), config).unwrap()
}

/// A queue holding `n` messages (`m0`, `m1`, ...) to bob@example.org, and its database's guard.
async fn queue_of(n: usize) -> (Stores, Option<TestDb>) {
    let (store, db) = fresh_store().await;
    for i in 0..n {
        store
            .directory
            .accept_message(&message(&format!("m{i}"), &["bob@example.org"]), None)
            .await
            .unwrap();
    }
    (store, db)
}

/// A worker relaying `store`'s messages to `sink` without TLS.
fn to_sink(store: &Stores, sink: &Sink) -> Relay {
    relay(
        store,
        vec![smarthost(sink.addr.port(), SmarthostTls::None)],
        config(),
    )
}

/// Runs passes until `done` or 10 s.
async fn drive(relay: &mut Relay, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        relay.run_once().await.unwrap();
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not done within 10 s");
}

#[tokio::test]
async fn a_refused_recipient_fails_alone_and_the_sender_gets_a_dsn() {
    let sink = a_refused_recipient_fails_alone(false).await;
    assert_eq!(
        sink.pipelined_envelopes(),
        2,
        "the message and its DSN, pipelined"
    );
}

#[tokio::test]
async fn without_pipelining_a_refused_recipient_fails_alone_too() {
    let sink = a_refused_recipient_fails_alone(true).await;
    assert_eq!(sink.pipelined_envelopes(), 0);
}

async fn a_refused_recipient_fails_alone(without_pipelining: bool) -> Sink {
    let sink = Sink::start(
        "127.0.0.1:0",
        SinkConfig {
            refuse: vec![(
                "nobody@example.org".into(),
                "550 5.1.1 <nobody@example.org>: no such user".into(),
            )],
            without_pipelining,
            ..SinkConfig::default()
        },
    )
    .await
    .unwrap();
    let (store, _db) = fresh_store().await;
    store
        .directory
        .accept_message(
            &message(
                "m1",
                &["bob@example.org", "nobody@example.org", "carol@example.org"],
            ),
            None,
        )
        .await
        .unwrap();
    let mut r = to_sink(&store, &sink);
    drive(&mut r, async || sink.received().len() >= 2).await;

    let got = sink.received();
    assert_eq!(
        got[0].recipients,
        vec!["bob@example.org", "carol@example.org"]
    );
    assert_eq!(got[0].from, "alice@example.com");
    assert!(String::from_utf8_lossy(&got[0].data).contains("\r\n.leading dot\r\n"));
    let st = store.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.entry.state, MessageState::Failed);
    let nobody = st
        .recipient_status
        .iter()
        .find(|r| r.recipient == "nobody@example.org")
        .unwrap();
    assert_eq!(nobody.state, RecipientState::Failed);
    assert_eq!(nobody.code.as_deref(), Some("upstream.refused"));
    assert_eq!(
        nobody.last_reply.as_deref(),
        Some("550 5.1.1 <nobody@example.org>: no such user")
    );
    for ok in ["bob@example.org", "carol@example.org"] {
        let r = st
            .recipient_status
            .iter()
            .find(|r| r.recipient == ok)
            .unwrap();
        assert_eq!(r.state, RecipientState::Delivered, "{ok}");
    }
    // The DSN went to the sender from the null sender, and names the refused recipient.
    let dsn = &got[1];
    assert_eq!(dsn.from, "");
    assert_eq!(dsn.recipients, vec!["alice@example.com"]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("report-type"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@example.org"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(
        !text.contains("bob@example.org>: "),
        "only failed recipients are reported"
    );
    sink
}

/// Pipelined, every recipient refused: the server refuses DATA too, nothing is delivered, each
/// recipient fails with its own RCPT reply.
#[tokio::test]
async fn every_recipient_refused_in_a_pipelined_envelope() {
    let sink = Sink::start(
        "127.0.0.1:0",
        SinkConfig {
            refuse: vec![
                (
                    "x@example.org".into(),
                    "550 5.1.1 <x@example.org>: no such user".into(),
                ),
                (
                    "y@example.org".into(),
                    "450 4.2.1 <y@example.org>: try later".into(),
                ),
            ],
            ..SinkConfig::default()
        },
    )
    .await
    .unwrap();
    let (store, _db) = fresh_store().await;
    store
        .directory
        .accept_message(&message("m1", &["x@example.org", "y@example.org"]), None)
        .await
        .unwrap();
    let mut r = to_sink(&store, &sink);
    r.run_once().await.unwrap();
    let st = store.queue.message_status("m1").await.unwrap().unwrap();
    let state = |who: &str| {
        st.recipient_status
            .iter()
            .find(|r| r.recipient == who)
            .map(|r| (r.state, r.last_reply.clone()))
            .unwrap()
    };
    assert_eq!(
        state("x@example.org"),
        (
            RecipientState::Failed,
            Some("550 5.1.1 <x@example.org>: no such user".into())
        )
    );
    assert_eq!(
        state("y@example.org"),
        (
            RecipientState::Deferred,
            Some("450 4.2.1 <y@example.org>: try later".into())
        )
    );
    assert_eq!(st.entry.state, MessageState::Deferred);
    assert!(
        sink.received().iter().all(|m| m.from.is_empty()),
        "no message was delivered (a DSN at most)"
    );
    assert_eq!(sink.pipelined_envelopes(), 1);
}

#[tokio::test]
async fn a_smarthost_down_for_a_while_defers_then_delivers() {
    // Reserve a port, leave it closed: the smarthost is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (store, _db) = fresh_store().await;
    store
        .directory
        .accept_message(&message("m1", &["bob@example.org"]), None)
        .await
        .unwrap();
    let mut r = relay(&store, vec![smarthost(port, SmarthostTls::None)], config());
    drive(&mut r, async || {
        store
            .queue
            .message_status("m1")
            .await
            .unwrap()
            .unwrap()
            .history
            .len()
            >= 2
    })
    .await;
    let st = store.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.entry.state, MessageState::Deferred);
    assert!(st.entry.next_attempt_ms.is_some());
    for h in &st.history {
        assert_eq!(h.outcome, RecipientState::Deferred);
        assert_eq!(h.code.as_deref(), Some("upstream.deferred"));
        assert!(h.reply.as_deref().unwrap().contains("unreachable"), "{h:?}");
        assert!(h.next_attempt_ms.is_some());
    }
    // Up again: delivered on the next attempt.
    let sink = Sink::start(&format!("127.0.0.1:{port}"), SinkConfig::default())
        .await
        .unwrap();
    drive(&mut r, async || sink.received().len() == 1).await;
    let st = store.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.entry.state, MessageState::Delivered);
    assert_eq!(
        st.history.last().unwrap().outcome,
        RecipientState::Delivered
    );
}

#[tokio::test]
async fn starttls_with_a_private_ca_and_auth() {
    let (cert, key) = mailgate_tls::self_signed(&["127.0.0.1"]).unwrap();
    let server =
        mailgate_tls::server_config_from_pem(cert.as_bytes(), key.as_bytes(), &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let sink = Sink::start(
        "127.0.0.1:0",
        SinkConfig {
            tls: Some(tokio_rustls::TlsAcceptor::from(server)),
            auth: Some(("relay-user".into(), "s3cret".into())),
            ..SinkConfig::default()
        },
    )
    .await
    .unwrap();
    let (store, _db) = fresh_store().await;
    store
        .directory
        .accept_message(&message("m1", &["bob@example.org"]), None)
        .await
        .unwrap();
    let mut good = smarthost(sink.addr.port(), SmarthostTls::Starttls);
    good.username = Some("relay-user".into());
    good.password_ref = Some(format!("file:{}", pw.display()));

    // Without the private CA the certificate is not trusted: deferred.
    let mut untrusted = relay(&store, vec![good.clone()], config());
    untrusted.run_once().await.unwrap();
    let st = store.queue.message_status("m1").await.unwrap().unwrap();
    assert_eq!(st.entry.state, MessageState::Deferred);
    let reply = st.history[0].reply.clone().unwrap();
    assert!(reply.contains("STARTTLS"), "{reply}");
    assert!(sink.received().is_empty());
    store.queue.retry_message("m1", 0).await.unwrap();

    // A wrong password: upstream.auth_failed, still deferred.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let mut bad = good.clone();
    bad.password_ref = Some(format!("file:{}", wrong.display()));
    let mut cfg = config();
    cfg.ca_pem = Some(cert.clone().into_bytes());
    let mut r = relay(&store, vec![bad], cfg.clone());
    r.run_once().await.unwrap();
    let st = store.queue.message_status("m1").await.unwrap().unwrap();
    let last = st.history.last().unwrap();
    assert_eq!(last.code.as_deref(), Some("upstream.auth_failed"));
    assert!(
        last.reply.as_deref().unwrap().starts_with("535 5.7.8"),
        "{last:?}"
    );
    assert!(
        !last.reply.as_deref().unwrap().contains("nope"),
        "no secret in the status"
    );
    store.queue.retry_message("m1", 0).await.unwrap();

    // The right password and the CA: delivered over TLS.
    let mut r = relay(&store, vec![good], cfg);
    drive(&mut r, async || sink.received().len() == 1).await;
    assert_eq!(
        store
            .queue
            .message_status("m1")
            .await
            .unwrap()
            .unwrap()
            .entry
            .state,
        MessageState::Delivered
    );
}

#[tokio::test]
async fn without_smarthosts_mail_is_captured() {
    let (store, _db) = fresh_store().await;
    store
        .directory
        .accept_message(&message("m1", &["bob@example.org"]), None)
        .await
        .unwrap();
    let mut r = relay(&store, vec![], config());
    assert!(r.capturing());
    assert_eq!(r.run_once().await.unwrap(), 1);
    let c = store.queue.list_captured(10).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(
        mailgate_relay::capture::summary(&c[0].raw)
            .subject
            .as_deref(),
        Some("hello")
    );
}

#[tokio::test]
async fn connections_are_reused_across_messages() {
    let sink = Sink::start("127.0.0.1:0", SinkConfig::default())
        .await
        .unwrap();
    let (store, _db) = queue_of(5).await;
    let mut r = to_sink(&store, &sink);
    drive(&mut r, async || sink.received().len() == 5).await;
    assert_eq!(sink.sessions(), 1, "one connection for the whole batch");
}

/// A kept connection that the smarthost closed between two messages (here: after every message)
/// is noticed at MAIL FROM, before anything was handed over, and replaced: no message is
/// deferred for it, and none is delivered twice.
#[tokio::test]
async fn a_connection_closed_between_messages_is_replaced_without_deferring() {
    let sink = Sink::start(
        "127.0.0.1:0",
        SinkConfig {
            messages_per_session: Some(1),
            ..SinkConfig::default()
        },
    )
    .await
    .unwrap();
    let (store, _db) = queue_of(3).await;
    let mut r = to_sink(&store, &sink);
    drive(&mut r, async || sink.received().len() >= 3).await;
    for i in 0..3 {
        let status = store
            .queue
            .message_status(&format!("m{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.entry.state, MessageState::Delivered);
        assert_eq!(status.history.len(), 1, "m{i}: {:?}", status.history);
    }
    assert_eq!(sink.received().len(), 3, "nothing delivered twice");
    assert_eq!(sink.sessions(), 3);
}

/// Workers sharing one wake (as `serve` runs them): only one gathers at a time, the others join
/// when batches come full. Whatever the timing, every accepted message is delivered promptly by
/// wakes alone (the poll interval here is far longer than the test), in bursts and after a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_wake_deliver_every_message_in_bursts_and_after_pauses() {
    let sink = Sink::start("127.0.0.1:0", SinkConfig::default())
        .await
        .unwrap();
    let (store, _db) = fresh_store().await;
    let notify = Arc::new(tokio::sync::Notify::new());
    let wake = mailgate_relay::Wake::new(notify.clone());
    let mut handles = Vec::new();
    for i in 0..3 {
        let r = relay(
            &store,
            vec![smarthost(sink.addr.port(), SmarthostTls::None)],
            RelayConfig {
                worker_id: format!("w{i}"),
                poll_interval: Duration::from_secs(60),
                batch: 8,
                ..config()
            },
        )
        .with_waker(wake.clone());
        handles.push(r.spawn());
    }
    let accept = async |from: usize, to: usize| {
        for i in from..to {
            store
                .directory
                .accept_message(&message(&format!("m{i}"), &["bob@example.org"]), None)
                .await
                .unwrap();
            notify.notify_one();
        }
    };
    let delivered = async |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.received().len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} delivered",
                sink.received().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    accept(0, 100).await;
    delivered(100).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    accept(100, 101).await;
    delivered(101).await;
    assert_eq!(sink.received().len(), 101, "nothing delivered twice");
    for h in handles {
        h.abort();
    }
}

/// A delivery that takes longer than the lease (a smarthost that answers the final dot after
/// 2 s, the lease 600 ms): the worker extends its lease while it waits, so another worker on the
/// same queue leases nothing meanwhile, and the message reaches the smarthost once, with one
/// attempt in its history and no `possible_duplicate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_longer_than_the_lease_is_neither_leased_nor_delivered_twice() {
    let sink = Sink::start(
        "127.0.0.1:0",
        SinkConfig {
            final_reply_delay: Some(Duration::from_secs(2)),
            ..SinkConfig::default()
        },
    )
    .await
    .unwrap();
    let (store, _db) = queue_of(1).await;
    let hosts = vec![smarthost(sink.addr.port(), SmarthostTls::None)];
    let lease = Duration::from_millis(600);
    let mut slow = relay(
        &store,
        hosts.clone(),
        RelayConfig {
            worker_id: "slow".into(),
            lease,
            ..config()
        },
    );
    let mut other = relay(
        &store,
        hosts,
        RelayConfig {
            worker_id: "other".into(),
            lease,
            ..config()
        },
    );
    let started = Instant::now();
    let first = tokio::spawn(async move { slow.run_once().await.unwrap() });
    // Once the slow worker holds the lease...
    while started.elapsed() < Duration::from_secs(2) {
        let st = store.queue.message_status("m0").await.unwrap().unwrap();
        if st.lease_owner.as_deref() == Some("slow") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The other worker looks for due messages all through the slow delivery (bounded: 3 s).
    let mut taken = 0;
    while !first.is_finished() && started.elapsed() < Duration::from_secs(3) {
        taken += other.run_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        first.await.unwrap(),
        1,
        "the slow worker delivered its message"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the delivery outlasted the lease"
    );
    assert_eq!(
        taken, 0,
        "another worker leased the message during its delivery"
    );
    assert_eq!(sink.received().len(), 1, "delivered twice");
    let st = store.queue.message_status("m0").await.unwrap().unwrap();
    assert_eq!(st.entry.state, MessageState::Delivered);
    assert_eq!(st.history.len(), 1);
    assert!(!st.possible_duplicate);
    assert_eq!(other.run_once().await.unwrap(), 0);
}
