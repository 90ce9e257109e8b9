//! Two nodes (two `serve` processes, each with its own data directory and `[node] id`) on one
//! PostgreSQL database deliver one shared queue (issue 16 item 4): a node killed mid-load loses
//! nothing acknowledged, and every message the smarthost got twice is marked
//! `possible_duplicate`; a node paused past its lease commits nothing for the messages it lost; a
//! node stopped cleanly leaves the messages its workers had not taken to the other at once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use mailgate_relay::testing::SinkConfig;
use mailgate_store::{MessageState, Stores, TokenRecord};

use crate::harness::{
    FAST_RELAY, Gateway, eventually, example_org, postgres_database, smarthost_yaml, start_sink,
};

const TOKEN: &str = "ya29.nodes-test-token";

/// The config of node `id` on the database `url`, with `relay` appended to `[relay]`.
fn node_config(url: &str, id: &str, relay: &str) -> String {
    format!("[store]\nurl = {url:?}\n[node]\nid = {id:?}\n{FAST_RELAY}{relay}")
}

/// Two gateways (data directories, ports) configured as nodes `a` and `b` of `url`, the example
/// organisation and a sink smarthost applied, generous limits, and an access token for alice.
fn two_nodes(rt: &tokio::runtime::Runtime, url: &str, sink_port: u16, relay: &str) -> [Gateway; 2] {
    let nodes = [Gateway::new(), Gateway::new()];
    nodes[0].config(&node_config(url, "a", relay));
    nodes[1].config(&node_config(url, "b", relay));
    nodes[0].ok(&["apply", "-f", example_org().to_str().unwrap()]);
    nodes[0].apply(
        "limits.yaml",
        &format!(
            "{}limits:\n  messages_per_day: 100000\n  recipients_per_day: 100000\n  rate_units_per_minute: 100000000\n  concurrent_sends: 1000\n",
            smarthost_yaml(sink_port)
        ),
    );
    rt.block_on(async {
        let store = open(url).await;
        let now = mailgate_gateway::now_ms() as i64;
        store
            .tokens
            .insert_token(&TokenRecord {
                token_sha256: mailgate_auth::sha256_hex(TOKEN.as_bytes()),
                kind: mailgate_store::TokenKind::Access,
                grant: serde_json::json!({"type": "user", "user": "alice@example.com", "client_id": "demo-web-client"}),
                scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
                family: "nodes".into(),
                created_at_ms: now,
                expires_at_ms: now + 3_600_000,
                revoked: false,
                used: false,
            })
            .await
            .unwrap();
    });
    nodes
}

async fn open(url: &str) -> Stores {
    mailgate_store::open(url).await.unwrap()
}

/// One Gmail send over a fresh connection: the message id on a 200.
fn send_one(addr: &str, n: u64) -> Option<String> {
    let raw = format!(
        "From: alice@example.com\r\nTo: x@example.org\r\nSubject: nodes-{n}\r\n\r\nmessage {n}\r\n"
    );
    let body = format!(
        "{{\"raw\":\"{}\"}}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "POST /gmail/v1/users/me/messages/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    if !resp.starts_with("HTTP/1.1 200") {
        return None;
    }
    let json = resp.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["id"].as_str().map(str::to_owned)
}

/// How many times the sink received each `nodes-<n>` subject.
fn subjects(sink: &mailgate_relay::testing::Sink) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for r in sink.received() {
        let text = String::from_utf8_lossy(&r.data).to_string();
        if let Some(n) = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: nodes-"))
            .and_then(|n| n.trim().parse().ok())
        {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

/// Load on both nodes; node `b` is `kill -9`'d three times mid-load and restarted: every
/// acknowledged message reaches the sink, and every one it got twice is `possible_duplicate` in
/// its history.
#[test]
fn two_nodes_one_killed_three_times_lose_nothing_and_mark_every_duplicate() {
    let pg = postgres_database();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(&rt, SinkConfig::default());
    let relay = "lease_ms = 2000\n";
    let nodes = two_nodes(&rt, &pg.url, sink.addr.port(), relay);
    let a = nodes[0].serve_with(&node_config(&pg.url, "a", relay), &[]);
    let mut b = nodes[1].serve_with(&node_config(&pg.url, "b", relay), &[]);
    let addrs = [a.addr.clone(), b.addr.clone()];

    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let clients: Vec<_> = (0..4u64)
        .map(|c| {
            let (acked, stop) = (acked.clone(), stop.clone());
            let addr = addrs[(c % 2) as usize].clone();
            std::thread::spawn(move || {
                let mut n = c * 1_000_000;
                // Bounded in count and time, and paced.
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && n < c * 1_000_000 + 1_000
                {
                    match send_one(&addr, n) {
                        Some(id) => {
                            acked.lock().unwrap().push((n, id));
                            std::thread::sleep(Duration::from_millis(15));
                        }
                        None => std::thread::sleep(Duration::from_millis(20)),
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        b.kill9();
        std::thread::sleep(Duration::from_millis(200));
        b = nodes[1].serve_with(&node_config(&pg.url, "b", relay), &[]);
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "too few sends: {}", acked.len());

    let all_arrived = eventually(Duration::from_secs(90), || {
        let got = subjects(&sink);
        acked.iter().all(|(n, _)| got.contains_key(n))
    });
    let got = subjects(&sink);
    let lost: Vec<&u64> = acked
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !got.contains_key(n))
        .collect();
    assert!(all_arrived && lost.is_empty(), "lost: {lost:?}");
    // Every message recorded (none left leased or queued), and every duplicate marked.
    let store = rt.block_on(open(&pg.url));
    let mut twice = 0;
    for (n, id) in &acked {
        let recorded = eventually(Duration::from_secs(30), || {
            rt.block_on(store.queue.message_status(id))
                .unwrap()
                .is_some_and(|s| s.entry.state == MessageState::Delivered)
        });
        assert!(recorded, "{id} (nodes-{n}) not recorded as delivered");
        let st = rt
            .block_on(store.queue.message_status(id))
            .unwrap()
            .unwrap();
        if got[n] > 1 {
            twice += 1;
            assert!(
                st.possible_duplicate && st.history.iter().any(|h| h.possible_duplicate),
                "{id} (nodes-{n}) delivered {} times, not marked possible_duplicate: {:?}",
                got[n],
                st.history
            );
        }
    }
    println!(
        "two nodes: {} acknowledged, {} delivered twice (all marked possible_duplicate)",
        acked.len(),
        twice
    );
    b.stop();
    a.stop();
}

/// Node `a` is stopped (SIGSTOP) mid-delivery (the smarthost answers the final dot after 4 s)
/// past its 2 s lease; node `b` delivers the message; `a` resumed (SIGCONT) commits nothing: its
/// late write-back changes zero rows and is logged, and the history holds `b`'s one record.
#[test]
fn a_node_paused_past_its_lease_commits_nothing_when_resumed() {
    let pg = postgres_database();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(
        &rt,
        SinkConfig {
            final_reply_delay: Some(Duration::from_secs(4)),
            ..SinkConfig::default()
        },
    );
    let relay = "lease_ms = 2000\n";
    let nodes = two_nodes(&rt, &pg.url, sink.addr.port(), relay);
    let a = nodes[0].serve_with(&node_config(&pg.url, "a", relay), &[]);
    let id = send_one(&a.addr, 1).expect("accepted by node a");
    // `a` is in the middle of the delivery: the sink has the message, its 250 not yet sent.
    assert!(
        eventually(Duration::from_secs(10), || sink.received().len() == 1),
        "node a did not start delivering"
    );
    let signal = |sig: &str, pid: u32| {
        assert!(
            Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP", a.pid());
    let b = nodes[1].serve_with(&node_config(&pg.url, "b", relay), &[]);
    let store = rt.block_on(open(&pg.url));
    // `b` takes the message once `a`'s lease expired and delivers it (4 s at the sink).
    let delivered = eventually(Duration::from_secs(30), || {
        rt.block_on(store.queue.message_status(&id))
            .unwrap()
            .is_some_and(|s| s.entry.state == MessageState::Delivered)
    });
    assert!(delivered, "node b did not deliver the message");
    assert_eq!(
        sink.received().len(),
        2,
        "delivered by a (unrecorded) and by b"
    );
    let before = rt
        .block_on(store.queue.message_status(&id))
        .unwrap()
        .unwrap();
    assert_eq!(before.history.len(), 1);
    assert!(
        before.possible_duplicate,
        "b's delivery followed a's interrupted lease"
    );

    signal("-CONT", a.pid());
    // `a` gets its 250 (the sink answered while it was stopped) and writes back: nothing changes.
    std::thread::sleep(Duration::from_secs(3));
    let after = rt
        .block_on(store.queue.message_status(&id))
        .unwrap()
        .unwrap();
    assert_eq!(
        after, before,
        "the resumed node's late write-back changed the message"
    );
    let (_, _, a_log) = a.stop();
    assert!(
        a_log
            .lines()
            .any(|l| l.contains("late write-back changed nothing") && l.contains(&id)),
        "node a did not log its refused write-back for {id}:\n{a_log}"
    );
    let (_, _, b_log) = b.stop();
    assert!(
        b_log
            .lines()
            .any(|l| l.contains("delivery attempt recorded") && l.contains(&id)),
        "node b did not record the delivery of {id}:\n{b_log}"
    );
}

/// A node stopped cleanly (SIGTERM) leaves the messages it accepted and leased to its own workers
/// at acceptance (PostgreSQL's hand-off), and that none of them had taken yet, to the other node
/// at once: not after its `relay.lease_ms` (a minute here), and not as possible duplicates
/// (nobody attempted them). Node `a` has one worker, held by the sink over its first message.
/// (Messages no worker takes within about 2 s go back to the shared queue anyway, stopped or not:
/// `handoff.rs`'s sweep, tested in the store's conformance suite.)
#[test]
fn a_node_stopped_cleanly_leaves_what_its_workers_had_not_taken_to_the_others_at_once() {
    let pg = postgres_database();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(
        &rt,
        SinkConfig {
            final_reply_delay: Some(Duration::from_secs(3)),
            ..SinkConfig::default()
        },
    );
    let relay = "lease_ms = 60000\nworkers = 1\n";
    let nodes = two_nodes(&rt, &pg.url, sink.addr.port(), relay);
    let a = nodes[0].serve_with(&node_config(&pg.url, "a", relay), &[]);
    let b = nodes[1].serve_with(&node_config(&pg.url, "b", relay), &[]);
    send_one(&a.addr, 1).expect("accepted by node a");
    assert!(
        eventually(Duration::from_secs(10), || sink.received().len() == 1),
        "node a did not start delivering"
    );
    // Its one worker is busy: these wait in a's memory, leased to a's run.
    let waiting: Vec<String> = (2..=4)
        .map(|n| send_one(&a.addr, n).expect("accepted by node a"))
        .collect();
    let store = rt.block_on(open(&pg.url));
    let status = |id: &str| {
        rt.block_on(store.queue.message_status(id))
            .unwrap()
            .unwrap()
    };
    for id in &waiting {
        let owner = status(id).lease_owner.unwrap_or_default();
        assert!(
            owner.starts_with("a/") && owner.ends_with("/accepted"),
            "{id} leased by `{owner}`"
        );
    }
    let (_, _, a_log) = a.stop();
    // Released by the stop, or (a stop slower than 2 s on a loaded machine) by the hand-off's
    // sweep before it: either way at once, not after the lease.
    assert!(
        a_log.lines().any(|l| {
            l.contains("released the accepted messages no worker had taken yet")
                || l.contains("back to the shared queue")
        }),
        "node a did not release its waiting messages:\n{a_log}"
    );
    // Three deliveries of 3 s each by b's one worker, far within a's one-minute lease.
    let delivered = eventually(Duration::from_secs(30), || {
        waiting
            .iter()
            .all(|id| status(id).entry.state == MessageState::Delivered)
    });
    assert!(delivered, "node b did not deliver what node a released");
    for id in &waiting {
        let st = status(id);
        assert!(!st.possible_duplicate, "{id}: {:?}", st.history);
        assert_eq!(st.history.len(), 1, "{id}: {:?}", st.history);
    }
    b.stop();
}
