//! `mailgate doctor smtp` against real SMTP servers: Mailgate's submission door (`serve --demo`)
//! and a private Postfix with Cyrus SASL (sasldb), whose replies differ from Mailgate's. The
//! real binary runs with `--json`; each case asserts the exit status, the problem codes and the
//! step that found them, and that no secret (the password, the token, the base64 AUTH payloads)
//! appears in standard output or standard error.
//!
//! Decisions:
//! - **One server, every case**: the Mailgate cases share one `serve --demo` (the doctor opens
//!   its own connection per run). Mailgate locks an IP out after 20 bad AUTHs in 15 minutes: the
//!   cases make two (a wrong password, a made-up XOAUTH2 token).
//! - **The demo certificate is trusted with `--ca-file`** (data dir `tls/cert.pem`, written by
//!   `serve --demo`), so "all good" includes a verified certificate; one case without it shows
//!   the certificate finding while every other step still runs.
//! - **Postfix as a server**: its own config directory in a temporary directory (as in
//!   postfix.rs, which runs it as a client), run as root, chroot off; `smtpd_tls_security_level =
//!   encrypt` and `smtpd_tls_auth_only = yes` (a submission port's usual settings), Cyrus SASL
//!   with a sasldb made by `saslpasswd2` (Debian's Postfix reads `<config_directory>/sasl/smtpd.conf`;
//!   `cyrus_sasl_config_path` points there too), `smtpd_sender_login_maps` with
//!   `reject_sender_login_mismatch`, and a `check_recipient_access` table that REJECTs one
//!   recipient. Postfix's default `smtpd_delay_reject = yes` reports the sender's refusal at RCPT
//!   TO: the doctor must still name `sender.not_owned` there. The certificate is made with rcgen
//!   (`mailgate_tls::self_signed`), a server certificate for localhost and 127.0.0.1.
//! - Missing Postfix, `saslpasswd2` or root fail the test (never skip) naming ./scripts/test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use crate::harness::{BIN, demo, eventually, free_port, stdout_json};
use crate::smtp::PW;

/// One doctor run: exit status, the JSON report, and both outputs as text.
struct Doctor {
    status: i32,
    json: Value,
    out: String,
}

impl Doctor {
    fn codes(&self) -> Vec<String> {
        self.json["problems"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| p["code"].as_str().unwrap_or("(none)").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The problems as (step id, code).
    fn problems(&self) -> Vec<(String, String)> {
        self.json["problems"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["step"].as_str().unwrap_or("").to_owned(),
                            p["code"].as_str().unwrap_or("(none)").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn step(&self, id: &str) -> &Value {
        self.json["steps"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["id"] == id))
            .unwrap_or_else(|| panic!("no step `{id}` in {}", self.out))
    }

    fn status_of(&self, id: &str) -> &str {
        self.step(id)["status"].as_str().unwrap_or("")
    }

    fn evidence(&self, id: &str) -> String {
        self.step(id)["evidence"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

/// The forms of `user`'s `secret` an SMTP client sends: the secret, base64 of it (AUTH LOGIN),
/// of the PLAIN payload and of the XOAUTH2 payload.
fn secret_forms(user: &str, secret: &str) -> Vec<String> {
    vec![
        secret.to_owned(),
        B64.encode(secret),
        B64.encode(format!("\0{user}\0{secret}")),
        B64.encode(format!("user={user}\x01auth=Bearer {secret}\x01\x01")),
    ]
}

fn output(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `mailgate doctor smtp <args> --json`; asserts that none of `secrets` is printed.
fn doctor(args: &[&str], secrets: &[String]) -> Doctor {
    let out = Command::new(BIN)
        .args(["doctor", "smtp"])
        .args(args)
        .args(["--json", "--timeout", "10"])
        .env_remove("MAILGATE_DOCTOR_PASSWORD")
        .env_remove("MAILGATE_DOCTOR_XOAUTH2_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run mailgate doctor smtp");
    let (status, stdout, stderr) = output(&out);
    let all = format!("{stdout}\n{stderr}");
    for s in secrets {
        assert!(!all.contains(s.as_str()), "secret `{s}` printed:\n{all}");
    }
    let json = stdout_json(&out, &format!("doctor smtp {args:?}"));
    Doctor {
        status,
        json,
        out: all,
    }
}

#[test]
fn doctor_smtp_against_mailgate_names_each_cause() {
    let (gw, srv) = demo();
    let ca = gw.data_dir().join("tls/cert.pem");
    assert!(ca.exists(), "serve --demo wrote no certificate at {ca:?}");
    let ca = ca.to_str().unwrap().to_owned();
    // 127.0.0.1:<port>: the demo certificate names 127.0.0.1 (an IP address SAN).
    let submission = srv.smtp.clone();
    let alice = secret_forms("alice@example.com", PW);
    let erin = secret_forms("erin@example.com", PW);
    let base = |user: &str, from: &str, to: &str| -> Vec<String> {
        [
            "--server",
            &submission,
            "--user",
            user,
            "--password",
            PW,
            "--from",
            from,
            "--to",
            to,
            "--ca-file",
            &ca,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let run = |args: &[String], secrets: &[String]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        doctor(&a, secrets)
    };

    // All good: STARTTLS with TLS 1.3 or 1.2, the certificate verified, AUTH, MAIL, RCPT, RSET.
    let d = run(
        &base("alice@example.com", "alice@example.com", "bob@example.com"),
        &alice,
    );
    assert_eq!(d.status, 0, "{}", d.out);
    assert_eq!(d.json["ok"], true, "{}", d.out);
    for id in [
        "connect",
        "banner",
        "ehlo",
        "tls",
        "tls.certificate",
        "ehlo.tls",
        "auth.mechanisms",
        "auth",
        "mail",
        "rcpt:bob@example.com",
        "rset",
        "quit",
    ] {
        assert_eq!(d.status_of(id), "pass", "{id}: {}", d.out);
    }
    let tls = d.evidence("tls");
    assert!(
        tls.contains("TLS 1.3, cipher ") || tls.contains("TLS 1.2, cipher "),
        "{tls}"
    );
    assert!(d.evidence("tls").contains("220 2.0.0 Ready to start TLS"));
    assert!(d.evidence("banner").starts_with("220 "), "{}", d.out);
    assert!(
        d.evidence("ehlo").contains("STARTTLS"),
        "the plaintext EHLO offers STARTTLS: {}",
        d.out
    );
    assert!(d.evidence("auth.mechanisms").contains("PLAIN"), "{}", d.out);
    assert!(d.evidence("auth").starts_with("235 "), "{}", d.out);

    // The same in text mode: the summary says so, and no secret either.
    let out = Command::new(BIN)
        .args(["doctor", "smtp"])
        .args(base(
            "alice@example.com",
            "alice@example.com",
            "bob@example.com",
        ))
        .args(["--timeout", "10"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (status, stdout, stderr) = output(&out);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("All good: "), "{stdout}");
    assert!(
        stdout.contains("ok    AUTH PLAIN as alice@example.com"),
        "{stdout}"
    );
    for s in &alice {
        assert!(!stdout.contains(s.as_str()) && !stderr.contains(s.as_str()));
    }

    // Without --ca-file the self-signed certificate is a finding, and the rest is still probed.
    let mut args = base("alice@example.com", "alice@example.com", "bob@example.com");
    args.truncate(args.len() - 2);
    let d = run(&args, &alice);
    assert_eq!(d.status, 3, "{}", d.out);
    assert_eq!(
        d.problems(),
        [("tls.certificate".to_owned(), "(none)".to_owned())]
    );
    assert!(
        d.evidence("tls.certificate").contains("UnknownIssuer"),
        "{}",
        d.out
    );
    assert_eq!(d.status_of("auth"), "pass", "{}", d.out);
    assert_eq!(d.status_of("rcpt:bob@example.com"), "pass", "{}", d.out);

    // --tls none: AUTH is not offered before STARTTLS, and MAIL FROM gets the 530.
    let mut args = base("alice@example.com", "alice@example.com", "bob@example.com");
    args.extend(["--tls".to_owned(), "none".to_owned()]);
    let d = run(&args, &alice);
    assert_eq!(d.status, 3, "{}", d.out);
    assert_eq!(
        d.problems(),
        [("mail".to_owned(), "tls.required".to_owned())]
    );
    assert!(
        d.evidence("mail")
            .starts_with("530 5.7.0 Must issue a STARTTLS command first."),
        "{}",
        d.out
    );
    assert_eq!(d.status_of("tls"), "skip");
    assert_eq!(d.status_of("auth"), "skip");

    // A wrong password (the only one: Mailgate locks an IP out after 20).
    let wrong = "not the password at all";
    let mut args = base("alice@example.com", "alice@example.com", "bob@example.com");
    args[5] = wrong.to_owned();
    let d = run(&args, &secret_forms("alice@example.com", wrong));
    assert_eq!(d.status, 3, "{}", d.out);
    assert_eq!(
        d.problems(),
        [("auth".to_owned(), "auth.invalid".to_owned())]
    );
    assert!(d.evidence("auth").starts_with("535"), "{}", d.out);
    assert_eq!(d.status_of("mail"), "skip", "{}", d.out);

    // A made-up XOAUTH2 token: Google's challenge, then 535.
    let token = "ya29.made-up-token-for-the-doctor";
    let d = doctor(
        &[
            "--server",
            &submission,
            "--user",
            "alice@example.com",
            "--xoauth2-token",
            token,
            "--from",
            "alice@example.com",
            "--ca-file",
            &ca,
        ],
        &secret_forms("alice@example.com", token),
    );
    assert_eq!(d.status, 3, "{}", d.out);
    assert_eq!(
        d.problems(),
        [("auth".to_owned(), "auth.invalid".to_owned())]
    );
    assert!(
        d.step("auth")["title"]
            .as_str()
            .unwrap()
            .starts_with("AUTH XOAUTH2"),
        "{}",
        d.out
    );
    // Google's failure challenge, shown and decoded; the cause speaks of the token.
    assert!(d.evidence("auth").starts_with("334 "), "{}", d.out);
    assert!(
        d.step("auth")["diagnosis"]["cause"]
            .as_str()
            .unwrap()
            .contains("access token"),
        "{}",
        d.out
    );

    // An address alice does not own.
    let d = run(
        &base("alice@example.com", "ceo@example.com", "bob@example.com"),
        &alice,
    );
    assert_eq!(d.status, 3, "{}", d.out);
    assert_eq!(
        d.problems(),
        [("mail".to_owned(), "sender.not_owned".to_owned())]
    );
    assert_eq!(d.status_of("auth"), "pass");
    assert_eq!(d.status_of("rcpt:bob@example.com"), "skip");

    // erin is barred from external recipients: refused at RCPT TO.
    let d = run(
        &base(
            "erin@example.com",
            "erin@example.com",
            "someone@external.test",
        ),
        &erin,
    );
    assert_eq!(d.status, 3, "{}", d.out);
    assert_eq!(
        d.problems(),
        [(
            "rcpt:someone@external.test".to_owned(),
            "policy.recipient_restricted".to_owned()
        )]
    );
    assert_eq!(d.status_of("rset"), "pass");

    // Implicit TLS on the SMTPS listener, chosen with --tls implicit (the port is not 465).
    let mut args = base("alice@example.com", "alice@example.com", "bob@example.com");
    args[1].clone_from(&srv.smtps);
    args.extend(["--tls".to_owned(), "implicit".to_owned()]);
    let d = run(&args, &alice);
    assert_eq!(d.status, 0, "{}", d.out);
    assert!(d.evidence("tls").contains("TLS 1."), "{}", d.out);
    assert_eq!(d.status_of("tls.certificate"), "pass");

    // Nothing listens: a finding with a note, exit 3 (not 1).
    let closed = format!("127.0.0.1:{}", free_port());
    let d = doctor(&["--server", &closed], &[]);
    assert_eq!(d.status, 3, "{}", d.out);
    let note = d.step("connect")["note"].as_str().unwrap_or("");
    assert!(note.contains("nothing listens"), "{}", d.out);
    let (clean, _, logs) = srv.stop();
    assert!(clean, "{logs}");
}

// ------------------------------------------------------------------------------------ Postfix

const POSTFIX: &str = "/usr/sbin/postfix";
const POSTCONF: &str = "/usr/sbin/postconf";
const SASLPASSWD2: &str = "/usr/sbin/saslpasswd2";
/// alice's password on the Postfix server (its own, not the demo's).
const PF_PW: &str = "postfix-sasl-password-7";

fn require_postfix_server() {
    let install = "run ./scripts/test, which installs postfix, sasl2-bin and libsasl2-modules from Debian's packages";
    for bin in [POSTFIX, POSTCONF, SASLPASSWD2] {
        assert!(Path::new(bin).exists(), "{bin} is missing: {install}");
    }
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the Postfix server test starts a private Postfix instance and must run as root (as CI does)"
    );
}

fn must(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private Postfix SMTP server with SASL, stopped on drop.
struct PostfixServer {
    dir: tempfile::TempDir,
    port: u16,
}

impl PostfixServer {
    fn start() -> PostfixServer {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("mailgate-postfix-server-")
            .tempdir()
            .expect("tempdir");
        must(Command::new("chmod").arg("755").arg(dir.path()));
        let pf = PostfixServer {
            dir,
            port: free_port(),
        };
        let (etc, sasl) = (pf.etc(), pf.etc().join("sasl"));
        for d in [&etc, &sasl, &pf.path("spool"), &pf.path("data")] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        must(Command::new("chown").arg("postfix").arg(pf.path("data")));
        let pristine = |c: &[&str]| {
            c.iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("none of {c:?}: is Postfix installed?"))
        };
        std::fs::copy(
            pristine(&[
                "/usr/share/postfix/main.cf.debian",
                "/etc/postfix/main.cf.proto",
            ]),
            etc.join("main.cf"),
        )
        .expect("main.cf");
        std::fs::copy(
            pristine(&[
                "/usr/share/postfix/master.cf.dist",
                "/etc/postfix/master.cf.proto",
            ]),
            etc.join("master.cf"),
        )
        .expect("master.cf");
        // A server certificate for localhost and 127.0.0.1.
        let (cert, key) = mailgate_tls::self_signed(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(etc.join("cert.pem"), cert).unwrap();
        std::fs::write(etc.join("key.pem"), key).unwrap();
        std::fs::set_permissions(etc.join("key.pem"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        // Cyrus SASL: alice@example.com in a sasldb the smtpd processes (user postfix) can read.
        let db = sasl.join("sasldb2");
        let mut child = Command::new(SASLPASSWD2)
            .arg("-f")
            .arg(&db)
            .args(["-p", "-c", "-u", "example.com", "alice"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("saslpasswd2");
        {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(PF_PW.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "saslpasswd2: {out:?}");
        std::fs::write(
            sasl.join("smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: {}\n",
                db.display()
            ),
        )
        .unwrap();
        must(Command::new("chown").arg("-R").arg("postfix").arg(&sasl));
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::set_permissions(&sasl, std::fs::Permissions::from_mode(0o750)).unwrap();
        // Who owns which sender; the recipient the policy refuses.
        let map = |name: &str, text: &str| {
            let p = etc.join(name);
            std::fs::write(&p, text).unwrap();
            format!("texthash:{}", p.display())
        };
        let logins = map(
            "sender_logins",
            "alice@example.com alice@example.com\nceo@example.com boss@example.com\n",
        );
        let rcpt = map("recipient_access", "blocked@external.test REJECT\n");
        let root = pf.dir.path().display().to_string();
        let settings = [
            format!("queue_directory = {}", pf.path("spool").display()),
            format!("data_directory = {}", pf.path("data").display()),
            format!("maillog_file = {}", pf.path("maillog").display()),
            format!("maillog_file_prefixes = {root}"),
            "myhostname = postfix.test".to_owned(),
            "inet_interfaces = 127.0.0.1".to_owned(),
            "inet_protocols = ipv4".to_owned(),
            "mynetworks = 127.0.0.1/32".to_owned(),
            "mydestination =".to_owned(),
            "alias_maps =".to_owned(),
            "alias_database =".to_owned(),
            "local_recipient_maps =".to_owned(),
            format!("smtpd_tls_cert_file = {}", etc.join("cert.pem").display()),
            format!("smtpd_tls_key_file = {}", etc.join("key.pem").display()),
            "smtpd_tls_security_level = encrypt".to_owned(),
            "smtpd_tls_auth_only = yes".to_owned(),
            "smtpd_sasl_auth_enable = yes".to_owned(),
            "smtpd_sasl_type = cyrus".to_owned(),
            "smtpd_sasl_path = smtpd".to_owned(),
            format!("cyrus_sasl_config_path = {}", sasl.display()),
            "smtpd_sasl_security_options = noanonymous".to_owned(),
            format!("smtpd_sender_login_maps = {logins}"),
            "smtpd_sender_restrictions = reject_sender_login_mismatch".to_owned(),
            "smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination"
                .to_owned(),
            format!(
                "smtpd_recipient_restrictions = check_recipient_access {rcpt}, permit_sasl_authenticated, reject"
            ),
        ];
        let cfg = |args: &[&str]| must(Command::new(POSTCONF).arg("-c").arg(&etc).args(args));
        let mut args = vec!["-e"];
        args.extend(settings.iter().map(String::as_str));
        cfg(&args);
        cfg(&["-F", "*/*/chroot = n"]);
        cfg(&["-M#", "smtp/inet"]);
        let inet = format!(
            "127.0.0.1:{0}/inet = 127.0.0.1:{0} inet n - n - - smtpd",
            pf.port
        );
        cfg(&["-Me", &inet]);
        must(Command::new(POSTFIX).arg("-c").arg(&etc).arg("check"));
        must(Command::new(POSTFIX).arg("-c").arg(&etc).arg("start"));
        assert!(
            eventually(Duration::from_secs(30), || std::net::TcpStream::connect((
                "127.0.0.1",
                pf.port
            ))
            .is_ok()),
            "Postfix did not listen within 30 s:\n{}",
            pf.maillog()
        );
        pf
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn etc(&self) -> PathBuf {
        self.path("etc")
    }

    fn maillog(&self) -> String {
        std::fs::read_to_string(self.path("maillog")).unwrap_or_default()
    }
}

impl Drop for PostfixServer {
    fn drop(&mut self) {
        let pid: Option<u32> = std::fs::read_to_string(self.path("spool/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(self.etc())
            .arg("stop")
            .output();
        if let Some(pid) = pid {
            let alive = || Path::new(&format!("/proc/{pid}")).exists();
            let _ = eventually(Duration::from_secs(10), || !alive());
            if alive() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

#[test]
fn doctor_smtp_against_postfix_with_sasl_names_each_cause() {
    require_postfix_server();
    let pf = PostfixServer::start();
    let ca = pf.etc().join("cert.pem").display().to_string();
    let addr = format!("127.0.0.1:{}", pf.port);
    let secrets = secret_forms("alice@example.com", PF_PW);
    let run = |password: &str, from: &str, to: &str, extra: &[&str]| {
        let mut args = vec![
            "--server",
            addr.as_str(),
            "--user",
            "alice@example.com",
            "--password",
            password,
            "--from",
            from,
            "--to",
            to,
            "--ca-file",
            ca.as_str(),
        ];
        args.extend_from_slice(extra);
        let mut s = secrets.clone();
        s.extend(secret_forms("alice@example.com", password));
        doctor(&args, &s)
    };
    let with_log = |d: &Doctor| format!("{}\nPostfix's log:\n{}", d.out, pf.maillog());

    // All good, through Postfix's STARTTLS and Cyrus SASL.
    let d = run(PF_PW, "alice@example.com", "someone@external.test", &[]);
    assert_eq!(d.status, 0, "{}", with_log(&d));
    assert!(d.evidence("banner").contains("ESMTP Postfix"), "{}", d.out);
    assert_eq!(d.status_of("tls.certificate"), "pass", "{}", d.out);
    assert!(d.evidence("tls").contains("TLS 1."), "{}", d.out);
    assert_eq!(
        d.evidence("auth.mechanisms"),
        "AUTH PLAIN LOGIN",
        "{}",
        d.out
    );
    assert_eq!(d.evidence("auth"), "235 2.7.0 Authentication successful");

    // STARTTLS missing: Postfix's 530 at MAIL FROM (smtpd_tls_security_level = encrypt).
    let d = run(
        PF_PW,
        "alice@example.com",
        "someone@external.test",
        &["--tls", "none"],
    );
    assert_eq!(d.status, 3, "{}", with_log(&d));
    assert_eq!(
        d.problems(),
        [("mail".to_owned(), "tls.required".to_owned())]
    );
    assert_eq!(
        d.evidence("mail"),
        "530 5.7.0 Must issue a STARTTLS command first"
    );

    // A wrong password: Cyrus SASL's refusal.
    let d = run(
        "wrong-password-for-postfix",
        "alice@example.com",
        "someone@external.test",
        &[],
    );
    assert_eq!(d.status, 3, "{}", with_log(&d));
    assert_eq!(
        d.problems(),
        [("auth".to_owned(), "auth.invalid".to_owned())]
    );
    assert!(
        d.evidence("auth")
            .starts_with("535 5.7.8 Error: authentication failed"),
        "{}",
        d.out
    );
    // The diagnosis is Postfix's row, not Gmail's App Password advice.
    let cause = d.step("auth")["diagnosis"]["cause"].as_str().unwrap_or("");
    assert!(cause.contains("SASL"), "{}", d.out);

    // A sender alice does not own: Postfix says so at RCPT TO (smtpd_delay_reject = yes).
    let d = run(PF_PW, "ceo@example.com", "someone@external.test", &[]);
    assert_eq!(d.status, 3, "{}", with_log(&d));
    assert_eq!(
        d.problems(),
        [(
            "rcpt:someone@external.test".to_owned(),
            "sender.not_owned".to_owned()
        )]
    );
    assert!(
        d.evidence("rcpt:someone@external.test").starts_with(
            "553 5.7.1 <ceo@example.com>: Sender address rejected: not owned by user alice@example.com"
        ),
        "{}",
        d.out
    );

    // A recipient the access table refuses.
    let d = run(PF_PW, "alice@example.com", "blocked@external.test", &[]);
    assert_eq!(d.status, 3, "{}", with_log(&d));
    assert_eq!(
        d.problems(),
        [(
            "rcpt:blocked@external.test".to_owned(),
            "policy.recipient_restricted".to_owned()
        )]
    );
    assert_eq!(
        d.evidence("rcpt:blocked@external.test"),
        "554 5.7.1 <blocked@external.test>: Recipient address rejected: Access denied"
    );
    // Nothing was sent: Postfix queued nothing.
    assert!(!pf.maillog().contains("message-id="), "{}", pf.maillog());
    assert_eq!(d.codes().len(), 1);
}
