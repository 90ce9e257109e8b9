//! Durability: a message the Gmail door acknowledged (200) survives SIGKILL of the server and
//! reaches the smarthost. Clients send continuously while the server is killed and restarted
//! several times; every acknowledged message must arrive at least once. Duplicates (a message
//! delivered, then the server killed before it recorded that) are allowed, counted and printed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use mailgate_relay::testing::SinkConfig;
use mailgate_store::TokenRecord;

use crate::harness::{FAST_RELAY, Gateway, eventually, example_org, smarthost_yaml, start_sink};

const TOKEN: &str = "ya29.crash-test-token";

/// An access token for alice, put in the store the way the token endpoint stores one.
fn mint_token(rt: &tokio::runtime::Runtime, gw: &Gateway) {
    rt.block_on(async {
        let store = gw.open_store().await.tokens;
        let now = mailgate_gateway::now_ms() as i64;
        store
            .insert_token(&TokenRecord {
                token_sha256: mailgate_auth::sha256_hex(TOKEN.as_bytes()),
                kind: mailgate_store::TokenKind::Access,
                grant: serde_json::json!({"type": "user", "user": "alice@example.com", "client_id": "demo-web-client"}),
                scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
                family: "crash".into(),
                created_at_ms: now,
                expires_at_ms: now + 3_600_000,
                revoked: false,
                used: false,
            })
            .await
            .unwrap();
    });
}

/// One Gmail send over a fresh connection: true only on a 200.
fn send_one(addr: &str, n: u64) -> bool {
    let raw = format!(
        "From: alice@example.com\r\nTo: x@example.org\r\nSubject: crash-{n}\r\n\r\nmessage {n}\r\n"
    );
    let body = format!(
        "{{\"raw\":\"{}\"}}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "POST /gmail/v1/users/me/messages/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.1 200")
}

#[test]
fn acknowledged_messages_survive_sigkill() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(&rt, SinkConfig::default());
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    // A generous daily limit: this test sends a few hundred messages as alice.
    gw.apply(
        "crash.yaml",
        &format!(
            "{}limits:\n  messages_per_day: 100000\n  recipients_per_day: 100000\n  rate_units_per_minute: 100000000\n  concurrent_sends: 1000\n",
            smarthost_yaml(sink.addr.port())
        ),
    );
    mint_token(&rt, &gw);
    let relay = format!("{FAST_RELAY}lease_ms = 2000\n");

    let mut server = gw.serve_with(&relay, &[]);
    let addr = server.addr.clone();
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let clients: Vec<_> = (0..4u64)
        .map(|c| {
            let (acked, stop, addr) = (acked.clone(), stop.clone(), addr.clone());
            std::thread::spawn(move || {
                let mut n = c * 1_000_000;
                // Bounded in count and time, and paced: continuous load through the kills, a
                // few hundred sends per client (unpaced, the server acknowledges thousands a
                // second, and delivering them all to the test sink is what the test then waits
                // for).
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && n < c * 1_000_000 + 1_000
                {
                    if send_one(&addr, n) {
                        acked.lock().unwrap().push(n);
                        std::thread::sleep(Duration::from_millis(15));
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    n += 1;
                }
            })
        })
        .collect();

    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        server.kill9();
        std::thread::sleep(Duration::from_millis(200));
        server = gw.serve_with(&relay, &[]);
        assert_eq!(server.addr, addr, "restarted on the same port");
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "too few sends got through to prove anything: {}",
        acked.len()
    );

    let subjects = || -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for r in sink.received() {
            let text = String::from_utf8_lossy(&r.data).to_string();
            if let Some(n) = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: crash-"))
                .and_then(|n| n.trim().parse().ok())
            {
                *m.entry(n).or_insert(0) += 1;
            }
        }
        m
    };
    let all_arrived = eventually(Duration::from_secs(90), || {
        let got = subjects();
        acked.iter().all(|n| got.contains_key(n))
    });
    let got = subjects();
    let lost: Vec<&u64> = acked.iter().filter(|n| !got.contains_key(n)).collect();
    let duplicates: usize = got.values().map(|c| c.saturating_sub(1)).sum();
    println!(
        "crash test: {} acknowledged, {} delivered distinct, {} duplicate deliveries, {} lost",
        acked.len(),
        got.len(),
        duplicates,
        lost.len()
    );
    assert!(
        all_arrived && lost.is_empty(),
        "lost acknowledged messages: {lost:?}"
    );
    server.stop();
}
