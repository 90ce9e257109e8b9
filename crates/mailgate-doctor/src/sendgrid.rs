//! `mailgate doctor sendgrid`: probes a SendGrid API key the way a support engineer would, in
//! order, never stopping at the first failure (a step that cannot learn anything once the key is
//! refused is skipped, saying why):
//!
//! 1. `key`: the key's shape (`SG.<id>.<secret>`, no white space or quotes kept around it), no
//!    request.
//! 2. `scopes`: `GET /v3/scopes`: is the key accepted, does it hold `mail.send`?
//! 3. `ip_access`: IP Access Management: SendGrid answers `403 access forbidden` to every call
//!    from an address outside the allowed list (Mailgate's door: `401 Authenticated user is not
//!    authorized to send mail`, as for a send); `GET /v3/access_settings/whitelist` shows the
//!    list when the key may read it.
//! 4. `sender`: the sender identity for `--from` (default: the first verified Single Sender):
//!    `GET /v3/verified_senders` (Single Sender Verification) and `GET /v3/whitelabel/domains`
//!    (Domain Authentication), skipped with a note when the key may not read them.
//! 5. `send`: `POST /v3/mail/send` with `mail_settings.sandbox_mode.enable` from the sender to
//!    itself: SendGrid validates and judges it but delivers nothing (200).
//! 6. `rate_limit`: the `X-RateLimit-*` headers any answer carried.
//!
//! Each failure is diagnosed from what SendGrid answered (status, `errors[].message` and `field`)
//! through `why`'s table ([`crate::diagnose`]) and what the earlier steps learnt; never from
//! Mailgate's own reason code, so the same diagnosis holds against the real SendGrid.

use std::path::PathBuf;
use std::time::Duration;

use mailgate_core::catalogue::Reason;
use serde_json::{Value, json};

use crate::http::{Answer, Client};
use crate::{Diagnosis, DoctorError, Output, Report, Run, Step, diagnose};

/// SendGrid's API.
pub const SENDGRID_ENDPOINT: &str = "https://api.sendgrid.com";

/// What `doctor sendgrid` probes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The API key (`SG....`).
    pub key: String,
    /// The From address to check against the verified senders.
    pub from: Option<String>,
    /// The API's base URL (`https://api.sendgrid.com`, or a Mailgate).
    pub endpoint: String,
    /// Extra trusted CA certificates (PEM) for the endpoint.
    pub ca_file: Option<PathBuf>,
    /// Deadline of each request.
    pub timeout: Duration,
}

/// The length of the secret part of the keys SendGrid issues (`SG.` + 22 + `.` + 43).
const SECRET_LEN: usize = 43;
/// At most this many `errors[]` entries are shown as evidence.
const MAX_ERRORS_SHOWN: usize = 5;
/// Longest error message shown (SendGrid's are a sentence or two).
const MAX_MESSAGE_CHARS: usize = 300;

/// The cause of `why`'s table row `row` for `code` (the table phrases it for SendGrid's console),
/// else the catalogue's.
fn table_cause(row: &str, code: Reason) -> Diagnosis {
    mailgate_core::why::TABLE
        .iter()
        .filter(|r| r.id == row)
        .flat_map(|r| r.causes.iter())
        .find(|c| c.code == code)
        .map_or_else(|| Diagnosis::catalogue(code), Diagnosis::from_cause)
}

/// Where to click in SendGrid's console for a code (the table's remedies say what to do; these
/// say where), replacing the remedy of a diagnosis with that code.
fn console_remedy(code: Reason) -> Option<&'static str> {
    Some(match code {
        Reason::AuthInvalid => {
            "Settings → API Keys → Create API Key (with Mail Send), and set the whole key it shows once, exactly as shown."
        }
        Reason::AuthRevoked => {
            "Settings → API Keys: a key whose id is no longer listed was deleted and never comes back: Create API Key (with Mail Send) and replace it where it is configured."
        }
        Reason::PermissionMissing => {
            "Settings → API Keys → the key → Edit API Key: Restricted Access → Mail Send: Full Access (or create a key that has it)."
        }
        Reason::KeyIpBlocked => {
            "Settings → IP Access Management → Add IP Addresses: add this machine's public address (or its range); Recent Access Attempts lists the address SendGrid saw."
        }
        Reason::SenderNotOwned => {
            "Settings → Sender Authentication: verify this address (Single Sender Verification → Create New Sender) or authenticate its domain (Domain Authentication); or send from an address already verified."
        }
        Reason::SenderUnverified => {
            "Settings → Sender Authentication → Single Sender Verification: click the link of the verification e-mail sent to the address (Resend if it was lost); or send from a verified sender."
        }
        Reason::SenderDomainUnverified => {
            "Settings → Sender Authentication → Domain Authentication → the domain: publish the DNS records it lists at your DNS host, then Verify; or send from a verified Single Sender."
        }
        _ => return None,
    })
}

/// The step with its remedy phrased for SendGrid's console where one is known.
fn in_console_terms(mut step: Step) -> Step {
    if let Some(d) = &mut step.diagnosis
        && let Some(r) = console_remedy(d.code)
    {
        r.clone_into(&mut d.remedy);
    }
    step
}

/// SendGrid's error envelope: `(message, field)` of each `errors[]` entry.
fn errors_of(a: &Answer) -> Vec<(String, Option<String>)> {
    let Some(v) = a.json() else {
        return Vec::new();
    };
    v.get("errors")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|e| {
                    let message = e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let field = e.get("field").and_then(Value::as_str).map(str::to_owned);
                    (message, field)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}...")
    }
}

/// One call and what it answered, as the steps use it.
struct Call {
    /// `GET /v3/scopes`.
    what: String,
    answer: Result<Answer, String>,
}

impl Call {
    fn status(&self) -> Option<u16> {
        self.answer.as_ref().ok().map(|a| a.status)
    }

    fn ok(&self) -> bool {
        self.answer.as_ref().is_ok_and(Answer::ok)
    }

    fn json(&self) -> Option<Value> {
        self.answer.as_ref().ok().and_then(Answer::json)
    }

    fn errors(&self) -> Vec<(String, Option<String>)> {
        self.answer.as_ref().map(errors_of).unwrap_or_default()
    }

    /// SendGrid's messages, one a line: what `why`'s table is matched against (Mailgate's `help`
    /// is left out: the diagnosis must hold against the real SendGrid, whose `help` is empty).
    fn text(&self) -> String {
        let errs = self.errors();
        if errs.is_empty() {
            return self
                .answer
                .as_ref()
                .map(|a| shorten(&a.text(), 2000))
                .unwrap_or_default();
        }
        errs.iter()
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn has_message(&self, needle: &str) -> bool {
        self.errors()
            .iter()
            .any(|(m, _)| m.to_ascii_lowercase().contains(needle))
    }

    fn field(&self) -> Option<String> {
        self.errors().into_iter().find_map(|(_, f)| f)
    }

    /// Evidence lines: the status, each error's message and field, and the decision id when
    /// the server is a Mailgate (`mailgate explain <id>` shows its trace).
    fn evidence(&self, step: Step) -> Step {
        match &self.answer {
            Err(e) => step.evidence(format!("{}: no answer: {e}", self.what)),
            Ok(a) => {
                let mut step = step.evidence(format!("{}: HTTP {}", self.what, a.status));
                let errs = errors_of(a);
                for (m, f) in errs.iter().take(MAX_ERRORS_SHOWN) {
                    let m = shorten(m, MAX_MESSAGE_CHARS);
                    step = match f {
                        Some(f) => step.evidence(format!("  error: \"{m}\" (field `{f}`)")),
                        None => step.evidence(format!("  error: \"{m}\"")),
                    };
                }
                if errs.len() > MAX_ERRORS_SHOWN {
                    step = step.evidence(format!(
                        "  ... and {} more errors",
                        errs.len() - MAX_ERRORS_SHOWN
                    ));
                }
                if !a.ok() && errs.is_empty() && !a.body.is_empty() {
                    step = step.evidence(format!("  body: {}", shorten(&a.text(), 200)));
                }
                if let Some(id) = a.header("x-mailgate-decision") {
                    let id = shorten(id, 80);
                    step = step.evidence(format!(
                        "  Mailgate decision {id} (its trace: GET /mailgate/v1/decisions/{id})"
                    ));
                }
                step
            }
        }
    }
}

/// What the probes share.
struct Probe {
    client: Client,
    base: String,
    auth: String,
    /// `X-RateLimit-*` headers seen: (call, header, value).
    rate: Vec<(String, String, String)>,
}

impl Probe {
    async fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Call {
        let url = format!("{}{path}", self.base);
        let headers = [("authorization", self.auth.as_str())];
        let answer = match body {
            Some(b) => self.client.send_json(method, &url, &headers, b).await,
            None => self.client.request(method, &url, &headers, None).await,
        };
        let what = format!("{method} {path}");
        if let Ok(a) = &answer {
            for (n, v) in &a.headers {
                if n.starts_with("x-ratelimit-") {
                    self.rate.push((what.clone(), n.clone(), v.clone()));
                }
            }
        }
        Call { what, answer }
    }
}

/// What the key's shape says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `SG.<id>.<secret>` with a secret as long as SendGrid issues.
    Issued,
    /// Three parts, but a secret of another length: truncated, or not SendGrid's.
    Odd,
    /// Not a SendGrid key at all.
    Malformed,
}

fn key_step(raw: &str) -> (Shape, Step) {
    const TITLE: &str = "API key shape (SG.<id>.<secret>)";
    let trimmed = raw.trim();
    if trimmed != raw {
        return (
            Shape::Malformed,
            Step::fail(
                "key",
                TITLE,
                Diagnosis::new(
                    Reason::AuthInvalid,
                    "The key has white space or a line break around it (read from a file or an environment variable with its newline).",
                    "Set the key exactly as SendGrid showed it when it was created, without the trailing newline.",
                ),
            ),
        );
    }
    if trimmed.starts_with(['"', '\'']) || trimmed.ends_with(['"', '\'']) {
        return (
            Shape::Malformed,
            Step::fail(
                "key",
                TITLE,
                Diagnosis::new(
                    Reason::AuthInvalid,
                    "The key is wrapped in quotes (kept from a .env or YAML file): SendGrid receives the quotes as part of the key.",
                    "Remove the quotes around the key where it is configured.",
                ),
            ),
        );
    }
    let parts: Vec<&str> = trimmed.split('.').collect();
    let well_formed = parts.len() == 3
        && parts.first() == Some(&"SG")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !well_formed {
        let what = if !trimmed.starts_with("SG.") {
            "it does not start with `SG.`".to_owned()
        } else {
            format!(
                "it has {} dot-separated parts (or characters a key never has); SendGrid's have three",
                parts.len()
            )
        };
        return (
            Shape::Malformed,
            Step::fail(
                "key",
                TITLE,
                Diagnosis::new(
                    Reason::AuthInvalid,
                    format!(
                        "This is not a SendGrid API key: {what} (an environment variable not set, another service's key, a truncated copy)."
                    ),
                    "Settings → API Keys → Create API Key, and set the whole key it shows once (SG.<id>.<secret>, 69 characters).",
                ),
            )
            .evidence(format!("{} characters", trimmed.chars().count())),
        );
    }
    let id = parts.get(1).copied().unwrap_or_default();
    let secret_len = parts.get(2).map_or(0, |s| s.len());
    if secret_len == SECRET_LEN {
        (
            Shape::Issued,
            Step::pass("key", TITLE).evidence(format!(
                "key id {id} (Settings → API Keys shows it), secret of {SECRET_LEN} characters"
            )),
        )
    } else {
        (
            Shape::Odd,
            Step::warn(
                "key",
                TITLE,
                format!(
                    "the secret part has {secret_len} character{}; the keys SendGrid issues have {SECRET_LEN}: truncated, or mistyped?",
                    if secret_len == 1 { "" } else { "s" }
                ),
            )
            .evidence(format!("key id {id}")),
        )
    }
}

/// What `GET /v3/scopes` taught.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyState {
    /// Accepted; its scopes.
    Scopes(Vec<String>),
    /// Refused as a key (invalid, revoked): nothing else can be probed with it.
    Refused,
    /// The key may be fine but this machine was refused (IP Access Management).
    MachineRefused,
    /// No usable answer (unreachable, a server error): later steps try anyway.
    Unknown,
}

/// Whether an answer is SendGrid's refusal of the calling machine rather than of the key:
/// `403 access forbidden` on a call that needs no scope, or (Mailgate's door, as for a send)
/// `401 Authenticated user is not authorized to send mail`.
fn machine_refused(c: &Call) -> bool {
    (c.status() == Some(403) && c.has_message("access forbidden"))
        || (c.status() == Some(401) && c.has_message("not authorized to send mail"))
}

fn scopes_step(c: &Call, shape: Shape) -> (KeyState, Step) {
    const TITLE: &str = "GET /v3/scopes: the key is accepted and holds mail.send";
    match &c.answer {
        Err(e) => {
            let step = Step::fail_unexplained(
                "scopes",
                TITLE,
                format!(
                    "{} did not answer ({e}): check the endpoint, the network path (proxy, firewall) and, for https, the CA (--ca-file)",
                    c.what
                ),
            );
            return (KeyState::Unknown, c.evidence(step));
        }
        Ok(a) if a.ok() => {
            let scopes: Vec<String> = c
                .json()
                .and_then(|v| {
                    v.get("scopes").and_then(Value::as_array).map(|l| {
                        l.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                })
                .unwrap_or_default();
            let listed = if scopes.len() <= 8 {
                scopes.join(", ")
            } else {
                format!("{}, ... ({} in all)", scopes[..8].join(", "), scopes.len())
            };
            let step = if scopes.iter().any(|s| s == "mail.send") {
                Step::pass("scopes", TITLE)
            } else {
                Step::fail(
                    "scopes",
                    TITLE,
                    table_cause("sendgrid.not_authorized_to_send", Reason::PermissionMissing),
                )
            };
            let step = c.evidence(step).evidence(format!(
                "  scopes: {}",
                if listed.is_empty() { "(none)" } else { &listed }
            ));
            return (KeyState::Scopes(scopes), step);
        }
        Ok(_) => {}
    }
    if machine_refused(c) {
        let step = Step::warn(
            "scopes",
            TITLE,
            "SendGrid refused this machine before looking at the key's scopes: see the IP access step",
        );
        return (KeyState::MachineRefused, c.evidence(step));
    }
    let text = c.text();
    if c.status() == Some(401) {
        // The same text for a key that never existed and one deleted since: the key's shape
        // tells them apart (a key of SendGrid's exact shape was issued by someone).
        let prefer: &[Reason] = match shape {
            Shape::Issued => &[Reason::AuthRevoked, Reason::AuthInvalid],
            Shape::Odd | Shape::Malformed => &[Reason::AuthInvalid],
        };
        let d = diagnose(&text, prefer).unwrap_or_else(|| {
            table_cause(
                "sendgrid.grant_invalid",
                prefer.first().copied().unwrap_or(Reason::AuthInvalid),
            )
        });
        let mut step = c.evidence(Step::fail("scopes", TITLE, d));
        if shape == Shape::Issued {
            step = step.note(
                "the key has SendGrid's exact shape, so it was issued: most likely deleted since (Settings → API Keys no longer lists its id), or created in another account or subuser",
            );
        }
        return (KeyState::Refused, step);
    }
    let step = match diagnose(&text, &[]) {
        Some(d) => Step::fail("scopes", TITLE, d),
        None => Step::fail_unexplained(
            "scopes",
            TITLE,
            format!(
                "an answer `why` does not know (HTTP {}): see the evidence",
                c.status().unwrap_or_default()
            ),
        ),
    };
    (KeyState::Unknown, c.evidence(step))
}

/// The IP Access Management diagnosis, in SendGrid's console terms.
fn ip_blocked() -> Diagnosis {
    table_cause("sendgrid.access_forbidden", Reason::KeyIpBlocked)
}

async fn ip_step(p: &mut Probe, key: &KeyState, scopes_call: &Call) -> Step {
    const ID: &str = "ip_access";
    const TITLE: &str = "IP Access Management: this machine's address is allowed";
    match key {
        KeyState::MachineRefused => {
            return scopes_call.evidence(Step::fail(ID, TITLE, ip_blocked())).note(
                "SendGrid answers every call from an address outside the allowed list this way (Settings → IP Access Management → recent access attempts shows this machine's address)",
            );
        }
        KeyState::Refused => {
            return Step::skip(
                ID,
                TITLE,
                "the key was refused: SendGrid checks the address only for an accepted key",
            );
        }
        KeyState::Scopes(_) | KeyState::Unknown => {}
    }
    let c = p.call("GET", "/v3/access_settings/whitelist", None).await;
    let answered = matches!(key, KeyState::Scopes(_));
    if c.ok() {
        let ips: Vec<String> = c
            .json()
            .and_then(|v| {
                v.get("result").and_then(Value::as_array).map(|l| {
                    l.iter()
                        .filter_map(|r| r.get("ip").and_then(Value::as_str))
                        .map(str::to_owned)
                        .collect()
                })
            })
            .unwrap_or_default();
        let step = c.evidence(Step::pass(ID, TITLE));
        return if ips.is_empty() {
            step.note("no allowed-address list: IP Access Management does not restrict API calls")
        } else {
            step.evidence(format!("  allowed: {}", ips.join(", "))).note(
                "the list is on, and this machine's calls are answered, so its address is in it",
            )
        };
    }
    if answered && c.status() == Some(403) && c.has_message("access forbidden") {
        // The key lacks access_settings.whitelist.read; /v3/scopes was answered, which SendGrid
        // does not do for an address outside the list.
        return c.evidence(Step::pass(ID, TITLE)).note(
            "the key may not read the allowed list (it lacks access_settings.whitelist.read), but GET /v3/scopes was answered, which IP Access Management refuses to an address outside the list",
        );
    }
    if machine_refused(&c) {
        return c.evidence(Step::fail(ID, TITLE, ip_blocked()));
    }
    let step = match (&c.answer, diagnose(&c.text(), &[])) {
        (Err(e), _) => Step::fail_unexplained(ID, TITLE, format!("no answer: {e}")),
        (Ok(_), Some(d)) => Step::fail(ID, TITLE, d),
        (Ok(a), None) => Step::skip(
            ID,
            TITLE,
            format!(
                "HTTP {} to the allowed-list request: nothing learnt",
                a.status
            ),
        ),
    };
    c.evidence(step)
}

/// What the sender identity lists said about the From address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SenderFinding {
    /// Not looked at (skipped, unreadable).
    Unknown,
    /// A verified Single Sender, or in an authenticated domain.
    Fine,
    /// Listed as a Single Sender not verified yet.
    Unverified,
    /// In a domain whose authentication does not verify.
    DomainUnverified,
    /// In neither list.
    NotListed,
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The domain entry covering `domain` (itself or a parent), with its `valid` flag.
fn covering(domains: &[(String, bool)], domain: &str) -> Option<(String, bool)> {
    let domain = lower(domain);
    domains
        .iter()
        .filter(|(d, _)| domain == *d || domain.ends_with(&format!(".{d}")))
        .max_by_key(|(d, _)| d.len())
        .cloned()
}

async fn sender_step(
    p: &mut Probe,
    key: &KeyState,
    wanted: Option<&str>,
) -> (Option<String>, SenderFinding, Step) {
    const ID: &str = "sender";
    let title = |from: Option<&str>| match from {
        Some(f) => {
            format!("Sender identity for {f} (Single Sender Verification, Domain Authentication)")
        }
        None => "Sender identity (Single Sender Verification, Domain Authentication)".to_owned(),
    };
    if matches!(key, KeyState::Refused | KeyState::MachineRefused) {
        let from = wanted.map(str::to_owned);
        return (
            from.clone(),
            SenderFinding::Unknown,
            Step::skip(
                ID,
                title(wanted),
                "the key or this machine was refused: the sender lists cannot be read",
            ),
        );
    }
    let senders_call = p.call("GET", "/v3/verified_senders", None).await;
    let domains_call = p.call("GET", "/v3/whitelabel/domains", None).await;
    let senders: Option<Vec<(String, bool)>> = senders_call.ok().then(|| {
        senders_call
            .json()
            .and_then(|v| {
                v.get("results").and_then(Value::as_array).map(|l| {
                    l.iter()
                        .filter_map(|s| {
                            let e = s.get("from_email")?.as_str()?;
                            let ok = s.get("verified").and_then(Value::as_bool).unwrap_or(false);
                            Some((lower(e), ok))
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    });
    let domains: Option<Vec<(String, bool)>> = domains_call.ok().then(|| {
        domains_call
            .json()
            .and_then(|v| {
                v.as_array().map(|l| {
                    l.iter()
                        .filter_map(|d| {
                            let name = d.get("domain")?.as_str()?;
                            let valid = d.get("valid").and_then(Value::as_bool).unwrap_or(false);
                            Some((lower(name), valid))
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    });
    // The From address: given, or the first verified Single Sender.
    let from = wanted.map(str::to_owned).or_else(|| {
        senders
            .as_ref()
            .and_then(|s| s.iter().find(|(_, ok)| *ok).map(|(e, _)| e.clone()))
    });
    let t = title(from.as_deref());
    let with_evidence = |step: Step| {
        let mut step = senders_call.evidence(step);
        if let Some(s) = &senders {
            let shown: Vec<String> = s
                .iter()
                .take(10)
                .map(|(e, ok)| format!("{e}{}", if *ok { "" } else { " (not verified)" }))
                .collect();
            step = step.evidence(format!(
                "  single senders: {}",
                if shown.is_empty() {
                    "(none)".to_owned()
                } else {
                    shown.join(", ")
                }
            ));
        }
        step = domains_call.evidence(step);
        if let Some(d) = &domains {
            let shown: Vec<String> = d
                .iter()
                .take(10)
                .map(|(n, ok)| format!("{n}{}", if *ok { "" } else { " (not verified)" }))
                .collect();
            step = step.evidence(format!(
                "  authenticated domains: {}",
                if shown.is_empty() {
                    "(none)".to_owned()
                } else {
                    shown.join(", ")
                }
            ));
        }
        step
    };
    let Some(from) = from else {
        let note = if senders.is_some() {
            "no --from given and no verified Single Sender to default to: pass --from <the address your application sends from>"
        } else {
            "no --from given, and the key may not read the Single Senders to pick one: pass --from <the address your application sends from>"
        };
        return (
            None,
            SenderFinding::Unknown,
            with_evidence(Step::skip(ID, t, note)),
        );
    };
    if senders.is_none() && domains.is_none() {
        let note = "the key may not read the sender identity lists (Settings → API Keys: Sender Authentication / Single Sender read access); the sandbox send below tells whether SendGrid accepts this From";
        return (
            Some(from),
            SenderFinding::Unknown,
            with_evidence(Step::skip(ID, t, note)),
        );
    }
    let single = senders
        .as_ref()
        .and_then(|s| s.iter().find(|(e, _)| *e == lower(&from)).cloned());
    let domain = domains
        .as_deref()
        .and_then(|d| covering(d, domain_of(&from)));
    let (finding, step) = match (&single, &domain) {
        (Some((_, true)), _) => (
            SenderFinding::Fine,
            Step::pass(ID, t.clone()).note(format!("{from} is a verified Single Sender")),
        ),
        (_, Some((d, true))) => (
            SenderFinding::Fine,
            Step::pass(ID, t.clone()).note(format!(
                "{from} is in the authenticated domain {d}: SendGrid accepts any of its addresses (Mailgate also requires the key's owner to own the address: the sandbox send checks that)"
            )),
        ),
        (_, Some((d, false))) => (
            SenderFinding::DomainUnverified,
            Step::fail(
                ID,
                t.clone(),
                table_cause("sendgrid.sender_identity", Reason::SenderDomainUnverified),
            )
            .note(format!("the domain {d} is listed but does not verify")),
        ),
        (Some((_, false)), None) => (
            SenderFinding::Unverified,
            Step::fail(
                ID,
                t.clone(),
                table_cause("sendgrid.sender_identity", Reason::SenderUnverified),
            ),
        ),
        (None, None) if senders.is_some() && domains.is_some() => (
            SenderFinding::NotListed,
            Step::fail(
                ID,
                t.clone(),
                table_cause("sendgrid.sender_identity", Reason::SenderNotOwned),
            ),
        ),
        (None, None) => (
            SenderFinding::Unknown,
            Step::skip(
                ID,
                t.clone(),
                format!("{from} is not among the lists the key could read (one was not readable): the sandbox send below tells"),
            ),
        ),
    };
    (Some(from), finding, with_evidence(step))
}

fn send_step(c: &Call, from: &str, scopes: &KeyState, sender: SenderFinding) -> Step {
    const ID: &str = "send";
    let title =
        format!("Sandbox send from {from} to {from} (POST /v3/mail/send, nothing delivered)");
    let a = match &c.answer {
        Err(e) => {
            return c.evidence(Step::fail_unexplained(ID, title, format!("no answer: {e}")));
        }
        Ok(a) => a,
    };
    if a.status == 200 {
        return c
            .evidence(Step::pass(ID, title))
            .note("SendGrid validated and accepted the message in sandbox mode: a real send with this key and From would be accepted");
    }
    if a.ok() {
        return c.evidence(Step::warn(
            ID,
            title,
            format!(
                "HTTP {}: accepted, but sandbox mode answers 200; this server may have queued the message (to {from} itself)",
                a.status
            ),
        ));
    }
    let text = c.text();
    let lower_text = text.to_ascii_lowercase();
    let scopes_ok = matches!(scopes, KeyState::Scopes(s) if s.iter().any(|s| s == "mail.send"));
    let d: Option<Diagnosis> = if lower_text.contains("does not match a verified sender identity") {
        let prefer: &[Reason] = match sender {
            SenderFinding::DomainUnverified => &[Reason::SenderDomainUnverified],
            SenderFinding::Unverified => &[Reason::SenderUnverified],
            _ => &[Reason::SenderNotOwned],
        };
        diagnose(&text, prefer)
    } else if a.status == 401 && lower_text.contains("not authorized to send mail") && scopes_ok {
        // The key holds mail.send and this machine's calls are answered: the account itself.
        Some(Diagnosis::new(
            Reason::AccountSuspended,
            "The key holds mail.send and this machine is allowed, yet SendGrid refuses to send for the account: it is suspended (most often), under review, or its sending was revoked after a compliance review.",
            "Log in to app.sendgrid.com: a banner names the account's state; answer SendGrid's notice e-mail or open a ticket at support.sendgrid.com to have it reactivated.",
        ))
    } else if a.status == 403
        && lower_text.contains("access forbidden")
        && scopes_ok
        && c.field().as_deref() == Some("personalizations")
    {
        Some(Diagnosis::catalogue(Reason::PolicyRecipientRestricted))
    } else if a.status == 403 && lower_text.contains("access forbidden") && scopes_ok {
        Some(Diagnosis::new(
            Reason::ProjectApiDisabled,
            "The key holds mail.send and this machine is allowed, yet sending is forbidden: the mail send API is not enabled for the key's account or project (behind Mailgate: the key's project lacks sendgrid.api in enabled_apis).",
            "On SendGrid, ask support why the account may not use the API (Settings → Account Details shows its state); behind Mailgate, add sendgrid.api to projects[<id>].enabled_apis in org.yaml and run `mailgate apply -f org.yaml`, or use a key of an enabled project.",
        ))
    } else if lower_text.contains("maximum credits exceeded") {
        Some(Diagnosis::new(
            Reason::LimitDailyMessages,
            "The account's sending credits are used up (the plan's daily or monthly e-mail allowance).",
            "Settings → Account Details → Your Products shows the plan and its usage: wait for the reset or upgrade the plan.",
        ))
    } else if a.status == 429 {
        Some(Diagnosis::new(
            Reason::LimitRate,
            "SendGrid's rate limit for this endpoint ran out (the X-RateLimit-* headers say when it resets).",
            "Retry after the X-RateLimit-Reset time with back-off; send fewer requests per second (batch recipients in personalizations).",
        ))
    } else {
        let prefer: &[Reason] = if scopes_ok {
            &[]
        } else {
            &[Reason::PermissionMissing]
        };
        diagnose(&text, prefer)
    };
    let step = match d {
        Some(d) => Step::fail(ID, title, d),
        None => Step::fail_unexplained(
            ID,
            title,
            format!(
                "HTTP {}: an answer `why` does not know (see the evidence; `mailgate why` with the whole answer)",
                a.status
            ),
        ),
    };
    c.evidence(step)
}

fn rate_step(p: &Probe) -> Step {
    const ID: &str = "rate_limit";
    const TITLE: &str = "Rate limits (X-RateLimit-* headers)";
    if p.rate.is_empty() {
        return Step::skip(
            ID,
            TITLE,
            "no answer carried X-RateLimit-* headers (Mailgate sends them with a 429 only)",
        );
    }
    let exhausted = p
        .rate
        .iter()
        .any(|(_, n, v)| n == "x-ratelimit-remaining" && v.trim() == "0");
    let mut step = if exhausted {
        Step::warn(
            ID,
            TITLE,
            "a limit is used up (remaining 0): requests fail with 429 until X-RateLimit-Reset",
        )
    } else {
        Step::pass(ID, TITLE)
    };
    let mut calls: Vec<&str> = p.rate.iter().map(|(c, _, _)| c.as_str()).collect();
    calls.dedup();
    for call in calls {
        let vals: Vec<String> = p
            .rate
            .iter()
            .filter(|(c, _, _)| c == call)
            .map(|(_, n, v)| {
                let n = n.trim_start_matches("x-ratelimit-");
                format!("{n} {}", shorten(v, 40))
            })
            .collect();
        step = step.evidence(format!("{call}: {}", vals.join(", ")));
    }
    step
}

/// Runs every probe.
pub async fn run(opts: &Options, output: Output) -> Result<Report, DoctorError> {
    let base = opts.endpoint.trim_end_matches('/').to_owned();
    let u = url::Url::parse(&base)
        .map_err(|e| DoctorError::Usage(format!("--endpoint `{}`: {e}", opts.endpoint)))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(DoctorError::Usage(format!(
            "--endpoint `{}`: an http:// or https:// URL with a host",
            opts.endpoint
        )));
    }
    if let Some(f) = &opts.from
        && !f.contains('@')
    {
        return Err(DoctorError::Usage(format!(
            "--from `{f}` is not an e-mail address"
        )));
    }
    let ca = match &opts.ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| DoctorError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?),
        None => None,
    };
    let client = Client::new(ca.as_deref(), opts.timeout)?;
    let mut run = Run::new("sendgrid", base.clone(), output);
    run.secret(&opts.key);
    run.secret(opts.key.trim());
    if let Some(secret) = opts.key.trim().rsplit('.').next() {
        run.secret(secret);
    }
    let key = opts.key.trim();
    let mut p = Probe {
        client,
        base,
        auth: format!("Bearer {key}"),
        rate: Vec::new(),
    };

    // 1. The key's shape: no request.
    run.begin("API key shape");
    let (shape, step) = key_step(&opts.key);
    run.finish(in_console_terms(step));

    // 2. Scopes.
    run.begin("GET /v3/scopes");
    let scopes_call = p.call("GET", "/v3/scopes", None).await;
    let (key_state, step) = scopes_step(&scopes_call, shape);
    run.finish(in_console_terms(step));

    // 3. IP Access Management.
    run.begin("IP Access Management");
    let step = ip_step(&mut p, &key_state, &scopes_call).await;
    run.finish(in_console_terms(step));

    // 4. Sender identity.
    run.begin("sender identity");
    let (from, finding, step) = sender_step(&mut p, &key_state, opts.from.as_deref()).await;
    run.finish(in_console_terms(step));

    // 5. The sandbox send.
    run.begin("sandbox send");
    let lacks_send =
        matches!(&key_state, KeyState::Scopes(s) if !s.iter().any(|s| s == "mail.send"));
    let step = match (&key_state, from) {
        (KeyState::Refused | KeyState::MachineRefused, _) => Step::skip(
            "send",
            "Sandbox send (POST /v3/mail/send)",
            "the key or this machine was refused: a send would be refused the same way",
        ),
        _ if lacks_send => Step::skip(
            "send",
            "Sandbox send (POST /v3/mail/send)",
            "the key lacks mail.send (see scopes): SendGrid would answer 401 Authenticated user is not authorized to send mail",
        ),
        (_, None) => Step::skip(
            "send",
            "Sandbox send (POST /v3/mail/send)",
            "no From address to send from: pass --from",
        ),
        (_, Some(from)) => {
            let body = json!({
                "personalizations": [{"to": [{"email": from}]}],
                "from": {"email": from},
                "subject": "mailgate doctor sandbox probe",
                "content": [{"type": "text/plain", "value": "A sandbox-mode probe from `mailgate doctor sendgrid`: SendGrid validates it and delivers nothing."}],
                "mail_settings": {"sandbox_mode": {"enable": true}},
            });
            let c = p.call("POST", "/v3/mail/send", Some(&body)).await;
            send_step(&c, &from, &key_state, finding)
        }
    };
    run.finish(in_console_terms(step));

    // 6. Rate-limit headers.
    run.begin("rate limits");
    let step = rate_step(&p);
    run.finish(in_console_terms(step));

    Ok(run.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shapes() {
        let issued = format!("SG.{}.{}", "a".repeat(22), "b".repeat(43));
        assert_eq!(key_step(&issued).0, Shape::Issued);
        assert_eq!(key_step("SG.x.y").0, Shape::Odd);
        for bad in [
            "",
            "x",
            "SG.a",
            "SG.a.b.c",
            "sg.a.b",
            "\"SG.a.b\"",
            "SG.a.b\n",
            "SG..b",
        ] {
            let (shape, step) = key_step(bad);
            assert_eq!(shape, Shape::Malformed, "{bad:?}");
            assert_eq!(
                step.diagnosis.map(|d| d.code),
                Some(Reason::AuthInvalid),
                "{bad:?}"
            );
        }
    }

    fn answer(status: u16, body: &str) -> Call {
        Call {
            what: "GET /v3/scopes".into(),
            answer: Ok(Answer {
                status,
                headers: Vec::new(),
                body: body.as_bytes().to_vec(),
            }),
        }
    }

    #[test]
    fn scopes_answers_are_diagnosed_from_sendgrids_text() {
        let grant = r#"{"errors":[{"message":"The provided authorization grant is invalid, expired, or revoked","field":null,"help":null}]}"#;
        let code = |c: &Call, s: Shape| scopes_step(c, s).1.diagnosis.map(|d| d.code);
        assert_eq!(
            code(&answer(401, grant), Shape::Issued),
            Some(Reason::AuthRevoked)
        );
        assert_eq!(
            code(&answer(401, grant), Shape::Odd),
            Some(Reason::AuthInvalid)
        );
        let forbidden = r#"{"errors":[{"field":null,"message":"access forbidden"}]}"#;
        let (state, step) = scopes_step(&answer(403, forbidden), Shape::Issued);
        assert_eq!(state, KeyState::MachineRefused);
        assert_eq!(step.status, crate::Status::Warn);
        let (state, step) = scopes_step(
            &answer(200, r#"{"scopes":["mail.batch.read"]}"#),
            Shape::Issued,
        );
        assert_eq!(state, KeyState::Scopes(vec!["mail.batch.read".into()]));
        assert_eq!(
            step.diagnosis.map(|d| d.code),
            Some(Reason::PermissionMissing)
        );
        let (_, step) = scopes_step(&answer(200, r#"{"scopes":["mail.send"]}"#), Shape::Issued);
        assert_eq!(step.status, crate::Status::Pass);
    }

    #[test]
    fn a_sender_identity_refusal_follows_what_the_lists_said() {
        let body = r#"{"errors":[{"message":"The from address does not match a verified Sender Identity. Mail cannot be sent until this error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ to see the Sender Identity requirements","field":"from","help":null}]}"#;
        let c = answer(403, body);
        let scopes = KeyState::Scopes(vec!["mail.send".into()]);
        let code = |f| {
            send_step(&c, "a@b.test", &scopes, f)
                .diagnosis
                .map(|d| d.code)
        };
        assert_eq!(
            code(SenderFinding::DomainUnverified),
            Some(Reason::SenderDomainUnverified)
        );
        assert_eq!(
            code(SenderFinding::Unverified),
            Some(Reason::SenderUnverified)
        );
        assert_eq!(code(SenderFinding::Fine), Some(Reason::SenderNotOwned));
        assert_eq!(code(SenderFinding::Unknown), Some(Reason::SenderNotOwned));
    }

    #[test]
    fn limits_are_named_and_their_headers_shown() {
        let scopes = KeyState::Scopes(vec!["mail.send".into()]);
        let credits = answer(
            401,
            r#"{"errors":[{"message":"Maximum credits exceeded","field":null,"help":null}]}"#,
        );
        assert_eq!(
            send_step(&credits, "a@b.test", &scopes, SenderFinding::Fine)
                .diagnosis
                .map(|d| d.code),
            Some(Reason::LimitDailyMessages)
        );
        let many = answer(
            429,
            r#"{"errors":[{"message":"too many requests","field":null,"help":null}]}"#,
        );
        assert_eq!(
            send_step(&many, "a@b.test", &scopes, SenderFinding::Fine)
                .diagnosis
                .map(|d| d.code),
            Some(Reason::LimitRate)
        );
        let mut p = Probe {
            client: Client::new(None, Duration::from_secs(1)).unwrap(),
            base: String::new(),
            auth: String::new(),
            rate: Vec::new(),
        };
        assert_eq!(rate_step(&p).status, crate::Status::Skip);
        for (n, v) in [
            ("limit", "600"),
            ("remaining", "0"),
            ("reset", "1700000000"),
        ] {
            p.rate.push((
                "POST /v3/mail/send".into(),
                format!("x-ratelimit-{n}"),
                v.into(),
            ));
        }
        let s = rate_step(&p);
        assert_eq!(s.status, crate::Status::Warn);
        assert_eq!(
            s.evidence,
            vec!["POST /v3/mail/send: limit 600, remaining 0, reset 1700000000".to_owned()]
        );
    }

    #[test]
    fn an_unexpected_202_is_a_warning_not_a_pass() {
        let scopes = KeyState::Scopes(vec!["mail.send".into()]);
        let s = send_step(&answer(202, ""), "a@b.test", &scopes, SenderFinding::Fine);
        assert_eq!(s.status, crate::Status::Warn);
    }

    #[test]
    fn covering_domain_prefers_the_longest() {
        let d = vec![
            ("example.com".to_owned(), true),
            ("mail.example.com".to_owned(), false),
        ];
        assert_eq!(
            covering(&d, "x.mail.example.com"),
            Some(("mail.example.com".into(), false))
        );
        assert_eq!(
            covering(&d, "EXAMPLE.com"),
            Some(("example.com".into(), true))
        );
        assert_eq!(covering(&d, "notexample.com"), None);
    }
}
