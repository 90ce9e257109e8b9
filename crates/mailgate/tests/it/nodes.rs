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
