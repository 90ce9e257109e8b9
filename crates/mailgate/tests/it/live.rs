//! A directory change is live on the running server when the command that made it returns
//! (issue 13: a script that creates a key and uses it at once must work; a suspension refuses
//! the very next send). The server here polls the store only every 1.5 s, so without the wait
//! (`mailgate_gateway::nodes`) each of these sends would meet the old directory.

use std::time::{Duration, Instant};

use crate::harness::{Gateway, example_org, http_post};

const SLOW_POLL: &str = "[directory]\nreload_interval_ms = 1500\n";

fn mail(from: &str) -> String {
    format!(
        r#"{{"personalizations":[{{"to":[{{"email":"x@example.org"}}]}}],"from":{{"email":"{from}"}},"subject":"hi","content":[{{"type":"text/plain","value":"hi"}}]}}"#
    )
}

/// One SendGrid send from alice@example.com with `key`: (status, body).
fn send_as_alice(server: &crate::harness::Server, key: &str) -> (u16, String) {
    http_post(
        &server.addr,
        "/v3/mail/send",
        key,
        &mail("alice@example.com"),
    )
}

fn serve(gw: &Gateway) -> crate::harness::Server {
    gw.ok(&["apply", "-f", example_org().to_str().expect("utf-8 path")]);
    gw.serve_with(SLOW_POLL, &["--demo"])
}

fn new_key(gw: &Gateway, owner: &str, name: &str) -> String {
    let out = gw.ok(&[
        "key",
        "create",
        "--owner",
        owner,
        "--name",
        name,
        "--permission",
        "mail.send",
        "--project",
        "acme-app",
    ]);
    out.split_whitespace()
        .find(|w| w.starts_with("SG."))
        .unwrap_or_else(|| panic!("no key in {out}"))
        .to_owned()
}

#[test]
fn a_key_created_with_the_cli_sends_at_once() {
    let gw = Gateway::new();
    let server = serve(&gw);
    // The server has loaded the directory; wait past its first poll so the next one is 1.5 s away.
    std::thread::sleep(Duration::from_millis(300));
    let key = new_key(&gw, "alice@example.com", "made by a script");
    let (status, body) = send_as_alice(&server, &key);
    assert_eq!(status, 202, "the new key was refused: {body}");
}

#[test]
fn a_suspension_made_with_the_cli_refuses_the_next_send() {
    let gw = Gateway::new();
    let server = serve(&gw);
    let key = new_key(&gw, "alice@example.com", "before the suspension");
    let (status, body) = send_as_alice(&server, &key);
    assert_eq!(status, 202, "{body}");
    gw.ok(&["user", "suspend", "alice@example.com"]);
    let (status, body) = send_as_alice(&server, &key);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("account.suspended"), "{body}");
    gw.ok(&["user", "unsuspend", "alice@example.com"]);
    let (status, body) = send_as_alice(&server, &key);
    assert_eq!(status, 202, "{body}");
}

/// Times `mailgate user suspend` once `stop` has ended the server: it must not wait for it.
fn assert_cli_does_not_wait_after(stop: impl FnOnce(crate::harness::Server), how: &str) {
    let gw = Gateway::new();
    let server = serve(&gw);
    // Its row is written at start.
    std::thread::sleep(Duration::from_millis(300));
    stop(server);
    let t = Instant::now();
    gw.ok(&["user", "suspend", "bob@example.com"]);
    assert!(
        t.elapsed() < Duration::from_millis(1_000),
        "the CLI waited {:?} for a server that was {how}",
        t.elapsed()
    );
}

#[test]
fn a_killed_server_does_not_make_the_cli_wait() {
    assert_cli_does_not_wait_after(|mut s| s.kill9(), "killed");
}

#[test]
fn a_stopped_server_does_not_make_the_cli_wait() {
    assert_cli_does_not_wait_after(
        |s| {
            let (clean, _, stderr) = s.stop();
            assert!(clean, "{stderr}");
        },
        "stopped",
    );
}
