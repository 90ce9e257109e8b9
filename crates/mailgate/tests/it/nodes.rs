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
