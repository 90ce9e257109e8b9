//! Limits exact across nodes (issue 16 item 3): two `serve --demo` processes on one PostgreSQL
//! database, load on the Gmail and SendGrid doors and SMTP submission of both. Every node admits
//! a send in one transaction of the shared store that re-checks the engine's decision with the
//! live numbers (`mailgate_store::CounterStore`), so a daily limit, a concurrency limit and a rate
//! hold over both nodes together, not per node; a refusal is the engine's own, with its code.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{
    Gateway, PgDatabase, Server, eventually, http_get, http_post, postgres_database, psql,
};
use crate::smtp::{PW, auth, send, service_account_token, steps};

const FRANK: &str = "SG.it-frank-key-0001.fRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfR0";
const CONNY: &str = "SG.it-conny-key-0001.cOnNycOnNycOnNycOnNycOnNycOnNycOnNycOnNycO0";
const RAPID: &str = "SG.it-rapid-key-0001.rApIdrApIdrApIdrApIdrApIdrApIdrApIdrApIdrA0";

/// Added to the demo organisation: keys for frank (3 messages a day), conny (2 sends at once) and
/// rapid (600 sends a minute, a burst of a minute's allowance).
const EXTRA: &str = r#"
users:
  - email: conny@example.com
    limits: {concurrent_sends: 2}
  - email: rapid@example.com
    limits: {rate_units_per_minute: 60000, messages_per_day: 100000, recipients_per_day: 100000}
api_keys:
  - name: frank
    secret: "SG.it-frank-key-0001.fRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfR0"
    owner: frank@example.com
    permissions: [mail.send]
  - name: conny
    secret: "SG.it-conny-key-0001.cOnNycOnNycOnNycOnNycOnNycOnNycOnNycOnNycO0"
    owner: conny@example.com
    permissions: [mail.send]
  - name: rapid
    secret: "SG.it-rapid-key-0001.rApIdrApIdrApIdrApIdrApIdrApIdrApIdrApIdrA0"
    owner: rapid@example.com
    permissions: [mail.send]
"#;

/// Two nodes on one fresh database, the extra keys loaded on both.
struct TwoNodes {
    pg: PgDatabase,
    nodes: Vec<(Gateway, Server)>,
}

fn two_nodes() -> TwoNodes {
    let pg = postgres_database();
    let store = format!("[store]\nurl = {:?}\n", pg.url);
    let mut nodes = Vec::new();
    for i in 0..2 {
        let gw = Gateway::new();
        gw.config(&format!("{store}[node]\nid = \"node-{i}\"\n"));
        let server = gw.serve(&["--demo"]);
        if i == 0 {
            gw.apply("extra.yaml", EXTRA);
        }
        nodes.push((gw, server));
    }
    for (_, server) in &nodes {
        assert!(
            eventually(Duration::from_secs(10), || {
                http_get(&server.addr, "/v3/scopes", Some(RAPID)).0 == 200
            }),
            "node {} did not load the extra keys",
            server.addr
        );
    }
    TwoNodes { pg, nodes }
}

fn sendgrid_send(addr: &str, key: &str, from: &str) -> (u16, String) {
    let mail = json!({
        "personalizations": [{"to": [{"email": "x@example.org"}]}],
        "from": {"email": from}, "subject": "limits", "content": [{"type": "text/plain", "value": "hi"}],
    });
    http_post(addr, "/v3/mail/send", key, &mail.to_string())
}

const GMAIL_SEND: &str = "https://www.googleapis.com/auth/gmail.send";

/// `users.messages.send` for the token's user (`me`), the message as JSON `raw`.
fn gmail_send(addr: &str, token: &str) -> (u16, String) {
    use base64::Engine as _;
    let raw = "From: frank@example.com\r\nTo: x@example.org\r\nSubject: limits\r\n\r\nhi\r\n";
    let mail = json!({"raw": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)});
    http_post(
        addr,
        "/gmail/v1/users/me/messages/send",
        token,
        &mail.to_string(),
    )
}

/// Gmail's refusal for frank's spent day: 429, Google's `rateLimitExceeded`, and Mailgate's
/// `limit.daily_messages` in `details[]`.
fn is_gmail_daily_limit(status: u16, body: &str) -> bool {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let e = &v["error"];
    status == 429
        && e["errors"][0]["reason"] == "rateLimitExceeded"
        && e["details"].as_array().is_some_and(|d| {
            d.iter()
                .any(|x| x["domain"] == "mailgate" && x["reason"] == "limit.daily_messages")
        })
}

/// Access tokens for frank, one per node's token endpoint, obtained before the burst: on node 0
/// a service account with domain-wide delegation (a key made through node 0's configuration,
/// its `token_uri` node 0), on node 1 the OAuth consent flow of the demo web client.
fn frank_tokens(two: &TwoNodes) -> [String; 2] {
    let key = two.nodes[0].0.sa_key("mailer@acme-app.iam.example.com");
    // The new key is live once node 0 has reloaded the directory.
    let mut answer = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            answer = service_account_token(&key, GMAIL_SEND, "frank@example.com");
            answer["error"]["mailgate"]["code"] != "auth.invalid"
        }),
        "{answer}"
    );
    let delegated = answer["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no delegated token for frank: {answer}"))
        .to_owned();
    let consented = crate::hostile::gmail::user_token(&two.nodes[1].1, "frank@example.com");
    [delegated, consented]
}

/// What one send got: accepted, or refused as the daily limit in its door's dialect, or neither;
/// and the whole answer.
#[derive(Debug)]
struct Outcome {
    door: &'static str,
    node: usize,
    accepted: bool,
    daily_limit: bool,
    answer: String,
}

/// Frank (3 messages a day) sends at once on every door of both nodes: 6 SendGrid, 2 SMTP
/// submissions and 3 Gmail sends per node, the Gmail ones with the token the other node's token
/// endpoint gave (a token is no more sticky than a limit). Exactly 3 go through over everything;
/// every refusal is the daily limit, in its door's dialect.
#[test]
fn frank_gets_exactly_his_three_messages_a_day_over_two_nodes_and_three_doors() {
    let two = two_nodes();
    let tokens = frank_tokens(&two);
    let mut threads = Vec::new();
    for (node, (gw, server)) in two.nodes.iter().enumerate() {
        for _ in 0..6 {
            let addr = server.addr.clone();
            threads.push(std::thread::spawn(move || {
                let (status, body) = sendgrid_send(&addr, FRANK, "frank@example.com");
                Outcome {
                    door: "sendgrid",
                    node,
                    accepted: status == 202,
                    daily_limit: status == 401 && body.contains("limit.daily_messages"),
                    answer: format!("{status} {body}"),
                }
            }));
        }
        for _ in 0..2 {
            let (smtp, gw_dir) = (server.smtps.clone(), gw.data_dir());
            threads.push(std::thread::spawn(move || {
                let r = smtplib_at(&gw_dir, &smtp);
                let last = r.last().cloned().unwrap_or(Value::Null);
                Outcome {
                    door: "smtp",
                    node,
                    accepted: last["step"] == "data" && last["code"] == 250,
                    daily_limit: last.to_string().contains("limit.daily_messages"),
                    answer: last.to_string(),
                }
            }));
        }
        for _ in 0..3 {
            // The token from the other node's token endpoint.
            let (addr, token) = (server.addr.clone(), tokens[1 - node].clone());
            threads.push(std::thread::spawn(move || {
                let (status, body) = gmail_send(&addr, &token);
                Outcome {
                    door: "gmail",
                    node,
                    accepted: status == 200,
                    daily_limit: is_gmail_daily_limit(status, &body),
                    answer: format!("{status} {body}"),
                }
            }));
        }
    }
    let outcomes: Vec<Outcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let accepted = outcomes.iter().filter(|o| o.accepted).count();
    assert_eq!(accepted, 3, "{outcomes:#?}");
    for o in outcomes.iter().filter(|o| !o.accepted) {
        assert!(
            o.daily_limit,
            "a refusal that is not the daily limit on {} of node {}: {}",
            o.door, o.node, o.answer
        );
    }
    // The fourth, on either node, later: still refused with the numbers of both nodes, on
    // SendGrid and on Gmail (now each node with its own token: both tokens work on both nodes).
    for (node, (_, server)) in two.nodes.iter().enumerate() {
        let (status, body) = sendgrid_send(&server.addr, FRANK, "frank@example.com");
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("used 3 of 3"), "{body}");
        let (status, body) = gmail_send(&server.addr, &tokens[node]);
        assert!(is_gmail_daily_limit(status, &body), "{status} {body}");
        assert!(body.contains("used 3 of 3"), "{body}");
    }
    // `explain` reads the live shared numbers too, through either node's configuration.
    for (gw, _) in &two.nodes {
        let out = gw.cmd(&[
            "explain",
            "--as",
            "frank@example.com",
            "--from",
            "frank@example.com",
            "--to",
            "x@example.org",
            "--door",
            "smtp",
            "--tls",
            "1.2",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("✘ limit.daily_messages")),
            "{text}"
        );
    }
}

/// SMTP submission over implicit TLS as frank, one message.
fn smtplib_at(data_dir: &std::path::Path, addr: &str) -> Vec<Value> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let spec = json!({
        "host": host, "port": port.parse::<u16>().unwrap(), "tls": "implicit",
        "ca": data_dir.join("tls/cert.pem"),
        "steps": steps(vec![
            vec![auth("PLAIN", "frank@example.com", PW)],
            send("frank@example.com", "frank@example.com", &["x@example.org"]),
        ]),
    });
    crate::harness::json_lines(&mut crate::harness::python_driver("smtp_client.py", &spec))
}

#[test]
fn a_concurrency_limit_of_two_holds_across_nodes() {
    let two = two_nodes();
    // Hold every message write for a while: the sends admitted by then keep their slots.
    let lock = Command::new("psql")
        .args([
            "-X",
            "-q",
            &two.pg.url,
            "-c",
            "BEGIN; LOCK TABLE messages IN EXCLUSIVE MODE; SELECT pg_sleep(6); COMMIT;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql");
    let mut lock = Guard(lock);
    assert!(
        eventually(Duration::from_secs(5), || {
            psql(
                &two.pg.url,
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'messages' AND l.mode = 'ExclusiveLock' AND l.granted",
            )
            .is_ok_and(|n| n.trim() == "1")
        }),
        "the lock on messages was not taken"
    );
    let started = Instant::now();
    let mut threads = Vec::new();
    for (_, server) in &two.nodes {
        for _ in 0..3 {
            let addr = server.addr.clone();
            threads.push(std::thread::spawn(move || {
                sendgrid_send(&addr, CONNY, "conny@example.com")
            }));
        }
    }
    let answers: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the sends did not finish"
    );
    let accepted = answers.iter().filter(|(s, _)| *s == 202).count();
    assert_eq!(accepted, 2, "{answers:#?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(*status, 429, "{body}");
        assert!(body.contains("limit.concurrency"), "{body}");
    }
    let _ = lock.0.wait();
    // Both slots were freed when their messages were stored: the next send goes through.
    let (status, body) = sendgrid_send(&two.nodes[1].1.addr, CONNY, "conny@example.com");
    assert_eq!(status, 202, "{body}");
}

/// Kills the child when dropped (a failed assertion must not leave the lock holder running).
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_rate_limit_admits_its_allowance_within_one_percent_over_a_burst_split_across_nodes() {
    let two = two_nodes();
    // rapid: 600 sends a minute (one per 100 ms), a burst of 600. Eight clients, four per node,
    // send as fast as they can for 10 s.
    const BURST: f64 = 600.0;
    const PER_MS: f64 = 0.01;
    let run = Duration::from_secs(10);
    let admitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut threads = Vec::new();
    for (_, server) in &two.nodes {
        for _ in 0..4 {
            let (addr, admitted) = (server.addr.clone(), admitted.clone());
            threads.push(std::thread::spawn(move || {
                let mut other = Vec::new();
                // Bounded: at most 5,000 attempts per client.
                for _ in 0..5_000 {
                    if start.elapsed() >= run {
                        break;
                    }
                    let (status, body) = sendgrid_send(&addr, RAPID, "rapid@example.com");
                    if status == 202 {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    } else if !(status == 429 && body.contains("limit.rate")) {
                        other.push(format!("{status} {body}"));
                    }
                }
                other
            }));
        }
    }
    let other: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = start.elapsed().as_millis() as f64;
    assert!(
        other.is_empty(),
        "answers that are neither 202 nor limit.rate: {other:?}"
    );
    let got = admitted.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let allowance = BURST + elapsed * PER_MS;
    assert!(
        (got - allowance).abs() <= allowance * 0.01,
        "admitted {got} over {elapsed} ms; the allowance is {allowance:.1} (within 1 %)"
    );
}
