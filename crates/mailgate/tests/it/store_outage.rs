//! PostgreSQL going away while a node serves (issue 16, "Bad input and faults"): its database
//! stops taking connections and every open one is cut, mid-load. Sends get a temporary refusal in
//! each door's dialect with the reason code `store.unavailable` (SendGrid 503, SMTP 451 4.3.0),
//! nothing is acknowledged that is not stored, and the node serves again by itself when the
//! database is back. Only the test's own database goes away (`ALLOW_CONNECTIONS false` and
//! `pg_terminate_backend` on it), not the server other tests use.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Gateway, eventually, http_post, postgres_database, psql};
use crate::smtp::{PW, auth, send, steps};

const BILLING: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";

fn sendgrid_send(addr: &str) -> (u16, String) {
    let mail = json!({
        "personalizations": [{"to": [{"email": "x@example.org"}]}],
        "from": {"email": "alice@example.com"}, "subject": "outage",
        "content": [{"type": "text/plain", "value": "hi"}],
    });
    http_post(addr, "/v3/mail/send", BILLING, &mail.to_string())
}

/// The message id SendGrid's 202 names (`X-Message-Id` is not in the body: Mailgate puts the id
/// in the body's explanation only on refusals), read back from the queue instead.
fn smtp_send(data_dir: &std::path::Path, addr: &str) -> Value {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let spec = json!({
        "host": host, "port": port.parse::<u16>().unwrap(), "tls": "implicit",
        "ca": data_dir.join("tls/cert.pem"),
        "steps": steps(vec![
            vec![auth("PLAIN", "alice@example.com", PW)],
            send("alice@example.com", "alice@example.com", &["x@example.org"]),
        ]),
    });
    crate::harness::json_lines(&mut crate::harness::python_driver("smtp_client.py", &spec))
        .last()
        .cloned()
        .unwrap_or(Value::Null)
}

fn outage(url: &str, db: &str, on: bool) {
    let allow = if on { "false" } else { "true" };
    psql(
        url,
        &format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS {allow}"),
    )
    .unwrap();
    if on {
        psql(
            url,
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{db}' AND pid <> pg_backend_pid()"
            ),
        )
        .unwrap();
    }
}

#[test]
fn postgres_going_away_mid_load_refuses_temporarily_and_the_node_recovers_by_itself() {
    let pg = postgres_database();
    let db = pg.url.rsplit('/').next().unwrap().to_owned();
    let admin = crate::harness::postgres_server();
    let gw = Gateway::new();
    gw.config(&format!("[store]\nurl = {:?}\n", pg.url));
    let server = gw.serve(&["--demo"]);
    let (status, body) = sendgrid_send(&server.addr);
    assert_eq!(status, 202, "{body}");

    // Load from four clients, bounded in time and count: a send every 250 ms each, within
    // alice's rate (a burst of 150).
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, stop) = (server.addr.clone(), stop.clone());
        clients.push(std::thread::spawn(move || {
            let mut answers = Vec::new();
            for _ in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                answers.push(sendgrid_send(&addr));
                std::thread::sleep(Duration::from_millis(250));
            }
            answers
        }));
    }
    std::thread::sleep(Duration::from_millis(700));
    outage(&admin, &db, true);
    // While it is away: SMTP answers 451 4.3.0 with the reason code, SendGrid 503.
    let r = smtp_send(&gw.data_dir(), &server.smtps);
    let text = r["message"].as_str().unwrap_or_default().to_owned();
    assert_eq!(r["code"], 451, "{r}");
    assert!(
        text.contains("4.3.0") && text.contains("store.unavailable"),
        "{r}"
    );
    let (status, body) = sendgrid_send(&server.addr);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store.unavailable"), "{body}");
    std::thread::sleep(Duration::from_millis(1_500));
    outage(&admin, &db, false);
    // Back: the node serves again without a restart.
    let back = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || sendgrid_send(&server.addr).0
            == 202),
        "the node did not recover within 15 s of the database coming back"
    );
    let recovered_in = back.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<(u16, String)> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();

    // Every answer is an acceptance or the temporary refusal with its code: nothing else.
    let mut accepted = 0;
    let mut refused = 0;
    for (status, body) in &answers {
        match status {
            202 => accepted += 1,
            503 => {
                assert!(body.contains("store.unavailable"), "{body}");
                refused += 1;
            }
            _ => panic!("{status} {body}"),
        }
    }
    assert!(
        refused > 0,
        "the load never met the outage: {accepted} accepted"
    );
    // Nothing acknowledged that is not stored: every 202 (the loads', the probes' and the
    // recovery's) is a message in the database.
    let stored: usize = pg
        .sql("SELECT count(*) FROM messages WHERE principal = 'alice@example.com'")
        .trim()
        .parse()
        .unwrap();
    assert!(
        stored >= accepted + 2,
        "{accepted} load acceptances + 2 probes, but {stored} messages stored"
    );
    eprintln!("{accepted} accepted, {refused} refused; recovered in {recovered_in:?}");
}
