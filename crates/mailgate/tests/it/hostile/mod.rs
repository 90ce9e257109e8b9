//! The hostile-client suite (issue 12): each test attacks a real `mailgate serve --demo` over
//! loopback, without credentials unless the attack needs one, and asserts the defence: the right
//! refusal in the door's dialect, nothing stored, the server's peak memory under
//! [`MAX_RSS_MB`], and a legitimate client on another door (a [`Probe`]) keeping its p99 under
//! [`MAX_P99_MS`] while the attack runs (sends that overlapped a stall of the machine itself,
//! seen by a [`Canary`] outside the server, are left out and reported). Every loop is bounded in
//! count and time.
//!
//! Attackers connect from 127.0.0.2 and up ([`connect_from`]); the probe sends from 127.0.0.1,
//! the only address the demo's SendGrid key and relay allow, so per-IP caps are tested as they
//! work: against the attacker's address, not the legitimate client's.
//!
//! These tests run on their own after the rest of the suite (`scripts/test`), one at a time, so
//! the latency they measure is the attack's effect, not another test's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::Server;

mod auth;
pub(crate) mod gmail;
mod http;
mod sender;
mod sendgrid;
mod smtp;

/// Peak resident memory the server may reach under any attack (issue 12).
pub const MAX_RSS_MB: f64 = 300.0;
/// The p99 a legitimate send keeps while an attack runs (issue 12).
pub const MAX_P99_MS: f64 = 50.0;

/// The demo's SendGrid key (owner alice@example.com, allowed from 127.0.0.1 only).
pub const DEMO_KEY: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";

/// The legitimate probe's key (owner probe@example.com, limits out of the way: the demo's
/// alice may send 150 messages a minute, which a probe sending every 25 ms would exhaust).
pub const PROBE_KEY: &str = "SG.hostile-probe-0001.cHJvYmVwcm9iZXByb2JlcHJvYmVwcm9iZXByb2JlcHI";

/// The probe's principal, added to the demo organisation by [`serve_demo`].
const PROBE_ORG: &str = r#"
users:
  - email: probe@example.com
    password: "correct horse battery staple"
    limits:
      rate_units_per_minute: 100000000
      messages_per_day: 100000000
      recipients_per_day: 100000000
api_keys:
  - name: hostile-suite probe
    secret: "SG.hostile-probe-0001.cHJvYmVwcm9iZXByb2JlcHJvYmVwcm9iZXByb2JlcHI"
    owner: probe@example.com
    project: acme-app
    permissions: [mail.send]
"#;

/// `mailgate serve --demo` (with `extra_config` appended to the config) on the demo
/// organisation plus the probe's principal.
pub fn serve_demo(gw: &crate::harness::Gateway, extra_config: &str) -> Server {
    serve_demo_wrapped(gw, extra_config, &[])
}

/// [`serve_demo`] started through `wrapper` (e.g. `prlimit --nofile=1024:1024 --`).
pub fn serve_demo_wrapped(
    gw: &crate::harness::Gateway,
    extra_config: &str,
    wrapper: &[&str],
) -> Server {
    let org = crate::harness::example_org();
    gw.ok(&["apply", "-f", org.to_str().expect("utf-8 path")]);
    let probe = gw.dir.path().join("probe.yaml");
    std::fs::write(&probe, PROBE_ORG).expect("write probe.yaml");
    gw.ok(&["apply", "-f", probe.to_str().expect("utf-8 path")]);
    gw.serve_wrapped(extra_config, &["--demo"], wrapper)
}
/// The demo users' password.
pub const DEMO_PASSWORD: &str = "correct horse battery staple";

/// A TCP connection to `to` from the loopback address `from` (127.0.0.2, ...), so a test can
/// be "another client" to the per-IP limits.
pub fn connect_from(from: &str, to: &str) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let to: SocketAddr = to.parse().map_err(std::io::Error::other)?;
    let from: IpAddr = from.parse().map_err(std::io::Error::other)?;
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Starts an attacker thread. It runs at the lowest scheduling priority (nice 19): on this one
/// machine the attacker's own CPU (building and writing its bytes) competes with the server and
/// the legitimate probe, which a real attacker on another machine does not; the server's work
/// for the attack still runs at the server's priority, and that is what the suite measures.
pub fn attacker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(move || {
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
        f()
    })
}

/// A TLS client that trusts the demo's self-signed certificate (generated under the data
/// directory), for SMTP STARTTLS and SMTPS.
pub fn tls_client(gw: &crate::harness::Gateway) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(gw.data_dir().join("tls/cert.pem")).expect("demo certificate");
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.expect("a PEM certificate"))
            .expect("a usable root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Bytes of the database and its write-ahead log (what a flood would grow).
pub fn store_bytes(gw: &crate::harness::Gateway) -> u64 {
    ["mailgate.db", "mailgate.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(gw.data_dir().join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

/// What a probe saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Sends answered with success.
    pub sent: usize,
    /// Sends refused or failed (with the first few answers).
    pub failed: usize,
    pub failures: Vec<String>,
    /// Latency percentiles of the successful sends (ms).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Successful sends left out of the percentiles because the machine itself stalled while
    /// they ran (see [`Canary`]), and the longest such stall (ms).
    pub excluded: usize,
    pub worst_stall_ms: f64,
}

/// The machine's own stalls, seen from outside the server: a thread of the test process that
/// writes and fsyncs a small file in the temporary directory (the filesystem the server's
/// database is on), then sleeps 10 ms, and records every round that took 40 ms longer than
/// that. On a shared 2-core VM the disk or the scheduler now and then stops everyone for
/// 100 ms to 1 s with no attack running (seen in CI); a probe send that overlapped such a stall
/// measures the machine, not the defence, and is left out of the percentiles (and reported).
/// A defence that fails slows the server, not this thread's fsync or wake-up.
struct Canary {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Instant, Instant)>>>,
}

impl Canary {
    const ROUND: Duration = Duration::from_millis(10);
    const STALL: Duration = Duration::from_millis(40);

    fn start() -> Canary {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut stalls = Vec::new();
            let Ok(mut file) = tempfile::tempfile() else {
                return stalls;
            };
            // Bounded: the probe stops within MAX_SENDS × INTERVAL (30 s) plus slow sends.
            for _ in 0..20_000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let t0 = Instant::now();
                let _ = file.write_all(&[0u8; 512]);
                let _ = file.sync_data();
                std::thread::sleep(Self::ROUND);
                let took = t0.elapsed();
                if took > Self::ROUND + Self::STALL {
                    stalls.push((t0, t0 + took));
                }
            }
            stalls
        });
        Canary {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(Instant, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One successful probe send: when it started and how long it took.
type Sample = (Instant, Duration);

/// A legitimate client sending in the background while an attack runs: one send every
/// [`Probe::INTERVAL`], at most [`Probe::MAX_SENDS`], until [`Probe::finish`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Vec<Sample>, Vec<String>)>>,
    canary: Option<Canary>,
}

impl Probe {
    pub const INTERVAL: Duration = Duration::from_millis(25);
    pub const MAX_SENDS: usize = 1200;

    fn start(mut send: impl FnMut() -> Result<(), String> + Send + 'static) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let canary = Canary::start();
        let thread = std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut failures = Vec::new();
            for _ in 0..Self::MAX_SENDS {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                match send() {
                    Ok(()) => lat.push((t, t.elapsed())),
                    Err(e) => failures.push(e),
                }
                std::thread::sleep(Self::INTERVAL);
            }
            (lat, failures)
        });
        // Let it take a few samples before the attack starts.
        std::thread::sleep(Duration::from_millis(200));
        Probe {
            stop,
            thread: Some(thread),
            canary: Some(canary),
        }
    }

    /// Sends through the SendGrid door (plain HTTP, the demo key) from 127.0.0.1.
    pub fn sendgrid(server: &Server) -> Probe {
        let addr = server.addr.clone();
        Probe::start(move || sendgrid_send(&addr))
    }

    /// Sends through the SMTP relay listener (no AUTH: the demo allows 127.0.0.1) over one
    /// connection kept open, one transaction per send.
    pub fn relay(server: &Server) -> Probe {
        let addr = server.smtp_relay.clone();
        let mut conn: Option<SmtpConn> = None;
        Probe::start(move || {
            if conn.is_none() {
                conn = Some(SmtpConn::open(&addr)?);
            }
            let c = conn.as_mut().ok_or("no connection")?;
            let r = c.send_one();
            if r.is_err() {
                conn = None;
            }
            r
        })
    }

    /// Stops the probe and reports.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, failures) = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let stalls = self.canary.take().map(Canary::finish).unwrap_or_default();
        let during_stall = |start: Instant, took: Duration| {
            stalls.iter().any(|&(s, e)| start < e && start + took > s)
        };
        let mut lat: Vec<f64> = samples
            .iter()
            .filter(|&&(start, took)| !during_stall(start, took))
            .map(|(_, took)| took.as_secs_f64() * 1000.0)
            .collect();
        let excluded = samples.len() - lat.len();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return f64::INFINITY;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            lat[i]
        };
        Report {
            sent: samples.len(),
            failed: failures.len(),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: lat.last().copied().unwrap_or(f64::INFINITY),
            failures: failures.into_iter().take(5).collect(),
            excluded,
            worst_stall_ms: stalls
                .iter()
                .map(|(s, e)| (*e - *s).as_secs_f64() * 1000.0)
                .fold(0.0, f64::max),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One `POST /v3/mail/send` as the probe (needs [`serve_demo`]); Ok on 202.
pub fn sendgrid_send(addr: &str) -> Result<(), String> {
    let body = r#"{"personalizations":[{"to":[{"email":"probe@example.org"}]}],"from":{"email":"probe@example.com"},"subject":"probe","content":[{"type":"text/plain","value":"a legitimate message"}]}"#;
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    // Long enough for a write that waits out SQLite's 10 s busy timeout (twice: a failed batch is replayed).
    s.set_read_timeout(Some(Duration::from_secs(28))).ok();
    s.set_nodelay(true).ok();
    write!(
        s,
        "POST /v3/mail/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {PROBE_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(|e| format!("read: {e}"))?;
    let status = String::from_utf8_lossy(&head);
    if status.starts_with("HTTP/1.1 202") {
        Ok(())
    } else {
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        Err(format!(
            "{status}{}",
            rest.chars().take(300).collect::<String>()
        ))
    }
}

/// A plain SMTP client on the relay listener.
pub struct SmtpConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl SmtpConn {
    pub fn open(addr: &str) -> Result<SmtpConn, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        s.set_nodelay(true).ok();
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut c = SmtpConn {
            r: BufReader::new(s),
            w,
        };
        c.expect("", "220")?;
        c.expect("EHLO probe.example.com\r\n", "250")?;
        Ok(c)
    }

    /// Reads one (multi-line) reply; returns its last line.
    pub fn reply(&mut self) -> Result<String, String> {
        loop {
            let mut line = String::new();
            let n = self
                .r
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed".into());
            }
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(line.trim_end().to_owned());
            }
        }
    }

    /// Sends `cmd` (may be empty) and checks the reply starts with `code`.
    pub fn expect(&mut self, cmd: &str, code: &str) -> Result<String, String> {
        if !cmd.is_empty() {
            self.w
                .write_all(cmd.as_bytes())
                .map_err(|e| format!("write: {e}"))?;
        }
        let r = self.reply()?;
        if r.starts_with(code) {
            Ok(r)
        } else {
            Err(format!("{} -> {r}", cmd.trim_end()))
        }
    }

    /// One message from probe@example.com; Ok on 250 after DATA.
    pub fn send_one(&mut self) -> Result<(), String> {
        self.expect("MAIL FROM:<probe@example.com>\r\n", "250")?;
        self.expect("RCPT TO:<probe@example.org>\r\n", "250")?;
        self.expect("DATA\r\n", "354")?;
        self.expect(
            "From: probe@example.com\r\nTo: probe@example.org\r\nSubject: probe\r\n\r\na legitimate message\r\n.\r\n",
            "250",
        )?;
        Ok(())
    }
}

/// The issue's bounds: peak RSS under [`MAX_RSS_MB`]; the probe sent enough, failed none, and
/// kept its p99 under [`MAX_P99_MS`].
pub fn assert_budget(server: &Server, report: &Report) {
    let peak = server.peak_rss_mb();
    eprintln!(
        "budget: peak RSS {peak:.0} MB (now {:.0} MB); probe sent {} failed {} p50 {:.1} ms p99 {:.1} ms max {:.1} ms; {} sends during machine stalls left out (worst stall {:.0} ms)",
        server.rss_mb(),
        report.sent,
        report.failed,
        report.p50_ms,
        report.p99_ms,
        report.max_ms,
        report.excluded,
        report.worst_stall_ms
    );
    assert!(
        peak > 0.0 && peak < MAX_RSS_MB,
        "server peak RSS {peak:.0} MB (bound {MAX_RSS_MB} MB)"
    );
    assert!(
        report.sent >= 10,
        "the legitimate probe sent only {} messages: {:?}",
        report.sent,
        report.failures
    );
    assert_eq!(
        report.failed, 0,
        "legitimate sends failed during the attack: {:?}",
        report.failures
    );
    assert!(
        report.excluded * 4 <= report.sent,
        "the machine stalled during {} of {} probe sends (worst {:.0} ms): too noisy to measure",
        report.excluded,
        report.sent,
        report.worst_stall_ms
    );
    assert!(
        report.p99_ms < MAX_P99_MS,
        "legitimate send p99 {:.1} ms during the attack (bound {MAX_P99_MS} ms)",
        report.p99_ms
    );
}

/// The control: with no attack, each probe is well inside the budget. When an attack test
/// fails its latency bound, this one says whether the machine, not the attack, is the cause.
#[test]
fn the_probes_alone_are_within_budget() {
    let gw = crate::harness::Gateway::new();
    let server = serve_demo(&gw, "");
    for probe in [Probe::sendgrid(&server), Probe::relay(&server)] {
        std::thread::sleep(Duration::from_secs(3));
        let report = probe.finish();
        assert_budget(&server, &report);
    }
}
