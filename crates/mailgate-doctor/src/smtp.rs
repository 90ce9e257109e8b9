//! `mailgate doctor smtp`: probes an SMTP server the way a support engineer would with `openssl
//! s_client -starttls smtp`, one step after another, and sends nothing (no DATA).
//!
//! The steps, in order: DNS and TCP connect; the banner; EHLO (the extensions); TLS (STARTTLS,
//! or implicit TLS on 465 / `--tls implicit`) with the negotiated version and cipher, then the
//! certificate check (the chain leads to a public root or a `--ca-file` certificate, and names the
//! server); EHLO again over TLS; the AUTH mechanisms offered; AUTH (PLAIN or LOGIN with a
//! password, XOAUTH2 with a token); `MAIL FROM`; `RCPT TO` for each recipient; `RSET`; `QUIT`.
//!
//! Decisions:
//! - **Evidence is the server's reply, verbatim** (every line); the command is in the step's
//!   title. Every refusal is classified with [`crate::diagnose`] (`why`'s table), preferring
//!   the causes the step makes likely: on a plaintext connection `tls.required`; at AUTH
//!   `auth.invalid` and `auth.locked`; at MAIL FROM the sender's causes once authenticated, the
//!   relay's otherwise; at RCPT TO the recipient's policy and, since Postfix reports a MAIL FROM
//!   restriction at RCPT TO (`smtpd_delay_reject`), the sender's.
//! - **Never stop where going on tells more.** A bad certificate is a finding and the handshake
//!   goes on ([`mailgate_tls::client_config_recording`]); a server without STARTTLS is a finding
//!   (`tls.required`) and the rest is probed in plaintext; with `--tls none` AUTH is skipped when
//!   the server hides it before STARTTLS, and MAIL FROM is still sent so the server's own answer
//!   (`530 5.7.0 Must issue a STARTTLS command first`) names the cause. Only a connection that is
//!   gone ends the probes (the remaining steps are skipped, saying why).
//! - **The password is never sent in plaintext unless asked**: without TLS, AUTH is skipped
//!   unless `--tls none` says plaintext is meant.
//! - **Secrets**: the password, the token and every base64 AUTH payload sent are registered with
//!   [`Run::secret`] before anything is printed, so no output shows them.
//! - **Bounded**: each exchange has the `--timeout` deadline; a reply line is at most 4096 bytes
//!   and a reply at most 200 lines; nothing the server sends can make the doctor panic.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mailgate_core::catalogue::Reason;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Diagnosis, DoctorError, Output, Report, Run, Step, diagnose};

/// How TLS is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Implicit TLS on port 465, STARTTLS elsewhere.
    Auto,
    /// STARTTLS after EHLO.
    Starttls,
    /// TLS from the first byte (SMTPS).
    Implicit,
    /// No TLS at all (to show what a server says to a plaintext client).
    None,
}

/// What `doctor smtp` probes.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port`.
    pub server: String,
    /// AUTH user name.
    pub user: Option<String>,
    /// AUTH password.
    pub password: Option<String>,
    /// An OAuth access token for AUTH XOAUTH2 (with `user`).
    pub xoauth2_token: Option<String>,
    /// `MAIL FROM`.
    pub from: Option<String>,
    /// `RCPT TO`, each.
    pub to: Vec<String>,
    /// TLS mode.
    pub tls: TlsMode,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// The EHLO name.
    pub ehlo: String,
    /// Deadline of each exchange.
    pub timeout: Duration,
}

/// Longest reply line read (RFC 5321 allows 512; servers send longer).
const MAX_LINE: usize = 4096;
/// Most lines in one reply.
const MAX_LINES: usize = 200;

const NO_STARTTLS_CAUSE: &str = "The server does not offer STARTTLS after EHLO: the password and every message would cross the network in plaintext, and clients that require TLS (most do) refuse to send.";
const NO_STARTTLS_REMEDY: &str = "Turn STARTTLS on on the server (Postfix: smtpd_tls_cert_file, smtpd_tls_key_file and smtpd_tls_security_level = may, or encrypt on the submission port), or use port 465 with implicit TLS (--tls implicit). If other machines see STARTTLS, something between this machine and the server (antivirus or firewall mail scanning) removes it.";
const XOAUTH2_CAUSE: &str = "The OAuth access token was refused: it expired (Google's last an hour), was revoked, was issued for another user than --user, or lacks the https://mail.google.com/ scope that SMTP needs.";
const XOAUTH2_REMEDY: &str = "Get a fresh access token for this user with the https://mail.google.com/ scope (`mailgate doctor oauth` checks the refresh token and client behind it).";
const XOAUTH2_CONFIRM: &str = "Google's token information endpoint (https://oauth2.googleapis.com/tokeninfo?access_token=<token>) shows the token's email, scope and expiry, or says it is invalid.";

/// Runs every probe.
pub async fn run(opts: &Options, output: Output) -> Result<Report, DoctorError> {
    let (host, port) = split_server(&opts.server)?;
    for a in opts.from.iter().chain(&opts.to) {
        if !a.is_empty() && !a.contains('@') {
            return Err(DoctorError::Usage(format!(
                "`{a}` is not an address (no @)"
            )));
        }
    }
    let secret = match (&opts.password, &opts.xoauth2_token) {
        (Some(_), Some(_)) => {
            return Err(DoctorError::Usage(
                "give --password or --xoauth2-token, not both".into(),
            ));
        }
        (Some(p), None) => Some(Secret::Password(p.clone())),
        (None, Some(t)) => Some(Secret::Token(t.clone())),
        (None, None) => None,
    };
    let creds = match (&opts.user, secret) {
        (Some(u), Some(s)) => Some((u.clone(), s)),
        (None, Some(_)) => {
            return Err(DoctorError::Usage(
                "--password and --xoauth2-token need --user".into(),
            ));
        }
        (Some(_), None) => {
            return Err(DoctorError::Usage(
                "--user needs --password or --xoauth2-token".into(),
            ));
        }
        (None, None) => None,
    };
    let ca = match &opts.ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| DoctorError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?),
        None => None,
    };
    let (tls_config, cert_check) = mailgate_tls::client_config_recording(ca.as_deref(), &[])
        .map_err(|e| DoctorError::Tls(e.to_string()))?;
    let implicit = match opts.tls {
        TlsMode::Implicit => true,
        TlsMode::Auto => port == 465,
        TlsMode::Starttls | TlsMode::None => false,
    };
    let mut run = Run::new("smtp", opts.server.clone(), output);
    if let Some((user, s)) = &creds {
        match s {
            Secret::Password(p) => {
                run.secret(p);
                run.secret(&B64.encode(format!("\0{user}\0{p}")));
                run.secret(&B64.encode(p));
            }
            Secret::Token(t) => {
                run.secret(t);
                run.secret(&B64.encode(format!("user={user}\x01auth=Bearer {t}\x01\x01")));
            }
        }
    }
    let mut p = Probe {
        run,
        opts,
        host,
        port,
        implicit,
        creds,
        tls_config,
        cert_check,
        conn: None,
        gone: None,
        tls: false,
        starttls_offered: false,
        ehlo: Vec::new(),
        authenticated: false,
        auth_failed: false,
    };
    p.probe().await;
    Ok(p.run.end())
}

/// `host:port`, `[v6]:port`.
fn split_server(server: &str) -> Result<(String, u16), DoctorError> {
    let usage = || {
        DoctorError::Usage(format!(
            "--server `{server}`: give host:port (e.g. smtp.example.com:587)"
        ))
    };
    let (host, port) = server.rsplit_once(':').ok_or_else(usage)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| usage())?;
    if host.is_empty() || port == 0 {
        return Err(usage());
    }
    Ok((host.to_owned(), port))
}

#[derive(Debug, Clone)]
enum Secret {
    Password(String),
    Token(String),
}

/// One SMTP reply.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    /// Every line as received (without CRLF).
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        self.lines.join("\n")
    }

    fn positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The text after the code of each line (EHLO keywords).
    fn bodies(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|l| l.get(4..).unwrap_or("").trim())
    }
}

/// Why an exchange did not get a reply.
#[derive(Debug)]
enum ConnError {
    Timeout,
    Closed,
    Io(String),
    Protocol(String),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Timeout => write!(f, "no answer within the timeout"),
            ConnError::Closed => write!(f, "the server closed the connection"),
            ConnError::Io(e) => write!(f, "connection error: {e}"),
            ConnError::Protocol(e) => write!(f, "not an SMTP reply: {e}"),
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A connection with its read buffer.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Conn {
    async fn read_some(&mut self) -> Result<(), ConnError> {
        let mut chunk = [0u8; 4096];
        let n = match &mut self.stream {
            Stream::Plain(s) => s.read(&mut chunk).await,
            Stream::Tls(s) => s.read(&mut chunk).await,
        }
        .map_err(|e| ConnError::Io(e.to_string()))?;
        if n == 0 {
            return Err(ConnError::Closed);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn line(&mut self) -> Result<String, ConnError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&raw);
                return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
            }
            if self.buf.len() > MAX_LINE {
                return Err(ConnError::Protocol(format!(
                    "a line longer than {MAX_LINE} bytes"
                )));
            }
            self.read_some().await?;
        }
    }

    async fn reply_inner(&mut self) -> Result<Reply, ConnError> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await?;
            let b = line.as_bytes();
            let code = (b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit))
                .then(|| line[..3].parse::<u16>().ok())
                .flatten()
                .ok_or_else(|| ConnError::Protocol(printable(&line)))?;
            let more = match b.get(3) {
                Some(b'-') => true,
                Some(b' ') | None => false,
                Some(_) => return Err(ConnError::Protocol(printable(&line))),
            };
            lines.push(printable(&line));
            if !more {
                return Ok(Reply { code, lines });
            }
            if lines.len() >= MAX_LINES {
                return Err(ConnError::Protocol(format!(
                    "a reply of more than {MAX_LINES} lines"
                )));
            }
        }
    }

    async fn reply(&mut self) -> Result<Reply, ConnError> {
        tokio::time::timeout(self.timeout, self.reply_inner())
            .await
            .unwrap_or(Err(ConnError::Timeout))
    }

    async fn send(&mut self, line: &str) -> Result<(), ConnError> {
        let data = format!("{line}\r\n");
        let w = async {
            match &mut self.stream {
                Stream::Plain(s) => {
                    s.write_all(data.as_bytes()).await?;
                    s.flush().await
                }
                Stream::Tls(s) => {
                    s.write_all(data.as_bytes()).await?;
                    s.flush().await
                }
            }
        };
        match tokio::time::timeout(self.timeout, w).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ConnError::Io(e.to_string())),
            Err(_) => Err(ConnError::Timeout),
        }
    }

    async fn command(&mut self, line: &str) -> Result<Reply, ConnError> {
        self.send(line).await?;
        self.reply().await
    }
}

/// What a refused certificate means, and what to do.
fn certificate_problem(e: &rustls::Error, host: &str, roots: &str) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(c) = e else {
        return format!("the certificate was refused ({e})");
    };
    match c {
        C::UnknownIssuer => format!(
            "the certificate is not issued by a CA in {roots} (self-signed, or a private CA): \
             clients refuse it. Install a certificate from a public CA on the server (e.g. \
             Let's Encrypt), or, for a private CA, give its certificate with --ca-file to check \
             the rest"
        ),
        C::NotValidForName | C::NotValidForNameContext { .. } => format!(
            "the certificate does not name {host}: connect with the name the certificate \
             carries (the server's documented host name), or get a certificate for {host}"
        ),
        C::Expired | C::ExpiredContext { .. } => {
            "the certificate has expired: renew it on the server".to_owned()
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "the certificate is not valid yet: check this machine's clock and the \
             certificate's dates"
                .to_owned()
        }
        _ if e.to_string().contains("CaUsedAsEndEntity") => {
            "the server presents a CA certificate as its own (typical of `openssl req -x509` \
             without a server profile): clients refuse it; make a server certificate \
             (basicConstraints CA:FALSE) for the host name"
                .to_owned()
        }
        _ => format!("the certificate was refused ({e})"),
    }
}

/// Control characters out (a hostile server's bytes are printed).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

struct Probe<'a> {
    run: Run,
    opts: &'a Options,
    host: String,
    port: u16,
    implicit: bool,
    creds: Option<(String, Secret)>,
    tls_config: Arc<rustls::ClientConfig>,
    cert_check: Arc<mailgate_tls::CertCheck>,
    conn: Option<Conn>,
    /// Why the connection is gone (the remaining steps are skipped with it).
    gone: Option<String>,
    tls: bool,
    starttls_offered: bool,
    /// The last EHLO's keywords (upper-cased first word and the rest).
    ehlo: Vec<String>,
    authenticated: bool,
    /// AUTH was tried and refused: MAIL FROM would only say the server needs AUTH.
    auth_failed: bool,
}

impl Probe<'_> {
    async fn probe(&mut self) {
        if !self.connect().await {
            return;
        }
        if self.implicit && !self.handshake(None).await {
            return;
        }
        if !self.banner().await {
            return;
        }
        self.ehlo_step("ehlo", "EHLO").await;
        if !self.implicit {
            self.starttls().await;
        }
        self.auth_mechanisms();
        self.auth().await;
        let mail_ok = self.mail().await;
        self.rcpts(mail_ok).await;
        self.rset_quit().await;
    }

    fn skip_gone(&mut self, id: &str, title: &str) -> bool {
        if let Some(why) = &self.gone {
            let note = format!("not probed: {why}");
            self.run.finish(Step::skip(id, title, note));
            return true;
        }
        false
    }

    /// An exchange on the connection; a dead connection is remembered.
    async fn exchange(&mut self, line: Option<&str>) -> Result<Reply, ConnError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(ConnError::Closed);
        };
        let r = match line {
            Some(l) => conn.command(l).await,
            None => conn.reply().await,
        };
        match &r {
            Ok(reply) if reply.code == 421 => {
                self.gone = Some(format!(
                    "the server closed the session ({})",
                    reply.lines.last().map_or("", String::as_str)
                ));
            }
            Err(e) => {
                self.gone = Some(e.to_string());
                self.conn = None;
            }
            Ok(_) => {}
        }
        r
    }

    /// A refusal as a step: `why`'s diagnosis preferring `prefer`, or said as it is.
    fn refused(&self, id: &str, title: &str, reply: &Reply, prefer: &[Reason], hint: &str) -> Step {
        let text = reply.text();
        let step = match diagnose(&text, prefer) {
            Some(d) => Step::fail(id, title, d),
            None if (400..500).contains(&reply.code) => Step::warn(
                id,
                title,
                format!(
                    "a temporary refusal ({}) that Mailgate's table does not know: {hint}; retry later, and if it persists ask the server's operator what it means",
                    reply.code
                ),
            ),
            None => Step::fail_unexplained(
                id,
                title,
                format!(
                    "a refusal ({}) that Mailgate's table does not know: {hint}; `mailgate why` lists the questions that narrow it down",
                    reply.code
                ),
            ),
        };
        reply.lines.iter().fold(step, |s, l| s.evidence(l.clone()))
    }

    /// What a plaintext connection makes likely first.
    fn prefer_transport(&self) -> Vec<Reason> {
        if self.tls {
            Vec::new()
        } else {
            vec![Reason::TlsRequired]
        }
    }

    async fn connect(&mut self) -> bool {
        let target = format!("{}:{}", self.host, self.port);
        self.run.begin(&format!("connecting to {target}"));
        let timeout = self.opts.timeout;
        let addrs = match tokio::time::timeout(
            timeout,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(a)) => a.collect::<Vec<_>>(),
            Ok(Err(e)) => {
                self.run.finish(Step::fail_unexplained(
                    "connect",
                    format!("resolve {}", self.host),
                    format!(
                        "the name does not resolve ({e}): check the host name (the server's \
                         documentation names it, e.g. smtp.gmail.com, smtp.office365.com) and \
                         this machine's DNS"
                    ),
                ));
                return false;
            }
            Err(_) => {
                self.run.finish(Step::fail_unexplained(
                    "connect",
                    format!("resolve {}", self.host),
                    format!(
                        "no DNS answer within {} s: check this machine's DNS resolver",
                        timeout.as_secs()
                    ),
                ));
                return false;
            }
        };
        let mut failures = Vec::new();
        for addr in &addrs {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    self.conn = Some(Conn {
                        stream: Stream::Plain(s),
                        buf: Vec::new(),
                        timeout,
                    });
                    let mut step = Step::pass("connect", format!("TCP connect to {target}"))
                        .evidence(format!("connected to {addr}"));
                    if addrs.len() > 1 {
                        step = step.evidence(format!(
                            "{} resolves to {}",
                            self.host,
                            addrs
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    for f in failures {
                        step = step.evidence(f);
                    }
                    self.run.finish(step);
                    return true;
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    failures.push(format!("{addr}: connection refused"));
                }
                Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                Err(_) => {
                    failures.push(format!("{addr}: no answer within {} s", timeout.as_secs()))
                }
            }
        }
        let refused = failures.iter().any(|f| f.ends_with("connection refused"));
        let note = if addrs.is_empty() {
            format!("{} resolves to no address", self.host)
        } else if refused {
            format!(
                "nothing listens on port {} there: check the port (587 submission with STARTTLS, 465 implicit TLS, 25 server-to-server) and that the server runs",
                self.port
            )
        } else {
            "the connection attempt got no answer: a firewall drops it (many ISPs and cloud providers block outgoing port 25: use 587 or 465), or the server is down".to_owned()
        };
        let mut step = Step::fail_unexplained("connect", format!("TCP connect to {target}"), note);
        for f in failures {
            step = step.evidence(f);
        }
        self.run.finish(step);
        false
    }

    /// The TLS handshake (implicit TLS, or after `220` to STARTTLS).
    async fn handshake(&mut self, starttls_reply: Option<&Reply>) -> bool {
        let id = "tls";
        let title = if starttls_reply.is_some() {
            "STARTTLS"
        } else {
            "TLS (implicit, from the first byte)"
        };
        self.run.begin("TLS handshake");
        let Some(conn) = self.conn.take() else {
            return false;
        };
        let Stream::Plain(tcp) = conn.stream else {
            self.conn = Some(conn);
            return false;
        };
        let mut step_evidence: Vec<String> =
            starttls_reply.map(|r| r.lines.clone()).unwrap_or_default();
        if !conn.buf.is_empty() {
            step_evidence.push(format!(
                "{} bytes after the STARTTLS reply were discarded (RFC 3207 §4.2)",
                conn.buf.len()
            ));
        }
        let name = match ServerName::try_from(self.host.clone()) {
            Ok(n) => n,
            Err(e) => {
                self.gone = Some("the TLS handshake could not start".into());
                self.run.finish(Step::fail_unexplained(
                    id,
                    title,
                    format!("`{}` is not a name TLS can check ({e})", self.host),
                ));
                return false;
            }
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls_config.clone());
        let timeout = self.opts.timeout;
        let res = tokio::time::timeout(timeout, connector.connect(name, tcp)).await;
        match res {
            Ok(Ok(tls)) => {
                let (_, session) = tls.get_ref();
                let version = mailgate_tls::tls_version(session.protocol_version())
                    .map_or("?", mailgate_core::engine::TlsVersion::number);
                let cipher = session
                    .negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_else(|| "?".into());
                let mut step = Step::pass(id, title);
                for e in step_evidence {
                    step = step.evidence(e);
                }
                step = step.evidence(format!("TLS {version}, cipher {cipher}"));
                self.run.finish(step);
                self.conn = Some(Conn {
                    stream: Stream::Tls(Box::new(tls)),
                    buf: Vec::new(),
                    timeout,
                });
                self.tls = true;
                self.certificate();
                true
            }
            Ok(Err(e)) => {
                let note = if starttls_reply.is_none() {
                    format!(
                        "the TLS handshake failed ({e}): if the port speaks plaintext first (587, 25), use --tls starttls"
                    )
                } else {
                    format!(
                        "the TLS handshake failed ({e}): the server's TLS set-up (Mailgate speaks TLS 1.2 and 1.3 only: a server offering only older versions fails here)"
                    )
                };
                self.gone = Some("the connection ended with the failed TLS handshake".into());
                let mut step = Step::fail_unexplained(id, title, note);
                for e in step_evidence {
                    step = step.evidence(e);
                }
                self.run.finish(step);
                false
            }
            Err(_) => {
                let note = if starttls_reply.is_none() {
                    format!(
                        "no TLS answer within {} s: the port may speak plaintext first (use --tls starttls)",
                        timeout.as_secs()
                    )
                } else {
                    format!("no TLS answer within {} s", timeout.as_secs())
                };
                self.gone = Some("the TLS handshake did not finish".into());
                let mut step = Step::fail_unexplained(id, title, note);
                for e in step_evidence {
                    step = step.evidence(e);
                }
                self.run.finish(step);
                false
            }
        }
    }

    /// The certificate check the handshake recorded.
    fn certificate(&mut self) {
        let id = "tls.certificate";
        let title = format!("certificate for {}", self.host);
        let Some(v) = self.cert_check.verdict() else {
            self.run.finish(Step::warn(
                id,
                title,
                "the handshake did not show a certificate check",
            ));
            return;
        };
        let chain = format!(
            "the server sent {} certificate{}",
            v.chain_len,
            if v.chain_len == 1 { "" } else { "s" }
        );
        let roots = if self.opts.ca_file.is_some() {
            "the public web PKI roots and --ca-file"
        } else {
            "the public web PKI roots"
        };
        let step = match v.result {
            Ok(()) => Step::pass(id, title).evidence(chain).evidence(format!(
                "the chain leads to a trusted root ({roots}) and names {}",
                self.host
            )),
            Err(e) => {
                let why = certificate_problem(&e, &self.host, roots);
                Step::fail_unexplained(id, title, why)
                    .evidence(chain)
                    .evidence(format!("verification: {e}"))
            }
        };
        self.run.finish(step);
    }

    async fn banner(&mut self) -> bool {
        self.run.begin("waiting for the banner");
        let title = "banner (220 greeting)";
        match self.exchange(None).await {
            Ok(r) if r.code == 220 => {
                let step = r
                    .lines
                    .iter()
                    .fold(Step::pass("banner", title), |s, l| s.evidence(l.clone()));
                self.run.finish(step);
                true
            }
            Ok(r) => {
                let step = self.refused(
                    "banner",
                    title,
                    &r,
                    &[Reason::LimitConcurrency, Reason::RelayIpNotAllowed],
                    "the server does not take mail from this client now (554: usually this IP address is blocklisted or not allowed; 421: busy)",
                );
                self.run
                    .finish(step.note_if_none("the server refused the session at connect"));
                let _ = self.exchange(Some("QUIT")).await;
                false
            }
            Err(e) => {
                let hint = if matches!(e, ConnError::Timeout) && !self.implicit {
                    " (a port that expects implicit TLS, such as 465, waits for the client: use --tls implicit)"
                } else {
                    ""
                };
                self.run.finish(Step::fail_unexplained(
                    "banner",
                    title,
                    format!("no SMTP greeting: {e}{hint}"),
                ));
                false
            }
        }
    }

    /// EHLO (falls back to HELO when EHLO is refused).
    async fn ehlo_step(&mut self, id: &str, title: &str) {
        if self.skip_gone(id, title) {
            return;
        }
        self.run.begin(title);
        let cmd = format!("EHLO {}", self.opts.ehlo);
        let title = format!("{title} {}", self.opts.ehlo);
        match self.exchange(Some(&cmd)).await {
            Ok(r) if r.code == 250 => {
                self.ehlo = r.bodies().skip(1).map(str::to_owned).collect();
                self.starttls_offered = self.has("STARTTLS");
                let step = r
                    .lines
                    .iter()
                    .fold(Step::pass(id, title), |s, l| s.evidence(l.clone()));
                let note = self.extensions();
                self.run.finish(step.note(note));
            }
            Ok(r) => {
                let prefer = self.prefer_transport();
                let step = self.refused(id, &title, &r, &prefer, "the server refuses EHLO");
                self.run.finish(step);
                self.ehlo.clear();
                if self.gone.is_none() {
                    let helo = format!("HELO {}", self.opts.ehlo);
                    let _ = self.exchange(Some(&helo)).await;
                }
            }
            Err(e) => {
                self.run.finish(Step::fail_unexplained(
                    id,
                    title,
                    format!("no answer to EHLO: {e}"),
                ));
            }
        }
    }

    /// The EHLO keyword's parameters, if offered.
    fn keyword(&self, name: &str) -> Option<String> {
        self.ehlo.iter().find_map(|k| {
            let mut it = k.splitn(2, [' ', '=']);
            let first = it.next()?;
            first
                .eq_ignore_ascii_case(name)
                .then(|| it.next().unwrap_or("").trim().to_owned())
        })
    }

    fn has(&self, name: &str) -> bool {
        self.keyword(name).is_some()
    }

    fn auth_mechs(&self) -> Vec<String> {
        self.keyword("AUTH")
            .map(|m| m.split_whitespace().map(str::to_ascii_uppercase).collect())
            .unwrap_or_default()
    }

    fn extensions(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let mechs = self.auth_mechs();
        let auth = if mechs.is_empty() {
            "not offered".to_owned()
        } else {
            mechs.join(" ")
        };
        let size = match self.keyword("SIZE") {
            Some(s) => match s.parse::<u64>() {
                Ok(0) => "no fixed limit".to_owned(),
                Ok(n) => format!("{n} bytes ({:.1} MiB)", n as f64 / 1_048_576.0),
                Err(_) => "offered".to_owned(),
            },
            None => "not advertised".to_owned(),
        };
        format!(
            "STARTTLS {}; AUTH {auth}; SIZE {size}; 8BITMIME {}; SMTPUTF8 {}; PIPELINING {}",
            yes(self.has("STARTTLS")),
            yes(self.has("8BITMIME")),
            yes(self.has("SMTPUTF8")),
            yes(self.has("PIPELINING")),
        )
    }

    async fn starttls(&mut self) {
        let id = "tls";
        if self.skip_gone(id, "STARTTLS") {
            self.run.finish(Step::skip(
                "ehlo.tls",
                "EHLO after TLS",
                "not probed: no connection",
            ));
            return;
        }
        if self.opts.tls == TlsMode::None {
            let offered = if self.starttls_offered {
                "the server offers STARTTLS"
            } else {
                "the server does not offer STARTTLS"
            };
            self.run.finish(Step::skip(
                id,
                "STARTTLS",
                format!("--tls none: the probes go on in plaintext ({offered})"),
            ));
            return;
        }
        if !self.starttls_offered {
            let confirm = format!(
                "the EHLO reply above lists no STARTTLS; `openssl s_client -starttls smtp -connect {}:{}` says so too (\"didn't find starttls in server response\")",
                self.host, self.port
            );
            let diagnosis = Diagnosis {
                confirm: Some(confirm),
                ..Diagnosis::new(Reason::TlsRequired, NO_STARTTLS_CAUSE, NO_STARTTLS_REMEDY)
            };
            let step = Step::fail(id, "STARTTLS offered", diagnosis);
            self.run
                .finish(step.note("the remaining probes go on in plaintext"));
            return;
        }
        self.run.begin("STARTTLS");
        match self.exchange(Some("STARTTLS")).await {
            Ok(r) if r.code == 220 => {
                if self.handshake(Some(&r)).await {
                    self.ehlo_step("ehlo.tls", "EHLO again over TLS").await;
                } else {
                    self.skip_gone("ehlo.tls", "EHLO again over TLS");
                }
            }
            Ok(r) => {
                let hint = "the server refuses to start TLS (454: its TLS set-up is broken, \
                            e.g. an unreadable certificate or key)";
                let step = self.refused(id, "STARTTLS", &r, &[], hint);
                self.run
                    .finish(step.note_if_none("the remaining probes go on in plaintext"));
            }
            Err(e) => {
                self.run.finish(Step::fail_unexplained(
                    id,
                    "STARTTLS",
                    format!("no answer to STARTTLS: {e}"),
                ));
            }
        }
    }

    fn auth_mechanisms(&mut self) {
        let id = "auth.mechanisms";
        let title = "AUTH mechanisms offered";
        if self.skip_gone(id, title) {
            return;
        }
        let mechs = self.auth_mechs();
        let usable: Vec<&str> = match &self.creds {
            Some((_, Secret::Token(_))) => vec!["XOAUTH2"],
            _ => vec!["PLAIN", "LOGIN"],
        };
        let step = if mechs.is_empty() {
            if !self.tls && self.starttls_offered {
                Step::skip(
                    id,
                    title,
                    "the server offers no AUTH on a plaintext connection (most offer it only after STARTTLS)",
                )
            } else if self.creds.is_some() {
                Step::fail_unexplained(
                    id,
                    title,
                    "the server offers no AUTH: this port may be for incoming mail (25) rather than submission (587 or 465), or authentication is off (Postfix: smtpd_sasl_auth_enable = yes)",
                )
            } else {
                Step::skip(
                    id,
                    title,
                    "the server offers no AUTH (and no credentials were given)",
                )
            }
        } else if self.creds.is_some() && !mechs.iter().any(|m| usable.contains(&m.as_str())) {
            Step::fail_unexplained(
                id,
                title,
                format!(
                    "the server offers none of {} (the mechanisms the doctor's credentials need)",
                    usable.join(", ")
                ),
            )
            .evidence(format!("AUTH {}", mechs.join(" ")))
        } else {
            Step::pass(id, title).evidence(format!("AUTH {}", mechs.join(" ")))
        };
        self.run.finish(step);
    }

    async fn auth(&mut self) {
        let id = "auth";
        let Some((user, secret)) = self.creds.clone() else {
            let note = "no --user with --password or --xoauth2-token given: MAIL FROM shows \
                        whether the server takes mail without AUTH";
            self.run.finish(Step::skip(id, "AUTH", note));
            return;
        };
        if self.skip_gone(id, "AUTH") {
            return;
        }
        let mechs = self.auth_mechs();
        let mech = match &secret {
            Secret::Token(_) => mechs.iter().any(|m| m == "XOAUTH2").then_some("XOAUTH2"),
            Secret::Password(_) => ["PLAIN", "LOGIN"]
                .into_iter()
                .find(|m| mechs.iter().any(|x| x == m)),
        };
        let Some(mech) = mech else {
            self.run.finish(Step::skip(
                id,
                "AUTH",
                "no usable mechanism offered (see above)",
            ));
            return;
        };
        if !self.tls && self.opts.tls != TlsMode::None {
            self.run.finish(Step::skip(
                id,
                format!("AUTH {mech} as {user}"),
                "not sending the credentials over a plaintext connection (--tls none sends them anyway)",
            ));
            return;
        }
        let title = format!("AUTH {mech} as {user}");
        self.run.begin(&title);
        let mut challenge = None;
        let res = match (&secret, mech) {
            (Secret::Password(p), "PLAIN") => {
                let payload = B64.encode(format!("\0{user}\0{p}"));
                self.exchange(Some(&format!("AUTH PLAIN {payload}"))).await
            }
            (Secret::Password(p), _) => self.login(&user, p).await,
            (Secret::Token(t), _) => {
                let payload = B64.encode(format!("user={user}\x01auth=Bearer {t}\x01\x01"));
                match self
                    .exchange(Some(&format!("AUTH XOAUTH2 {payload}")))
                    .await
                {
                    Ok(r) if r.code == 334 => {
                        // Google's failure challenge (JSON, base64); the client answers with an
                        // empty line and gets the final reply.
                        let b = r.bodies().next().unwrap_or("").to_owned();
                        let mut shown = r.lines.clone();
                        if let Ok(d) = B64.decode(b.as_bytes()) {
                            shown.push(format!(
                                "(the challenge, decoded: {})",
                                printable(&String::from_utf8_lossy(&d))
                            ));
                        }
                        challenge = Some(shown);
                        self.exchange(Some("")).await
                    }
                    other => other,
                }
            }
        };
        let step = match res {
            Ok(r) if r.code == 235 => {
                self.authenticated = true;
                r.lines
                    .iter()
                    .fold(Step::pass(id, title), |s, l| s.evidence(l.clone()))
            }
            Ok(r) => {
                self.auth_failed = true;
                let mut prefer = self.prefer_transport();
                prefer.extend([Reason::AuthInvalid, Reason::AuthLocked]);
                let mut step = self.refused(
                    id,
                    &title,
                    &r,
                    &prefer,
                    "the server refuses the credentials",
                );
                if let Some(mut c) = challenge {
                    c.append(&mut step.evidence);
                    step.evidence = c;
                }
                if mech == "XOAUTH2"
                    && step
                        .diagnosis
                        .as_ref()
                        .is_some_and(|d| d.code == Reason::AuthInvalid)
                {
                    // The table's causes for a 535 speak of passwords.
                    step.diagnosis = Some(Diagnosis {
                        confirm: Some(XOAUTH2_CONFIRM.to_owned()),
                        ..Diagnosis::new(Reason::AuthInvalid, XOAUTH2_CAUSE, XOAUTH2_REMEDY)
                    });
                }
                step
            }
            Err(e) => {
                self.auth_failed = true;
                Step::fail_unexplained(id, title, format!("no answer to AUTH: {e}"))
            }
        };
        self.run.finish(step);
    }

    /// AUTH LOGIN: user name and password each answering a 334.
    async fn login(&mut self, user: &str, password: &str) -> Result<Reply, ConnError> {
        let r = self.exchange(Some("AUTH LOGIN")).await?;
        if r.code != 334 {
            return Ok(r);
        }
        let r = self.exchange(Some(&B64.encode(user))).await?;
        if r.code != 334 {
            return Ok(r);
        }
        self.exchange(Some(&B64.encode(password))).await
    }

    async fn mail(&mut self) -> bool {
        let id = "mail";
        let Some(from) = self.opts.from.clone() else {
            self.run
                .finish(Step::skip(id, "MAIL FROM", "no --from given"));
            return false;
        };
        let title = format!("MAIL FROM:<{from}>");
        if self.skip_gone(id, &title) {
            return false;
        }
        if self.auth_failed {
            self.run.finish(Step::skip(
                id,
                title,
                "not probed: AUTH failed, and unauthenticated MAIL FROM would only show that the server wants AUTH",
            ));
            return false;
        }
        self.run.begin(&title);
        match self.exchange(Some(&title)).await {
            Ok(r) if r.positive() => {
                let step = r
                    .lines
                    .iter()
                    .fold(Step::pass(id, title), |s, l| s.evidence(l.clone()));
                self.run.finish(step);
                true
            }
            Ok(r) => {
                let mut prefer = self.prefer_transport();
                if self.authenticated {
                    prefer.extend([
                        Reason::SenderNotOwned,
                        Reason::SenderUnverified,
                        Reason::ImpersonationDenied,
                    ]);
                } else {
                    prefer.extend([Reason::AuthMissing, Reason::RelayIpNotAllowed]);
                }
                let step = self.refused(id, &title, &r, &prefer, "the server refuses this sender");
                self.run.finish(step);
                false
            }
            Err(e) => {
                self.run.finish(Step::fail_unexplained(
                    id,
                    title,
                    format!("no answer to MAIL FROM: {e}"),
                ));
                false
            }
        }
    }

    async fn rcpts(&mut self, mail_ok: bool) {
        if self.opts.to.is_empty() {
            self.run
                .finish(Step::skip("rcpt", "RCPT TO", "no --to given"));
            return;
        }
        for to in self.opts.to.clone() {
            let id = format!("rcpt:{to}");
            let title = format!("RCPT TO:<{to}>");
            if self.skip_gone(&id, &title) {
                continue;
            }
            if !mail_ok {
                let why = if self.opts.from.is_none() {
                    "not probed: RCPT TO needs --from (MAIL FROM comes first)"
                } else if self.auth_failed {
                    "not probed: AUTH failed"
                } else {
                    "not probed: MAIL FROM was refused"
                };
                self.run.finish(Step::skip(&id, title, why));
                continue;
            }
            self.run.begin(&title);
            match self.exchange(Some(&title)).await {
                Ok(r) if r.positive() => {
                    let step = r
                        .lines
                        .iter()
                        .fold(Step::pass(&id, title), |s, l| s.evidence(l.clone()));
                    self.run.finish(step);
                }
                Ok(r) => {
                    let mut prefer = self.prefer_transport();
                    if !self.authenticated {
                        prefer.push(Reason::AuthMissing);
                    }
                    // Postfix reports a MAIL FROM restriction at RCPT TO (smtpd_delay_reject).
                    prefer.extend([
                        Reason::PolicyRecipientRestricted,
                        Reason::SenderNotOwned,
                        Reason::SenderUnverified,
                    ]);
                    let step = self.refused(
                        &id,
                        &title,
                        &r,
                        &prefer,
                        "the server refuses this recipient",
                    );
                    self.run.finish(step);
                }
                Err(e) => {
                    self.run.finish(Step::fail_unexplained(
                        &id,
                        title,
                        format!("no answer to RCPT TO: {e}"),
                    ));
                }
            }
        }
    }

    async fn rset_quit(&mut self) {
        for (id, cmd, want) in [("rset", "RSET", 250), ("quit", "QUIT", 221)] {
            if self.skip_gone(id, cmd) {
                continue;
            }
            let note = if id == "rset" {
                "the transaction is dropped: nothing was sent (no DATA)"
            } else {
                "session closed"
            };
            let step = match self.exchange(Some(cmd)).await {
                Ok(r) => {
                    let step = if r.code == want {
                        Step::pass(id, cmd).note(note)
                    } else {
                        Step::warn(id, cmd, format!("expected {want}"))
                    };
                    r.lines.iter().fold(step, |s, l| s.evidence(l.clone()))
                }
                // A server may close at once after QUIT's reply or without one.
                Err(ConnError::Closed) if id == "quit" => {
                    Step::pass(id, cmd).note("the server closed the connection")
                }
                Err(e) => Step::warn(id, cmd, e.to_string()),
            };
            self.run.finish(step);
        }
        self.conn = None;
    }
}

trait NoteIfNone {
    fn note_if_none(self, note: &str) -> Self;
}

impl NoteIfNone for Step {
    fn note_if_none(self, note: &str) -> Self {
        if self.note.is_none() {
            self.note(note)
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;

    #[test]
    fn server_argument_forms() {
        assert_eq!(
            split_server("smtp.example.com:587").unwrap(),
            ("smtp.example.com".into(), 587)
        );
        assert_eq!(split_server("[::1]:25").unwrap(), ("::1".into(), 25));
        assert!(split_server("smtp.example.com").is_err());
        assert!(split_server(":25").is_err());
        assert!(split_server("h:0").is_err());
        assert!(split_server("h:99999").is_err());
    }

    /// A scripted server on a loopback port: for each line it reads, the first matching
    /// (prefix, reply) answers; it sends `greeting` first. Returns the address and what the
    /// client sent.
    async fn scripted(
        greeting: &'static [u8],
        script: &'static [(&'static str, &'static str)],
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = tokio::io::BufReader::new(r);
            let mut seen = Vec::new();
            w.write_all(greeting).await.unwrap();
            loop {
                let mut line = String::new();
                use tokio::io::AsyncBufReadExt;
                match r.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = line.trim_end().to_owned();
                let reply = script
                    .iter()
                    .find(|(p, _)| line.starts_with(p))
                    .map_or("500 5.5.2 what?\r\n", |(_, r)| r);
                seen.push(line.clone());
                if w.write_all(reply.as_bytes()).await.is_err() || line == "QUIT" {
                    break;
                }
            }
            seen
        });
        (addr, task)
    }

    fn opts(server: &str) -> Options {
        Options {
            server: server.to_owned(),
            user: Some("alice@example.com".into()),
            password: Some("s3cret-password".into()),
            xoauth2_token: None,
            from: Some("alice@example.com".into()),
            to: vec!["bob@example.org".into()],
            tls: TlsMode::Auto,
            ca_file: None,
            ehlo: "doctor.test".into(),
            timeout: Duration::from_secs(5),
        }
    }

    fn status(r: &Report, id: &str) -> Status {
        r.steps
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("no step {id}: {}", r.render(false)))
            .status
    }

    #[tokio::test]
    async fn a_server_without_starttls_is_tls_required_and_gets_no_password() {
        let (addr, task) = scripted(
            b"220 old.test ESMTP\r\n",
            &[
                (
                    "EHLO",
                    "250-old.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
                ),
                ("MAIL", "250 2.1.0 Ok\r\n"),
                (
                    "RCPT",
                    "554 5.7.1 <bob@example.org>: Relay access denied\r\n",
                ),
                ("RSET", "250 2.0.0 Ok\r\n"),
                ("QUIT", "221 2.0.0 Bye\r\n"),
            ],
        )
        .await;
        let r = run(&opts(&addr), Output::default()).await.unwrap();
        let seen = task.await.unwrap();
        assert!(!seen.iter().any(|l| l.starts_with("AUTH")), "{seen:?}");
        assert_eq!(status(&r, "tls"), Status::Fail);
        assert_eq!(status(&r, "auth"), Status::Skip);
        assert_eq!(
            r.codes(),
            vec![Reason::TlsRequired, Reason::AuthMissing],
            "{}",
            r.render(false)
        );
        assert_eq!(seen.last().map(String::as_str), Some("QUIT"));
    }

    #[tokio::test]
    async fn hostile_replies_are_findings_not_panics() {
        // A greeting line longer than any reply may be.
        static LONG: [u8; 9000] = [b'2'; 9000];
        let (addr, _task) = scripted(&LONG, &[]).await;
        let r = run(&opts(&addr), Output::default()).await.unwrap();
        assert_eq!(r.exit_code(), 3);
        let banner = r.steps.iter().find(|s| s.id == "banner").unwrap();
        assert!(
            banner
                .note
                .as_deref()
                .unwrap_or("")
                .contains("longer than 4096"),
            "{}",
            r.render(false)
        );
        // Not SMTP at all, with control characters.
        let (addr, _task) = scripted(b"HTTP/1.1 400 Bad\x1b[2J\r\n", &[]).await;
        let r = run(&opts(&addr), Output::default()).await.unwrap();
        assert_eq!(r.exit_code(), 3);
        assert!(!r.render(false).contains('\x1b'), "{}", r.render(false));
        // A 554 greeting: the refusal, then QUIT, nothing else.
        let (addr, task) = scripted(
            b"554 5.7.1 Service unavailable; client host blocked\r\n",
            &[("QUIT", "221 Bye\r\n")],
        )
        .await;
        let r = run(&opts(&addr), Output::default()).await.unwrap();
        assert_eq!(r.exit_code(), 3);
        assert_eq!(status(&r, "banner"), Status::Fail);
        assert_eq!(task.await.unwrap(), ["QUIT"]);
    }

    #[test]
    fn control_characters_are_not_printed() {
        assert_eq!(printable("250 ok\x1b[31m\x07"), "250 ok?[31m?");
    }
}
