//! The tokio driver over real loopback sockets: connection caps per client IP (the refusal in
//! the right protocol: after the TLS handshake on the implicit-TLS listener), the short idle
//! timeouts before a client is trusted (shorter under pressure, and a lifetime bound for slow
//! senders), and error delays that keep other connections going. On SQLite only, whatever
//! `MAILGATE_TEST_STORE` says: these are the driver's socket and timing behaviour, and the store
//! is only read once when the gateway opens (the stores' own tests and tests/session.rs run on
//! PostgreSQL too).

#![allow(clippy::unwrap_used, reason = "tests: a panic is a failed test")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailgate_core::orgfile::OrgFile;
use mailgate_gateway::Gateway;
use mailgate_gateway::budget;
use mailgate_smtp::{Limits, Listener, SmtpContext};
use mailgate_store::Changeset;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

const ORG: &str = r#"
domains: [{name: example.com, verified: true}]
users:
  - email: alice@example.com
smtp_relay:
  allowed_ips: [127.0.0.0/8]
  allowed_senders: domain_addresses
"#;

struct Running {
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
    /// The certificate (PEM) of the implicit-TLS listener.
    cert: String,
}

async fn start(kind: Listener, limits: Limits, budgets: budget::Limits) -> Running {
    mailgate_tls::install_provider();
    let store = mailgate_store::in_memory().await.unwrap();
    let dir = OrgFile::parse(ORG).unwrap().directory;
    store
        .directory
        .commit(0, &Changeset::between(&Default::default(), &dir), "t")
        .await
        .unwrap();
    let gateway = Gateway::open_with_limits(store.directory.clone(), budgets)
        .await
        .unwrap();
    let ctx = Arc::new(SmtpContext {
        gateway,
        tokens: store.tokens,
        hostname: "mx.test".into(),
        limits,
        auth_without_tls: false,
    });
    let (cert, key) = mailgate_tls::self_signed(&["localhost"]).unwrap();
    let tls = mailgate_tls::server_config_from_pem(cert.as_bytes(), key.as_bytes(), &[]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    tokio::spawn(mailgate_smtp::serve(listener, kind, ctx, Some(tls), rx));
    Running {
        addr,
        _stop: stop,
        cert,
    }
}

/// A connection from `from` (any 127/8 address: the kernel routes all of it to loopback).
async fn connect_from(addr: SocketAddr, from: &str) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(addr).await.unwrap()
}

/// Reads until a complete final reply line (`NNN text\r\n`) or EOF, at most `limit`.
async fn reply<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if text
            .lines()
            .any(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
            && text.ends_with("\r\n")
        {
            return text;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return String::from_utf8_lossy(&got).into_owned(),
        }
    }
}

/// Whether the peer closed the connection within `limit`, after whatever it still sent.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> (bool, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (false, String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

async fn say<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, line: &str) -> String {
    s.write_all(line.as_bytes()).await.unwrap();
    reply(s, Duration::from_secs(5)).await
}

const SEC: Duration = Duration::from_secs(5);

#[tokio::test]
async fn one_ip_cannot_take_every_slot() {
    let budgets = budget::Limits {
        smtp_max_connections: 100,
        smtp_max_connections_per_ip: 3,
        ..budget::Limits::default()
    };
    let srv = start(Listener::Relay, Limits::default(), budgets).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from(srv.addr, "127.0.0.1").await;
        let g = reply(&mut c, SEC).await;
        assert!(g.starts_with("220 "), "{g}");
        held.push(c);
    }
    let mut c = connect_from(srv.addr, "127.0.0.1").await;
    let (closed, r) = closed_within(&mut c, SEC).await;
    assert!(closed, "{r}");
    assert_eq!(
        r,
        "421 4.7.0 mx.test Error: too many connections from 127.0.0.1, try again later\r\n"
    );
    // Another address still gets in.
    let mut other = connect_from(srv.addr, "127.0.0.2").await;
    let g = reply(&mut other, SEC).await;
    assert!(g.starts_with("220 "), "{g}");
    // A slot given back is taken again.
    let mut first = held.remove(0);
    assert!(say(&mut first, "QUIT\r\n").await.starts_with("221"));
    drop(first);
    let ok = async {
        loop {
            let mut c = connect_from(srv.addr, "127.0.0.1").await;
            if reply(&mut c, SEC).await.starts_with("220 ") {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    timeout(SEC, ok).await.unwrap();
}

/// On the implicit-TLS listener the refusal is never cleartext: nothing comes before the
/// client's TLS hello, and the `421` comes over TLS.
#[tokio::test]
async fn smtps_refusal_comes_after_tls() {
    let budgets = budget::Limits {
        smtp_max_connections_per_ip: 1,
        ..budget::Limits::default()
    };
    let srv = start(Listener::Smtps, Limits::default(), budgets).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(srv.cert.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = ServerName::try_from("localhost").unwrap();

    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let mut first = connector.connect(name.clone(), tcp).await.unwrap();
    assert!(reply(&mut first, SEC).await.starts_with("220 "));

    let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let early = timeout(Duration::from_millis(500), tcp.read(&mut buf)).await;
    assert!(early.is_err(), "the server wrote before TLS: {early:?}");
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let r = reply(&mut tls, SEC).await;
    assert!(
        r.starts_with("421 4.7.0 mx.test Error: too many connections from 127.0.0.1"),
        "{r}"
    );
}

/// A refused client that never finishes its TLS handshake does not keep anything for long.
#[tokio::test]
async fn smtps_handshakes_are_bounded() {
    let budgets = budget::Limits {
        header_timeout: Duration::from_millis(300),
        ..budget::Limits::default()
    };
    let srv = start(Listener::Smtps, Limits::default(), budgets).await;
    let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
    let t = Instant::now();
    let (closed, r) = closed_within(&mut tcp, SEC).await;
    assert!(closed && r.is_empty(), "{r}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn untrusted_connections_time_out_quickly_trusted_ones_do_not() {
    let limits = Limits {
        idle_untrusted: Duration::from_millis(300),
        idle: Duration::from_secs(3),
        ..Limits::default()
    };
    let srv = start(Listener::Relay, limits, budget::Limits::default()).await;
    // Greeting to first command.
    let mut c = connect_from(srv.addr, "127.0.0.1").await;
    let t = Instant::now();
    let (closed, r) = closed_within(&mut c, SEC).await;
    assert!(closed, "{r}");
    assert!(
        r.ends_with("421 4.4.2 mx.test Error: timeout exceeded\r\n"),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // After EHLO: still untrusted.
    let mut c = connect_from(srv.addr, "127.0.0.1").await;
    reply(&mut c, SEC).await;
    assert!(say(&mut c, "EHLO x\r\n").await.starts_with("250"));
    let (closed, _) = closed_within(&mut c, SEC).await;
    assert!(closed);
    // A transaction started (the relay trusts this IP): the long idle time.
    let mut c = connect_from(srv.addr, "127.0.0.1").await;
    reply(&mut c, SEC).await;
    assert!(say(&mut c, "EHLO x\r\n").await.starts_with("250"));
    let r = say(&mut c, "MAIL FROM:<scanner@example.com>\r\n").await;
    assert!(r.starts_with("250"), "{r}");
    let (closed, r) = closed_within(&mut c, Duration::from_secs(1)).await;
    assert!(!closed, "{r}");
    assert!(say(&mut c, "RSET\r\n").await.starts_with("250"));
}

/// Near the listener's capacity, untrusted connections get the shorter idle time (Postfix's
/// stress-dependent `smtpd_timeout`).
#[tokio::test]
async fn pressure_shortens_the_untrusted_idle_time() {
    let limits = Limits {
        idle_untrusted: Duration::from_secs(20),
        idle_under_pressure: Duration::from_millis(300),
        pressure_percent: 80,
        ..Limits::default()
    };
    let budgets = budget::Limits {
        smtp_max_connections: 5,
        smtp_max_connections_per_ip: 5,
        ..budget::Limits::default()
    };
    let srv = start(Listener::Relay, limits, budgets).await;
    let mut one = connect_from(srv.addr, "127.0.0.1").await;
    reply(&mut one, SEC).await;
    // One of five: the ordinary idle time.
    let (closed, _) = closed_within(&mut one, Duration::from_millis(800)).await;
    assert!(!closed);
    let mut more = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from(srv.addr, "127.0.0.1").await;
        reply(&mut c, SEC).await;
        more.push(c);
    }
    // Four of five (80 %): the wait already under way is cut short too.
    let t = Instant::now();
    let (closed, r) = closed_within(&mut one, SEC).await;
    assert!(closed && r.starts_with("421 4.4.2"), "{r}");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
}

/// A client that sends a byte now and then never lets an idle timer fire; the untrusted
/// lifetime still ends it.
#[tokio::test]
async fn slow_untrusted_clients_are_bounded() {
    let limits = Limits {
        idle_untrusted: Duration::from_millis(500),
        untrusted_lifetime: Duration::from_millis(1500),
        ..Limits::default()
    };
    let srv = start(Listener::Submission, limits, budget::Limits::default()).await;
    let mut c = connect_from(srv.addr, "127.0.0.1").await;
    reply(&mut c, SEC).await;
    let t = Instant::now();
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(5) {
        if c.write_all(b"N").await.is_err() {
            closed = true;
            break;
        }
        let (gone, r) = closed_within(&mut c, Duration::from_millis(200)).await;
        if gone {
            assert!(r.contains("421 4.4.2"), "{r}");
            closed = true;
            break;
        }
    }
    assert!(closed);
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(1200) && e < Duration::from_secs(3),
        "{e:?}"
    );
}

/// Error replies past the soft limit are delayed; the delay is a timer, not a blocked worker:
/// other connections are answered at once meanwhile.
#[tokio::test]
async fn error_delays_do_not_hold_other_connections() {
    let limits = Limits {
        soft_error_limit: 1,
        hard_error_limit: 4,
        error_sleep: Duration::from_millis(700),
        ..Limits::default()
    };
    let srv = start(Listener::Submission, limits, budget::Limits::default()).await;
    let mut bad = connect_from(srv.addr, "127.0.0.1").await;
    reply(&mut bad, SEC).await;
    let t = Instant::now();
    bad.write_all(b"FOO\r\nFOO\r\nFOO\r\nFOO\r\nFOO\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut good = connect_from(srv.addr, "127.0.0.1").await;
    assert!(reply(&mut good, SEC).await.starts_with("220"));
    assert!(say(&mut good, "NOOP\r\n").await.starts_with("250"));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let (closed, r) = closed_within(&mut bad, SEC).await;
    assert!(closed, "{r}");
    assert!(
        r.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"),
        "{r}"
    );
    // Errors 1 to 3 were each delayed (the 4th closed the session).
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(2000) && e < Duration::from_secs(4),
        "{e:?}"
    );
}
