//! The SMTP session: a state machine that takes the client's bytes and produces the server's
//! reply bytes. It performs no network I/O (the driver in [`crate::server`] reads and writes the
//! socket and does the TLS handshake), so tests feed it bytes and read its replies.
//!
//! Parsing is smtp-proto's: [`RequestReceiver`] for commands (lines capped at 4096 bytes),
//! [`DataReceiver`] for DATA (dot-unstuffing), [`BdatReceiver`] for CHUNKING. Every decision is
//! the gateway's, asked at the moment its facts exist:
//!
//! | moment | facts added | typical refusals |
//! |---|---|---|
//! | AUTH | credential (password, API key, OAuth token) | `auth.*`, `key.*`, `scope.insufficient` |
//! | MAIL FROM | envelope sender, declared SIZE | `tls.required`, `auth.missing`, `relay.ip_not_allowed`, `account.*`, `sender.*` |
//! | RCPT TO | recipients so far | `policy.recipient_restricted`, `policy.too_many_recipients`, `limit.*` |
//! | end of DATA / BDAT LAST | header From/Sender, validity, size | `sender.*` (header), `message.*`, `limit.*` |
//!
//! Input handling is total: no input panics, and buffers are bounded (command lines by
//! smtp-proto, AUTH lines at 4096 bytes, message bodies at `Limits::max_message_bytes` + 1, after
//! which the rest of the body is counted and discarded). Bodies are also reserved, chunk by
//! chunk, from the process-wide DATA memory budget (`452 4.3.1` when it is spent), and the
//! session counts errors and commands the way Postfix's smtpd does (`Limits`): past the soft
//! error limit each error reply is delayed ([`Session::take_delay`], the driver sleeps), at the
//! hard limit the session is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailgate_core::catalogue::{Reason, RenderArgs};
use mailgate_core::engine::{
    Action, Body, Credential, CredentialState, Door, Originator, SendAttempt, TlsVersion, Transport,
};
use mailgate_gateway::budget::{MemoryBudget, MemoryLease};
use mailgate_gateway::{Accepted, Decided, Gateway, Message};
use mailgate_store::TokenStore;
use smtp_proto::request::receiver::{
    BdatReceiver, DataReceiver, DummyDataReceiver, LineReceiver, RequestReceiver,
};
use smtp_proto::{Error as ProtoError, Request};

use crate::reply;

/// The reply when the store cannot write (catalogue `store.unavailable`): nothing was accepted.
fn store_unavailable() -> String {
    reply::fault_text(
        Reason::StoreUnavailable,
        "Temporary system problem. Try again later.",
    )
}
use crate::sasl::{self, Mechanism, SaslError};

/// Which listener a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Submission (587-style): STARTTLS required before AUTH and MAIL.
    Submission,
    /// Implicit TLS (465-style).
    Smtps,
    /// Workspace-style relay: IP allowlist and/or AUTH, as the directory's `smtp_relay` says.
    Relay,
}

impl Listener {
    /// The engine's door.
    pub fn door(self) -> Door {
        match self {
            Listener::Relay => Door::SmtpRelay,
            _ => Door::Smtp,
        }
    }

    /// The door name decisions are kept under.
    pub fn door_name(self) -> &'static str {
        match self {
            Listener::Relay => "smtp_relay",
            _ => "smtp",
        }
    }

    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Listener::Submission => "submission",
            Listener::Smtps => "smtps",
            Listener::Relay => "relay",
        }
    }

    /// Whether the listener itself requires TLS (the relay's TLS rule is `smtp_relay.require_tls`).
    fn requires_tls(self) -> bool {
        self != Listener::Relay
    }
}

/// Protocol limits of every session. Connection caps, the TLS handshake timeout and the
/// process-wide DATA memory budget are the gateway's (`Gateway::budget().limits()`), shared with
/// the HTTP doors.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message accepted on the wire (advertised as SIZE); the directory's
    /// `limits.max_message_bytes` may be lower per user.
    pub max_message_bytes: usize,
    /// Most RCPT TO per transaction, whatever the directory says (memory bound). Each RCPT past
    /// it is answered `452 4.5.3` and counts as an error.
    pub max_recipients: usize,
    /// Most commands per connection.
    pub max_commands: u32,
    /// Most commands while no mail transaction is open (none started yet, or since the last
    /// one ended); MAIL FROM accepted starts the count again. Beyond: `421 4.7.0` and closed.
    pub max_commands_without_mail: u32,
    /// Errors (replies 4xx/5xx: refusals, unknown or malformed commands, RCPTs past the limit)
    /// after which every further error reply is delayed by `error_sleep` (Postfix's
    /// `smtpd_soft_error_limit`).
    pub soft_error_limit: u32,
    /// Errors after which the session gets `421 4.7.0 ... Error: too many errors` and is closed
    /// (Postfix's `smtpd_hard_error_limit`). A stored message starts the count again.
    pub hard_error_limit: u32,
    /// Delay of each error reply from the soft limit on (Postfix's `smtpd_error_sleep_time`);
    /// the driver sleeps asynchronously, and at most `(hard - soft) * error_sleep` per session.
    pub error_sleep: Duration,
    /// Most AUTH attempts per connection.
    pub max_auth_attempts: u32,
    /// Idle time before the server closes a trusted connection (authenticated, or one that has
    /// started a mail transaction).
    pub idle: Duration,
    /// Idle time before the server closes a connection that is not trusted yet (greeting to
    /// first command included).
    pub idle_untrusted: Duration,
    /// `idle_untrusted` while the listener holds `pressure_percent` % of its connections or
    /// more (Postfix's stress-dependent `smtpd_timeout`).
    pub idle_under_pressure: Duration,
    /// Share of the listener's connection slots from which it is under pressure.
    pub pressure_percent: usize,
    /// Longest time a connection may stay untrusted, whatever it sends (slow senders that keep
    /// an idle timer from firing with a byte now and then).
    pub untrusted_lifetime: Duration,
    /// What a bare LF or bare CR in a message does (`[smtp] bare_newline`).
    pub bare_newline: BareNewline,
}

/// What the SMTP doors do with a line of a message (DATA or BDAT) that ends in a bare LF or a
/// bare CR instead of CRLF (`[smtp] bare_newline` in mailgate.toml). Either way the end of DATA
/// is only CR LF . CR LF, and a bare LF or CR is never stored or relayed. This is what Postfix
/// settled on after the SMTP smuggling disclosures (CVE-2023-51764,
/// `smtpd_forbid_bare_newline`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BareNewline {
    /// `521 5.5.2 Error: bare <LF> received [mailgate: message.bare_newline] ...` as soon as one
    /// arrives, and the connection is closed, so nothing after it is read as a command (Postfix's
    /// `reject` with its disconnecting code 521). The default.
    #[default]
    Reject,
    /// Each bare LF or CR becomes CRLF, as if the client had sent CRLF (Postfix's `normalize`),
    /// and a dot opening a line after one is a stuffing dot, removed as after CRLF (DATA only).
    Normalize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 36_700_160,
            max_recipients: 1000,
            max_commands: 10_000,
            max_commands_without_mail: 100,
            soft_error_limit: 10,
            hard_error_limit: 20,
            error_sleep: Duration::from_secs(1),
            max_auth_attempts: 10,
            idle: Duration::from_secs(300),
            idle_untrusted: Duration::from_secs(30),
            idle_under_pressure: Duration::from_secs(10),
            pressure_percent: 80,
            untrusted_lifetime: Duration::from_secs(120),
            bare_newline: BareNewline::Reject,
        }
    }
}

/// What every session of a gateway shares.
pub struct SmtpContext {
    /// The gateway (decisions, acceptance).
    pub gateway: Arc<Gateway>,
    /// OAuth tokens (XOAUTH2, OAUTHBEARER).
    pub tokens: Arc<dyn TokenStore>,
    /// Name in the greeting and EHLO.
    pub hostname: String,
    /// Protocol limits.
    pub limits: Limits,
    /// Development only: offer AUTH on plaintext connections. Not wired to the config yet
    /// (`mailgate serve` always sets `false`); whoever wires it must allow it on loopback
    /// listeners only and say so in the banner and the log.
    pub auth_without_tls: bool,
}

/// What the driver must do after [`Session::ingest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write the output and read more.
    Continue,
    /// Write the output (`220 2.0.0 Ready to start TLS`), then hand the socket to TLS. Input
    /// after STARTTLS was discarded (RFC 3207 §4.2).
    StartTls,
    /// Write the output and close.
    Close,
}

enum AuthWait {
    Plain,
    LoginUser,
    LoginPassword {
        login: String,
    },
    Bearer(Mechanism),
    /// A failure challenge was sent (XOAUTH2 / OAUTHBEARER); the final reply follows the
    /// client's (empty) answer.
    Challenge {
        reply: String,
    },
}

/// After a discarded body: what to answer.
enum AfterDiscard {
    /// The message is over the size limit (end of DATA, or a BDAT chunk).
    TooLarge,
    /// A BDAT chunk outside a valid transaction: this reply.
    Reply(String),
    /// The process's DATA memory budget was spent: `452 4.3.1`, transaction over.
    NoStorage,
}

enum State {
    Command,
    /// The rest of an over-long command line is dropped.
    SkipLine,
    Data(DataReceiver),
    Bdat {
        rx: BdatReceiver,
        last: bool,
        /// Bytes of the chunk still to come.
        left: usize,
    },
    Discard {
        rx: DummyDataReceiver,
        then: AfterDiscard,
    },
    Auth {
        wait: AuthWait,
        line: LineReceiver<()>,
    },
}

#[derive(Default)]
struct Transaction {
    from: Option<String>,
    rcpts: Vec<String>,
    declared_size: Option<u64>,
    /// The message as received; its capacity never exceeds `lease` (see
    /// [`Session::make_room`]).
    body: BodyBuf,
    /// The bytes `body` holds from the process's DATA memory budget.
    lease: Option<MemoryLease>,
    /// Bytes of a body too large to keep (counted, not stored).
    oversize: Option<u64>,
    bdat: bool,
    /// Bare LF / CR seen in the body as it arrived.
    newlines: NewlineScan,
}

/// The body as it arrives on the wire, watched for a bare LF or a bare CR. A CR that ends one
/// read waits for the next byte.
#[derive(Default)]
struct NewlineScan {
    /// The last byte scanned was a CR.
    cr: bool,
    /// The first bare newline of the message (`<LF>` or `<CR>`).
    bare: Option<&'static str>,
}

const BARE_LF: &str = "<LF>";
const BARE_CR: &str = "<CR>";

impl NewlineScan {
    /// Scans the next bytes of the message; the first bare newline among them, if any.
    fn scan(&mut self, bytes: &[u8]) -> Option<&'static str> {
        let mut first = None;
        let mut rest = bytes;
        loop {
            if self.cr {
                match rest.first() {
                    None => break,
                    Some(b'\n') => {
                        self.cr = false;
                        rest = rest.get(1..).unwrap_or_default();
                        continue;
                    }
                    Some(_) => {
                        self.cr = false;
                        first.get_or_insert(BARE_CR);
                    }
                }
            }
            let Some(p) = rest.iter().position(|b| matches!(b, b'\r' | b'\n')) else {
                break;
            };
            if rest.get(p) == Some(&b'\n') {
                first.get_or_insert(BARE_LF);
            } else {
                self.cr = true;
            }
            rest = rest.get(p + 1..).unwrap_or_default();
        }
        if self.bare.is_none() {
            self.bare = first;
        }
        first
    }

    /// The message is complete: a CR still waiting is bare.
    fn finish(&mut self) -> Option<&'static str> {
        if std::mem::take(&mut self.cr) {
            self.bare.get_or_insert(BARE_CR);
            Some(BARE_CR)
        } else {
            None
        }
    }
}

/// The body with every bare LF and bare CR made CRLF (`bare_newline = normalize`). With
/// `unstuff` (DATA), a dot opening a line after a bare newline is removed: smtp-proto removes
/// stuffing dots only after CRLF, and a client that ends lines with LF stuffed its own lines.
fn normalize_newlines(raw: &[u8], unstuff: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(normalized_len(raw));
    let mut rest = raw;
    while let Some(p) = rest.iter().position(|b| matches!(b, b'\r' | b'\n')) {
        out.extend_from_slice(rest.get(..p).unwrap_or_default());
        let crlf = rest.get(p..p + 2) == Some(b"\r\n");
        out.extend_from_slice(b"\r\n");
        rest = rest.get(p + if crlf { 2 } else { 1 }..).unwrap_or_default();
        if !crlf && unstuff && rest.first() == Some(&b'.') {
            rest = rest.get(1..).unwrap_or_default();
        }
    }
    out.extend_from_slice(rest);
    out
}

/// The length of [`normalize_newlines`]' result at most (one byte more per bare newline).
fn normalized_len(raw: &[u8]) -> usize {
    let mut n = raw.len();
    let mut prev = 0u8;
    for (i, b) in raw.iter().enumerate() {
        let bare = match b {
            b'\n' => prev != b'\r',
            b'\r' => raw.get(i + 1) != Some(&b'\n'),
            _ => false,
        };
        n += usize::from(bare);
        prev = *b;
    }
    n
}

/// A message body as it arrives, in chunks that never move once allocated. One growing buffer
/// would be copied at every growth (for a 30 MB message, some 60 MB of copying on the async
/// workers, with the old and the new buffer alive at once); chunks are reserved from the DATA
/// memory budget one at a time and copied once, into one buffer, when the message is complete.
#[derive(Default)]
struct BodyBuf {
    full: Vec<Vec<u8>>,
    /// The chunk being written; its spare capacity is made by [`Session::make_room`].
    tail: Vec<u8>,
}

impl BodyBuf {
    /// The smallest chunk; chunks double up to [`BodyBuf::MAX_CHUNK`].
    const FIRST_CHUNK: usize = 64 * 1024;
    const MAX_CHUNK: usize = 1024 * 1024;

    fn len(&self) -> usize {
        self.full.iter().map(Vec::len).sum::<usize>() + self.tail.len()
    }

    fn capacity(&self) -> usize {
        self.full.iter().map(Vec::capacity).sum::<usize>() + self.tail.capacity()
    }

    /// The last byte of the body.
    fn last(&self) -> Option<u8> {
        self.tail
            .last()
            .or_else(|| self.full.last().and_then(|c| c.last()))
            .copied()
    }

    fn spare(&self) -> usize {
        self.tail.capacity() - self.tail.len()
    }

    /// The size of the next chunk for `more` bytes (one more: see [`BodyBuf::start_chunk`]),
    /// the body's whole capacity staying within `ceiling` when `more` allows.
    fn next_chunk(&self, more: usize, ceiling: usize) -> usize {
        self.tail
            .capacity()
            .saturating_mul(2)
            .clamp(Self::FIRST_CHUNK, Self::MAX_CHUNK)
            .min(ceiling.saturating_sub(self.capacity()))
            .max(more.saturating_add(1))
    }

    /// Starts a chunk of `capacity` bytes. A CR ending the last chunk moves to the new one:
    /// the end of DATA (CR LF . CR LF) removes the CR it wrote last.
    fn start_chunk(&mut self, capacity: usize) {
        let mut next = Vec::with_capacity(capacity);
        if self.tail.last() == Some(&b'\r') {
            self.tail.pop();
            next.push(b'\r');
        }
        let done = std::mem::replace(&mut self.tail, next);
        if !done.is_empty() {
            self.full.push(done);
        }
    }

    /// The body in one buffer (a copy only when it spans chunks).
    fn into_vec(self) -> Vec<u8> {
        if self.full.is_empty() {
            return self.tail;
        }
        let mut out = Vec::with_capacity(self.len());
        for chunk in self.full {
            out.extend_from_slice(&chunk);
        }
        out.extend_from_slice(&self.tail);
        out
    }
}

/// One SMTP session.
pub struct Session {
    ctx: Arc<SmtpContext>,
    listener: Listener,
    peer: SocketAddr,
    tls: Option<TlsVersion>,
    tls_available: bool,
    state: State,
    requests: RequestReceiver,
    out: Vec<u8>,
    helo: Option<String>,
    credential: Credential,
    tx: Transaction,
    commands: u32,
    /// Commands since the last mail transaction started (or since the greeting).
    commands_without_mail: u32,
    /// Error replies since the greeting or the last stored message.
    errors: u32,
    /// How long the driver must wait before writing the output (error replies past the soft
    /// error limit).
    delay: Duration,
    /// A mail transaction was started on this session (MAIL FROM accepted).
    started_mail: bool,
    auth_attempts: u32,
    closed: bool,
}

/// Longest command line (smtp-proto's own cap for buffered lines).
const MAX_LINE: usize = smtp_proto::request::receiver::MAX_LINE_LENGTH;

fn line_receiver() -> LineReceiver<()> {
    LineReceiver::new(())
}

impl Session {
    /// A session for a client at `peer`. `tls`: the version when TLS is already up (implicit
    /// TLS); `tls_available`: whether STARTTLS can be offered.
    pub fn new(
        ctx: Arc<SmtpContext>,
        listener: Listener,
        peer: SocketAddr,
        tls: Option<TlsVersion>,
        tls_available: bool,
    ) -> Session {
        Session {
            ctx,
            listener,
            peer,
            tls,
            tls_available,
            state: State::Command,
            requests: RequestReceiver::default(),
            out: Vec::with_capacity(512),
            helo: None,
            credential: Credential::None,
            tx: Transaction::default(),
            commands: 0,
            commands_without_mail: 0,
            errors: 0,
            delay: Duration::ZERO,
            started_mail: false,
            auth_attempts: 0,
            closed: false,
        }
    }

    /// Writes the greeting.
    pub fn greeting(&mut self) {
        let host = self.ctx.hostname.clone();
        self.out
            .extend_from_slice(format!("220 {host} ESMTP Mailgate ready\r\n").as_bytes());
    }

    /// The reply bytes produced so far (drains them).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// True once the session wants the connection closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The negotiated TLS version.
    pub fn tls(&self) -> Option<TlsVersion> {
        self.tls
    }

    /// How long the driver must wait before writing the output (drains it): one
    /// `Limits::error_sleep` per error reply from the soft error limit on. The driver sleeps
    /// asynchronously (other connections go on) and reads nothing meanwhile.
    pub fn take_delay(&mut self) -> Duration {
        std::mem::take(&mut self.delay)
    }

    /// Whether the client has authenticated or started a mail transaction (the relay's IP
    /// trust is decided at MAIL FROM). Untrusted sessions get the short idle timeouts.
    pub fn trusted(&self) -> bool {
        self.started_mail || !matches!(self.credential, Credential::None)
    }

    /// The client was idle too long: writes the 421 and closes.
    pub fn timed_out(&mut self) {
        let host = self.ctx.hostname.clone();
        self.push(&reply::line(
            421,
            "4.4.2",
            &format!("{host} Error: timeout exceeded"),
        ));
        self.closed = true;
    }

    /// TLS is up after STARTTLS: everything learnt before is forgotten (RFC 3207 §4.2).
    pub fn tls_started(&mut self, version: TlsVersion) {
        self.tls = Some(version);
        self.helo = None;
        self.credential = Credential::None;
        self.tx = Transaction::default();
        self.requests = RequestReceiver::default();
        self.state = State::Command;
    }

    /// Writes a reply; every error reply (4xx/5xx but the closing 421) counts against the
    /// error limits.
    fn push(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
        let b = s.as_bytes();
        if matches!(b.first(), Some(b'4' | b'5')) && !b.starts_with(b"421") {
            self.error();
        }
    }

    /// One more error: past the soft limit the reply waits `error_sleep`; at the hard limit
    /// the session is closed with `421 4.7.0` (Postfix's `smtpd_soft_error_limit`,
    /// `smtpd_error_sleep_time`, `smtpd_hard_error_limit`).
    fn error(&mut self) {
        if self.closed {
            return;
        }
        self.errors = self.errors.saturating_add(1);
        let limits = self.ctx.limits;
        if self.errors >= limits.hard_error_limit {
            if self
                .ctx
                .gateway
                .budget()
                .log_limited("smtp.too_many_errors")
            {
                tracing::info!(
                    listener = self.listener.name(),
                    client = %self.peer.ip(),
                    errors = self.errors,
                    "SMTP connection closed: too many errors (rate-limited log)"
                );
            }
            let host = self.ctx.hostname.clone();
            self.push(&reply::line(
                421,
                "4.7.0",
                &format!("{host} Error: too many errors"),
            ));
            self.closed = true;
        } else if self.errors >= limits.soft_error_limit {
            self.delay = self.delay.saturating_add(limits.error_sleep);
        }
    }

    fn reply(&mut self, code: u16, enhanced: &str, text: &str) {
        self.push(&reply::line(code, enhanced, text));
    }

    fn close_with(&mut self, code: u16, enhanced: &str, text: &str) -> Step {
        self.reply(code, enhanced, text);
        self.closed = true;
        Step::Close
    }

    /// An error reply (counted by [`Session::push`]); `Close` when it reached the hard limit.
    fn bad_command(&mut self, code: u16, enhanced: &str, text: &str) -> Step {
        self.reply(code, enhanced, text);
        if self.closed {
            Step::Close
        } else {
            Step::Continue
        }
    }

    /// Feeds bytes received from the client; replies accumulate in the output.
    pub async fn ingest(&mut self, bytes: &[u8]) -> Step {
        let mut iter = bytes.iter();
        loop {
            if self.closed {
                return Step::Close;
            }
            let state = std::mem::replace(&mut self.state, State::Command);
            match state {
                State::Command => {
                    if iter.len() == 0 {
                        return Step::Continue;
                    }
                    // Command lines are capped whether they arrive whole or in pieces.
                    let rest = iter.as_slice();
                    let newline = rest.iter().position(|b| *b == b'\n');
                    let pending = self.requests.buf().len();
                    let line_len = pending + newline.map_or(rest.len(), |p| p + 1);
                    if line_len > MAX_LINE {
                        self.requests.buf().clear();
                        match newline {
                            Some(p) => iter = rest.get(p + 1..).unwrap_or_default().iter(),
                            None => {
                                iter = [].iter();
                                self.state = State::SkipLine;
                            }
                        }
                        let step = self.bad_command(500, "5.5.2", "Line too long.");
                        if step != Step::Continue {
                            return step;
                        }
                        continue;
                    }
                    let before = iter.len();
                    let parsed = self.requests.ingest(&mut iter).map(Request::into_owned);
                    let step = match parsed {
                        Ok(req) => self.command(req).await,
                        Err(ProtoError::NeedsMoreData { .. }) => {
                            if iter.len() == before && before > 0 {
                                // No progress on non-empty input: drop it rather than spin.
                                return self.bad_command(500, "5.5.2", "Syntax error.");
                            }
                            continue;
                        }
                        Err(e) => self.protocol_error(e),
                    };
                    if step != Step::Continue {
                        return step;
                    }
                }
                State::SkipLine => {
                    let rest = iter.as_slice();
                    match rest.iter().position(|b| *b == b'\n') {
                        Some(p) => iter = rest.get(p + 1..).unwrap_or_default().iter(),
                        None => {
                            self.state = State::SkipLine;
                            return Step::Continue;
                        }
                    }
                }
                State::Data(mut rx) => {
                    let max = self.ctx.limits.max_message_bytes;
                    let rest = iter.as_slice();
                    let room = max.saturating_sub(self.tx.body.len()).saturating_add(1);
                    let head = rest.get(..rest.len().min(room)).unwrap_or(rest);
                    // Dot-unstuffing never writes more than it reads.
                    if !self.make_room(head.len()) {
                        self.state = State::Discard {
                            rx: DummyDataReceiver::new_data(&rx),
                            then: AfterDiscard::NoStorage,
                        };
                        continue;
                    }
                    let mut sub = head.iter();
                    let done = rx.ingest(&mut sub, &mut self.tx.body.tail);
                    let consumed = head.len() - sub.len();
                    iter = rest.get(consumed..).unwrap_or_default().iter();
                    let bare = self
                        .tx
                        .newlines
                        .scan(head.get(..consumed).unwrap_or_default());
                    if let Some(kind) = bare
                        && self.ctx.limits.bare_newline == BareNewline::Reject
                    {
                        return self.refuse_bare_newline(kind);
                    }
                    if done && self.tx.body.last() == Some(b'\r') {
                        // smtp-proto also ends DATA at CR LF . CR CR LF (the CRs before the
                        // last LF are kept, but for one): not the standard end, and what a
                        // server behind could read as content. Refused whatever the setting.
                        return self.refuse_bare_newline(BARE_CR);
                    }
                    if done {
                        self.finish_message().await;
                    } else if self.tx.body.len() > max {
                        self.tx.oversize = Some(self.tx.body.len() as u64);
                        self.tx.body = BodyBuf::default();
                        self.tx.lease = None;
                        self.state = State::Discard {
                            rx: DummyDataReceiver::new_data(&rx),
                            then: AfterDiscard::TooLarge,
                        };
                    } else {
                        self.state = State::Data(rx);
                        return Step::Continue;
                    }
                }
                State::Bdat { mut rx, last, left } => {
                    let n = iter.len().min(left);
                    if !self.make_room(n) {
                        self.state = State::Discard {
                            rx: DummyDataReceiver::new_bdat(left),
                            then: AfterDiscard::NoStorage,
                        };
                        continue;
                    }
                    let left = left - n;
                    let chunk = iter.as_slice();
                    let done = rx.ingest(&mut iter, &mut self.tx.body.tail);
                    let consumed = chunk.len() - iter.len();
                    let mut bare = self
                        .tx
                        .newlines
                        .scan(chunk.get(..consumed).unwrap_or_default());
                    if done && last {
                        bare = bare.or(self.tx.newlines.finish());
                    }
                    if let Some(kind) = bare
                        && self.ctx.limits.bare_newline == BareNewline::Reject
                    {
                        return self.refuse_bare_newline(kind);
                    }
                    if done {
                        if last {
                            self.finish_message().await;
                        } else {
                            let n = self.tx.body.len();
                            self.reply(250, "2.0.0", &format!("{n} octets received"));
                        }
                    } else {
                        self.state = State::Bdat { rx, last, left };
                        return Step::Continue;
                    }
                }
                State::Discard { mut rx, then } => {
                    let before = iter.len();
                    let done = rx.ingest(&mut iter);
                    let n = (before - iter.len()) as u64;
                    if let Some(o) = self.tx.oversize.as_mut() {
                        *o = o.saturating_add(n);
                    }
                    if !done {
                        self.state = State::Discard { rx, then };
                        return Step::Continue;
                    }
                    match then {
                        AfterDiscard::Reply(r) => self.push(&r),
                        AfterDiscard::NoStorage => {
                            self.tx = Transaction::default();
                            self.reply(452, "4.3.1", &no_storage());
                        }
                        // Refused now (also for a BDAT chunk that is not the last: the later
                        // chunks of this transaction then find none).
                        AfterDiscard::TooLarge => self.finish_message().await,
                    }
                }
                State::Auth { wait, mut line } => {
                    if line.ingest(&mut iter) {
                        let data = std::mem::take(&mut line.buf);
                        let step = self.auth_continue(wait, &data).await;
                        if step != Step::Continue {
                            return step;
                        }
                    } else {
                        self.state = State::Auth { wait, line };
                        return Step::Continue;
                    }
                }
            }
        }
    }

    /// A bare LF or CR in a message (`bare_newline = reject`, or an end of DATA that was not
    /// CR LF . CR LF): `521 5.5.2` with the reason code, the transaction dropped and the
    /// connection closed, so that nothing the client sent after it is read as a command.
    fn refuse_bare_newline(&mut self, kind: &'static str) -> Step {
        let reason = Reason::MessageBareNewline;
        let budget = self.ctx.gateway.budget();
        budget.count_refusal(self.listener.door_name(), reason.code());
        if budget.log_limited("smtp.bare_newline") {
            tracing::info!(
                listener = self.listener.name(),
                client = %self.peer.ip(),
                code = reason.code(),
                "message refused: bare {kind} received; connection closed (rate-limited log)"
            );
        }
        let args = RenderArgs {
            detail: Some(kind.to_owned()),
            ..RenderArgs::default()
        };
        let line = reply::refusal(reason, &args);
        self.tx = Transaction::default();
        self.state = State::Command;
        // Closed before the reply is written: the error count cannot add a 421 after it.
        self.closed = true;
        self.out.extend_from_slice(line.as_bytes());
        Step::Close
    }

    fn protocol_error(&mut self, e: ProtoError) -> Step {
        match e {
            ProtoError::ResponseTooLong => self.bad_command(500, "5.5.2", "Line too long."),
            ProtoError::UnknownCommand => self.bad_command(502, "5.5.1", "Unrecognized command."),
            ProtoError::InvalidSenderAddress => {
                self.bad_command(501, "5.1.7", "Bad sender address syntax.")
            }
            ProtoError::InvalidRecipientAddress => {
                self.bad_command(501, "5.1.3", "Bad recipient address syntax.")
            }
            ProtoError::SyntaxError { syntax } => {
                self.bad_command(501, "5.5.4", &format!("Syntax: {syntax}"))
            }
            ProtoError::InvalidParameter { param } => {
                self.bad_command(501, "5.5.4", &format!("Invalid parameter {param}."))
            }
            ProtoError::UnsupportedParameter { param } => {
                let p: String = param.chars().take(64).collect();
                self.bad_command(555, "5.5.4", &format!("Unsupported parameter {p}."))
            }
            ProtoError::NeedsMoreData { .. } | ProtoError::InvalidResponse { .. } => {
                self.bad_command(500, "5.5.2", "Syntax error.")
            }
        }
    }

    async fn command(&mut self, req: Request<String>) -> Step {
        self.commands = self.commands.saturating_add(1);
        if self.commands > self.ctx.limits.max_commands {
            return self.close_with(421, "4.7.0", "Too many commands, closing connection.");
        }
        if self.tx.from.is_none() {
            self.commands_without_mail = self.commands_without_mail.saturating_add(1);
            if self.commands_without_mail > self.ctx.limits.max_commands_without_mail {
                return self.close_with(
                    421,
                    "4.7.0",
                    "Too many commands without a mail transaction, closing connection.",
                );
            }
        }
        match req {
            Request::Ehlo { host } => {
                self.helo = Some(host);
                self.tx = Transaction::default();
                self.ehlo();
                Step::Continue
            }
            Request::Helo { host } => {
                self.helo = Some(host);
                self.tx = Transaction::default();
                let text = format!("{} at your service", self.ctx.hostname);
                self.push(&format!("250 {text}\r\n"));
                Step::Continue
            }
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response).await,
            Request::Mail { from } => {
                self.mail(from.address, from.size).await;
                Step::Continue
            }
            Request::Rcpt { to } => {
                self.rcpt(to.address).await;
                Step::Continue
            }
            Request::Data => {
                self.data();
                Step::Continue
            }
            Request::Bdat {
                chunk_size,
                is_last,
            } => {
                self.bdat(chunk_size, is_last);
                Step::Continue
            }
            Request::Rset => {
                self.tx = Transaction::default();
                self.reply(250, "2.1.5", "Flushed");
                Step::Continue
            }
            Request::Noop { .. } => {
                self.reply(250, "2.0.0", "OK");
                Step::Continue
            }
            Request::Quit => self.close_with(221, "2.0.0", "closing connection"),
            Request::Vrfy { .. } => {
                self.reply(252, "2.1.5", "Send some mail, I'll try my best");
                Step::Continue
            }
            Request::Help { .. } => {
                self.reply(214, "2.0.0", "See RFC 5321 and docs/smtp.md");
                Step::Continue
            }
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.bad_command(502, "5.5.1", "Unrecognized command."),
        }
    }

    fn auth_offered(&self) -> bool {
        self.tls.is_some() || self.ctx.auth_without_tls
    }

    fn ehlo(&mut self) {
        let mut caps = vec![
            format!(
                "{} at your service, [{}]",
                self.ctx.hostname,
                self.peer.ip()
            ),
            format!("SIZE {}", self.ctx.limits.max_message_bytes),
            "8BITMIME".to_owned(),
        ];
        if self.tls.is_none() && self.tls_available {
            caps.push("STARTTLS".to_owned());
        }
        caps.push("ENHANCEDSTATUSCODES".to_owned());
        caps.push("PIPELINING".to_owned());
        if self.auth_offered() {
            caps.push(format!("AUTH {}", Mechanism::ADVERTISED));
        }
        caps.push("CHUNKING".to_owned());
        caps.push("SMTPUTF8".to_owned());
        let last = caps.len() - 1;
        for (i, c) in caps.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("250{sep}{c}\r\n").as_bytes());
        }
    }

    fn starttls(&mut self) -> Step {
        if self.tls.is_some() {
            return self.bad_command(503, "5.5.1", "TLS already active.");
        }
        if !self.tls_available {
            self.reply(454, "4.7.0", "TLS not available.");
            return Step::Continue;
        }
        self.reply(220, "2.0.0", "Ready to start TLS");
        Step::StartTls
    }

    /// The attempt with every fact known so far.
    fn attempt(&self) -> SendAttempt {
        let credential = match (&self.credential, self.listener) {
            (Credential::None, Listener::Relay) => Credential::RelayIp,
            (c, _) => c.clone(),
        };
        let mut a = SendAttempt::new(self.listener.door(), credential);
        a.transport = Transport {
            tls: self.tls,
            listener_requires_tls: self.listener.requires_tls(),
            client_ip: Some(self.peer.ip()),
            referrer: None,
        };
        a.envelope_from.clone_from(&self.tx.from);
        a.size = self.tx.declared_size;
        if !self.tx.rcpts.is_empty() {
            a.recipients = Some(self.tx.rcpts.clone());
        }
        a
    }

    async fn decide(&mut self, attempt: &SendAttempt) -> Option<Decided> {
        match self
            .ctx
            .gateway
            .decide(self.listener.door_name(), attempt)
            .await
        {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, listener = self.listener.name(), "decision failed");
                self.reply(451, "4.3.0", &store_unavailable());
                None
            }
        }
    }

    /// Decides `attempt`; on a denial writes the reply and returns `None`.
    async fn decide_or_refuse(&mut self, attempt: &SendAttempt) -> Option<Decided> {
        let d = self.decide(attempt).await?;
        if let Some(denial) = d.decision.denial() {
            let line = reply::denial_about(denial, &d.id, None);
            self.push(&line);
            return None;
        }
        Some(d)
    }

    /// Screens an intermediate step (MAIL FROM, RCPT TO, AUTH's TLS check): on a denial writes
    /// the reply (naming `address` when its object at fault is not an address) and returns
    /// false. Allowed steps keep no decision (see [`Gateway::screen`]).
    async fn screen_or_refuse(&mut self, attempt: &SendAttempt, address: Option<&str>) -> bool {
        match self
            .ctx
            .gateway
            .screen(self.listener.door_name(), attempt)
            .await
        {
            Ok(None) => true,
            Ok(Some(d)) => {
                if let Some(denial) = d.decision.denial() {
                    let line = reply::denial_about(denial, &d.id, address);
                    self.push(&line);
                }
                false
            }
            Err(e) => {
                tracing::error!(error = %e, listener = self.listener.name(), "decision failed");
                self.reply(451, "4.3.0", &store_unavailable());
                false
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // AUTH

    async fn auth(&mut self, mechanism: u64, initial: &str) -> Step {
        if !matches!(self.credential, Credential::None) {
            return self.bad_command(503, "5.5.1", "Already authenticated.");
        }
        if self.helo.is_none() {
            return self.bad_command(503, "5.5.1", "EHLO/HELO first.");
        }
        if self.tx.from.is_some() {
            return self.bad_command(
                503,
                "5.5.1",
                "AUTH not permitted during a mail transaction.",
            );
        }
        if !self.auth_offered() {
            // The engine's `tls.required`: AUTH needs TLS on every listener.
            let mut a = self.attempt();
            a.credential = Credential::None;
            a.transport.listener_requires_tls = true;
            if self.screen_or_refuse(&a, None).await {
                self.reply(530, "5.7.0", "Must issue a STARTTLS command first.");
            }
            return Step::Continue;
        }
        let Some(mech) = Mechanism::from_bits(mechanism) else {
            return self.bad_command(504, "5.7.4", "Unrecognized authentication type.");
        };
        self.auth_attempts = self.auth_attempts.saturating_add(1);
        if self.auth_attempts > self.ctx.limits.max_auth_attempts {
            return self.close_with(421, "4.7.0", "Too many AUTH attempts, closing connection.");
        }
        let initial = initial.as_bytes();
        match mech {
            Mechanism::Plain if initial.is_empty() => self.wait_auth(AuthWait::Plain, ""),
            Mechanism::Plain => self.auth_plain(initial).await,
            Mechanism::Login if initial.is_empty() => {
                self.wait_auth(AuthWait::LoginUser, &sasl::encode("Username:"))
            }
            Mechanism::Login => match sasl::decode_text(initial) {
                Ok(login) => self.wait_auth(
                    AuthWait::LoginPassword { login },
                    &sasl::encode("Password:"),
                ),
                Err(e) => self.sasl_error(e),
            },
            Mechanism::XOAuth2 | Mechanism::OAuthBearer if initial.is_empty() => {
                self.wait_auth(AuthWait::Bearer(mech), "")
            }
            Mechanism::XOAuth2 | Mechanism::OAuthBearer => self.auth_bearer(mech, initial).await,
        }
    }

    fn wait_auth(&mut self, wait: AuthWait, challenge: &str) -> Step {
        self.push(&format!("334 {challenge}\r\n"));
        self.state = State::Auth {
            wait,
            line: line_receiver(),
        };
        Step::Continue
    }

    fn sasl_error(&mut self, e: SaslError) -> Step {
        match e {
            SaslError::Cancelled => {
                self.reply(501, "5.0.0", "Authentication cancelled.");
                Step::Continue
            }
            _ => self.bad_command(501, "5.5.2", "Cannot decode the AUTH response."),
        }
    }

    async fn auth_continue(&mut self, wait: AuthWait, data: &[u8]) -> Step {
        match wait {
            AuthWait::Plain => self.auth_plain(data).await,
            AuthWait::LoginUser => match sasl::decode_text(data) {
                Ok(login) => self.wait_auth(
                    AuthWait::LoginPassword { login },
                    &sasl::encode("Password:"),
                ),
                Err(e) => self.sasl_error(e),
            },
            AuthWait::LoginPassword { login } => match sasl::decode_text(data) {
                Ok(password) => self.auth_password(login, password).await,
                Err(e) => self.sasl_error(e),
            },
            AuthWait::Bearer(mech) => self.auth_bearer(mech, data).await,
            AuthWait::Challenge { reply } => {
                self.push(&reply);
                Step::Continue
            }
        }
    }

    async fn auth_plain(&mut self, data: &[u8]) -> Step {
        match sasl::decode_plain(data) {
            Ok(p) => self.auth_password(p.login, p.password).await,
            Err(e) => self.sasl_error(e),
        }
    }

    /// A password: an API key (`SG.<id>.<secret>`, any login) or the user's own password.
    async fn auth_password(&mut self, login: String, password: String) -> Step {
        let ip = self.peer.ip();
        let cred = if self
            .ctx
            .gateway
            .lockout()
            .check_shared(&login, ip)
            .await
            .is_err()
        {
            Credential::Refused {
                state: CredentialState::Locked,
                presented: Some(mailgate_auth::redact_login(&login).into_owned()),
            }
        } else if mailgate_auth::api_key_id(&password).is_some() {
            self.ctx
                .gateway
                .api_key(&password)
                .credential(|id| format!("API key {}", id.unwrap_or_default()))
        } else {
            match self.password_credential(&login, password).await {
                Ok(c) => c,
                Err(mailgate_gateway::budget::Busy) => return self.auth_busy(&login),
            }
        };
        self.finish_auth(cred, Some(login), None).await
    }

    /// The user's password checked on the gateway's bounded password pool (argon2 is slow and
    /// memory-hungry: never on the async workers). An unknown login, or one without a password,
    /// is checked against a dummy hash, so that it takes as long as a known one.
    async fn password_credential(
        &self,
        login: &str,
        password: String,
    ) -> Result<Credential, mailgate_gateway::budget::Busy> {
        let found = {
            let live = self.ctx.gateway.live();
            live.index.user_by_address(login).map(|u| {
                let user = live.index.user(u);
                (user.email.clone(), user.password_hash.clone())
            })
        };
        let hash = found.as_ref().and_then(|(_, h)| h.clone());
        let known = hash.is_some();
        let ok = self
            .ctx
            .gateway
            .budget()
            .passwords()
            .verify(hash, password)
            .await?;
        Ok(match found {
            Some((primary, _)) if ok && known => Credential::SmtpLogin { user: primary },
            _ => Credential::Refused {
                state: CredentialState::Invalid,
                presented: Some(mailgate_auth::redact_login(login).into_owned()),
            },
        })
    }

    /// The password pool is full: a temporary refusal (nothing was checked, nothing counted
    /// against the login).
    fn auth_busy(&mut self, login: &str) -> Step {
        let budget = self.ctx.gateway.budget();
        budget.count_refusal(self.listener.door_name(), Reason::ServerBusy.code());
        if budget.log_limited("smtp.auth_busy") {
            tracing::warn!(
                listener = self.listener.name(),
                client = %self.peer.ip(),
                login = %mailgate_auth::redact_login(login),
                "AUTH refused for now: the password pool is full"
            );
        }
        self.reply(
            454,
            "4.7.0",
            &reply::fault_text(Reason::ServerBusy, "Temporary authentication failure"),
        );
        Step::Continue
    }

    async fn auth_bearer(&mut self, mech: Mechanism, data: &[u8]) -> Step {
        let decoded = match mech {
            Mechanism::OAuthBearer => sasl::decode_oauthbearer(data),
            _ => sasl::decode_xoauth2(data),
        };
        let b = match decoded {
            Ok(b) => b,
            Err(e) => return self.sasl_error(e),
        };
        let ip = self.peer.ip();
        let login = (!b.user.is_empty()).then(|| b.user.clone());
        let shown = login
            .as_deref()
            .map(|l| mailgate_auth::redact_login(l).into_owned());
        let cred = if self
            .ctx
            .gateway
            .lockout()
            .check_shared(&b.user, ip)
            .await
            .is_err()
        {
            Credential::Refused {
                state: CredentialState::Locked,
                presented: shown.clone(),
            }
        } else {
            let c = self
                .ctx
                .gateway
                .credential_for_access_token(self.ctx.tokens.as_ref(), &b.token)
                .await;
            let mismatch = |who: &str| !b.user.is_empty() && !who.eq_ignore_ascii_case(&b.user);
            match c {
                Credential::OauthUser { ref user, .. } if mismatch(user) => Credential::Refused {
                    state: CredentialState::Invalid,
                    presented: shown.clone(),
                },
                Credential::ServiceAccount {
                    subject: Some(ref s),
                    ..
                } if mismatch(s) => Credential::Refused {
                    state: CredentialState::Invalid,
                    presented: shown.clone(),
                },
                c => c,
            }
        };
        let challenge = match mech {
            Mechanism::OAuthBearer => sasl::oauthbearer_challenge(),
            _ => sasl::xoauth2_challenge(),
        };
        self.finish_auth(cred, login, Some(challenge)).await
    }

    async fn finish_auth(
        &mut self,
        cred: Credential,
        login: Option<String>,
        challenge: Option<String>,
    ) -> Step {
        // AUTH answers for the credential only (the engine's `Action::Authenticate`); the
        // account's own checks (suspended, ...) are answered at MAIL FROM, and only then kept
        // and logged.
        let mut a = self.attempt().for_action(Action::Authenticate);
        a.credential = cred.clone();
        let screened = self.ctx.gateway.screen(self.listener.door_name(), &a).await;
        let d = match screened {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, listener = self.listener.name(), "decision failed");
                self.reply(451, "4.3.0", &store_unavailable());
                return Step::Continue;
            }
        };
        let refusal = d
            .as_ref()
            .and_then(|d| d.decision.denial().map(|x| (x, d.id.as_str())));
        let ip = self.peer.ip();
        // The login as it may be logged: a secret typed into the login field is redacted.
        let shown = mailgate_auth::redact_login(login.as_deref().unwrap_or("")).into_owned();
        let lockout = self.ctx.gateway.lockout();
        match refusal {
            Some((denial, decision_id)) => {
                let locked = matches!(
                    cred,
                    Credential::Refused {
                        state: CredentialState::Locked,
                        ..
                    }
                );
                if !locked {
                    lockout
                        .failure_shared(login.as_deref().unwrap_or(""), ip)
                        .await;
                }
                let line = reply::denial(denial, decision_id);
                // Before authentication: anyone can cause these, so a few lines a second (the
                // gateway counts every refusal).
                if self.ctx.gateway.budget().log_limited("smtp.auth_refused") {
                    tracing::info!(
                        listener = self.listener.name(),
                        client = %ip,
                        login = %shown,
                        code = denial.code.code(),
                        decision_id = %decision_id,
                        "AUTH refused (rate-limited log)"
                    );
                }
                match challenge {
                    Some(ch) if !locked => {
                        self.push(&format!("334 {ch}\r\n"));
                        self.state = State::Auth {
                            wait: AuthWait::Challenge { reply: line },
                            line: line_receiver(),
                        };
                    }
                    _ => self.push(&line),
                }
            }
            None => {
                lockout
                    .success_shared(login.as_deref().unwrap_or(""), ip)
                    .await;
                tracing::info!(
                    listener = self.listener.name(),
                    client = %ip,
                    login = %shown,
                    "AUTH accepted"
                );
                self.credential = cred;
                self.reply(235, "2.7.0", "Accepted");
            }
        }
        Step::Continue
    }

    // ---------------------------------------------------------------------------------------
    // MAIL, RCPT, DATA, BDAT

    async fn mail(&mut self, from: String, size: usize) {
        if self.helo.is_none() {
            self.bad_command(503, "5.5.1", "EHLO/HELO first.");
            return;
        }
        if self.tx.from.is_some() {
            self.bad_command(503, "5.5.1", "Nested MAIL command.");
            return;
        }
        let mut a = self.attempt();
        a.envelope_from = Some(from.clone());
        if size > 0 {
            a.size = Some(size as u64);
        }
        if !self.screen_or_refuse(&a, None).await {
            return;
        }
        if size > self.ctx.limits.max_message_bytes {
            self.reply(552, "5.3.4", "Message size exceeds fixed limit.");
            return;
        }
        self.tx = Transaction {
            from: Some(from),
            declared_size: (size > 0).then_some(size as u64),
            ..Transaction::default()
        };
        self.started_mail = true;
        self.commands_without_mail = 0;
        self.reply(250, "2.1.0", "OK");
    }

    async fn rcpt(&mut self, to: String) {
        if self.tx.from.is_none() {
            self.bad_command(503, "5.5.1", "MAIL first.");
            return;
        }
        if self.tx.rcpts.iter().any(|r| r.eq_ignore_ascii_case(&to)) {
            self.reply(250, "2.1.5", "OK");
            return;
        }
        if self.tx.rcpts.len() >= self.ctx.limits.max_recipients {
            self.reply(452, "4.5.3", "Your message has too many recipients.");
            return;
        }
        let mut a = self.attempt();
        let mut rcpts = self.tx.rcpts.clone();
        rcpts.push(to.clone());
        a.recipients = Some(rcpts);
        if !self.screen_or_refuse(&a, Some(&to)).await {
            return;
        }
        self.tx.rcpts.push(to);
        self.reply(250, "2.1.5", "OK");
    }

    fn data(&mut self) {
        if self.tx.from.is_none() {
            self.bad_command(503, "5.5.1", "MAIL first.");
            return;
        }
        if self.tx.rcpts.is_empty() {
            self.bad_command(503, "5.5.1", "RCPT first.");
            return;
        }
        if self.tx.bdat {
            self.bad_command(503, "5.5.1", "DATA not permitted after BDAT.");
            return;
        }
        self.push("354 Go ahead\r\n");
        self.state = State::Data(DataReceiver::new());
    }

    fn bdat(&mut self, chunk_size: usize, last: bool) {
        let refuse = |text: &str| reply::line(503, "5.5.1", text);
        let problem = if self.tx.from.is_none() {
            Some(refuse("MAIL first."))
        } else if self.tx.rcpts.is_empty() {
            Some(refuse("RCPT first."))
        } else {
            None
        };
        if let Some(r) = problem {
            // The chunk is read and dropped, then refused (RFC 3030 §2), an error.
            self.state = State::Discard {
                rx: DummyDataReceiver::new_bdat(chunk_size),
                then: AfterDiscard::Reply(r),
            };
            return;
        }
        self.tx.bdat = true;
        let max = self.ctx.limits.max_message_bytes;
        let total = (self.tx.body.len() as u64).saturating_add(chunk_size as u64);
        if self.tx.oversize.is_some() || total > max as u64 {
            let so_far = self.tx.oversize.unwrap_or(self.tx.body.len() as u64);
            self.tx.oversize = Some(so_far);
            self.tx.body = BodyBuf::default();
            self.tx.lease = None;
            self.state = State::Discard {
                rx: DummyDataReceiver::new_bdat(chunk_size),
                then: AfterDiscard::TooLarge,
            };
            return;
        }
        self.state = State::Bdat {
            rx: BdatReceiver::new(chunk_size, last),
            last,
            left: chunk_size,
        };
    }

    /// Makes room in the body for `more` bytes: a new chunk when the current one is full,
    /// reserved from the process's DATA memory budget before it is allocated (the body's
    /// capacity never exceeds its lease; past 1 MiB a body may not take the budget's last
    /// eighth, kept for small messages). False when the budget is spent: the body and its
    /// lease are dropped, and the message will be refused.
    fn make_room(&mut self, more: usize) -> bool {
        if self.tx.body.spare() >= more {
            return true;
        }
        let ceiling = self.ctx.limits.max_message_bytes.saturating_add(2);
        let next = self.tx.body.next_chunk(more, ceiling);
        let total = self.tx.body.capacity().saturating_add(next);
        if !reserve(
            self.ctx.gateway.budget().data_memory(),
            &mut self.tx.lease,
            total,
        ) {
            self.memory_spent();
            self.tx.body = BodyBuf::default();
            self.tx.lease = None;
            return false;
        }
        self.tx.body.start_chunk(next);
        true
    }

    /// Logs (rate-limited) that a message was refused because the DATA memory budget is spent.
    fn memory_spent(&self) {
        let b = self.ctx.gateway.budget();
        if b.log_limited("smtp.data_memory_spent") {
            tracing::warn!(
                listener = self.listener.name(),
                client = %self.peer.ip(),
                used = b.data_memory().used(),
                max = b.data_memory().max(),
                "message refused with 452 4.3.1: the process's DATA memory budget is spent (limits.data_memory_mb; rate-limited log)"
            );
        }
    }

    /// The body ready for the store, Bcc removed and From replaced as `new_from` says, in its
    /// own buffer when the header does not grow (the usual case): a large message is not
    /// copied again.
    fn final_body(mut body: Vec<u8>, new_from: Option<&str>) -> Vec<u8> {
        let mut at = 0;
        for line in body.split_inclusive(|b| *b == b'\n') {
            if line == b"\n" || line == b"\r\n" {
                break;
            }
            at += line.len();
        }
        let Some(head) = body.get(..at) else {
            return body;
        };
        let header = mailgate_gateway::message::rewrite_headers(head, new_from, None);
        if header == head {
            return body;
        }
        if header.len() <= at {
            body.splice(..at, header);
            return body;
        }
        let rest = body.get(at..).unwrap_or_default();
        let mut out = Vec::with_capacity(header.len() + rest.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(rest);
        out
    }

    /// The end of the message: the last checks, then durable acceptance and 250.
    async fn finish_message(&mut self) {
        let mut tx = std::mem::take(&mut self.tx);
        // The body in one buffer: the copy is reserved until the chunks are freed.
        let cap = tx.body.capacity();
        let len = tx.body.len();
        let budget = self.ctx.gateway.budget().data_memory();
        if !tx.body.full.is_empty() && !reserve(budget, &mut tx.lease, cap.saturating_add(len)) {
            self.memory_spent();
            self.reply(452, "4.3.1", &no_storage());
            return;
        }
        let body = std::mem::take(&mut tx.body);
        let raw = if len > SMALL_BODY {
            // Copying megabytes is work for a blocking thread, not for an async worker that
            // other connections wait on.
            match tokio::task::spawn_blocking(move || body.into_vec()).await {
                Ok(raw) => raw,
                Err(e) => {
                    tracing::error!(error = %e, "joining the body copy failed");
                    self.reply(451, "4.3.0", "Temporary server error, try again later.");
                    return;
                }
            }
        } else {
            body.into_vec()
        };
        // `bare_newline = normalize` (under `reject` the connection is closed already).
        let raw = if tx.newlines.bare.is_some() && tx.oversize.is_none() {
            let grown = normalized_len(&raw);
            let budget = self.ctx.gateway.budget().data_memory();
            if !reserve(
                budget,
                &mut tx.lease,
                cap.saturating_add(len).saturating_add(grown),
            ) {
                self.memory_spent();
                self.reply(452, "4.3.1", &no_storage());
                return;
            }
            normalize_newlines(&raw, !tx.bdat)
        } else {
            raw
        };
        let mut a = self.attempt();
        a.envelope_from.clone_from(&tx.from);
        a.recipients = Some(tx.rcpts.clone());
        match tx.oversize {
            Some(n) => {
                a.size = Some(n);
                a.body = Body::Valid;
            }
            None => {
                a.size = Some(raw.len() as u64);
                let h = headers(&raw);
                // A null reverse-path (a bounce) is decided by the engine: on the relay the
                // header's sender stands for it (the null-sender rule, engine/checks.rs).
                a.header = h.originator;
                a.body = h.body;
            }
        }
        let Some(d) = self.decide_or_refuse(&a).await else {
            return;
        };
        if tx.oversize.is_some() {
            self.reply(552, "5.3.4", "Message size exceeds fixed limit.");
            return;
        }
        if !d.decision.complete {
            tracing::error!(decision_id = %d.id, "decision incomplete with every fact known");
            self.reply(451, "4.3.0", &store_unavailable());
            return;
        }
        // Bcc never travels; with `on_unowned_from: rewrite` the decision names the From to put.
        let new_from = d
            .decision
            .rewrites
            .iter()
            .find(|r| r.header == "From")
            .map(|r| r.replacement.clone());
        // Storing copies the body twice more (SQLite binds its own copy, then builds the row
        // from it): that is reserved too, and the lease (dropped with `tx`) holds until the
        // message is stored.
        let copies = cap.saturating_add(raw.len().saturating_mul(2));
        if !reserve(
            self.ctx.gateway.budget().data_memory(),
            &mut tx.lease,
            copies,
        ) {
            self.memory_spent();
            self.reply(452, "4.3.1", &no_storage());
            return;
        }
        let message = Message {
            envelope_from: tx.from.clone().unwrap_or_default(),
            recipients: tx.rcpts.clone(),
            raw: Self::final_body(raw, new_from.as_deref()),
        };
        match self
            .ctx
            .gateway
            .accept(self.listener.door_name(), &a, &d, message)
            .await
        {
            Ok(Accepted::Stored { message_id, state }) => {
                // Delivering mail is what a client is for: its error count starts again.
                self.errors = 0;
                self.reply(
                    250,
                    "2.0.0",
                    &format!("OK {message_id} {state} [mailgate: decision {}]", d.id),
                );
            }
            Ok(Accepted::Refused(again)) => match again.decision.denial() {
                Some(denial) => {
                    let line = reply::denial(denial, &again.id);
                    self.push(&line);
                }
                None => self.reply(451, "4.3.0", &store_unavailable()),
            },
            Err(e) => {
                tracing::error!(error = %e, decision_id = %d.id, "accepting the message failed");
                self.reply(451, "4.3.0", &store_unavailable());
            }
        }
    }
}

/// The `452 4.3.1` text when the DATA memory budget is spent (RFC 3463: mail system full).
fn no_storage() -> String {
    reply::fault_text(
        Reason::ServerBusy,
        "Insufficient system storage, try again later.",
    )
}

/// Bodies up to this size may use the whole DATA memory budget; larger ones leave its last
/// eighth to small messages, so that a few large messages cannot make every small one wait.
const SMALL_BODY: usize = 1024 * 1024;

/// Makes `lease` hold at least `total` bytes of `budget` (nothing taken when it cannot).
fn reserve(budget: &Arc<MemoryBudget>, lease: &mut Option<MemoryLease>, total: usize) -> bool {
    let held = lease.as_ref().map_or(0, MemoryLease::bytes);
    let more = total.saturating_sub(held);
    if more == 0 {
        return true;
    }
    let headroom = budget.max() - budget.max() / 8;
    if total > SMALL_BODY && budget.used().saturating_add(more) > headroom {
        return false;
    }
    match lease {
        Some(l) => l.grow(more),
        None => budget.try_reserve(more).map(|l| *lease = Some(l)).is_some(),
    }
}

struct Headers {
    originator: Option<Originator>,
    body: Body,
}

/// Every header From and Sender field with every address (the engine checks their shape and
/// each address), and whether the message parses.
fn headers(raw: &[u8]) -> Headers {
    match mail_parser::MessageParser::default().parse_headers(raw) {
        Some(m) => Headers {
            originator: Some(mailgate_gateway::message::originator(&m)),
            body: Body::Valid,
        },
        None => Headers {
            originator: None,
            body: Body::Invalid {
                detail: "Invalid RFC 5322 message".into(),
                field: None,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mailgate_core::orgfile::OrgFile;
    use mailgate_store::Changeset;

    use super::*;
    use mailgate_gateway::lockout::LockoutPolicy;

    const KEY: &str = "SG.unit-key-0001.c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA";

    async fn context() -> Arc<SmtpContext> {
        let org = format!(
            "domains: [{{name: example.com, verified: true}}]\nusers:\n  - email: alice@example.com\napi_keys:\n  - name: k\n    secret: \"{KEY}\"\n    owner: alice@example.com\n    permissions: [mail.send]\nsmtp_relay:\n  allowed_ips: [127.0.0.1/32]\n  allowed_senders: domain_addresses\n"
        );
        let store = mailgate_store::in_memory().await.unwrap();
        let mut dir = OrgFile::parse(&org).unwrap().directory;
        let issues = mailgate_auth::prepare_secrets(&mut dir, &Default::default()).unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        store
            .directory
            .commit(0, &Changeset::between(&Default::default(), &dir), "t")
            .await
            .unwrap();
        let gateway = Gateway::open(store.directory.clone()).await.unwrap();
        gateway.lockout().set_policy(LockoutPolicy {
            login_threshold: 3,
            max_lock: Duration::from_secs(60),
            ..LockoutPolicy::default()
        });
        Arc::new(SmtpContext {
            gateway,
            tokens: store.tokens,
            hostname: "mx.test".into(),
            limits: Limits::default(),
            auth_without_tls: false,
        })
    }

    /// The replies to `input`, the greeting left out.
    async fn converse(ctx: &Arc<SmtpContext>, l: Listener, input: &str) -> String {
        let tls = (l == Listener::Smtps).then_some(TlsVersion::Tls13);
        let peer = "127.0.0.1:40000".parse().unwrap();
        let mut s = Session::new(ctx.clone(), l, peer, tls, false);
        assert_eq!(s.ingest(input.as_bytes()).await, Step::Continue);
        String::from_utf8(s.take_output()).unwrap()
    }

    fn last_reply(replies: &str) -> &str {
        replies.trim_end().lines().last().unwrap_or_default()
    }

    /// Found by fuzz/fuzz_targets/smtp_session.rs: with `MAIL FROM:<>` the engine had no sender
    /// to check (relay: never; authenticated: when the message has no From), so the end of the
    /// message answered `451 4.3.0 Temporary server error` and clients retried forever.
    #[tokio::test]
    async fn null_reverse_path_is_decided_by_the_header_sender() {
        let ctx = context().await;
        let relay = |body: &str| {
            format!("HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{body}\r\n.\r\n")
        };

        // Relay (trusted IP): a bounce from the organisation's domain goes, one from elsewhere
        // is refused by smtp_relay.allowed_senders, one naming no sender is malformed.
        let r = converse(
            &ctx,
            Listener::Relay,
            &relay("From: MAILER-DAEMON@example.com\r\n\r\nbounce"),
        )
        .await;
        assert!(last_reply(&r).starts_with("250 2.0.0 OK "), "{r}");
        let r = converse(
            &ctx,
            Listener::Relay,
            &relay("From: someone@other.example\r\n\r\nx"),
        )
        .await;
        assert!(
            last_reply(&r).contains("[mailgate: sender.not_owned"),
            "{r}"
        );
        let r = converse(&ctx, Listener::Relay, &relay("Subject: no from\r\n\r\nx")).await;
        assert!(last_reply(&r).starts_with("554 5.6.0"), "{r}");
        assert!(last_reply(&r).contains("[mailgate: message.invalid"), "{r}");

        // Authenticated: the header From is checked as before; no sender at all is malformed,
        // after DATA and after BDAT alike.
        let auth = format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.org>\r\n",
            sasl::encode(&format!("\0k\0{KEY}"))
        );
        let r = converse(
            &ctx,
            Listener::Smtps,
            &format!("{auth}DATA\r\nFrom: alice@example.com\r\n\r\nx\r\n.\r\n"),
        )
        .await;
        assert!(last_reply(&r).starts_with("250 2.0.0 OK "), "{r}");
        let r = converse(
            &ctx,
            Listener::Smtps,
            &format!("{auth}DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n"),
        )
        .await;
        assert!(last_reply(&r).starts_with("554 5.6.0"), "{r}");
        let r = converse(
            &ctx,
            Listener::Smtps,
            &format!("{auth}BDAT 9 LAST\r\nFrom: x\r\n"),
        )
        .await;
        assert!(last_reply(&r).starts_with("554 5.6.0"), "{r}");
    }

    /// Issue 12: every From field and address is read, on submission and on the relay alike.
    #[tokio::test]
    async fn every_from_field_and_address_is_decided() {
        let ctx = context().await;
        let auth = format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n",
            sasl::encode(&format!("\0k\0{KEY}"))
        );
        let submit = |head: &str| format!("{auth}{head}\r\nhi\r\n.\r\n");
        let r = converse(
            &ctx,
            Listener::Smtps,
            &submit("From: ceo@example.com\r\nFrom: alice@example.com\r\n"),
        )
        .await;
        let last = last_reply(&r);
        assert!(last.starts_with("554 5.6.0"), "{r}");
        assert!(last.contains("[mailgate: message.invalid"), "{r}");
        assert!(last.contains("2 From header fields"), "{r}");
        let r = converse(
            &ctx,
            Listener::Smtps,
            &submit("From: alice@example.com, ceo@example.com\r\nSender: alice@example.com\r\n"),
        )
        .await;
        assert!(last_reply(&r).starts_with("553 5.7.1"), "{r}");
        assert!(last_reply(&r).contains("<ceo@example.com>"), "{r}");
        let r = converse(&ctx, Listener::Smtps, &submit("Subject: no From\r\n")).await;
        assert!(last_reply(&r).contains("[mailgate: message.invalid"), "{r}");
        let r = converse(
            &ctx,
            Listener::Smtps,
            &submit("From: alice@example.com\r\n"),
        )
        .await;
        assert!(last_reply(&r).starts_with("250 2.0.0 OK "), "{r}");

        // The relay (trusted IP) checks the header against smtp_relay.allowed_senders too.
        let relay = |head: &str| {
            format!(
                "HELO c\r\nMAIL FROM:<support@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n{head}\r\nhi\r\n.\r\n"
            )
        };
        let r = converse(&ctx, Listener::Relay, &relay("From: ceo@evil.test\r\n")).await;
        assert!(
            last_reply(&r).contains("[mailgate: sender.not_owned"),
            "{r}"
        );
        let r = converse(&ctx, Listener::Relay, &relay("Subject: no From\r\n")).await;
        assert!(last_reply(&r).contains("[mailgate: message.invalid"), "{r}");
        let r = converse(&ctx, Listener::Relay, &relay("From: alice@example.com\r\n")).await;
        assert!(last_reply(&r).starts_with("250 2.0.0 OK "), "{r}");
    }
}
