//! Two gateway nodes on one PostgreSQL database (issue 16 item 5): what was per process is
//! shared. Each test starts two `mailgate serve` processes, each with its own data directory,
//! ports and node identity, on a fresh database of its own (dropped at the end), and checks
//! that what one node learnt holds on the other.

use serde_json::{Value, json};

use crate::harness::{Gateway, Server, json_lines, postgres_database, python_driver};

/// The demo users' password.
const PASSWORD: &str = "correct horse battery staple";

/// Two nodes serving the demo organisation from the database at `url` (the first applies it),
/// each with `extra` in its config.
fn two_nodes(url: &str, extra: &str) -> [(Gateway, Server); 2] {
    let config = format!("{extra}\n[store]\nurl = {url:?}\n");
    let a = Gateway::new();
    let sa = a.serve_with(&config, &["--demo"]);
    let b = Gateway::new();
    let sb = b.serve_with(&config, &["--demo"]);
    [(a, sa), (b, sb)]
}

/// One AUTH PLAIN over STARTTLS on `node`'s submission listener, for the probe.
fn auth(node: &(Gateway, Server), user: &str, secret: &str) -> Value {
    let port: u16 = node.1.smtp.rsplit_once(':').unwrap().1.parse().unwrap();
    json!({"mechanism": "PLAIN", "user": user, "secret": secret, "port": port,
           "ca": node.0.data_dir().join("tls/cert.pem")})
}

/// Runs the attempts in order, from 127.0.0.2; (code, message) of each.
fn probe(attempts: Vec<Value>) -> Vec<(u64, String)> {
    let first = attempts[0].clone();
    let spec = json!({
        "host": "127.0.0.1", "port": first["port"], "tls": "starttls", "ca": first["ca"],
        "source": "127.0.0.2", "threads": 1, "per_connection": 100, "attempts": attempts,
    });
    let mut lines = json_lines(&mut python_driver("smtp_auth_probe.py", &spec));
    lines.sort_by_key(|v| v["i"].as_u64());
    lines
        .iter()
        .map(|v| {
            (
                v["code"].as_u64().unwrap(),
                v["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Wrong passwords spread over two nodes add up: with `lockout_login_failures = 4`, two wrong
/// passwords on each node lock frank on both (each node alone saw only two), and the right
/// password is then refused as locked on both. Before the shared count each node counted its
/// own failures, so an attacker with N nodes had N times the guesses.
#[test]
fn wrong_passwords_spread_over_two_nodes_lock_the_login_on_both() {
    let pg = postgres_database();
    let nodes = two_nodes(&pg.url, "[limits]\nlockout_login_failures = 4\n");
    let [a, b] = &nodes;
    let frank = "frank@example.com";
    let seen = probe(vec![
        auth(a, frank, "guess-1"),
        auth(b, frank, "guess-2"),
        auth(a, frank, "guess-3"),
        auth(b, frank, "guess-4"),
        auth(a, frank, PASSWORD),
        auth(b, frank, PASSWORD),
    ]);
    for (i, (code, message)) in seen[..4].iter().enumerate() {
        assert!(
            *code == 535 && message.contains("[mailgate: auth.invalid"),
            "guess {} was checked and refused: {seen:?}",
            i + 1
        );
    }
    for (node, (code, message)) in ["A", "B"].iter().zip(&seen[4..]) {
        assert!(
            *code == 454 && message.contains("[mailgate: auth.locked"),
            "frank is locked on node {node} after 4 failures over both: {seen:?}"
        );
    }
    // The count is in the database, under a hash of the login: never the login, never a guess.
    let rows = pg.sql("SELECT key || ' ' || failures FROM auth_failures ORDER BY key");
    assert!(!rows.contains("frank") && !rows.contains("guess"), "{rows}");
    assert!(
        rows.lines()
            .any(|l| l.starts_with("l:") && l.ends_with(" 4")),
        "{rows}"
    );
}

/// One HTTP/1.1 request on a connection of its own, with `token`: (status, head, body).
fn request(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// A Gmail resumable upload started on node A is finished on node B: the `PUT` of the message to
/// the same path on B's port is accepted (the session is in the database, not in A's memory),
/// and the session is used up on every node.
#[test]
fn a_resumable_upload_started_on_one_node_is_finished_on_another() {
    let pg = postgres_database();
    let nodes = two_nodes(&pg.url, "");
    let [a, b] = &nodes;
    // alice's access token, through the consent flow on node A.
    let token = crate::hostile::gmail::user_token(&a.1, "alice@example.com");
    let (status, head, body) = request(
        &a.1.addr,
        &token,
        "POST",
        "/upload/gmail/v1/users/me/messages/send?uploadType=resumable",
        "Content-Type: application/json\r\nX-Upload-Content-Type: message/rfc822\r\n",
        b"{}",
    );
    assert_eq!(status, 200, "{head}\n{body}");
    let location = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no Location: {head}"));
    let after_scheme = location
        .split_once("://")
        .map_or(location.as_str(), |(_, r)| r);
    let path = &after_scheme[after_scheme.find('/').unwrap()..];
    assert!(path.contains("upload_id="), "{location}");
    let message =
        b"From: alice@example.com\r\nTo: x@example.org\r\nSubject: two nodes\r\n\r\nhello\r\n";
    let put = |node: &(Gateway, Server)| {
        request(
            &node.1.addr,
            &token,
            "PUT",
            path,
            "Content-Type: message/rfc822\r\n",
            message,
        )
    };
    let (status, head, body) = put(b);
    assert_eq!(status, 200, "node B: {head}\n{body}");
    let sent: Value = serde_json::from_str(&body).unwrap();
    let id = sent["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pg.sql(&format!("SELECT count(*) FROM messages WHERE id = '{id}'"))
            .trim(),
        "1"
    );
    // Used up on every node.
    for node in [a, b] {
        let (status, _, body) = put(node);
        assert_eq!(status, 404, "{body}");
    }
}

// ---------------------------------------------------------------------------------------------
// Directory changes pushed to every node (LISTEN/NOTIFY), with the periodic re-check as fallback.

/// Each node re-checks the directory only every 30 s: a change in force on the other node
/// within a second can only have been announced to it.
const RECHECK_30S: &str = "[directory]\nreload_interval_ms = 30000\n";

/// The demo billing key (alice@example.com's).
const BILLING: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";

/// One SendGrid send from alice with the billing key on `node`: (status, body).
fn send_as_alice(node: &(Gateway, Server)) -> (u16, String) {
    let mail = r#"{"personalizations":[{"to":[{"email":"x@example.org"}]}],"from":{"email":"alice@example.com"},"subject":"two nodes","content":[{"type":"text/plain","value":"hi"}]}"#;
    crate::harness::http_post(&node.1.addr, "/v3/mail/send", BILLING, mail)
}

/// The directory generation `node` serves (`/healthz`).
fn generation_on(node: &(Gateway, Server)) -> i64 {
    let (status, body) = crate::harness::http_get(&node.1.addr, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["directory_generation"].as_i64().unwrap()
}

/// How long `node` takes to serve generation `generation`, looked at every 10 ms for at most
/// `bound`; `None` when it did not within it.
fn time_to_generation(
    node: &(Gateway, Server),
    generation: i64,
    bound: std::time::Duration,
) -> Option<std::time::Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < bound {
        if generation_on(node) >= generation {
            return Some(started.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

/// Commits a change to alice's status straight to the store at `url` (as another node's
/// writer does, without waiting for the nodes); returns the new generation.
fn set_alice_status(url: &str, status: mailgate_core::directory::UserStatus) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = mailgate_store::open(url).await.unwrap().directory;
        let snap = store.snapshot().await.unwrap();
        let mut to = snap.directory.clone();
        to.users
            .iter_mut()
            .find(|u| u.email == "alice@example.com")
            .expect("alice in the demo")
            .status = status;
        let changes = mailgate_store::Changeset::between(&snap.directory, &to);
        store
            .commit(snap.generation, &changes, "cli:test")
            .await
            .unwrap()
    })
}

/// Two nodes both serving the store's generation (each loaded it at start).
fn settled(nodes: &[(Gateway, Server); 2], pg: &crate::harness::PgDatabase) {
    let stored: i64 = pg
        .sql("SELECT value FROM meta WHERE key = 'directory_generation'")
        .trim()
        .parse()
        .unwrap();
    for node in nodes {
        assert!(
            time_to_generation(node, stored, std::time::Duration::from_secs(10)).is_some(),
            "a node did not load generation {stored} at start"
        );
    }
}

/// The backends listening for directory changes (one per node), once there are `n`.
fn listeners(pg: &crate::harness::PgDatabase, n: usize) -> Vec<String> {
    let mut pids = Vec::new();
    let found = crate::harness::eventually(std::time::Duration::from_secs(10), || {
        pids = pg
            .sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND query LIKE 'LISTEN%mailgate_directory%' AND pid <> pg_backend_pid()",
            )
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        pids.len() >= n
    });
    assert!(found, "expected {n} directory listeners, found {pids:?}");
    pids
}

/// With each node re-checking only every 30 s, a suspension committed by another writer is in
/// force on node B within a second (its next send refused `account.suspended`), and so is an
/// injected fault set with `mailgate simulate` through node A's configuration: PostgreSQL
/// announces both (a trigger's NOTIFY) and each node reloads on the announcement. Without the
/// announcement node B would serve the old directory for up to 30 s.
#[test]
fn a_change_is_in_force_on_the_other_node_within_a_second_without_waiting_for_the_recheck() {
    use mailgate_core::directory::UserStatus;
    let pg = postgres_database();
    let nodes = two_nodes(&pg.url, RECHECK_30S);
    settled(&nodes, &pg);
    let [a, b] = &nodes;
    let (status, body) = send_as_alice(b);
    assert_eq!(status, 202, "{body}");

    // A fault injected through node A's configuration (the CLI), seen by node B.
    a.0.ok(&[
        "simulate",
        "alice@example.com",
        "limit.rate",
        "--for",
        "10m",
    ]);
    let started = std::time::Instant::now();
    let mut last = (0, String::new());
    let refused = crate::harness::eventually(std::time::Duration::from_secs(1), || {
        last = send_as_alice(b);
        last.0 != 202 && last.1.contains("limit.rate")
    });
    assert!(
        refused,
        "node B did not refuse with the injected fault within 1 s: {last:?}"
    );
    a.0.ok(&["simulate", "alice@example.com", "--clear"]);
    assert!(
        crate::harness::eventually(std::time::Duration::from_secs(1), || send_as_alice(b).0
            == 202),
        "node B still refused 1 s after the fault was cleared"
    );
    eprintln!("fault in force on node B after {:?}", started.elapsed());

    // A suspension committed by a writer that does not wait for the nodes.
    let generation = set_alice_status(&pg.url, UserStatus::Suspended);
    let took = time_to_generation(b, generation, std::time::Duration::from_secs(1));
    assert!(
        took.is_some(),
        "node B did not load generation {generation} within 1 s (it re-checks every 30 s)"
    );
    let (status, body) = send_as_alice(b);
    assert!(
        status == 401 && body.contains("account.suspended"),
        "{status} {body}"
    );
    eprintln!("suspension in force on node B after {took:?}");
    // Node A too (it did not make the change either).
    assert!(time_to_generation(a, generation, std::time::Duration::from_secs(1)).is_some());
}

/// Announcements lost, the periodic re-check still picks a change up: with the triggers
/// disabled (no NOTIFY at all) and a re-check every second, node B serves a change within the
/// interval (plus the reload); and a node whose listening connection is killed
/// (`pg_terminate_backend`) listens again and serves a change made meanwhile, and the next one
/// announced, within a second although it re-checks only every 30 s.
#[test]
fn the_recheck_and_a_new_listening_connection_cover_lost_announcements() {
    use mailgate_core::directory::UserStatus;
    let pg = postgres_database();
    // A re-check every second; no announcement reaches anyone.
    {
        let nodes = two_nodes(&pg.url, "[directory]\nreload_interval_ms = 1000\n");
        settled(&nodes, &pg);
        pg.sql("ALTER TABLE meta DISABLE TRIGGER mailgate_directory_changed");
        let generation = set_alice_status(&pg.url, UserStatus::Suspended);
        let took = time_to_generation(&nodes[1], generation, std::time::Duration::from_secs(3));
        assert!(
            took.is_some(),
            "the re-check did not pick generation {generation} up within 3 s"
        );
        pg.sql("ALTER TABLE meta ENABLE TRIGGER mailgate_directory_changed");
    }
    // Listening connections killed, re-checks 30 s apart.
    let nodes = two_nodes(&pg.url, RECHECK_30S);
    settled(&nodes, &pg);
    let killed = listeners(&pg, 2);
    for pid in &killed {
        pg.sql(&format!("SELECT pg_terminate_backend({pid})"));
    }
    let generation = set_alice_status(&pg.url, UserStatus::Active);
    let took = time_to_generation(&nodes[1], generation, std::time::Duration::from_secs(3));
    assert!(
        took.is_some(),
        "a change made while node B's listener was down was not served within 3 s"
    );
    // Listening again (new connections), the next change is announced as before.
    let again = listeners(&pg, 2);
    assert!(
        again.iter().all(|p| !killed.contains(p)),
        "{killed:?} {again:?}"
    );
    let generation = set_alice_status(&pg.url, UserStatus::Suspended);
    let took = time_to_generation(&nodes[1], generation, std::time::Duration::from_secs(1));
    assert!(
        took.is_some(),
        "after reconnecting node B did not load generation {generation} within 1 s"
    );
}

/// The config of node `id` on the database `url` (no smarthost: accepted mail is captured).
fn named_node_config(url: &str, id: &str) -> String {
    format!("[store]\nurl = {url:?}\n[node]\nid = {id:?}\n")
}

const GMAIL_TOKEN: &str = "ya29.node-numbers-test-token";

/// One Gmail send over a fresh connection: `Ok(id)` on a 200, `Err(the response)` otherwise.
fn gmail_send(addr: &str, n: u64) -> Result<String, String> {
    use base64::Engine as _;
    use std::io::{Read, Write};
    let raw = format!(
        "From: alice@example.com\r\nTo: x@example.org\r\nSubject: ids-{n}\r\n\r\nmessage {n}\r\n"
    );
    let body = format!(
        "{{\"raw\":\"{}\"}}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(20)));
    let req = format!(
        "POST /gmail/v1/users/me/messages/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {GMAIL_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    if !resp.starts_with("HTTP/1.1 200") {
        return Err(resp);
    }
    let json = resp.split_once("\r\n\r\n").ok_or(resp.clone())?.1;
    let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    v["id"].as_str().map(str::to_owned).ok_or(resp)
}

/// Message ids are unique across nodes by construction (issue 16 item 5): two nodes on one
/// database each lease a node number when they start, and every id a node returns carries its
/// number (bits 10 to 15 of the 16 hex digits), so under concurrent load on both no two ids
/// meet and no acceptance fails on the messages primary key. Before, each id's last 16 bits
/// counted from a random start per process: the ids of two nodes had no node bits to tell them
/// apart (this test's first assertion fails at once), and two nodes could draw the same id in
/// one millisecond, a failed send (rare at the rate this test reaches on two shared cores, so
/// the load alone would not show it in bounded time; the unit test
/// `two_node_numbers_never_collide_in_the_same_milliseconds` does it at 2,000 a millisecond).
#[test]
fn two_nodes_message_ids_carry_different_node_numbers_and_never_collide_under_load() {
    use std::sync::{Arc, Mutex};
    let pg = postgres_database();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nodes = [Gateway::new(), Gateway::new()];
    nodes[0].config(&named_node_config(&pg.url, "a"));
    nodes[1].config(&named_node_config(&pg.url, "b"));
    nodes[0].ok(&[
        "apply",
        "-f",
        crate::harness::example_org().to_str().unwrap(),
    ]);
    nodes[0].apply(
        "limits.yaml",
        "limits:\n  messages_per_day: 100000\n  recipients_per_day: 100000\n  rate_units_per_minute: 100000000\n  concurrent_sends: 1000\n",
    );
    rt.block_on(async {
        let store = mailgate_store::open(&pg.url).await.unwrap();
        let now = mailgate_gateway::now_ms() as i64;
        store
            .tokens
            .insert_token(&mailgate_store::TokenRecord {
                token_sha256: mailgate_auth::sha256_hex(GMAIL_TOKEN.as_bytes()),
                kind: mailgate_store::TokenKind::Access,
                grant: json!({"type": "user", "user": "alice@example.com", "client_id": "demo-web-client"}),
                scopes: vec!["https://www.googleapis.com/auth/gmail.send".into()],
                family: "node-numbers".into(),
                created_at_ms: now,
                expires_at_ms: now + 3_600_000,
                revoked: false,
                used: false,
            })
            .await
            .unwrap();
    });
    let a = nodes[0].serve_with(&named_node_config(&pg.url, "a"), &[]);
    let b = nodes[1].serve_with(&named_node_config(&pg.url, "b"), &[]);
    let addrs = [a.addr.clone(), b.addr.clone()];

    // 6 clients on each node, 150 sends each (bounded in count and time).
    let ids: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let clients: Vec<_> = (0..12u64)
        .map(|c| {
            let (ids, failed) = (ids.clone(), failed.clone());
            let node = (c % 2) as usize;
            let addr = addrs[node].clone();
            std::thread::spawn(move || {
                for i in 0..150 {
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                    match gmail_send(&addr, c * 1_000 + i) {
                        Ok(id) => ids.lock().unwrap().push((node, id)),
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} sends failed; first: {}",
        failed.len(),
        failed[0]
    );
    let ids = ids.lock().unwrap();
    assert!(ids.len() >= 600, "only {} sends in the time", ids.len());
    let number = |node: usize| -> std::collections::BTreeSet<u16> {
        ids.iter()
            .filter(|(n, _)| *n == node)
            .map(|(_, id)| mailgate_store::message_id_node(id).unwrap())
            .collect()
    };
    let (na, nb) = (number(0), number(1));
    assert_eq!(
        na.len(),
        1,
        "every id of node a has one node number: {na:?}"
    );
    assert_eq!(
        nb.len(),
        1,
        "every id of node b has one node number: {nb:?}"
    );
    assert_ne!(na, nb, "the two nodes hold different numbers");
    let unique: std::collections::HashSet<&String> = ids.iter().map(|(_, id)| id).collect();
    assert_eq!(unique.len(), ids.len(), "an id was returned twice");
    // The store holds each node's lease, under its [node] id.
    let rows = pg.sql(
        "SELECT holder || ' ' || number FROM node_numbers WHERE holder IS NOT NULL ORDER BY holder",
    );
    let want = format!("a {}\nb {}", na.first().unwrap(), nb.first().unwrap());
    assert_eq!(rows.trim(), want);
}

/// A node cannot start while other running nodes hold all 64 message-id node numbers: `serve`
/// exits at once and says why, instead of making ids that may meet another node's.
#[test]
fn serve_refuses_to_start_when_every_node_number_is_held() {
    let pg = postgres_database();
    let node = Gateway::new();
    node.config(&named_node_config(&pg.url, "late"));
    // Creates the schema.
    node.ok(&[
        "apply",
        "-f",
        crate::harness::example_org().to_str().unwrap(),
    ]);
    let until = mailgate_gateway::now_ms() + 600_000;
    pg.sql(&format!(
        "UPDATE node_numbers SET holder = 'running-' || number, until_ms = {until}"
    ));
    let mut child = std::process::Command::new(crate::harness::BIN)
        .arg("--config")
        .arg(node.config(""))
        .arg("serve")
        .env_remove("MAILGATE_CONFIG")
        .env_remove("MAILGATE_DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a node that starts anyway is stopped after 30 s (and the test fails).
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "serve started: {stderr}"
    );
    assert!(
        stderr.contains("all 64 message-id node numbers are held by other running nodes"),
        "{stderr}"
    );
}

/// Access tokens are looked up once a second per node, not per send (issue 16: the benchmark's
/// token lookups), so a revocation is in force at once on the node that revoked the token and
/// within a second on the others (ARCHITECTURE.md, "Access-token cache").
#[test]
fn a_revoked_access_token_is_refused_at_once_where_revoked_and_within_a_second_on_the_other_node() {
    let pg = postgres_database();
    let nodes = two_nodes(&pg.url, "");
    let [a, b] = [&nodes[0].1, &nodes[1].1];
    let auth = crate::gmail::user("alice@example.com", &[GMAIL_SEND]);
    let send = json!({"do": "send", "to": ["bob@example.org"]});
    let client =
        |server: &Server, actions: Value| crate::gmail::client(server, auth.clone(), actions);
    // Revoked on the node that answers the sends: the very next send is refused.
    let here = client(a, json!([send, {"do": "revoke"}, send]));
    assert_eq!(here[0]["ok"], true, "{here:?}");
    assert_eq!(here[1]["ok"], true, "{here:?}");
    assert_revoked(&here[2]);
    // Revoked through the other node: refused here once the second has passed.
    let there = client(
        b,
        json!([send, {"do": "revoke", "endpoint": format!("http://{}", a.addr)},
               {"do": "sleep", "seconds": 1.2}, send]),
    );
    assert_eq!(there[0]["ok"], true, "{there:?}");
    assert_eq!(there[1]["ok"], true, "{there:?}");
    assert_revoked(&there[3]);
}

const GMAIL_SEND: &str = "https://www.googleapis.com/auth/gmail.send";

/// Google's client answers a 401 by refreshing its token, and the refresh token was revoked
/// with its family: the send ends in `invalid_grant` (a send that was accepted would be `ok`).
fn assert_revoked(r: &Value) {
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["kind"], "RefreshError", "{r}");
    assert_eq!(r["body"]["error"], "invalid_grant", "{r}");
}
