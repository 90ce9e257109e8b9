//! The SMTP session state machine (`mailgate_smtp::Session`) on arbitrary client bytes, driven
//! the way `mailgate_smtp::server` drives it, without sockets: greeting, one `ingest` per read,
//! `tls_started` when the session answers STARTTLS, `timed_out` when the input ends. Every step
//! the session asks of the gateway is answered by a real `Gateway` over an in-memory SQLite store
//! holding a small directory (the unit tests' fixture, with a cheap argon2 hash), so AUTH (every
//! mechanism), MAIL, RCPT, DATA, BDAT and acceptance run their real code.
//!
//! Input: one flags byte, then the client's bytes, cut into reads at each `\0\0` (the separator
//! is dropped; with no separator everything is one read, cut at the driver's 16 KiB buffer):
//!
//! | bits | meaning |
//! |---|---|
//! | 0-1 | listener: 0 submission with STARTTLS, 1 implicit TLS, 2 relay with STARTTLS, 3 submission without a certificate |
//! | 2 | the TLS version is 1.2 (else 1.3) |
//! | 3 | the client is outside the relay's allowlist (192.0.2.7, else 127.0.0.1) |
//! | 4 | 4 KiB message limit (else the default 35 MiB) |
//! | 5-6 | each read is further cut into pieces of: 0 as is, 1 one byte, 2 three bytes, 3 61 bytes |
//! | 7 | `auth_without_tls` (development setting: AUTH offered without TLS) |
//!
//! `MAILGATE_FUZZ_TRACE=1` prints the conversation to stderr (to read what a corpus file does:
//! `MAILGATE_FUZZ_TRACE=1 fuzz/target/<triple>/release/smtp_session FILE`).
//!
//! Checked beyond "no panic": every reply is UTF-8, made of whole CRLF-terminated lines of at
//! most 512 octets that start with a 3-digit code and ` ` or `-` and hold no control character;
//! no `451 4.3.0` (the in-memory store never fails, so that reply would mean a decision the
//! engine could not complete with every fact known); STARTTLS is granted only when offered and
//! at most once; `Close` means closed.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use mailgate_core::engine::TlsVersion;
use mailgate_core::orgfile::OrgFile;
use mailgate_gateway::Gateway;
use mailgate_gateway::lockout::LockoutPolicy;
use mailgate_smtp::{Limits, Listener, Session, SmtpContext, Step};
use mailgate_store::{Changeset, Stores, TokenRecord};

/// The driver's read buffer (`server.rs`).
const READ_BUF: usize = 16 * 1024;
/// Cuts the input into reads.
const SEPARATOR: &[u8] = b"\0\0";
/// Runs sharing one store. Every decision and accepted message is stored, and usage counters
/// fill up, so the store is rebuilt this often to keep memory flat and runs alike.
const RUNS_PER_STORE: u32 = 256;

/// The directory. Passwords: alice `pw-alice`, bob (suspended) `pw-bob`; alice's API key and
/// OAuth access token are below. The hashes are argon2id with the smallest parameters (checked
/// in microseconds, not the default's tens of milliseconds).
const ORG: &str = r#"
domains: [{name: example.com, verified: true}]
users:
  - email: alice@example.com
    password_hash: "$PW_ALICE"
    aliases: [al@example.com]
  - email: bob@example.com
    password_hash: "$PW_BOB"
    status: suspended
api_keys:
  - name: fuzz
    secret: "SG.fuzz-key-0001.c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"
    owner: alice@example.com
    permissions: [mail.send]
oauth_clients:
  - client_id: web
    name: Web
    secret: "s"
    project: p
    redirect_uris: [http://127.0.0.1:1/cb]
projects:
  - id: p
    number: 1
    enabled_apis: [gmail.googleapis.com]
limits:
  recipients_per_message: 3
smtp_relay:
  allowed_ips: [127.0.0.1/32]
  allowed_senders: domain_addresses
"#;

/// Alice's OAuth access token (XOAUTH2 / OAUTHBEARER).
const TOKEN: &str = "ya29.fuzz-token";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let mut fixture = FIXTURE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    fixture.get_or_insert_with(Fixture::new).run(flags, input);
});

/// A static, never dropped: the store's connections and writer task live on the runtime, and
/// dropping them at process exit (after the runtime) would panic inside sqlx.
static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);

struct Fixture {
    rt: tokio::runtime::Runtime,
    trace: bool,
    world: Option<World>,
    runs: u32,
}

/// The store and the gateway over it.
struct World {
    store: Stores,
    gateway: Arc<Gateway>,
}

fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::PasswordHasher as _;
    let params = argon2::Params::new(8, 1, 1, None).expect("argon2 parameters");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_with_salt(password.as_bytes(), b"fuzz-salt-fuzz-salt")
        .expect("argon2 hash")
        .to_string()
}

impl World {
    async fn new() -> World {
        let store = mailgate_store::in_memory().await.expect("in-memory store");
        let org = ORG
            .replace("$PW_ALICE", &cheap_hash("pw-alice"))
            .replace("$PW_BOB", &cheap_hash("pw-bob"));
        let mut dir = OrgFile::parse(&org).expect("fixture directory").directory;
        let issues =
            mailgate_auth::prepare_secrets(&mut dir, &Default::default()).expect("fixture secrets");
        assert!(issues.is_empty(), "{issues:?}");
        store
            .directory
            .commit(0, &Changeset::between(&Default::default(), &dir), "fuzz")
            .await
            .expect("fixture directory commit");
        let now = mailgate_gateway::now_ms() as i64;
        store
            .tokens
            .insert_token(&TokenRecord {
                token_sha256: mailgate_auth::sha256_hex(TOKEN.as_bytes()),
                kind: mailgate_store::TokenKind::Access,
                grant: serde_json::json!({"type": "user", "user": "alice@example.com", "client_id": "web"}),
                scopes: vec!["https://mail.google.com/".into()],
                family: "fuzz".into(),
                created_at_ms: now,
                expires_at_ms: now + 365 * 24 * 3_600_000,
                revoked: false,
                used: false,
            })
            .await
            .expect("fixture token");
        let gateway = World::gateway(&store).await;
        World { store, gateway }
    }

    /// A gateway over `store`, its failed-AUTH lockout empty (a login locks after 3 failures).
    async fn gateway(store: &Stores) -> Arc<Gateway> {
        let gateway = Gateway::open(store.directory.clone()).await.expect("gateway");
        gateway.lockout().set_policy(LockoutPolicy {
            login_threshold: 3,
            network_threshold: 100,
            ..LockoutPolicy::default()
        });
        gateway
    }
}

/// What the flags byte chooses.
struct Config {
    listener: Listener,
    /// TLS from the first byte (implicit TLS).
    tls: Option<TlsVersion>,
    /// STARTTLS can be offered.
    tls_available: bool,
    version: TlsVersion,
    peer: SocketAddr,
    limits: Limits,
    piece: usize,
    auth_without_tls: bool,
}

impl Config {
    fn new(flags: u8) -> Config {
        let version = if flags & 0b100 != 0 {
            TlsVersion::Tls12
        } else {
            TlsVersion::Tls13
        };
        let (listener, tls, tls_available) = match flags & 0b11 {
            0 => (Listener::Submission, None, true),
            1 => (Listener::Smtps, Some(version), false),
            2 => (Listener::Relay, None, true),
            _ => (Listener::Submission, None, false),
        };
        let ip = if flags & 0b1000 != 0 {
            Ipv4Addr::new(192, 0, 2, 7)
        } else {
            Ipv4Addr::LOCALHOST
        };
        let mut limits = Limits::default();
        if flags & 0b1_0000 != 0 {
            limits.max_message_bytes = 4096;
        }
        Config {
            listener,
            tls,
            tls_available,
            version,
            peer: SocketAddr::new(IpAddr::V4(ip), 40000),
            limits,
            piece: match (flags >> 5) & 0b11 {
                0 => READ_BUF,
                1 => 1,
                2 => 3,
                _ => 61,
            },
            auth_without_tls: flags & 0b1000_0000 != 0,
        }
    }
}

impl Fixture {
    fn new() -> Fixture {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Fixture {
            rt,
            trace: std::env::var_os("MAILGATE_FUZZ_TRACE").is_some_and(|v| v != "0"),
            world: None,
            runs: 0,
        }
    }

    fn run(&mut self, flags: u8, input: &[u8]) {
        let _enter = self.rt.enter();
        if self.runs.is_multiple_of(RUNS_PER_STORE) || self.world.is_none() {
            self.world = None;
            self.world = Some(self.rt.block_on(World::new()));
        }
        self.runs = self.runs.wrapping_add(1);
        let Some(world) = self.world.as_ref() else {
            return;
        };
        let c = Config::new(flags);
        let ctx = Arc::new(SmtpContext {
            gateway: world.gateway.clone(),
            tokens: world.store.tokens.clone(),
            hostname: "mx.fuzz".into(),
            limits: c.limits,
            auth_without_tls: c.auth_without_tls,
        });
        let mut session = Session::new(ctx, c.listener, c.peer, c.tls, c.tls_available);
        session.greeting();
        let out = session.take_output();
        self.show(b"S", &out);
        check_replies(&out);
        let mut upgraded = false;
        'reads: for read in reads(input) {
            for piece in read.chunks(c.piece) {
                assert!(!session.is_closed());
                self.show(b"C", piece);
                let step = self.rt.block_on(session.ingest(piece));
                let out = session.take_output();
                self.show(b"S", &out);
                check_replies(&out);
                match step {
                    Step::Continue => assert!(!session.is_closed()),
                    Step::Close => {
                        assert!(session.is_closed());
                        break 'reads;
                    }
                    Step::StartTls => {
                        // Offered, not yet up, and answered with the 220 (the rest of this read
                        // was discarded by the session, RFC 3207 §4.2).
                        assert!(c.tls_available && c.tls.is_none() && !upgraded);
                        assert!(session.tls().is_none());
                        assert!(out.ends_with(b"220 2.0.0 Ready to start TLS\r\n"));
                        self.show(b"--", b"TLS started");
                        session.tls_started(c.version);
                        upgraded = true;
                    }
                }
            }
        }
        if !session.is_closed() {
            self.show(b"--", b"idle timeout");
            session.timed_out();
            let out = session.take_output();
            self.show(b"S", &out);
            check_replies(&out);
            assert!(out.starts_with(b"421 4.4.2 "));
            assert!(session.is_closed());
        }
        // A failed AUTH left lockout state in the gateway (where the lockout lives): a new
        // gateway over the same store, so that an earlier input's lock does not change what a
        // later one does.
        if !world.gateway.lockout().is_empty() {
            let gateway = self.rt.block_on(World::gateway(&world.store));
            if let Some(w) = self.world.as_mut() {
                w.gateway = gateway;
            }
        }
    }
}

impl Fixture {
    fn show(&self, who: &[u8], bytes: &[u8]) {
        if self.trace && !bytes.is_empty() {
            eprintln!(
                "{}: {:?}",
                String::from_utf8_lossy(who),
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

/// The input cut into reads at each separator, each at most one driver buffer long.
fn reads(input: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(input);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(p) => {
                rest = r.get(p + SEPARATOR.len()..);
                r.get(..p)
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
    .flat_map(|read| read.chunks(READ_BUF))
}

/// Replies are whole lines: `NNN` then ` ` or `-`, printable, CRLF, at most 512 octets, UTF-8;
/// none is the 451 of a fault.
fn check_replies(out: &[u8]) {
    let text = match std::str::from_utf8(out) {
        Ok(t) => t,
        Err(e) => panic!(
            "reply is not UTF-8 ({e}): {:?}",
            String::from_utf8_lossy(out)
        ),
    };
    assert!(
        text.is_empty() || text.ends_with("\r\n"),
        "unterminated reply: {text:?}"
    );
    for line in text.split_terminator("\r\n") {
        let b = line.as_bytes();
        let well_formed = b.len() >= 4
            && matches!(b.first(), Some(b'2'..=b'5'))
            && b.iter().take(3).all(u8::is_ascii_digit)
            && matches!(b.get(3), Some(b' ' | b'-'))
            && !line.contains(|c: char| c.is_ascii_control() && c != '\t');
        assert!(well_formed, "malformed reply line: {line:?}");
        assert!(
            !line.starts_with("451 4.3.0"),
            "temporary failure without a fault: {line:?}"
        );
        assert!(
            b.len() + 2 <= 512,
            "reply line of {} octets: {line:?}",
            b.len() + 2
        );
    }
}
