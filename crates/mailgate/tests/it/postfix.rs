//! Postfix (Debian's package) as a real relay client: a private Postfix instance relays through
//! Mailgate's SMTP submission door with STARTTLS and SASL, a message arrives at the test sink
//! (`mailgate_relay::testing::Sink`, Mailgate's smarthost), and every refusal a relay client can
//! meet comes back to Postfix as the documented reply, which Postfix logs in its maillog.
//!
//! Decisions:
//! - **One Postfix instance, one Mailgate, every scenario at once.** Each scenario is one message
//!   injected into Postfix over SMTP (raw SMTP over a `TcpStream`: Postfix answers
//!   `250 2.0.0 Ok: queued as <queue id>`); the queue id ties the maillog lines to the scenario.
//!   What differs between scenarios is the envelope sender (which picks the SASL credentials,
//!   `smtp_sender_dependent_authentication` with a `texthash:` map keyed by sender) or the
//!   recipient (which picks a transport, `transport_maps`): a transport without TLS, one that
//!   ignores the server's SIZE, one pointing at the relay listener without SASL.
//! - **Private instance, run as root.** Its own `config_directory`, `queue_directory` and
//!   `data_directory` in a temporary directory (made 0755 so the `postfix` user can reach it),
//!   main.cf and master.cf from Debian's pristine copies in /usr/share/postfix, chroot off (the
//!   chroot would need copies of the SASL plugins and /etc files), smtpd on a free loopback port,
//!   `maillog_file` in the temporary directory. `postfix -c DIR stop` runs on drop (also on a
//!   panic), then the master is killed by its pid if it is still there. The system instance in
//!   /etc/postfix (the benchmark's) is never touched.
//! - **TLS is verified, not just encrypted:** `smtp_tls_security_level = secure` with
//!   `smtp_tls_CAfile` = the demo certificate Mailgate serves and the relay host named
//!   `[localhost]` (the certificate's DNS name; `smtp_host_lookup = native` reads /etc/hosts).
//!   The test asserts Postfix logged "Verified TLS connection established".
//! - **No retries that could lock 127.0.0.1 out.** `smtp_sasl_auth_soft_bounce = no` turns the
//!   535 for the bad password into a bounce; with Postfix's default (defer and retry) every queue
//!   run would count another failure against Mailgate's per-IP AUTH lockout (20 per 15 min), and
//!   then every sender behind this Postfix would get `auth.locked`. Bounces (DSNs from `<>`) are
//!   discarded (`sender_dependent_default_transport_maps` maps `<>` to `discard:`) so they do not
//!   travel back through Mailgate.
//! - **Postfix's own limits are raised so it meets Mailgate's:** Postfix sends at most 50
//!   recipients per transaction by default (below Mailgate's 100), so
//!   `smtp_destination_recipient_limit = 1000` for the too-many-recipients scenario; its default
//!   `message_size_limit` (10 MB) is below Mailgate's 36,700,160 bytes, so it is raised to 64 MB.
//! - **What Postfix does with each reply** (asserted): 5xx at MAIL FROM, end of DATA or AUTH is
//!   a bounce; the 452 4.5.3 at the 101st RCPT TO defers that one recipient, which Postfix
//!   delivers in a new transaction on its next queue run (so it arrives too); an EHLO
//!   `SIZE 36700160` makes Postfix bounce a larger message itself without sending MAIL FROM
//!   ("message size ... exceeds size limit 36700160 of server"), so Mailgate's own 552 5.3.4
//!   `message.too_large` is heard through a transport with `smtp_discard_ehlo_keywords = size`.
//! - **No STARTTLS before AUTH:** Postfix never sends AUTH when it is not offered (Mailgate
//!   offers it only after STARTTLS), so the refusal a Postfix without TLS meets is the 530 5.7.0
//!   `tls.required` at MAIL FROM.
//! - **Relay from an unlisted IP:** the organisation is the demo's with `smtp_relay.allowed_ips`
//!   set to 192.0.2.0/24, and a transport without SASL points at the relay listener.
//! - Missing Postfix or Cyrus SASL plugins fail the test with a message naming ./scripts/test,
//!   which installs them.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mailgate_relay::testing::{Received, SinkConfig};

use crate::harness::{
    FAST_RELAY, Gateway, eventually, example_org, free_port, smarthost_yaml, start_sink,
};
use crate::smtp::PW;

const POSTFIX: &str = "/usr/sbin/postfix";
const POSTCONF: &str = "/usr/sbin/postconf";
const POSTQUEUE: &str = "/usr/sbin/postqueue";

/// Fails (never skips) when Postfix, its SASL client plugins or root are missing.
fn require_postfix() {
    let install =
        "run ./scripts/test, which installs postfix and libsasl2-modules from Debian's packages";
    assert!(
        Path::new(POSTFIX).exists() && Path::new(POSTCONF).exists(),
        "Postfix is not installed ({POSTFIX}): {install}"
    );
    let plugin_dirs = std::fs::read_dir("/usr/lib")
        .map(|d| d.flatten().map(|e| e.path().join("sasl2")).collect())
        .unwrap_or_else(|_| Vec::new());
    assert!(
        plugin_dirs
            .iter()
            .chain([PathBuf::from("/usr/lib/sasl2")].iter())
            .any(|d| d.join("libplain.so").exists()),
        "Cyrus SASL's PLAIN plugin (libsasl2-modules) is not installed: {install}"
    );
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the Postfix test starts a private Postfix instance and must run as root (as CI does)"
    );
}

/// Runs a command that must succeed.
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first of `candidates` that exists.
fn pristine(candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("none of {candidates:?} exists: is Postfix installed?"))
}

/// A private Postfix instance in a temporary directory, stopped on drop.
struct Postfix {
    dir: tempfile::TempDir,
    /// smtpd's loopback port (where mail is injected).
    port: u16,
}

impl Postfix {
    /// Makes the instance's directories and copies Debian's pristine main.cf and master.cf.
    fn create() -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("mailgate-postfix-")
            .tempdir()
            .expect("tempdir");
        // Postfix's daemons run as `postfix` and must reach the queue and data directories.
        run(Command::new("chmod").arg("755").arg(dir.path()));
        let pf = Postfix {
            dir,
            port: free_port(),
        };
        let etc = pf.config_dir();
        for d in [&etc, &pf.queue_dir(), &pf.data_dir()] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        run(Command::new("chown").arg("postfix").arg(pf.data_dir()));
        std::fs::copy(
            pristine(&[
                "/usr/share/postfix/main.cf.debian",
                "/etc/postfix/main.cf.proto",
            ]),
            etc.join("main.cf"),
        )
        .expect("copy main.cf");
        std::fs::copy(
            pristine(&[
                "/usr/share/postfix/master.cf.dist",
                "/etc/postfix/master.cf.proto",
            ]),
            etc.join("master.cf"),
        )
        .expect("copy master.cf");
        pf
    }

    /// Writes a lookup table (root's, mode 0600, as a password table should be) into the
    /// config directory; returns its `texthash:` name.
    fn map(&self, name: &str, text: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = self.config_dir().join(name);
        std::fs::write(&path, text).expect("write map");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        format!("texthash:{}", path.display())
    }

    /// Sets `settings` in main.cf and adds `services` to master.cf (both `postconf` syntax),
    /// puts smtpd on the instance's loopback port, starts Postfix and waits until it listens.
    fn start(&self, settings: &[String], services: &[String]) {
        let etc = self.config_dir();
        let root = self.dir.path().display().to_string();
        let mut all = vec![
            format!("queue_directory = {}", self.queue_dir().display()),
            format!("data_directory = {}", self.data_dir().display()),
            format!("maillog_file = {}", self.maillog_path().display()),
            format!("maillog_file_prefixes = {root}"),
            "myhostname = postfix.test".to_owned(),
            "inet_interfaces = 127.0.0.1".to_owned(),
            "inet_protocols = ipv4".to_owned(),
            "mynetworks = 127.0.0.0/8".to_owned(),
            "mydestination =".to_owned(),
            "alias_maps =".to_owned(),
            "alias_database =".to_owned(),
            "local_recipient_maps =".to_owned(),
            "mailbox_size_limit = 0".to_owned(),
            // Retry deferred mail at once (the too-many-recipients scenario waits for it).
            "queue_run_delay = 1s".to_owned(),
            "minimal_backoff_time = 1s".to_owned(),
            "maximal_backoff_time = 2s".to_owned(),
        ];
        all.extend(settings.iter().cloned());
        let cfg = |args: &[&str]| {
            run(Command::new(POSTCONF).arg("-c").arg(&etc).args(args));
        };
        let mut args = vec!["-e"];
        args.extend(all.iter().map(String::as_str));
        cfg(&args);
        cfg(&["-F", "*/*/chroot = n"]);
        cfg(&["-M#", "smtp/inet"]);
        let inet = format!(
            "127.0.0.1:{0}/inet = 127.0.0.1:{0} inet n - n - - smtpd",
            self.port
        );
        let mut args = vec!["-Me", inet.as_str()];
        args.extend(services.iter().map(String::as_str));
        cfg(&args);
        // `check` creates the queue's subdirectories with Postfix's ownership and modes.
        run(Command::new(POSTFIX).arg("-c").arg(&etc).arg("check"));
        run(Command::new(POSTFIX).arg("-c").arg(&etc).arg("start"));
        assert!(
            eventually(Duration::from_secs(30), || TcpStream::connect((
                "127.0.0.1",
                self.port
            ))
            .is_ok()),
            "Postfix did not listen on 127.0.0.1:{} within 30 s:\n{}",
            self.port,
            self.maillog()
        );
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn maillog_path(&self) -> PathBuf {
        self.dir.path().join("maillog")
    }

    fn maillog(&self) -> String {
        std::fs::read_to_string(self.maillog_path()).unwrap_or_default()
    }

    /// `postqueue -f`: attempt every queued message now (deferred ones included).
    fn flush(&self) {
        let _ = Command::new(POSTQUEUE)
            .arg("-c")
            .arg(self.config_dir())
            .arg("-f")
            .status();
    }

    fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.queue_dir().join("pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Injects one message over SMTP; returns Postfix's queue id.
    fn submit(&self, from: &str, to: &[String], message: &[u8]) -> String {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to Postfix");
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        s.set_write_timeout(Some(Duration::from_secs(60))).ok();
        let mut r = BufReader::new(s.try_clone().expect("clone socket"));
        let mut w = BufWriter::new(s);
        expect(&mut r, 220);
        command(&mut w, &mut r, "EHLO injector.test", 250);
        command(&mut w, &mut r, &format!("MAIL FROM:<{from}>"), 250);
        for t in to {
            command(&mut w, &mut r, &format!("RCPT TO:<{t}>"), 250);
        }
        command(&mut w, &mut r, "DATA", 354);
        w.write_all(message).expect("write message");
        let queued = command(&mut w, &mut r, ".", 250);
        command(&mut w, &mut r, "QUIT", 221);
        queued
            .rsplit_once("queued as ")
            .map(|(_, id)| id.trim().to_owned())
            .unwrap_or_else(|| panic!("no queue id in `{queued}`"))
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = self.master_pid();
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(self.config_dir())
            .arg("stop")
            .output();
        if let Some(pid) = pid {
            let alive = || Path::new(&format!("/proc/{pid}")).exists();
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Reads one (possibly multi-line) reply; asserts its code; returns its text.
fn expect(r: &mut impl BufRead, code: u16) -> String {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("read reply from Postfix");
        assert!(
            line.len() >= 4,
            "short reply from Postfix: `{line}` after `{text}`"
        );
        text.push_str(line[4..].trim_end());
        text.push('\n');
        if line.as_bytes()[3] == b' ' {
            assert_eq!(&line[..3], code.to_string(), "Postfix replied `{line}`");
            return text;
        }
    }
}

fn command(w: &mut BufWriter<TcpStream>, r: &mut impl BufRead, line: &str, code: u16) -> String {
    w.write_all(line.as_bytes()).expect("write command");
    w.write_all(b"\r\n").expect("write command");
    w.flush().expect("flush command");
    expect(r, code)
}

/// A message with `filler` bytes of body lines, ready for DATA (CRLF, no leading dots).
fn message(header_from: &str, to: &str, subject: &str, filler: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {header_from}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello from Postfix.\r\n"
    )
    .into_bytes();
    let line = format!("{}\r\n", "x".repeat(76));
    m.reserve(filler + line.len());
    while m.len() < filler {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// One recipient's delivery result in Postfix's maillog.
#[derive(Debug, Clone)]
struct Outcome {
    rcpt: String,
    /// `sent`, `bounced` or `deferred`.
    status: String,
    /// The text in parentheses after the status.
    detail: String,
}

/// Every `<queue id>: to=<...>, ..., status=...` line of `qid`, in log order.
fn outcomes(log: &str, qid: &str) -> Vec<Outcome> {
    let key = format!(" {qid}: to=<");
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            let (rcpt, rest) = rest.split_once('>')?;
            let (status, detail) = rest.split_once(", status=")?.1.split_once(' ')?;
            let detail = detail.strip_prefix('(')?.strip_suffix(')')?;
            Some(Outcome {
                rcpt: rcpt.to_owned(),
                status: status.to_owned(),
                detail: detail.to_owned(),
            })
        })
        .collect()
}

/// Asserts Postfix's record of a refusal: its status, Mailgate's reply (code and start of text,
/// then `[mailgate: <reason>, decision <26 chars>]`) and the command it answered (`None` for a
/// SASL failure, which Postfix words differently).
fn assert_refused(
    o: &Outcome,
    status: &str,
    code: u16,
    text: &str,
    reason: &str,
    stage: Option<&str>,
) {
    assert_eq!(o.status, status, "{o:?}");
    let reply = o
        .detail
        .split_once(" said: ")
        .unwrap_or_else(|| panic!("no server reply in {o:?}"))
        .1;
    let start = format!("{code} {text}");
    assert!(
        reply.starts_with(&start),
        "`{reply}` does not start with `{start}`"
    );
    let tag = format!("[mailgate: {reason}, decision ");
    let at = reply
        .find(&tag)
        .unwrap_or_else(|| panic!("`{reply}` lacks `{tag}`"));
    let id = &reply[at + tag.len()..];
    assert!(
        id.len() > 26 && id.as_bytes()[26] == b']',
        "decision id in `{reply}`"
    );
    assert!(reply.contains("] Remedy: "), "`{reply}` has no remedy");
    match stage {
        Some(stage) => {
            let end = format!("(in reply to {stage} command)");
            assert!(reply.ends_with(&end), "`{reply}` does not end with `{end}`");
        }
        None => assert!(
            o.detail.starts_with("SASL authentication failed; server "),
            "{o:?}"
        ),
    }
}

/// What one scenario injects.
struct Scenario {
    name: &'static str,
    /// Envelope sender: picks the SASL credentials.
    from: &'static str,
    header_from: &'static str,
    /// Recipients: a special one picks a transport.
    to: Vec<String>,
    filler: usize,
}

impl Scenario {
    fn new(name: &'static str, from: &'static str, to: &str) -> Scenario {
        Scenario {
            name,
            from,
            header_from: from,
            to: vec![to.to_owned()],
            filler: 0,
        }
    }

    fn subject(&self) -> String {
        format!("postfix scenario {}", self.name)
    }
}

/// Larger than the demo organisation's `limits.max_message_bytes` (36,700,160).
const TOO_LARGE: usize = 36_800_000;

#[test]
fn postfix_relays_through_submission_with_sasl_and_gets_the_documented_refusals() {
    require_postfix();
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(&rt, SinkConfig::default());

    // Mailgate: the demo organisation with 127.0.0.1 not allowlisted on the relay listener,
    // relaying to the sink; `--demo` for its self-signed certificate (the directory is applied
    // first, so the demo does not re-apply its own).
    let gw = Gateway::new();
    let org = std::fs::read_to_string(example_org()).unwrap();
    let listed = "smtp_relay:\n  allowed_ips: [127.0.0.1/32]";
    assert!(org.contains(listed), "the demo organisation changed");
    let org = org.replace(listed, "smtp_relay:\n  allowed_ips: [192.0.2.0/24]");
    gw.apply("org.yaml", &org);
    gw.apply("smarthost.yaml", &smarthost_yaml(sink.addr.port()));
    let server = gw.serve_with(&format!("{FAST_RELAY}capture = false\n"), &["--demo"]);
    let ca = gw.data_dir().join("tls/cert.pem");
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.to_owned();
    let (submission, relay) = (port(&server.smtp), port(&server.smtp_relay));

    // Postfix: relayhost = Mailgate's submission door, STARTTLS verified, SASL per sender.
    let alice = format!("alice@example.com:{PW}");
    let passwords = [
        ("alice@example.com", alice.clone()),
        ("al@example.com", alice.clone()),
        ("support@example.com", alice.clone()),
        ("sales@example.com", alice.clone()),
        ("ceo@example.com", alice.clone()),
        ("alice@gmail.test", alice),
        ("frank@example.com", format!("frank@example.com:{PW}")),
        ("bob@example.com", format!("bob@example.com:{PW}")),
        ("erin@example.com", "erin@example.com:wrong".to_owned()),
    ];
    let postfix = Postfix::create();
    let settings = vec![
        format!("relayhost = [localhost]:{submission}"),
        "smtp_host_lookup = native".to_owned(),
        "smtp_tls_security_level = secure".to_owned(),
        "smtp_tls_secure_cert_match = nexthop".to_owned(),
        format!("smtp_tls_CAfile = {}", ca.display()),
        "smtp_tls_loglevel = 1".to_owned(),
        "smtp_sasl_auth_enable = yes".to_owned(),
        "smtp_sasl_security_options = noanonymous".to_owned(),
        "smtp_sasl_tls_security_options = noanonymous".to_owned(),
        "smtp_sasl_mechanism_filter = plain, login".to_owned(),
        "smtp_sender_dependent_authentication = yes".to_owned(),
        format!(
            "smtp_sasl_password_maps = {}",
            postfix.map(
                "sasl_passwd",
                &passwords
                    .iter()
                    .map(|(sender, cred)| format!("{sender} {cred}\n"))
                    .collect::<String>()
            )
        ),
        "smtp_sasl_auth_soft_bounce = no".to_owned(),
        format!(
            "transport_maps = {}",
            postfix.map(
                "transport",
                &format!(
                    "plain@example.org mg-plain:[localhost]:{submission}\n\
                     nosize@example.org mg-nosize:[localhost]:{submission}\n\
                     relay@example.org mg-relay:[localhost]:{relay}\n"
                )
            )
        ),
        format!(
            "sender_dependent_default_transport_maps = {}",
            postfix.map("sender_transport", "<> discard:\n")
        ),
        "smtp_destination_recipient_limit = 1000".to_owned(),
        "message_size_limit = 67108864".to_owned(),
    ];
    let services = [
        "mg-plain/unix = mg-plain unix - - n - - smtp -o smtp_tls_security_level=none",
        "mg-nosize/unix = mg-nosize unix - - n - - smtp -o smtp_discard_ehlo_keywords=size",
        "mg-relay/unix = mg-relay unix - - n - - smtp -o smtp_sasl_auth_enable=no",
    ]
    .map(str::to_owned);
    postfix.start(&settings, &services);

    // The scenarios, all in flight at once.
    let mut scenarios = vec![
        Scenario::new("accepted", "alice@example.com", "accepted@example.org"),
        Scenario::new("no-tls", "alice@example.com", "plain@example.org"),
        Scenario::new("bad-password", "erin@example.com", "x@example.org"),
        Scenario::new("unowned-envelope", "ceo@example.com", "x@example.org"),
        Scenario {
            header_from: "ceo@example.com",
            ..Scenario::new("unowned-header", "al@example.com", "x@example.org")
        },
        Scenario::new("pending-send-as", "alice@gmail.test", "x@example.org"),
        Scenario::new("suspended", "bob@example.com", "x@example.org"),
        Scenario {
            to: (0..101).map(|i| format!("r{i}@example.org")).collect(),
            ..Scenario::new("too-many-recipients", "support@example.com", "")
        },
        Scenario {
            filler: TOO_LARGE,
            ..Scenario::new(
                "too-large-size-advertised",
                "sales@example.com",
                "x@example.org",
            )
        },
        Scenario {
            filler: TOO_LARGE,
            ..Scenario::new("too-large", "alice@example.com", "nosize@example.org")
        },
        Scenario::new(
            "relay-unlisted-ip",
            "printer@example.com",
            "relay@example.org",
        ),
    ];
    for _ in 0..4 {
        scenarios.push(Scenario::new(
            "daily-limit",
            "frank@example.com",
            "x@example.org",
        ));
    }
    let queued: Vec<(String, &Scenario)> = scenarios
        .iter()
        .map(|s| {
            let m = message(s.header_from, &s.to[0], &s.subject(), s.filler);
            (postfix.submit(s.from, &s.to, &m), s)
        })
        .collect();
    let qids = |name: &str| -> Vec<&str> {
        queued
            .iter()
            .filter(|(_, s)| s.name == name)
            .map(|(q, _)| q.as_str())
            .collect()
    };
    let one = |name: &str| qids(name)[0].to_owned();

    // Done: every refused message bounced, the 101st recipient delivered on retry, and the
    // accepted messages at the sink.
    let arrived = |subject: &str| -> Vec<Received> {
        let needle = format!("Subject: {subject}\r\n");
        sink.received()
            .into_iter()
            .filter(|r| String::from_utf8_lossy(&r.data).contains(&needle))
            .collect()
    };
    let done = || {
        let log = postfix.maillog();
        let finished = |q: &str| {
            outcomes(&log, q)
                .iter()
                .any(|o| o.status == "sent" || o.status == "bounced")
        };
        let all_sent = |q: &str, n: usize| {
            let o = outcomes(&log, q);
            o.iter().filter(|o| o.status == "sent").count() == n
        };
        queued
            .iter()
            .filter(|(_, s)| s.name != "too-many-recipients")
            .all(|(q, _)| finished(q))
            && all_sent(&one("too-many-recipients"), 101)
            && arrived("postfix scenario accepted").len() == 1
            && arrived("postfix scenario daily-limit").len() == 3
            && arrived("postfix scenario too-many-recipients")
                .iter()
                .map(|r| r.recipients.len())
                .sum::<usize>()
                == 101
    };
    // Postfix retries the deferred 101st recipient by itself (queue_run_delay 1s); once, under
    // CI's load, its queue manager did not within 60 s (no connection to Mailgate after the
    // 452). What is tested is Mailgate's 452 and that the retry is delivered, not Postfix's
    // scheduler: ask for the retry (`postqueue -f`) every 5 s while waiting.
    let mut flushed = Instant::now();
    let wait = || {
        if done() {
            return true;
        }
        if flushed.elapsed() >= Duration::from_secs(5) {
            postfix.flush();
            flushed = Instant::now();
        }
        false
    };
    if !eventually(Duration::from_secs(60), wait) {
        let log = postfix.maillog();
        let statuses: Vec<&str> = log
            .lines()
            .filter(|l| {
                (l.contains("status=") && !l.contains("status=sent"))
                    || l.contains("warning")
                    || l.contains("error")
                    || l.contains("fatal")
            })
            .collect();
        drop(postfix);
        let (_, _, mailgate_log) = server.stop();
        panic!(
            "not every scenario finished within 60 s.\nqueued: {:?}\nsink: {} messages\nPostfix (refusals, warnings):\n{}\nMailgate log tail:\n{}",
            queued
                .iter()
                .map(|(q, s)| format!("{} {q}", s.name))
                .collect::<Vec<_>>(),
            sink.received().len(),
            statuses.join("\n"),
            mailgate_log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let log = postfix.maillog();
    let only = |name: &str| -> Outcome {
        let o = outcomes(&log, &one(name));
        assert_eq!(o.len(), 1, "{name}: {o:?}");
        o[0].clone()
    };

    // Sent over verified TLS with AUTH, and delivered to the sink as Postfix relayed it.
    let o = only("accepted");
    assert_eq!(o.status, "sent", "{o:?}");
    assert!(o.detail.starts_with("250 2.0.0 OK "), "{o:?}");
    assert!(o.detail.contains("[mailgate: decision "), "{o:?}");
    let verified =
        format!("Verified TLS connection established to localhost[127.0.0.1]:{submission}");
    assert!(log.contains(&verified), "no `{verified}` in the maillog");
    let got = &arrived("postfix scenario accepted")[0];
    assert_eq!(got.from, "alice@example.com");
    assert_eq!(got.recipients, ["accepted@example.org"]);
    let text = String::from_utf8_lossy(&got.data);
    assert!(text.contains("by postfix.test (Postfix)"), "{text}");

    // Without TLS Postfix sends no AUTH (none is offered) and MAIL FROM is refused.
    assert_refused(
        &only("no-tls"),
        "bounced",
        530,
        "5.7.0 Must issue a STARTTLS command first.",
        "tls.required",
        Some("MAIL FROM"),
    );
    assert_refused(
        &only("bad-password"),
        "bounced",
        535,
        "5.7.8 Username and Password not accepted.",
        "auth.invalid",
        None,
    );
    assert_refused(
        &only("unowned-envelope"),
        "bounced",
        553,
        "5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com",
        "sender.not_owned",
        Some("MAIL FROM"),
    );
    assert_refused(
        &only("unowned-header"),
        "bounced",
        553,
        "5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com",
        "sender.not_owned",
        Some("end of DATA"),
    );
    assert_refused(
        &only("pending-send-as"),
        "bounced",
        553,
        "5.7.1 <alice@gmail.test>: Sender address rejected: not verified",
        "sender.unverified",
        Some("MAIL FROM"),
    );
    assert_refused(
        &only("suspended"),
        "bounced",
        550,
        "5.7.0 Mail Sending denied",
        "account.suspended",
        Some("MAIL FROM"),
    );

    // Too many recipients: the 101st is deferred with 452 4.5.3, then Postfix sends it alone.
    let o = outcomes(&log, &one("too-many-recipients"));
    let deferred: Vec<&Outcome> = o.iter().filter(|o| o.status == "deferred").collect();
    assert_eq!(deferred.len(), 1, "{deferred:?}");
    assert_refused(
        deferred[0],
        "deferred",
        452,
        "4.5.3 Your message has too many recipients.",
        "policy.too_many_recipients",
        Some("RCPT TO"),
    );
    assert!(
        o.iter()
            .any(|x| x.rcpt == deferred[0].rcpt && x.status == "sent"),
        "{o:?}"
    );
    let mut sizes: Vec<usize> = arrived("postfix scenario too-many-recipients")
        .iter()
        .map(|r| r.recipients.len())
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 100]);

    // Too large: Postfix honours the advertised SIZE itself; without it Mailgate says 552.
    let o = only("too-large-size-advertised");
    assert_eq!(o.status, "bounced", "{o:?}");
    assert!(
        o.detail
            .contains("exceeds size limit 36700160 of server localhost[127.0.0.1]"),
        "{o:?}"
    );
    assert_refused(
        &only("too-large"),
        "bounced",
        552,
        "5.3.4",
        "message.too_large",
        Some("end of DATA"),
    );

    // The relay listener refuses 127.0.0.1 without AUTH once it is not allowlisted.
    assert_refused(
        &only("relay-unlisted-ip"),
        "bounced",
        550,
        "5.7.1 Invalid credentials for relay [127.0.0.1].",
        "relay.ip_not_allowed",
        Some("MAIL FROM"),
    );

    // Daily limit: frank may send 3 a day; the fourth, whichever it is, bounces.
    let frank: Vec<Outcome> = qids("daily-limit")
        .iter()
        .flat_map(|q| outcomes(&log, q))
        .collect();
    assert_eq!(frank.len(), 4, "{frank:?}");
    assert_eq!(frank.iter().filter(|o| o.status == "sent").count(), 3);
    let refused = frank.iter().find(|o| o.status != "sent").unwrap();
    // Decided at MAIL FROM, or at the end of DATA when two of them raced past MAIL FROM.
    let stage = if refused.detail.contains("(in reply to MAIL FROM command)") {
        "MAIL FROM"
    } else {
        "end of DATA"
    };
    assert_refused(
        refused,
        "bounced",
        550,
        "5.4.5 Daily user sending limit exceeded.",
        "limit.daily_messages",
        Some(stage),
    );

    // Nothing refused reached the sink.
    for r in sink.received() {
        let text = String::from_utf8_lossy(&r.data);
        assert!(
            ["accepted", "daily-limit", "too-many-recipients"]
                .iter()
                .any(|n| text.contains(&format!("Subject: postfix scenario {n}\r\n"))),
            "a refused message arrived: {text:.300}"
        );
    }
    eprintln!("postfix scenarios took {:?}", started.elapsed());
    drop(postfix);
    let (clean, _, logs) = server.stop();
    assert!(clean, "{logs}");
}
