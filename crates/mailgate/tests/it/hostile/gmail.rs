//! The Gmail door and its OAuth server under attack (issue 12, items 6, 11, 14, 15, 16 and 17):
//! resumable uploads that need a credential and cannot be used to evict anyone, a `Location`
//! built from the configured URL, a consent page that locks out (sharing the SMTP lockout),
//! refuses forged forms, cannot be framed, gives no code to a suspended, revoked or under-review
//! account or for an unknown scope, and takes as long for an unknown user as for a known one;
//! JWT assertions that cannot be replayed (even across a restart), with `crit` refused and `nbf`
//! honoured; OAuth client secrets hashed with argon2id; store faults answered with 503.
//!
//! Everything goes over real loopback sockets with a minimal HTTP/1.1 client; JWTs are signed
//! with `openssl dgst` (as `scripts/test` installs it) using a key from `mailgate sa key create`.
//! Every loop is bounded in count and time.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use super::{DEMO_PASSWORD, Probe, assert_budget, connect_from};
use crate::harness::{Gateway, Server, demo, json_lines, python_driver};

const CLIENT_ID: &str = "demo-web-client";
const CLIENT_SECRET: &str = "demo-client-secret";
const REDIRECT: &str = "http://127.0.0.1:8765/callback";
const SEND: &str = "https://www.googleapis.com/auth/gmail.send";
const SA: &str = "mailer@acme-app.iam.example.com";
const MESSAGE: &str =
    "From: alice@example.com\r\nTo: x@example.org\r\nSubject: hi\r\n\r\nhello\r\n";

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client

#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

fn read_response(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    for _ in 0..200 {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        for _ in 0..10_000 {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn request_text(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if close {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// One request on its own connection, from `from` (a loopback address) or 127.0.0.1.
fn http(
    addr: &str,
    from: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Resp {
    let mut s = match from {
        Some(f) => connect_from(f, addr).expect("connect"),
        None => TcpStream::connect(addr).expect("connect"),
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s.write_all(&request_text(addr, method, path, headers, body, true))
        .expect("write");
    read_response(&mut BufReader::new(s)).expect("response")
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

// ---------------------------------------------------------------------------------------------
// The consent flow

fn auth_params(scope: &str) -> Vec<(&'static str, String)> {
    vec![
        ("client_id", CLIENT_ID.into()),
        ("redirect_uri", REDIRECT.into()),
        ("response_type", "code".into()),
        ("scope", scope.into()),
        ("state", "xyz".into()),
    ]
}

fn pairs<'a>(p: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    p.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The sign-in page: (response, cookie `name=value`, CSRF token).
fn consent_get(server: &Server, from: Option<&str>, scope: &str) -> (Resp, String, String) {
    let q = form(&pairs(&auth_params(scope)));
    let r = http(
        &server.addr,
        from,
        "GET",
        &format!("/o/oauth2/auth?{q}"),
        &[],
        b"",
    );
    let cookie = r
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .unwrap_or_default()
        .to_owned();
    let csrf = r
        .body
        .split("name=\"csrf_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned();
    (r, cookie, csrf)
}

/// Posts the sign-in form.
fn consent_post(
    server: &Server,
    from: Option<&str>,
    scope: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    email: &str,
    password: &str,
) -> Resp {
    let mut p = auth_params(scope);
    p.push(("email", email.into()));
    p.push(("password", password.into()));
    if let Some(c) = csrf {
        p.push(("csrf_token", c.into()));
    }
    let mut headers = vec![(
        "Content-Type",
        "application/x-www-form-urlencoded".to_owned(),
    )];
    if let Some(c) = cookie {
        headers.push(("Cookie", c.to_owned()));
    }
    http(
        &server.addr,
        from,
        "POST",
        "/o/oauth2/auth",
        &headers,
        form(&pairs(&p)).as_bytes(),
    )
}

/// The code in a consent answer's redirect, if it is one.
fn code_of(r: &Resp) -> Option<String> {
    let loc = r.header("location")?;
    let q = loc.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix("code="))
        .map(|c| c.replace("%2F", "/"))
}

/// Signs in (fresh page, right password) from `from`: the answer.
fn sign_in(server: &Server, from: Option<&str>, email: &str, password: &str) -> Resp {
    sign_in_for(server, from, email, password, SEND)
}

fn sign_in_for(
    server: &Server,
    from: Option<&str>,
    email: &str,
    password: &str,
    scope: &str,
) -> Resp {
    let (page, cookie, csrf) = consent_get(server, from, scope);
    assert_eq!(page.status, 200, "{}", page.body);
    consent_post(
        server,
        from,
        scope,
        Some(&cookie),
        Some(&csrf),
        email,
        password,
    )
}

fn exchange(server: &Server, code: &str, secret: &str) -> Resp {
    http(
        &server.addr,
        None,
        "POST",
        "/token",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_owned(),
        )],
        form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", CLIENT_ID),
            ("client_secret", secret),
        ])
        .as_bytes(),
    )
}

/// A user access token through the whole authorization-code flow.
pub(crate) fn user_token(server: &Server, email: &str) -> String {
    user_token_for(server, email, SEND)
}

fn user_token_for(server: &Server, email: &str, scope: &str) -> String {
    let r = sign_in_for(server, None, email, DEMO_PASSWORD, scope);
    let code = code_of(&r).unwrap_or_else(|| panic!("no code for {email}: {r:?}"));
    let t = exchange(server, &code, CLIENT_SECRET);
    assert_eq!(t.status, 200, "{}", t.body);
    t.json()["access_token"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------
// JWTs signed with openssl

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A service-account key file: (private key PEM path, key id).
fn sa_key(gw: &Gateway) -> (std::path::PathBuf, String) {
    let path = gw.dir.path().join("sa.json");
    gw.ok(&["sa", "key", "create", SA, "-o", path.to_str().unwrap()]);
    // The server reloads the directory every 100 ms (the test config).
    std::thread::sleep(Duration::from_millis(500));
    let key: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let pem = gw.dir.path().join("sa.pem");
    std::fs::write(&pem, key["private_key"].as_str().unwrap()).unwrap();
    (pem, key["private_key_id"].as_str().unwrap().to_owned())
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// An RS256 JWT with `header` and `claims`, signed with the PEM key.
fn jwt(pem: &std::path::Path, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(pem)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed by scripts/test");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    format!("{input}.{}", b64(&out.stdout))
}

/// What google-auth sends: `iss`, `scope`, `aud`, `iat`, `exp`, `sub`; no `jti`.
fn claims() -> Value {
    let now = now_s();
    json!({
        "iss": SA, "scope": SEND, "aud": "https://oauth2.googleapis.com/token",
        "iat": now, "exp": now + 3600, "sub": "alice@example.com",
    })
}

fn header(kid: &str) -> Value {
    json!({"alg": "RS256", "typ": "JWT", "kid": kid})
}

fn jwt_exchange(server: &Server, assertion: &str) -> Resp {
    http(
        &server.addr,
        None,
        "POST",
        "/token",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_owned(),
        )],
        form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion),
        ])
        .as_bytes(),
    )
}

fn assert_invalid_grant(r: &Resp, description_has: &str) {
    assert_eq!(r.status, 400, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"], "invalid_grant", "{}", r.body);
    let d = j["error_description"].as_str().unwrap_or_default();
    assert!(
        d.contains(description_has),
        "`{d}` lacks `{description_has}`"
    );
    assert_eq!(j["mailgate"]["code"], "auth.invalid", "{}", r.body);
    assert!(j.get("access_token").is_none());
}

// ---------------------------------------------------------------------------------------------
// Item 6: resumable uploads

fn start_upload(server: &Server, from: Option<&str>, token: Option<&str>, user: &str) -> Resp {
    let mut h = vec![
        ("Content-Type", "application/json".to_owned()),
        ("X-Upload-Content-Type", "message/rfc822".to_owned()),
    ];
    if let Some(t) = token {
        h.push(bearer(t));
    }
    http(
        &server.addr,
        from,
        "POST",
        &format!("/upload/gmail/v1/users/{user}/messages/send?uploadType=resumable"),
        &h,
        b"{}",
    )
}

/// The path and query of a `Location`.
fn path_of(location: &str) -> String {
    let after_scheme = location.split_once("://").map_or(location, |(_, r)| r);
    after_scheme
        .find('/')
        .map_or("/".to_owned(), |i| after_scheme[i..].to_owned())
}

fn put_upload(server: &Server, token: Option<&str>, location: &str) -> Resp {
    let mut h = vec![("Content-Type", "message/rfc822".to_owned())];
    if let Some(t) = token {
        h.push(bearer(t));
    }
    http(
        &server.addr,
        None,
        "PUT",
        &path_of(location),
        &h,
        MESSAGE.as_bytes(),
    )
}

/// `n` requests pipelined on one connection from `from`; the statuses answered (fewer if the
/// server closed the connection).
fn pipelined(server: &Server, from: &str, n: usize, req: impl Fn(bool) -> Vec<u8>) -> Vec<u16> {
    let s = connect_from(from, &server.addr).expect("connect");
    let mut w = s.try_clone().unwrap();
    let mut bytes = Vec::new();
    for i in 0..n {
        bytes.extend_from_slice(&req(i + 1 == n));
    }
    let writer = super::attacker(move || {
        let _ = w.write_all(&bytes);
    });
    let mut r = BufReader::new(s);
    let mut statuses = Vec::new();
    for _ in 0..n {
        match read_response(&mut r) {
            Ok(resp) => statuses.push(resp.status),
            Err(_) => break,
        }
    }
    let _ = writer.join();
    statuses
}

/// Regression: 10,002 unauthenticated resumable sessions evicted 9 of 20 legitimate ones, and
/// 10,000 sessions with a 60 KB userId added 433 MB. Now a session needs a valid credential
/// (401 before anything is kept), an absurd userId is a 400, one principal holds at most 16
/// sessions (429 beyond, nobody evicted), and a session is usable only by its owner.
#[test]
fn resumable_upload_needs_a_credential_and_cannot_evict_others() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let alice = user_token(&server, "alice@example.com");
    let erin = user_token(&server, "erin@example.com");
    let mine: Vec<String> = (0..5)
        .map(|_| {
            let r = start_upload(&server, None, Some(&alice), "me");
            assert_eq!(r.status, 200, "{}", r.body);
            r.header("location").expect("Location").to_owned()
        })
        .collect();

    let probe = Probe::sendgrid(&server);
    let deadline = Instant::now() + Duration::from_secs(40);
    // 10,000 unauthenticated starts, 100 per connection.
    let addr = server.addr.clone();
    let mut statuses = Vec::new();
    let (cpu0, wall0) = (server.cpu_time(), Instant::now());
    for _ in 0..100 {
        if Instant::now() > deadline {
            break;
        }
        statuses.extend(pipelined(&server, "127.0.0.2", 100, |last| {
            request_text(
                &addr,
                "POST",
                "/upload/gmail/v1/users/me/messages/send?uploadType=resumable",
                &[("Content-Type", "application/json".to_owned())],
                b"",
                last,
            )
        }));
    }
    eprintln!(
        "flood: 10,000 unauthenticated starts in {:?}, server CPU {:?}",
        wall0.elapsed(),
        server.cpu_time() - cpu0
    );
    // 200 starts with a 20 KB userId, with a valid token.
    let long = "a".repeat(20_000);
    let bad_user: Vec<u16> = pipelined(&server, "127.0.0.3", 200, |last| {
        request_text(
            &addr,
            "POST",
            &format!("/upload/gmail/v1/users/{long}/messages/send?uploadType=resumable"),
            &[bearer(&erin)],
            b"",
            last,
        )
    });
    // Another valid principal opens as many as it can.
    let erins: Vec<Resp> = (0..40)
        .map(|_| start_upload(&server, Some("127.0.0.4"), Some(&erin), "me"))
        .collect();
    let report = probe.finish();

    assert_eq!(
        statuses.len(),
        10_000,
        "every unauthenticated start answered"
    );
    assert!(
        statuses.iter().all(|s| *s == 401),
        "unauthenticated starts: {:?}",
        statuses
            .iter()
            .filter(|s| **s != 401)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(bad_user.len(), 200);
    assert!(bad_user.iter().all(|s| *s == 400), "{bad_user:?}");
    let opened = erins.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        opened,
        16,
        "one principal holds at most 16 sessions: {:?}",
        erins
            .iter()
            .map(|r| (r.status, r.body.chars().take(300).collect::<String>()))
            .take(3)
            .collect::<Vec<_>>()
    );
    let refused = erins.iter().find(|r| r.status == 429).expect("a 429");
    assert_eq!(refused.json()["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(refused.header("retry-after").is_some());

    // Nobody else can use alice's session, with or without a credential; she still can.
    assert_eq!(put_upload(&server, None, &mine[0]).status, 401);
    assert_eq!(put_upload(&server, Some(&erin), &mine[0]).status, 404);
    for loc in &mine {
        let r = put_upload(&server, Some(&alice), loc);
        assert_eq!(r.status, 200, "legitimate session lost: {}", r.body);
        assert!(r.json()["id"].is_string());
    }
    assert_eq!(
        put_upload(&server, Some(&alice), &mine[0]).status,
        404,
        "used once"
    );
    assert_budget(&server, &report);
}

/// Regression: the `Host` header was copied into `Location`. Now it is the configured public
/// URL (or the HTTPS listener's name the request used), whatever `Host` says.
#[test]
fn location_does_not_copy_host() {
    let (gw, server) = demo();
    let alice = user_token(&server, "alice@example.com");
    let public = format!("http://{}/", gw.http_addr());
    for host in [
        "evil.example",
        "evil.example:80",
        "127.0.0.1:1@evil.example",
    ] {
        let r = http(
            &server.addr,
            None,
            "POST",
            "/upload/gmail/v1/users/me/messages/send?uploadType=resumable",
            &[
                ("Host", host.to_owned()),
                bearer(&alice),
                ("Content-Type", "application/json".to_owned()),
            ],
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let loc = r.header("location").unwrap();
        assert!(loc.starts_with(&public), "{loc}");
        assert!(!loc.contains("evil"), "{loc}");
        assert!(loc.contains("upload_id="), "{loc}");
        let put = put_upload(&server, Some(&alice), loc);
        assert_eq!(put.status, 200, "{}", put.body);
    }
}

// ---------------------------------------------------------------------------------------------
// Item 11: the consent page

fn assert_page_has_no_code(r: &Resp) {
    assert!(r.header("location").is_none(), "a redirect: {r:?}");
    assert!(code_of(r).is_none());
    assert!(!r.body.contains("4/mg_"), "a code in the page");
}

/// Regression: the consent page had no lockout (50 wrong passwords then the right one gave a
/// code) and ignored the SMTP lockout. Now it counts in the lockout every door shares: per
/// (login, client network), with exponential back-off, and a locked sign-in gets the page again
/// with the reason and no code, while the same user signs in from another network.
#[test]
fn consent_page_locks_out_and_shares_smtp_lockout() {
    let (gw, server) = demo();
    // Consent page alone: 5 wrong passwords lock erin on this network (for 1 s, then 2 s, ...).
    let from = Some("127.0.0.3");
    let (page, cookie, csrf) = consent_get(&server, from, SEND);
    assert_eq!(page.status, 200);
    let post = |email: &str, pw: &str| {
        consent_post(&server, from, SEND, Some(&cookie), Some(&csrf), email, pw)
    };
    for _ in 0..5 {
        let r = post("erin@example.com", "wrong password");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("Wrong email or password."), "{}", r.body);
        assert!(r.body.contains("auth.invalid"), "{}", r.body);
    }
    let locked = post("erin@example.com", DEMO_PASSWORD);
    assert_eq!(locked.status, 429, "{}", locked.body);
    assert!(locked.body.contains("auth.locked"), "{}", locked.body);
    assert!(locked.header("retry-after").is_some());
    assert_page_has_no_code(&locked);
    // Erin from another network is not locked out by it.
    let elsewhere = sign_in(
        &server,
        Some("127.1.0.1"),
        "erin@example.com",
        DEMO_PASSWORD,
    );
    assert!(code_of(&elsewhere).is_some(), "{elsewhere:?}");

    // SMTP failures lock frank on the consent page too: 7 wrong passwords over SMTP AUTH from
    // 127.0.0.5, spaced so the back-off reaches 4 s, then the right password on the consent
    // page from 127.0.0.6 (the same /24).
    let (host, port) = server.smtp.rsplit_once(':').unwrap();
    let wrong = |sleep_ms: u64| json!({"mechanism": "PLAIN", "user": "frank@example.com", "secret": "nope", "sleep_ms": sleep_ms});
    let attempts = vec![
        wrong(0),
        wrong(0),
        wrong(0),
        wrong(0),
        wrong(0),
        wrong(1100),
        wrong(2100),
    ];
    let spec = json!({
        "host": host, "port": port.parse::<u16>().unwrap(), "tls": "starttls",
        "ca": gw.data_dir().join("tls/cert.pem"), "source": "127.0.0.5",
        "threads": 1, "per_connection": 10, "attempts": attempts,
    });
    let seen = json_lines(&mut python_driver("smtp_auth_probe.py", &spec));
    assert_eq!(
        seen.iter().filter(|v| v["code"] == 535).count(),
        7,
        "{seen:?}"
    );
    let r = sign_in(
        &server,
        Some("127.0.0.6"),
        "frank@example.com",
        DEMO_PASSWORD,
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("auth.locked"), "{}", r.body);
    assert_page_has_no_code(&r);
    let other = sign_in(
        &server,
        Some("127.2.0.1"),
        "frank@example.com",
        DEMO_PASSWORD,
    );
    assert!(code_of(&other).is_some(), "{other:?}");
}

/// Regression: the sign-in form had no CSRF token. Now a form without the page's token, without
/// the cookie it is bound to, or with other parameters than the page's, is refused (400) and
/// gives no code.
#[test]
fn consent_page_refuses_without_csrf_token() {
    let (_gw, server) = demo();
    let (page, cookie, csrf) = consent_get(&server, None, SEND);
    assert_eq!(page.status, 200);
    assert!(cookie.starts_with("mg_consent="), "{cookie}");
    assert!(csrf.contains('.'), "{csrf}");
    let alice = "alice@example.com";
    let cases = [
        ("no token, no cookie", None, None, SEND),
        ("token without its cookie", None, Some(csrf.as_str()), SEND),
        (
            "cookie without the token",
            Some(cookie.as_str()),
            None,
            SEND,
        ),
        (
            "another page's parameters",
            Some(cookie.as_str()),
            Some(csrf.as_str()),
            "https://mail.google.com/",
        ),
    ];
    for (what, c, t, scope) in cases {
        let r = consent_post(&server, None, scope, c, t, alice, DEMO_PASSWORD);
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert!(r.body.contains("invalid_request"), "{what}: {}", r.body);
        assert_page_has_no_code(&r);
    }
    let (ts, _) = csrf.split_once('.').unwrap();
    let forged = format!("{ts}.{}", "A".repeat(43));
    let r = consent_post(
        &server,
        None,
        SEND,
        Some(&cookie),
        Some(&forged),
        alice,
        DEMO_PASSWORD,
    );
    assert_eq!(r.status, 400, "forged: {}", r.body);
    let other_cookie = "mg_consent=AAAAAAAAAAAAAAAAAAAAAA";
    let r = consent_post(
        &server,
        None,
        SEND,
        Some(other_cookie),
        Some(&csrf),
        alice,
        DEMO_PASSWORD,
    );
    assert_eq!(r.status, 400, "another cookie: {}", r.body);
    // The page's own form works.
    let r = consent_post(
        &server,
        None,
        SEND,
        Some(&cookie),
        Some(&csrf),
        alice,
        DEMO_PASSWORD,
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(code_of(&r).is_some());
}

/// Regression: no `X-Frame-Options` or CSP on the consent page (clickjacking), and it could be
/// cached. Every answer of the page now forbids framing, loads nothing and is `no-store`.
#[test]
fn consent_page_sets_frame_and_csp_headers() {
    let (_gw, server) = demo();
    let (page, cookie, csrf) = consent_get(&server, None, SEND);
    let wrong = consent_post(
        &server,
        None,
        SEND,
        Some(&cookie),
        Some(&csrf),
        "alice@example.com",
        "wrong",
    );
    let error = http(
        &server.addr,
        None,
        "GET",
        "/o/oauth2/auth?client_id=nobody",
        &[],
        b"",
    );
    assert_eq!(error.status, 401);
    for (what, r) in [
        ("page", &page),
        ("wrong password", &wrong),
        ("error", &error),
    ] {
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{what}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        for d in [
            "frame-ancestors 'none'",
            "default-src 'none'",
            "form-action 'self'",
        ] {
            assert!(csp.contains(d), "{what}: CSP `{csp}` lacks {d}");
        }
        assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
    }
    // The form may post here and (through the redirect) to the client's registered URI only.
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("form-action 'self' http://127.0.0.1:8765;"),
        "{csp}"
    );
    let cookie_attrs = page.header("set-cookie").unwrap();
    assert!(cookie_attrs.contains("HttpOnly") && cookie_attrs.contains("SameSite=Strict"));
}

/// Regression: suspended, revoked and under-review users completed the flow and got tokens.
/// Now the engine's account checks run at consent time: the page shows the reason, its code and
/// remedy, and no code is issued.
#[test]
fn suspended_user_gets_no_code() {
    let (_gw, server) = demo();
    for (user, code) in [
        ("bob@example.com", "account.suspended"),
        ("mallory@example.com", "account.sending_revoked"),
        ("dave@example.com", "account.under_review"),
    ] {
        let r = sign_in(&server, None, user, DEMO_PASSWORD);
        assert_eq!(r.status, 403, "{user}: {}", r.body);
        assert!(r.body.contains(code), "{user}: {}", r.body);
        assert!(r.body.contains("Remedy:"), "{user}: {}", r.body);
        assert!(r.body.contains("decision "), "{user}: {}", r.body);
        assert_page_has_no_code(&r);
    }
    assert!(code_of(&sign_in(&server, None, "alice@example.com", DEMO_PASSWORD)).is_some());
}

/// Regression: arbitrary scope strings were accepted. Now an unknown scope is Google's
/// `invalid_scope` (400, shown on the page, no code); Gmail's and the sign-in scopes work.
#[test]
fn unknown_scope_is_invalid_scope() {
    let (_gw, server) = demo();
    let bad = format!("{SEND} https://www.googleapis.com/auth/everything");
    let (page, _, _) = consent_get(&server, None, &bad);
    assert_eq!(page.status, 400, "{}", page.body);
    assert!(page.body.contains("invalid_scope"), "{}", page.body);
    assert!(page.body.contains("auth/everything"), "{}", page.body);
    // A form for an unknown scope (built from a valid page) gets no code either.
    let (_, cookie, csrf) = consent_get(&server, None, SEND);
    let r = consent_post(
        &server,
        None,
        &bad,
        Some(&cookie),
        Some(&csrf),
        "alice@example.com",
        DEMO_PASSWORD,
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("invalid_scope"));
    assert_page_has_no_code(&r);
    let (ok, _, _) = consent_get(
        &server,
        None,
        &format!("openid email profile https://mail.google.com/ {SEND}"),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
}

// ---------------------------------------------------------------------------------------------
// Item 14: timing

/// Regression: the consent page took 30 ms for a known user and 1.3 ms for an unknown one. Now
/// an unknown user's password is checked against a dummy hash on the same pool: the medians of
/// ten wrong sign-ins each are within a factor of two. Each attempt comes from its own network,
/// so the lockout (which answers at once) never steps in.
#[test]
fn consent_timing_does_not_reveal_users() {
    let (_gw, server) = demo();
    let (_, cookie, csrf) = consent_get(&server, None, SEND);
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..10 {
        for (who, net, out) in [
            ("alice@example.com", 3, &mut known),
            ("nobody-here@example.com", 4, &mut unknown),
        ] {
            let from = format!("127.{net}.{i}.1");
            let t = Instant::now();
            let r = consent_post(
                &server,
                Some(&from),
                SEND,
                Some(&cookie),
                Some(&csrf),
                who,
                "wrong password",
            );
            out.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(r.body.contains("Wrong email or password."));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (k, u) = (median(&mut known), median(&mut unknown));
    eprintln!("consent timing: known {k:.1} ms, unknown {u:.1} ms");
    assert!(
        u > k * 0.5 && u < k * 2.0,
        "unknown user {u:.1} ms vs known {k:.1} ms: timing tells which users exist"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 16: JWT bearer

/// Regression: the same assertion could be exchanged any number of times. Now an assertion is
/// exchanged once until its `exp` (by its SHA-256 without `jti`, as google-auth sends it; by
/// `jti` when present), and the record survives a restart.
#[test]
fn jwt_assertion_cannot_be_replayed() {
    let (gw, server) = demo();
    let (pem, kid) = sa_key(&gw);
    // Signed 30 s ago (past the same-second grace: see the next test).
    let mut signed_earlier = claims();
    signed_earlier["iat"] = json!(now_s() - 30);
    let a = jwt(&pem, &header(&kid), &signed_earlier);
    let first = jwt_exchange(&server, &a);
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.json()["access_token"].is_string());
    assert_invalid_grant(&jwt_exchange(&server, &a), "already exchanged");
    // Same jti, different assertion: a replay too.
    let mut c = claims();
    c["jti"] = json!("one-time-id");
    assert_eq!(
        jwt_exchange(&server, &jwt(&pem, &header(&kid), &c)).status,
        200
    );
    c["iat"] = json!(now_s() - 1);
    assert_invalid_grant(
        &jwt_exchange(&server, &jwt(&pem, &header(&kid), &c)),
        "already exchanged",
    );
    // A fresh assertion works.
    let mut fresh = claims();
    fresh["iat"] = json!(now_s() - 2);
    let fresh = jwt(&pem, &header(&kid), &fresh);
    // Across a restart, the used one stays used.
    let (ok, _, _) = server.stop();
    assert!(ok);
    let server = gw.serve(&["--demo"]);
    assert_invalid_grant(&jwt_exchange(&server, &a), "already exchanged");
    assert_eq!(jwt_exchange(&server, &fresh).status, 200);
}

/// Regression: two workers of one application asking for a token in the same second with the
/// same key, subject and scopes send byte-identical assertions (google-auth signs `iat` in whole
/// seconds and no `jti`); the second was refused as a replay, which Google does not do. Within a
/// few seconds of its `iat` the twin is exchanged too, each for a token of its own.
#[test]
fn identical_assertions_from_two_workers_in_the_same_second_both_get_a_token() {
    let (gw, server) = demo();
    let (pem, kid) = sa_key(&gw);
    let a = jwt(&pem, &header(&kid), &claims());
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(|| jwt_exchange(&server, &a));
        let two = s.spawn(|| jwt_exchange(&server, &a));
        (one.join().unwrap(), two.join().unwrap())
    });
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(two.status, 200, "{}", two.body);
    assert_ne!(one.json()["access_token"], two.json()["access_token"]);
    // With a jti, once only, even in the same second.
    let mut c = claims();
    c["jti"] = json!("worker-shared-id");
    let b = jwt(&pem, &header(&kid), &c);
    assert_eq!(jwt_exchange(&server, &b).status, 200);
    assert_invalid_grant(&jwt_exchange(&server, &b), "already exchanged");
}

/// Regression: an unknown `crit` header was accepted (RFC 7515 §4.1.11: it must be refused).
#[test]
fn jwt_with_unknown_crit_is_refused() {
    let (gw, server) = demo();
    let (pem, kid) = sa_key(&gw);
    let mut h = header(&kid);
    h["crit"] = json!(["https://example.com/must-understand"]);
    h["https://example.com/must-understand"] = json!(true);
    assert_invalid_grant(&jwt_exchange(&server, &jwt(&pem, &h, &claims())), "crit");
    assert_eq!(
        jwt_exchange(&server, &jwt(&pem, &header(&kid), &claims())).status,
        200
    );
}

/// Regression: `nbf` was ignored. Now an assertion is refused before its `nbf` (beyond the same
/// 60 s leeway as `exp`).
#[test]
fn jwt_nbf_in_future_is_refused() {
    let (gw, server) = demo();
    let (pem, kid) = sa_key(&gw);
    let mut c = claims();
    c["nbf"] = json!(now_s() + 600);
    assert_invalid_grant(&jwt_exchange(&server, &jwt(&pem, &header(&kid), &c)), "nbf");
    let mut c = claims();
    c["nbf"] = json!(now_s() + 30);
    let r = jwt_exchange(&server, &jwt(&pem, &header(&kid), &c));
    assert_eq!(r.status, 200, "within the leeway: {}", r.body);
}

// ---------------------------------------------------------------------------------------------
// Item 15: client secrets

/// Regression: OAuth client secrets were stored as unsalted SHA-256 of an operator-chosen string.
/// Now `apply` stores an argon2id hash, checked on the password pool; an entry written with
/// `secret_sha256` still works.
#[test]
fn client_secret_stored_as_argon2id() {
    let (gw, server) = demo();
    let exported = gw.ok(&["export"]);
    let clients = exported
        .split("\noauth_clients:")
        .nth(1)
        .expect("oauth_clients exported")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with(' ') || l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let line = clients
        .lines()
        .find(|l| l.trim_start().starts_with("secret_hash:"))
        .expect("the client's secret hash is exported");
    assert!(line.contains("$argon2id$"), "{line}");
    assert!(!clients.contains("secret_sha256"), "{clients}");
    assert!(!exported.contains(CLIENT_SECRET));
    // The flow works with the secret, not without it.
    let code = code_of(&sign_in(&server, None, "alice@example.com", DEMO_PASSWORD)).unwrap();
    assert_eq!(exchange(&server, &code, "wrong secret").status, 401);
    let code = code_of(&sign_in(&server, None, "alice@example.com", DEMO_PASSWORD)).unwrap();
    assert_eq!(exchange(&server, &code, CLIENT_SECRET).status, 200);

    // An older entry, with the SHA-256 of its secret, is still honoured.
    let legacy = mailgate_auth::sha256_hex(b"legacy-secret");
    let file = exported.replace(line.trim_start(), &format!("secret_sha256: {legacy}"));
    let path = gw.dir.path().join("legacy.yaml");
    std::fs::write(&path, file).unwrap();
    gw.ok(&["apply", "-f", path.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let code = code_of(&sign_in(&server, None, "alice@example.com", DEMO_PASSWORD)).unwrap();
        let s = exchange(&server, &code, "legacy-secret").status;
        if s == 200 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status, 200);
    let code = code_of(&sign_in(&server, None, "alice@example.com", DEMO_PASSWORD)).unwrap();
    assert_eq!(exchange(&server, &code, CLIENT_SECRET).status, 401);
}

// ---------------------------------------------------------------------------------------------
// Item 17: store faults

/// Holds SQLite's write lock on the database for `secs` (as a stuck backup job would).
fn lock_database(db: &std::path::Path, secs: u64) -> std::process::Child {
    let script = format!(
        "import sqlite3,time\nc=sqlite3.connect({db:?},timeout=30,isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked',flush=True)\ntime.sleep({secs})\nc.execute('ROLLBACK')\n",
        db = db.to_str().unwrap()
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .expect("lock taken");
    assert_eq!(line.trim(), "locked");
    child
}

/// Regression: a store fault was a 500 (or, for a token lookup, "invalid credentials"). Now it
/// is Google's 503 `UNAVAILABLE` with `Retry-After` and the reason `store.unavailable`. The
/// fault: a setting (a directory write) is changed while another process holds the database's
/// write lock beyond the store's busy timeout (10 s). (A send would wait longer: the write
/// thread replays a failed batch one write at a time, another busy timeout.)
#[test]
fn gmail_store_fault_is_503_with_retry_after() {
    let (gw, server) = demo();
    let alice = user_token_for(
        &server,
        "alice@example.com",
        &format!("{SEND} https://www.googleapis.com/auth/gmail.settings.sharing"),
    );
    let create = |email: &str| {
        http(
            &server.addr,
            None,
            "POST",
            "/gmail/v1/users/me/settings/sendAs",
            &[bearer(&alice), ("Content-Type", "application/json".into())],
            json!({"sendAsEmail": email}).to_string().as_bytes(),
        )
    };
    let mut lock = lock_database(&gw.data_dir().join("mailgate.db"), 12);
    let r = create("first@example.com");
    assert_eq!(r.status, 503, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"]["status"], "UNAVAILABLE", "{}", r.body);
    assert!(r.header("retry-after").is_some());
    let mailgate = j["error"]["details"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["domain"] == "mailgate"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(mailgate["reason"], "store.unavailable", "{}", r.body);
    let _ = lock.wait();
    let r = create("second@example.com");
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---------------------------------------------------------------------------------------------
// Bodies are read only after authentication

/// Sends the head of a request announcing `declared` body bytes and `sent` of them, then reads
/// the answer without sending the rest.
fn partial_upload(server: &Server, token: Option<&str>, declared: usize, sent: usize) -> Resp {
    let mut s = connect_from("127.0.0.7", &server.addr).expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST /upload/gmail/v1/users/me/messages/send?uploadType=media HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: message/rfc822\r\nContent-Length: {declared}\r\n\r\n",
        server.addr
    )
    .unwrap();
    let _ = s.write_all(&vec![b'x'; sent]);
    read_response(&mut BufReader::new(s)).expect("an answer before the body is complete")
}

/// Regression: the Gmail routes buffered up to 36 MiB of body before looking at the credential.
/// Now a request without a valid credential is answered from its headers (the body is never
/// read), an announced body over the limit is a 413 (at once if the client sends no more), and a
/// real upload still works.
#[test]
fn bodies_are_read_only_after_the_credential_passed() {
    let (_gw, server) = demo();
    let alice = user_token(&server, "alice@example.com");
    let t = Instant::now();
    let r = partial_upload(&server, None, 30 * 1024 * 1024, 64 * 1024);
    assert_eq!(r.status, 401, "{}", r.body);
    // The body stays unread, so the connection cannot be reused: the client is told.
    assert_eq!(r.header("connection"), Some("close"));
    let r = partial_upload(&server, Some("ya29.forged"), 30 * 1024 * 1024, 64 * 1024);
    assert_eq!(r.status, 401, "{}", r.body);
    // Over the limit with a valid credential: the rest of the body would be read and dropped
    // (so a client that writes it all first gets the answer); one that sends nothing more gets
    // it after DISCARD_IDLE (2 s).
    let r = partial_upload(&server, Some(&alice), 40 * 1024 * 1024, 0);
    assert_eq!(r.status, 413, "{}", r.body);
    let v = r.json();
    let details = v["error"]["details"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        details
            .iter()
            .any(|d| d["domain"] == "mailgate" && d["metadata"]["code"] == "message.too_large"),
        "{}",
        r.body
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answers waited for bodies"
    );
    // A 2 MB message from a valid credential is read and accepted.
    let big = format!("{MESSAGE}{}\r\n", "y".repeat(2 * 1024 * 1024));
    let r = http(
        &server.addr,
        None,
        "POST",
        "/upload/gmail/v1/users/me/messages/send?uploadType=media",
        &[bearer(&alice), ("Content-Type", "message/rfc822".into())],
        big.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A token without the send scope (read or settings only) must not outlive its user's
/// suspension: the engine stopped at the send-scope check (which such a token fails, and which
/// these methods do not answer for) and never reached the account's state, so a suspended user
/// kept reading the profile and refreshing the token. Now the later checks run too.
#[test]
fn suspension_stops_a_token_without_the_send_scope() {
    let (gw, server) = demo();
    let readonly = "https://www.googleapis.com/auth/gmail.readonly";
    let r = sign_in_for(&server, None, "alice@example.com", DEMO_PASSWORD, readonly);
    let t = exchange(&server, &code_of(&r).unwrap(), CLIENT_SECRET);
    assert_eq!(t.status, 200, "{}", t.body);
    let access = t.json()["access_token"].as_str().unwrap().to_owned();
    let refresh = t.json()["refresh_token"].as_str().unwrap().to_owned();
    let profile = || {
        http(
            &server.addr,
            None,
            "GET",
            "/gmail/v1/users/me/profile",
            &[bearer(&access)],
            b"",
        )
    };
    assert_eq!(profile().status, 200);
    gw.ok(&["user", "suspend", "alice@example.com"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = profile();
        if r.status != 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("account.suspended"), "{}", r.body);
    let r = http(
        &server.addr,
        None,
        "POST",
        "/token",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_owned(),
        )],
        form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.json()["mailgate"]["code"],
        "account.suspended",
        "{}",
        r.body
    );
}

/// Regression (issue 13 review): the Gmail door's message bodies (up to 35 MiB of message, 47 MiB
/// as JSON `raw`) were not reserved from the process's budget for message bodies, so a few
/// concurrent authenticated sends held some 85 MiB each. Now each is reserved twice over (the
/// JSON and the decoded message) before it is buffered, and a send the budget cannot take gets
/// Google's 503 with `Retry-After` and `server.busy`, after its body was read and dropped.
#[test]
fn four_concurrent_34mib_json_sends_stay_within_the_body_budget() {
    let gw = Gateway::new();
    let server = super::serve_demo(&gw, "");
    let token = user_token(&server, "alice@example.com");
    // A From alice may not use: the message is read and decoded, then refused; nothing stored.
    let mut msg = b"From: ceo@evil.test\r\nTo: x@example.org\r\nSubject: big\r\n\r\n".to_vec();
    let line = format!("{}\r\n", "z".repeat(998));
    while msg.len() < 34 * 1024 * 1024 {
        msg.extend_from_slice(line.as_bytes());
    }
    let body = Arc::new(format!(r#"{{"raw":"{}"}}"#, b64(&msg)).into_bytes());
    drop(msg);
    let probe = Probe::relay(&server);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (addr, body, token) = (server.addr.clone(), body.clone(), token.clone());
            super::attacker(move || {
                http(
                    &addr,
                    None,
                    "POST",
                    "/gmail/v1/users/me/messages/send",
                    &[
                        bearer(&token),
                        ("Content-Type", "application/json".to_owned()),
                    ],
                    &body,
                )
            })
        })
        .collect();
    let mut busy = 0;
    for t in threads {
        let r = t.join().unwrap();
        let code = r.json()["error"]["details"][0]["reason"].clone();
        if r.status == 503 {
            assert_eq!(code, "server.busy", "{}", r.body);
            assert!(r.header("retry-after").is_some(), "{r:?}");
            busy += 1;
        } else {
            assert_eq!(code, "sender.not_owned", "{} {}", r.status, r.body);
        }
    }
    assert!(busy > 0, "four 94 MiB reservations fit a 128 MiB budget?");
    let report = probe.finish();
    assert_budget(&server, &report);
}

/// Issue 15 item 2: the Gmail methods that send nothing are decided by the engine with their own
/// scopes (`Action::ReadSettings` and friends), and the answers stay Google's: a token with only
/// the send scope reading the profile or the send-as list, or a read-only token creating a
/// send-as address, gets Google's `403 insufficientPermissions` body with the method's
/// `ErrorInfo`, a `WWW-Authenticate` naming that method's scopes, and Mailgate's
/// `scope.insufficient` explanation (check, remedy naming the scopes, object at fault, decision
/// id), as the same refusal of a send does.
#[test]
fn non_send_methods_refuse_a_token_without_their_scope_in_googles_words() {
    let (_gw, server) = demo();
    let send_only = user_token_for(&server, "alice@example.com", SEND);
    let readonly = user_token_for(
        &server,
        "alice@example.com",
        "https://www.googleapis.com/auth/gmail.readonly",
    );
    let cases = [
        (
            &send_only,
            "GET",
            "/gmail/v1/users/me/profile",
            "caribou.api.proto.MailboxService.GetProfile",
            "https://www.googleapis.com/auth/gmail.readonly",
        ),
        (
            &send_only,
            "GET",
            "/gmail/v1/users/me/settings/sendAs",
            "caribou.api.proto.MailboxService.ListSendAs",
            "https://www.googleapis.com/auth/gmail.metadata",
        ),
        (
            &readonly,
            "POST",
            "/gmail/v1/users/me/settings/sendAs",
            "caribou.api.proto.MailboxService.CreateSendAs",
            "https://www.googleapis.com/auth/gmail.settings.sharing",
        ),
        (
            &readonly,
            "POST",
            "/gmail/v1/users/me/messages/send",
            "caribou.api.proto.MailboxService.SendMessage",
            SEND,
        ),
    ];
    for (token, method, path, rpc, scope) in cases {
        let body: &[u8] = if method == "POST" {
            br#"{"sendAsEmail":"x@example.com","raw":"eA"}"#
        } else {
            b""
        };
        let r = http(
            &server.addr,
            None,
            method,
            path,
            &[
                bearer(token),
                ("Content-Type", "application/json".to_owned()),
            ],
            body,
        );
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        let v = r.json();
        let e = &v["error"];
        assert_eq!(e["code"], 403, "{path}: {v}");
        assert_eq!(e["status"], "PERMISSION_DENIED", "{path}: {v}");
        assert_eq!(
            e["message"], "Request had insufficient authentication scopes.",
            "{path}: {v}"
        );
        assert_eq!(
            e["errors"],
            json!([{"message": "Insufficient Permission", "domain": "global", "reason": "insufficientPermissions"}]),
            "{path}: {v}"
        );
        assert_eq!(
            e["details"][0],
            json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                "domain": "googleapis.com",
                "metadata": {"method": rpc, "service": "gmail.googleapis.com"},
            }),
            "{path}: {v}"
        );
        let www = r.header("www-authenticate").unwrap_or_default();
        assert!(
            www.contains("error=\"insufficient_scope\"") && www.contains(scope),
            "{path}: {www}"
        );
        let m = &e["details"][1];
        assert_eq!(m["domain"], "mailgate", "{path}: {v}");
        assert_eq!(m["reason"], "scope.insufficient", "{path}: {v}");
        assert_eq!(m["metadata"]["code"], "scope.insufficient");
        assert_eq!(m["metadata"]["check"], "grant", "{path}: {v}");
        assert!(
            m["metadata"]["remedy"]
                .as_str()
                .is_some_and(|x| x.contains(scope)),
            "{path}: {v}"
        );
        assert_eq!(
            m["metadata"]["object_at_fault"], "credential alice@example.com",
            "{path}: {v}"
        );
        let id = m["metadata"]["decision_id"].as_str().unwrap_or_default();
        assert_eq!(id.len(), 26, "{path}: {v}");
        assert_eq!(r.header("x-mailgate-decision"), Some(id), "{path}");
    }
    // The scope a method takes is enough for it, and reads nothing it should not.
    let r = http(
        &server.addr,
        None,
        "GET",
        "/gmail/v1/users/me/profile",
        &[bearer(&readonly)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["emailAddress"], "alice@example.com");
}
