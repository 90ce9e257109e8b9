//! HTTP listener budgets (issue 12 item 4), private files (item 15) and store faults in
//! `/healthz` (item 17).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{Probe, assert_budget, connect_from};
use crate::harness::{Gateway, eventually, http_get};

/// Opens `n` connections from `from` that send half a request head and never finish it.
fn half_open(from: &str, to: &str, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        let Ok(mut s) = connect_from(from, to) else {
            break;
        };
        let _ = s.write_all(b"POST /v3/api_keys HTTP/1.1\r\nHost: x\r\n");
        v.push(s);
    }
    v
}

/// What the server answered on `s` before it closed the connection (empty when it closed
/// without a word); `None` when it did not close it within `wait`.
fn closed_with(s: &mut TcpStream, wait: Duration) -> Option<String> {
    s.set_read_timeout(Some(wait)).ok();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        // A reset is a close too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
        Err(_) => None,
    }
}

/// What the server answered on `s` within `wait` (whether or not it closed).
fn answer(s: &mut TcpStream, wait: Duration) -> String {
    s.set_read_timeout(Some(wait)).ok();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether the server closed `s` within `wait`, silently or with a 408.
fn cut_off(s: &mut TcpStream, wait: Duration) -> bool {
    closed_with(s, wait).is_some_and(|a| a.is_empty() || a.starts_with("HTTP/1.1 408"))
}

/// Regression: ~1,000 connections that never finished their headers took every open file, and
/// every listener (HTTP, SMTP submission, relay) stopped accepting. Now one address gets its
/// per-IP share and then a JSON 503, the listener's total is capped below the open-file limit
/// (the server runs with `ulimit -n 1024` here), silent connections are closed after the header
/// timeout, and mail keeps flowing through the relay meanwhile.
#[test]
fn idle_connections_cannot_exhaust_the_listeners() {
    let gw = Gateway::new();
    let server = super::serve_demo_wrapped(
        &gw,
        "[limits]\nheader_timeout_secs = 3\nhttp_max_connections_per_ip = 40\n",
        &["prlimit", "--nofile=1024:1024", "--"],
    );
    let probe = Probe::relay(&server);
    let started = Instant::now();
    // One address: 40 admitted, the rest refused at once in JSON.
    let mut held = half_open("127.0.0.2", &server.addr, 40);
    assert_eq!(held.len(), 40);
    let mut extra = connect_from("127.0.0.2", &server.addr).unwrap();
    let refused = answer(&mut extra, Duration::from_secs(2));
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("application/json"), "{refused}");
    assert!(
        refused.contains("\"reason\":\"connection.limit\""),
        "{refused}"
    );
    // Many addresses: 1,200 half-open connections in all, far more than 1,024 open files.
    for i in 3..33 {
        held.extend(half_open(&format!("127.0.0.{i}"), &server.addr, 40));
    }
    // A client that finishes its request still gets in somewhere, or is refused in JSON.
    let (status, body) = http_get(&server.addr, "/healthz", None);
    assert!(
        status == 200 || (status == 503 && body.contains("connection.limit")),
        "{status} {body}"
    );
    // Silent connections are closed after the header timeout (3 s here).
    let mut closed = 0;
    for s in held.iter_mut().take(50) {
        // hyper answers a timed-out head with 408 or just closes.
        assert!(
            cut_off(s, Duration::from_secs(6)),
            "a silent connection stayed open"
        );
        closed += 1;
    }
    assert_eq!(closed, 50);
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(held);
    assert!(
        eventually(Duration::from_secs(10), || http_get(
            &server.addr,
            "/healthz",
            None
        )
        .0 == 200),
        "the HTTP listener did not recover"
    );
    let report = probe.finish();
    assert_budget(&server, &report);
    let (_, _, log) = server.stop();
    assert!(!log.contains("Too many open files"), "{log}");
}

/// Regression: a client sending one byte of its request head every second held its connection
/// forever. The head must be complete within the header timeout.
#[test]
fn slow_headers_are_cut_after_the_header_timeout() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "[limits]\nheader_timeout_secs = 2\n");
    let mut s = connect_from("127.0.0.2", &server.addr).unwrap();
    let started = Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut cut = false;
    for b in head {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    if !cut {
        cut = cut_off(&mut s, Duration::from_secs(3));
    }
    assert!(cut, "the slow client was not cut off");
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// Regression: a connection that sent nothing after a response (or nothing at all) stayed open
/// for ever; the idle timeout closes it.
#[test]
fn a_silent_connection_is_closed() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "[limits]\nheader_timeout_secs = 2\n");
    let mut s = connect_from("127.0.0.2", &server.addr).unwrap();
    let started = Instant::now();
    assert!(
        cut_off(&mut s, Duration::from_secs(6)),
        "the silent connection stayed open"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Regression: `mailgate.db`, `-wal` and `-shm` were created 0644 (message bodies, password
/// hashes); `sa key create -o` wrote through an existing file (keeping its mode) and followed
/// symlinks.
#[test]
fn database_and_keys_are_private_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    // A send makes sure the write-ahead log exists.
    super::sendgrid_send(&server.addr).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&gw.data_dir()), 0o700);
    for f in [
        "mailgate.db",
        "mailgate.db-wal",
        "mailgate.db-shm",
        "demo-credentials.txt",
    ] {
        let p = gw.data_dir().join(f);
        assert!(p.exists(), "{f}");
        assert_eq!(mode(&p), 0o600, "{f}");
    }
    drop(server);
    // An existing world-readable file, and a symlink to another file.
    let victim = gw.dir.path().join("victim.txt");
    std::fs::write(&victim, "not a key").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = gw.dir.path().join("key-link.json");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    gw.ok(&[
        "sa",
        "key",
        "create",
        "mailer@acme-app.iam.example.com",
        "-o",
        link.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not a key");
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.is_file(), "the symlink was written through");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let existing = gw.dir.path().join("existing.json");
    std::fs::write(&existing, "old").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o644)).unwrap();
    gw.ok(&[
        "sa",
        "key",
        "create",
        "mailer@acme-app.iam.example.com",
        "-o",
        existing.to_str().unwrap(),
    ]);
    assert_eq!(mode(&existing), 0o600);
    assert!(
        std::fs::read_to_string(&existing)
            .unwrap()
            .contains("private_key")
    );
}

/// A small tmpfs mounted on a directory for the length of a test (root only, as the suite runs
/// here and in CI): a disk that can really be filled.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mb: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot mount a tmpfs on {} (the suite runs as root)",
            dir.display()
        );
        Tmpfs(dir.to_owned())
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// One `POST /v3/mail/send` with an attachment of `bytes`: the status line and body.
fn send_with_attachment(addr: &str, bytes: usize) -> String {
    use base64::Engine as _;
    let content = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; bytes]);
    let body = format!(
        r#"{{"personalizations":[{{"to":[{{"email":"probe@example.org"}}]}}],"from":{{"email":"alice@example.com"}},"subject":"big","content":[{{"type":"text/plain","value":"x"}}],"attachments":[{{"content":"{content}","filename":"a.bin","type":"application/octet-stream"}}]}}"#
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(
        s,
        "POST /v3/mail/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        super::DEMO_KEY,
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Regression: with the disk full, the SendGrid door answered `500 internal server error`, SMTP
/// a `451` without a reason, and `/healthz` still said `ok`. Now the send is a temporary refusal with the reason code
/// (`503`, `Retry-After`, `store.unavailable`), `/healthz` says `degraded` with the cause, and
/// both recover once there is room again. The data directory is a real 80 MB tmpfs, filled.
#[test]
fn a_full_disk_is_a_temporary_refusal_and_healthz_says_degraded() {
    let gw = Gateway::new();
    let disk = Tmpfs::mount(&gw.data_dir(), 80);
    let server = super::serve_demo(&gw, "");
    let (status, body) = http_get(&server.addr, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    // Fill the disk but for 512 KiB.
    let filler = gw.data_dir().join("filler");
    let room = disk.free().saturating_sub(512 * 1024);
    std::fs::write(&filler, vec![0u8; room as usize]).unwrap();
    let (status, body) = http_get(&server.addr, "/healthz", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"status\":\"degraded\""), "{body}");
    assert!(body.contains("MiB free"), "{body}");
    // A 2 MB message cannot be written.
    let answer = send_with_attachment(&server.addr, 2 * 1024 * 1024);
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "{}",
        &answer[..answer.len().min(600)]
    );
    assert!(
        answer.to_ascii_lowercase().contains("retry-after:"),
        "{answer}"
    );
    assert!(answer.contains("store.unavailable"), "{answer}");
    let (status, body) = http_get(&server.addr, "/healthz", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot write"), "{body}");
    // The SMTP door says the same in its dialect: 451 4.3.0 with the reason code.
    let mut smtp = super::SmtpConn::open(&server.smtp_relay).unwrap();
    smtp.expect("MAIL FROM:<alice@example.com>\r\n", "250")
        .unwrap();
    smtp.expect("RCPT TO:<x@example.org>\r\n", "250").unwrap();
    smtp.expect("DATA\r\n", "354").unwrap();
    let big = "x".repeat(998);
    let mut msg =
        String::from("From: alice@example.com\r\nTo: x@example.org\r\nSubject: big\r\n\r\n");
    for _ in 0..2100 {
        msg.push_str(&big);
        msg.push_str("\r\n");
    }
    msg.push_str(".\r\n");
    let reply = smtp.expect(&msg, "451").unwrap();
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    assert!(reply.contains("store.unavailable"), "{reply}");
    // Room again: sends succeed and health comes back.
    std::fs::remove_file(&filler).unwrap();
    super::sendgrid_send(&server.addr).unwrap();
    let (status, body) = http_get(&server.addr, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    drop(server);
    drop(disk);
}

/// Rows in a table of the server's database (read with Python's sqlite3 beside the server).
fn rows(gw: &Gateway, table: &str) -> u64 {
    let db = gw.data_dir().join("mailgate.db");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import sqlite3;print(sqlite3.connect({:?}).execute('SELECT count(*) FROM {table}').fetchone()[0])",
                db.to_str().unwrap()
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Regression: every refusal before authentication stored a decision (~1 KB) and logged a line,
/// so anyone could fill the disk. Now such refusals are counted (`GET /mailgate/v1/budget`) and
/// kept in memory only (their decision id still resolves), and nothing is written.
#[test]
fn refusals_before_authentication_are_counted_not_stored() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let admin = gw.demo_admin_token();
    // Let the demo's own writes settle.
    std::thread::sleep(Duration::from_millis(300));
    let before = rows(&gw, "decisions");
    let mut last_id = String::new();
    let body = r#"{"personalizations":[{"to":[{"email":"x@example.org"}]}],"from":{"email":"alice@example.com"},"subject":"s","content":[{"type":"text/plain","value":"x"}]}"#;
    for i in 0..300 {
        let mut s = TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let key = if i % 2 == 0 {
            "SG.nope-0001.bm9wZQ"
        } else {
            "garbage"
        };
        write!(
            s,
            "POST /v3/mail/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
        if let Some(id) = out
            .lines()
            .find_map(|l| l.strip_prefix("x-mailgate-decision: "))
        {
            last_id = id.trim().to_owned();
        }
    }
    assert!(!last_id.is_empty(), "no decision id on the refusals");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rows(&gw, "decisions"),
        before,
        "unauthenticated refusals were stored"
    );
    // The explanation is still there, by id.
    let (status, d) = http_get(
        &server.addr,
        &format!("/mailgate/v1/decisions/{last_id}"),
        Some(&admin),
    );
    assert_eq!(status, 200, "{d}");
    assert!(d.contains("auth.invalid"), "{d}");
    // And counted.
    let (status, b) = http_get(&server.addr, "/mailgate/v1/budget", Some(&admin));
    assert_eq!(status, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let counted: u64 = v["unauthenticated_refusals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["door"] == "sendgrid")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 300, "{b}");
    // The log holds a few lines, not 300.
    let (_, _, log) = server.stop();
    let lines = log.matches("before authentication").count();
    assert!(lines < 60, "{lines} log lines for 300 refusals");
}

/// Regression: a refusal on an implicit-TLS port must come after the handshake, in the protocol
/// the client speaks (here HTTP inside TLS), never as cleartext on a TLS port.
#[test]
fn https_refusal_comes_after_the_tls_handshake() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "[limits]\nhttp_max_connections_per_ip = 5\n");
    // Five plain TCP connections from 127.0.0.2 take that address's slots (no handshake yet).
    let held: Vec<_> = (0..5)
        .map(|_| connect_from("127.0.0.2", &server.https).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let script = format!(
        "import socket,ssl\nh,p={:?}.rsplit(':',1)\ns=socket.create_connection((h,int(p)),timeout=10,source_address=('127.0.0.2',0))\nc=ssl.create_default_context();c.check_hostname=False;c.verify_mode=ssl.CERT_NONE\nt=c.wrap_socket(s)\nprint(t.version())\nb=b''\nwhile True:\n  d=t.recv(4096)\n  if not d: break\n  b+=d\nprint(b.decode())\n",
        server.https
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("TLSv1.3") || text.starts_with("TLSv1.2"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("HTTP/1.1 503"), "{text}");
    assert!(text.contains("connection.limit"), "{text}");
    drop(held);
}

/// Regression: the admin API read (up to 2 MB of) a JSON body before checking the token, and a
/// malformed query string got axum's plain-text error. Now the token comes first (a refusal
/// does not wait for the body), bodies are capped at 64 KiB, and every error is JSON.
#[test]
fn admin_api_checks_the_token_before_the_body_and_answers_in_json() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let admin = gw.demo_admin_token();
    // 10 MB announced, none sent: the 401 comes back at once.
    let mut s = connect_from("127.0.0.2", &server.addr).unwrap();
    write!(
        s,
        "POST /mailgate/v1/explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{{"
    )
    .unwrap();
    let started = Instant::now();
    let a = answer(&mut s, Duration::from_secs(5));
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    assert!(a.contains("\"code\":401"), "{a}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // With the token, a body over 64 KiB is 413 in JSON.
    let big = format!("{{\"as\":\"{}\"}}", "a".repeat(100_000));
    let (status, body) =
        crate::harness::http_post(&server.addr, "/mailgate/v1/explain", &admin, &big);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"code\":413"), "{body}");
    // A malformed query string is a JSON 400, not axum's plain text.
    let (status, body) = http_get(
        &server.addr,
        "/mailgate/v1/messages?limit=many",
        Some(&admin),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("{\"error\""), "{body}");
}

/// One raw request: (status line, content type, body).
fn raw(addr: &str, method: &str, path: &str, auth: Option<&str>) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let auth = auth
        .map(|a| format!("Authorization: Bearer {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    let ct = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, ct, body.to_owned())
}

/// Regression: axum's own answers reached clients as plain text or empty bodies (an unknown
/// route, a wrong method, `Invalid URL: Invalid UTF-8 in `user_id`` for `%FF` in a path). Each is
/// now JSON in the dialect of the door the path belongs to.
#[test]
fn framework_errors_are_json_in_each_doors_dialect() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let cases: [(&str, &str, Option<&str>, &str, &str); 5] = [
        (
            "GET",
            "/no/such/route",
            None,
            "404",
            "{\"error\":{\"code\":404",
        ),
        (
            "DELETE",
            "/healthz",
            None,
            "405",
            "{\"error\":{\"code\":405",
        ),
        (
            "GET",
            "/gmail/v1/users/%FF/profile",
            None,
            "400",
            "\"status\":\"INVALID_ARGUMENT\"",
        ),
        (
            "GET",
            "/v3/api_keys/%FF",
            Some(super::DEMO_KEY),
            "400",
            "{\"errors\":[{\"message\":",
        ),
        (
            "GET",
            "/token",
            None,
            "405",
            "\"error\":\"invalid_request\"",
        ),
    ];
    for (method, path, auth, status, shape) in cases {
        let (line, ct, body) = raw(&server.addr, method, path, auth);
        assert!(line.contains(status), "{method} {path}: {line} {body}");
        assert_eq!(ct, "application/json", "{method} {path}: {body}");
        assert!(body.contains(shape), "{method} {path}: {body}");
    }
}
