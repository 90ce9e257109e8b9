//! Limits exact across nodes (issue 16 item 3): two `serve --demo` processes on one PostgreSQL
//! database, load on the SendGrid door and SMTP submission of both. Every node admits a send in
//! one transaction of the shared store that re-checks the engine's decision with the live numbers
//! (`mailgate_store::CounterStore`), so a daily limit, a concurrency limit and a rate hold over
//! both nodes together, not per node; a refusal is the engine's own, with its code.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{
    Gateway, PgDatabase, Server, eventually, http_get, http_post, postgres_database, psql,
};
use crate::smtp::{PW, auth, send, steps};

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

/// What one send got: accepted or not, and the whole answer (for the reason code).
#[derive(Debug)]
struct Outcome {
    door: &'static str,
    accepted: bool,
    answer: String,
}

#[test]
fn frank_gets_exactly_his_three_messages_a_day_over_two_nodes_and_two_doors() {
    let two = two_nodes();
    let mut threads = Vec::new();
    for (gw, server) in &two.nodes {
        for _ in 0..6 {
            let addr = server.addr.clone();
            threads.push(std::thread::spawn(move || {
                let (status, body) = sendgrid_send(&addr, FRANK, "frank@example.com");
                Outcome {
                    door: "sendgrid",
                    accepted: status == 202,
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
                    accepted: last["step"] == "data" && last["code"] == 250,
                    answer: last.to_string(),
                }
            }));
        }
    }
    let outcomes: Vec<Outcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let accepted = outcomes.iter().filter(|o| o.accepted).count();
    assert_eq!(accepted, 3, "{outcomes:#?}");
    for o in outcomes.iter().filter(|o| !o.accepted) {
        assert!(
            o.answer.contains("limit.daily_messages"),
            "a refusal that is not the daily limit on {}: {}",
            o.door,
            o.answer
        );
    }
    // The fourth, on either node, later: still refused with the numbers of both nodes.
    for (_, server) in &two.nodes {
        let (status, body) = sendgrid_send(&server.addr, FRANK, "frank@example.com");
        assert_eq!(status, 401, "{body}");
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
