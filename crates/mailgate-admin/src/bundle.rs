//! `mailgate support-bundle`: what a support ticket needs, in one `.tar.gz` the user can read
//! before sending it (docs/doctor.md, "Support bundle").
//!
//! With `--decision ID`: the decision's trace (the same JSON as `GET /mailgate/v1/decisions/{id}`),
//! the directory objects it touched, the effective configuration and the version. Without it: the
//! configuration, the version, a directory summary (counts and names) and the most recent
//! refusals, so the user can pick one. `--doctor-json FILE` adds a doctor report. A `README.txt`
//! inside says what is there, what was removed and how to read it.
//!
//! Secrets are removed three ways. Structurally: the fields that hold them (password hashes, key
//! hashes, client-secret hashes, domain verification tokens) are replaced before anything is
//! written. By value: every secret Mailgate can know of here (the hashes themselves, the demo
//! credentials file, the smarthost passwords their `password_ref` points to, the values of
//! secret-named fields of the doctor report) is collected into the doctor's [`Secrets`] and
//! redacted from every file. By shape: in the doctor report, which is free text from elsewhere,
//! every word that looks like a secret ([`mailgate_auth::redact::secret_kind`]) is replaced.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use mailgate_core::directory::Directory;
use mailgate_doctor::Secrets;
use mailgate_store::{Store, StoredDecision};
use serde_json::Value;

/// Refusals listed in a bundle made without `--decision`.
const RECENT_REFUSALS: u32 = 20;

/// Largest doctor report read (a real one is a few KB).
const MAX_DOCTOR_JSON: u64 = 16 * 1024 * 1024;

/// What a removed secret field says instead.
const REMOVED: &str = "(removed)";

/// The directory inside the archive every file is under.
const TOP: &str = "mailgate-support";

/// What to put in a bundle (`mailgate support-bundle`'s arguments).
#[derive(Debug, Default)]
pub struct Request<'a> {
    /// The decision to include; without it, the bundle lists the most recent refusals.
    pub decision: Option<&'a str>,
    /// A `mailgate doctor ... --json` report to include (its secrets are removed again).
    pub doctor_json: Option<&'a Path>,
}

/// What a bundle says about the installation, from the caller's configuration.
#[derive(Debug)]
pub struct Context<'a> {
    /// The effective configuration (config.json), secrets already left out by the caller.
    pub config: Value,
    /// The data directory (`serve --demo` writes its demo credentials there: they are redacted).
    pub data_dir: &'a Path,
    /// The store (the database file, or its URL without the password), named when a decision
    /// is not found.
    pub database: &'a str,
    /// `retention.decisions_days`, named when a decision is not found.
    pub retention_decisions_days: u64,
}

/// A made bundle.
#[derive(Debug)]
pub struct Bundle {
    /// The gzipped tar (`mailgate-support/...`, each file 0600).
    pub archive: Vec<u8>,
    /// How many files it holds, README.txt included.
    pub files: usize,
}

/// Finds a stored decision. A refusal the server made a moment ago may not be written yet
/// (refusals are written behind the answer, group commit): when the id's own time is under
/// 10 s old, it is looked for again for up to 3 s.
async fn find_decision(
    store: &dyn Store,
    id: &str,
    now_ms: u64,
) -> anyhow::Result<Option<StoredDecision>> {
    let recent = decision_time_ms(id).is_some_and(|t| now_ms.abs_diff(t) < 10_000);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        if let Some(d) = store.decision(id).await? {
            return Ok(Some(d));
        }
        if !recent || std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The Unix milliseconds at the start of a decision id (`mailgate_gateway::new_decision_id`:
/// 48 bits of time, then 80 random bits, in Crockford's base32).
fn decision_time_ms(id: &str) -> Option<u64> {
    const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    if id.len() != 26 {
        return None;
    }
    let mut v: u128 = 0;
    for b in id.bytes() {
        let digit = CROCKFORD.iter().position(|c| *c == b)?;
        v = (v << 5) | digit as u128;
    }
    u64::try_from(v >> 80).ok()
}

/// One file of the bundle.
struct File {
    name: &'static str,
    /// What it is, for README.txt.
    about: String,
    text: String,
}

/// Makes the bundle (the caller writes it, mode 0600).
pub async fn make(
    store: &dyn Store,
    ctx: &Context<'_>,
    req: &Request<'_>,
    now_ms: u64,
) -> anyhow::Result<Bundle> {
    let snap = store.snapshot().await?;
    let dir = &snap.directory;
    let mut secrets = known_secrets(dir, ctx.data_dir);
    let mut files = Vec::new();
    let mut summary = String::new();

    match req.decision {
        Some(id) => {
            let d = find_decision(store, id, now_ms).await?.with_context(|| {
                format!(
                    "no decision `{id}` in the store {}: check the id (the `X-Mailgate-Decision` \
                     header, or the `Decision:` at the end of a refusal). Refusals whose credential \
                     was missing or refused are kept only in the memory of the server that answered \
                     (GET /mailgate/v1/decisions/{id} on that server), and decisions older than \
                     retention.decisions_days ({}) are deleted. `mailgate support-bundle -o FILE` \
                     without --decision lists the most recent refusals",
                    ctx.database,
                    ctx.retention_decisions_days
                )
            })?;
            let (body, parse_note) = match d.body.parse() {
                Ok(v) => (v, None),
                Err(e) => (
                    Value::Null,
                    Some(format!("the stored trace does not parse: {e}")),
                ),
            };
            let doc = crate::decisions::document(&d, &body);
            summary = decision_summary(&d, &doc, parse_note.as_deref());
            files.push(File {
                name: "decision.json",
                about:
                    "the decision and its trace: the same JSON as `GET /mailgate/v1/decisions/{id}`"
                        .into(),
                text: pretty(&doc),
            });
            let touched = redacted(touched(dir, &doc));
            files.push(File {
                name: "directory.yaml",
                about: "the directory objects this decision touched, as they are now, in the \
                        directory-file format (docs/directory.md), secrets removed"
                    .into(),
                text: format!(
                    "# The directory objects decision {} touched, as they are now (directory\n\
                     # generation {}): they may have changed since the decision ({}).\n\
                     # Secrets removed: password hashes, API key hashes, OAuth client secret hashes,\n\
                     # domain verification tokens (each shown as {REMOVED}).\n{}",
                    d.id,
                    snap.generation,
                    mailgate_core::engine::rfc3339_ms(u64::try_from(d.at_ms).unwrap_or(0)),
                    strip_export_header(&mailgate_core::orgfile::to_yaml(&touched))
                ),
            });
        }
        None => {
            files.push(File {
                name: "directory-summary.txt",
                about: "how many of each kind of directory object there are, and their names \
                        (no secrets, no settings)"
                    .into(),
                text: directory_summary(dir, snap.generation),
            });
            let refusals = store.recent_refusals(RECENT_REFUSALS).await?;
            files.push(File {
                name: "refusals.txt",
                about: format!(
                    "the {RECENT_REFUSALS} most recent stored refusals, newest first: pick one for \
                     `mailgate support-bundle --decision ID -o FILE`"
                ),
                text: refusals_text(&refusals),
            });
        }
    }

    files.push(File {
        name: "config.json",
        about: "the effective configuration (docs/config.md's keys, defaults filled in) and the \
                directory's smarthosts (their password_ref only)"
            .into(),
        text: pretty(&ctx.config),
    });
    files.push(File {
        name: "version.txt",
        about: "Mailgate's version, the platform, the directory generation, when this was made"
            .into(),
        text: format!(
            "mailgate {}\nplatform: {} {}\ndirectory generation: {}\nbundle made: {}\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::env::consts::ARCH,
            snap.generation,
            mailgate_core::engine::rfc3339_ms(now_ms)
        ),
    });
    if let Some(path) = req.doctor_json {
        let report = read_doctor_json(path, &mut secrets)?;
        files.push(File {
            name: "doctor.json",
            about: format!(
                "the doctor report given with --doctor-json ({}), secrets removed again",
                path.display()
            ),
            text: pretty(&report),
        });
    }

    let readme = readme(req.decision, &summary, &files, ctx.data_dir, now_ms);
    files.insert(
        0,
        File {
            name: "README.txt",
            about: "this file".into(),
            text: readme,
        },
    );
    // Last line of defence: every secret known here, out of every file.
    for f in &mut files {
        f.text = secrets.redact(&f.text);
    }
    let archive = archive(&files, now_ms)?;
    Ok(Bundle {
        archive,
        files: files.len(),
    })
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// `to_yaml`'s first line says secrets appear as hashes: here they do not appear at all.
fn strip_export_header(yaml: &str) -> &str {
    match yaml.split_once('\n') {
        Some((first, rest)) if first.starts_with('#') => rest,
        _ => yaml,
    }
}

/// The lines of README.txt that say what the decision was.
fn decision_summary(d: &StoredDecision, doc: &Value, note: Option<&str>) -> String {
    let mut s = String::new();
    let at = mailgate_core::engine::rfc3339_ms(u64::try_from(d.at_ms).unwrap_or(0));
    let _ = writeln!(s, "Decision {} at {at}", d.id);
    let _ = writeln!(
        s,
        "  door {}, principal {}, verdict {}{}",
        d.door,
        if d.principal.is_empty() {
            "(none)"
        } else {
            &d.principal
        },
        d.verdict,
        d.code
            .as_deref()
            .map(|c| format!(", reason {c}"))
            .unwrap_or_default()
    );
    let denial = doc.pointer("/decision/denial");
    let field = |k: &str| denial.and_then(|x| x.get(k)).and_then(Value::as_str);
    if let Some(m) = field("message") {
        let _ = writeln!(s, "  why: {m}");
    }
    if let Some(o) = field("object_at_fault") {
        let _ = writeln!(s, "  object at fault: {o}");
    }
    if let Some(r) = field("remedy") {
        let _ = writeln!(s, "  remedy: {r}");
    }
    if let Some(n) = note {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The directory objects a decision touched.

/// The objects of `dir` that the decision `doc` names (its principal, credential, addresses,
/// object at fault, ...), with what they depend on (a key's owner and project, a user's org
/// units, roles and groups, a service account's delegation grants, every address's domain), and
/// the organisation-wide settings every decision reads (organisation, limits, policies, the SMTP
/// relay's rules).
fn touched(dir: &Directory, doc: &Value) -> Directory {
    // Every word of the decision except its recipients, of which only the domains matter.
    let mut words = BTreeSet::new();
    let mut without_recipients = doc.clone();
    let mut recipient_domains = BTreeSet::new();
    if let Some(r) = without_recipients
        .pointer_mut("/attempt/recipients")
        .map(Value::take)
    {
        let mut rw = BTreeSet::new();
        collect_words(&r, &mut rw);
        for w in rw {
            if let Some((_, domain)) = w.rsplit_once('@') {
                recipient_domains.insert(domain.to_ascii_lowercase());
            }
        }
    }
    collect_words(&without_recipients, &mut words);
    let mut domains: BTreeSet<String> = recipient_domains;
    for w in &words {
        if let Some((_, domain)) = w.rsplit_once('@') {
            domains.insert(domain.to_ascii_lowercase());
        }
    }
    let has = |s: &str| words.contains(&s.to_ascii_lowercase());

    let mut out = Directory {
        organisation: dir.organisation.clone(),
        limits: dir.limits.clone(),
        policies: dir.policies.clone(),
        smtp_relay: dir.smtp_relay.clone(),
        ..Directory::default()
    };
    let mut users: BTreeSet<String> = BTreeSet::new();
    let mut projects: BTreeSet<String> = BTreeSet::new();
    let mut sa_client_ids: BTreeSet<String> = BTreeSet::new();

    for k in &dir.api_keys {
        if has(&k.id) {
            users.insert(k.owner.to_ascii_lowercase());
            projects.extend(k.project.clone());
            out.api_keys.push(k.clone());
        }
    }
    for c in &dir.oauth_clients {
        if has(&c.client_id) {
            projects.insert(c.project.clone());
            out.oauth_clients.push(c.clone());
        }
    }
    for g in &dir.domain_wide_delegation {
        if has(&g.client_id) {
            sa_client_ids.insert(g.client_id.clone());
        }
    }
    for sa in &dir.service_accounts {
        if has(&sa.email) || sa_client_ids.contains(&sa.client_id) {
            sa_client_ids.insert(sa.client_id.clone());
            projects.insert(sa.project.clone());
            out.service_accounts.push(sa.clone());
        }
    }
    out.domain_wide_delegation = dir
        .domain_wide_delegation
        .iter()
        .filter(|g| sa_client_ids.contains(&g.client_id))
        .cloned()
        .collect();
    for u in &dir.users {
        let named = has(&u.email)
            || u.aliases.iter().any(|a| has(a))
            || u.send_as.iter().any(|s| has(&s.email));
        if named {
            users.insert(u.email.to_ascii_lowercase());
        }
    }
    let mut groups: BTreeSet<String> = dir
        .groups
        .iter()
        .filter(|g| has(&g.email))
        .map(|g| g.email.to_ascii_lowercase())
        .collect();
    let mut org_units: BTreeSet<String> = dir
        .org_units
        .iter()
        .filter(|o| o.path != "/" && has(&o.path))
        .map(|o| o.path.clone())
        .collect();
    let mut roles = BTreeSet::new();
    for u in dir
        .users
        .iter()
        .filter(|u| users.contains(&u.email.to_ascii_lowercase()))
    {
        org_units.extend(ancestors(&u.org_unit));
        roles.extend(u.roles.iter().cloned());
        for a in std::iter::once(&u.email)
            .chain(&u.aliases)
            .chain(u.send_as.iter().map(|s| &s.email))
        {
            if let Some((_, d)) = a.rsplit_once('@') {
                domains.insert(d.to_ascii_lowercase());
            }
        }
        for g in &dir.groups {
            if g.members.iter().any(|m| m.eq_ignore_ascii_case(&u.email)) {
                groups.insert(g.email.to_ascii_lowercase());
            }
        }
        out.users.push(u.clone());
    }
    for p in org_units.clone() {
        org_units.extend(ancestors(&p));
    }
    for g in &dir.groups {
        if groups.contains(&g.email.to_ascii_lowercase()) {
            if let Some((_, d)) = g.email.rsplit_once('@') {
                domains.insert(d.to_ascii_lowercase());
            }
            out.groups.push(g.clone());
        }
    }
    out.org_units = dir
        .org_units
        .iter()
        .filter(|o| org_units.contains(&o.path))
        .cloned()
        .collect();
    out.roles = dir
        .roles
        .iter()
        .filter(|r| roles.contains(&r.name))
        .cloned()
        .collect();
    out.projects = dir
        .projects
        .iter()
        .filter(|p| projects.contains(&p.id) || has(&p.id) || has(&p.number))
        .cloned()
        .collect();
    out.domains = dir
        .domains
        .iter()
        .filter(|d| domains.contains(&d.name.to_ascii_lowercase()) || has(&d.name))
        .cloned()
        .collect();
    out
}

/// `/a/b` -> `/`, `/a`, `/a/b`.
fn ancestors(path: &str) -> Vec<String> {
    let mut out = vec!["/".to_owned()];
    let mut cur = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cur.push('/');
        cur.push_str(part);
        out.push(cur.clone());
    }
    out
}

/// Every word of every string in `v` (lower case), split at spaces and the punctuation that
/// surrounds names in messages (`API key `x``, `users[alice@example.com]`, `(acme-app)`).
fn collect_words(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => {
            for w in s.split(|c: char| {
                c.is_whitespace()
                    || matches!(
                        c,
                        '`' | '"'
                            | '\''
                            | ','
                            | ';'
                            | '('
                            | ')'
                            | '['
                            | ']'
                            | '<'
                            | '>'
                            | '{'
                            | '}'
                    )
            }) {
                let w = w.trim_end_matches(['.', ':']);
                if !w.is_empty() {
                    out.insert(w.to_ascii_lowercase());
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_words(x, out)),
        Value::Object(m) => m.values().for_each(|x| collect_words(x, out)),
        _ => {}
    }
}

/// `dir` with every stored secret replaced by [`REMOVED`]: password hashes, API key hashes,
/// OAuth client secret hashes, domain verification tokens. Service-account public keys stay.
fn redacted(mut dir: Directory) -> Directory {
    let removed = |o: &mut Option<String>| {
        if o.is_some() {
            *o = Some(REMOVED.to_owned());
        }
    };
    for u in &mut dir.users {
        u.password = None;
        removed(&mut u.password_hash);
    }
    for k in &mut dir.api_keys {
        k.secret = None;
        k.secret_sha256 = REMOVED.to_owned();
    }
    for c in &mut dir.oauth_clients {
        c.secret = None;
        removed(&mut c.secret_hash);
        removed(&mut c.secret_sha256);
    }
    for d in &mut dir.domains {
        removed(&mut d.verification_token);
    }
    dir
}

// ---------------------------------------------------------------------------------------------
// Without a decision: a summary of the directory and the recent refusals.

fn directory_summary(dir: &Directory, generation: i64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Directory generation {generation}{}",
        if dir.organisation.name.is_empty() {
            String::new()
        } else {
            format!(", organisation {}", dir.organisation.name)
        }
    );
    let mut section = |title: &str, names: Vec<String>| {
        let _ = writeln!(s, "\n{title}: {}", names.len());
        for n in names {
            let _ = writeln!(s, "  {n}");
        }
    };
    section(
        "domains",
        dir.domains
            .iter()
            .map(|d| {
                format!(
                    "{}{}",
                    d.name,
                    if d.verified { "" } else { " (not verified)" }
                )
            })
            .collect(),
    );
    section(
        "org units",
        dir.org_units.iter().map(|o| o.path.clone()).collect(),
    );
    section(
        "users",
        dir.users
            .iter()
            .map(|u| format!("{} ({}, {})", u.email, word(u.status), u.org_unit))
            .collect(),
    );
    section(
        "groups",
        dir.groups
            .iter()
            .map(|g| format!("{} ({} members)", g.email, g.members.len()))
            .collect(),
    );
    section(
        "projects",
        dir.projects
            .iter()
            .map(|p| format!("{} ({})", p.id, p.number))
            .collect(),
    );
    section(
        "OAuth clients",
        dir.oauth_clients
            .iter()
            .map(|c| {
                format!(
                    "{} ({}){}",
                    c.client_id,
                    c.project,
                    if c.disabled { " disabled" } else { "" }
                )
            })
            .collect(),
    );
    section(
        "service accounts",
        dir.service_accounts
            .iter()
            .map(|a| {
                format!(
                    "{} (client id {}, {} key(s)){}",
                    a.email,
                    a.client_id,
                    a.keys.len(),
                    if a.disabled { " disabled" } else { "" }
                )
            })
            .collect(),
    );
    section(
        "domain-wide delegation grants",
        dir.domain_wide_delegation
            .iter()
            .map(|g| format!("{}: {}", g.client_id, g.scopes.join(" ")))
            .collect(),
    );
    section(
        "API keys",
        dir.api_keys
            .iter()
            .map(|k| {
                format!(
                    "{} \"{}\" of {}{}",
                    k.id,
                    k.name,
                    k.owner,
                    if k.revoked { " (revoked)" } else { "" }
                )
            })
            .collect(),
    );
    section("roles", dir.roles.iter().map(|r| r.name.clone()).collect());
    section(
        "policies",
        dir.policies.iter().map(|p| p.id.clone()).collect(),
    );
    section(
        "smarthosts",
        dir.smarthosts
            .iter()
            .map(|h| format!("{} ({}:{})", h.name, h.host, h.port))
            .collect(),
    );
    s
}

/// A serde enum's word (`active`, `suspended`, `starttls`).
pub fn word(v: impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => "?".to_owned(),
    }
}

fn refusals_text(refusals: &[mailgate_store::DecisionSummary]) -> String {
    if refusals.is_empty() {
        return "No refusal is stored (refusals whose credential was missing or refused are kept \
                only in the memory of the server that answered).\n"
            .to_owned();
    }
    let mut s = String::from("# decision id\ttime (UTC)\tdoor\tprincipal\treason\n");
    for r in refusals {
        let _ = writeln!(
            s,
            "{}\t{}\t{}\t{}\t{}",
            r.id,
            mailgate_core::engine::rfc3339_ms(u64::try_from(r.at_ms).unwrap_or(0)),
            r.door,
            if r.principal.is_empty() {
                "-"
            } else {
                &r.principal
            },
            r.code.as_deref().unwrap_or("-")
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Secrets.

/// Every secret this command can know of: the stored hashes and tokens (so that none survives
/// in any file, whatever field it hid in), the demo credentials file in the data directory, and
/// the smarthost passwords (read only to be redacted; never written).
fn known_secrets(dir: &Directory, data_dir: &Path) -> Secrets {
    let mut s = Secrets::default();
    for u in &dir.users {
        if let Some(h) = &u.password_hash {
            s.add(h);
        }
    }
    for k in &dir.api_keys {
        s.add(&k.secret_sha256);
    }
    for c in &dir.oauth_clients {
        for h in [&c.secret_hash, &c.secret_sha256].into_iter().flatten() {
            s.add(h);
        }
    }
    for d in &dir.domains {
        if let Some(t) = &d.verification_token {
            s.add(t);
        }
    }
    for h in &dir.smarthosts {
        let r = h.password_ref.as_deref().unwrap_or_default();
        let pw = if let Some(var) = r.strip_prefix("env:") {
            std::env::var(var).ok()
        } else if let Some(path) = r.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .ok()
                .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
        } else {
            None
        };
        if let Some(pw) = pw {
            s.add(&pw);
        }
    }
    // `serve --demo` writes the demo secrets here (main.rs, `demo_credentials`).
    if let Ok(text) = std::fs::read_to_string(data_dir.join("demo-credentials.txt")) {
        for line in text.lines() {
            if let Some((_, v)) = line.split_once(" = ") {
                s.add(v);
            } else if let Some((_, v)) = line.split_once("): ") {
                s.add(v);
            }
        }
    }
    s
}

/// Field names whose value is a secret, whatever it looks like.
fn secret_field(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('-', "_");
    [
        "password",
        "passwd",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "admin_token",
        "api_key",
        "apikey",
        "private_key",
        "authorization",
        "assertion",
        "xoauth2_token",
    ]
    .contains(&n.as_str())
        || n.ends_with("_password")
        || n.ends_with("_secret")
        || n.ends_with("_token")
}

/// Reads a doctor report and removes its secrets again: the values of secret-named fields
/// (which are also added to `secrets`, so they are removed from every file), credentials in
/// URLs, and every word that looks like a secret.
fn read_doctor_json(path: &Path, secrets: &mut Secrets) -> anyhow::Result<Value> {
    use std::io::Read as _;
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot read --doctor-json {}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_DOCTOR_JSON + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read --doctor-json {}", path.display()))?;
    if text.len() as u64 > MAX_DOCTOR_JSON {
        bail!(
            "--doctor-json {} is larger than {} MiB: not a doctor report",
            path.display(),
            MAX_DOCTOR_JSON / (1024 * 1024)
        );
    }
    let mut v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "--doctor-json {} is not JSON (write it with `mailgate doctor ... --json > FILE`)",
            path.display()
        )
    })?;
    take_secret_fields(&mut v, secrets);
    scrub_value(&mut v, secrets);
    Ok(v)
}

fn take_secret_fields(v: &mut Value, secrets: &mut Secrets) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if secret_field(k) {
                    match x {
                        Value::String(s) if !s.is_empty() && !s.starts_with("[redacted") => {
                            secrets.add(s);
                            *x = Value::String(mailgate_doctor::REDACTED.to_owned());
                        }
                        Value::Number(_) | Value::Array(_) | Value::Object(_) => {
                            *x = Value::String(mailgate_doctor::REDACTED.to_owned());
                        }
                        _ => {}
                    }
                } else {
                    take_secret_fields(x, secrets);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| take_secret_fields(x, secrets)),
        _ => {}
    }
}

fn scrub_value(v: &mut Value, secrets: &Secrets) {
    match v {
        Value::String(s) => *s = scrub_text(&secrets.redact(s)),
        Value::Array(a) => a.iter_mut().for_each(|x| scrub_value(x, secrets)),
        Value::Object(m) => m.values_mut().for_each(|x| scrub_value(x, secrets)),
        _ => {}
    }
}

/// Free text with every secret-looking word replaced: what `secret_kind` recognises (API keys,
/// OAuth tokens, JWTs, password hashes, PEM blocks, long random strings), base64 that decodes to
/// an SMTP AUTH PLAIN blob, the value of `name=value` pairs with a secret's name, the rest of the
/// line after a secret's label (`password: ...`, `Authorization: ...`), the argument of a
/// secret's flag (`--password X`, `--password 'a b c'`), and the user:password of a URL.
/// Decision ids stay.
fn scrub_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut after = After::Nothing;
    let mut id_next = false;
    let mut rest = text;
    while !rest.is_empty() {
        let ws_end = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        out.push_str(&rest[..ws_end]);
        rest = &rest[ws_end..];
        if rest.is_empty() {
            break;
        }
        match after {
            // A label's value: up to the end of the line or of the phrase around it (a closing
            // bracket or quote, `, `, `; `). A placeholder (`Bearer <key>`) or the scheme alone
            // (`(Authorization: Bearer)`) is no secret.
            After::Label => {
                after = After::Nothing;
                let eol = rest.find('\n').unwrap_or(rest.len());
                let line = &rest[..eol];
                let end = [")", "'", "\"", "`", ", ", "; "]
                    .iter()
                    .filter_map(|d| line.find(d))
                    .min()
                    .unwrap_or(line.len());
                let value = line[..end].trim_end();
                let scheme_only =
                    ["bearer", "basic"].contains(&value.to_ascii_lowercase().as_str());
                if !value.is_empty() && !value.contains('<') && !scheme_only {
                    out.push_str(mailgate_doctor::REDACTED);
                    rest = &rest[value.len()..];
                    continue;
                }
            }
            // A flag's argument: one word, or a quoted phrase; not another flag, a placeholder
            // or the prose around a flag's name (`--password or --xoauth2-token`).
            After::Flag => {
                after = After::Nothing;
                let q = rest.chars().next().filter(|c| matches!(c, '\'' | '"'));
                let end = match q {
                    Some(q) => rest[1..].find(q).map_or(rest.len(), |i| i + 2),
                    None => rest.find(char::is_whitespace).unwrap_or(rest.len()),
                };
                let arg = &rest[..end];
                let prose = [
                    "or", "and", "with", "without", "is", "are", "was", "not", "given", "to",
                    "the", "a", "an", "set", "flag", "option", "too", "nor",
                ]
                .contains(&arg.trim_end_matches([',', '.', ':', ';', ')']));
                if !arg.starts_with(['-', '<', '[']) && !prose {
                    out.push_str(mailgate_doctor::REDACTED);
                    rest = &rest[end..];
                    continue;
                }
            }
            After::Nothing => {}
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        let mut core = word;
        loop {
            let t = core
                .trim_matches(|c: char| {
                    matches!(
                        c,
                        '"' | '\''
                            | '`'
                            | ','
                            | ';'
                            | '('
                            | ')'
                            | '['
                            | ']'
                            | '<'
                            | '>'
                            | '{'
                            | '}'
                    )
                })
                .trim_end_matches('.');
            if t == core {
                break;
            }
            core = t;
        }
        let (pre, post) = match word.find(core) {
            Some(i) if !core.is_empty() => (&word[..i], &word[i + core.len()..]),
            _ => (word, ""),
        };
        // After `id`, `key id`, `kid`: an identifier (a service-account key's id is 40 hex
        // digits), kept unless it has a secret's own shape (a key, a token, a hash).
        let replaced = (!core.is_empty())
            .then(|| scrub_word(core))
            .flatten()
            .filter(|r| !(id_next && r == ENTROPY_ONLY));
        after = secret_keyword(core);
        id_next = is_id_label(core);
        match replaced {
            Some(r) => {
                out.push_str(pre);
                out.push_str(&r);
                out.push_str(post);
            }
            None => out.push_str(word),
        }
    }
    out
}

/// What follows a word.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    Nothing,
    /// A secret's label (`password:`): its value is the rest of the line.
    Label,
    /// A secret's flag (`--password`): its value is the next word or quoted phrase.
    Flag,
}

/// What `secret_kind` says of a word that is only random-looking (no secret's own shape).
const ENTROPY_ONLY: &str = "[redacted: looks like a secret]";

/// `id`, `id:`, `kid`, `key_id`, `private_key_id`, `client_id`: the next word is an identifier.
fn is_id_label(word: &str) -> bool {
    let w = word.trim_end_matches([':', '=']).to_ascii_lowercase();
    ["id", "kid", "key_id", "private_key_id", "client_id"].contains(&w.as_str())
}

/// A secret's name as a flag or a label (`--password`, `--client-secret`, `password:`,
/// `token=`): what follows is the secret. A name in prose (`Username and Password not
/// accepted`) is not one.
fn secret_keyword(word: &str) -> After {
    let word: String = word.chars().filter(|c| !matches!(c, '"' | '\'')).collect();
    let w = word.trim_start_matches('-').trim_end_matches([':', '=']);
    if w.is_empty() || !secret_field(w) {
        After::Nothing
    } else if word.starts_with("--") {
        After::Flag
    } else if word.ends_with([':', '=']) {
        After::Label
    } else {
        After::Nothing
    }
}

/// A secret's name in a `name=value` or `name:value` word.
fn is_secret_name(name: &str) -> bool {
    let w = name.trim_start_matches('-');
    !w.is_empty() && secret_field(w)
}

/// One word's replacement, when it is or holds a secret.
fn scrub_word(w: &str) -> Option<String> {
    // `scheme://user:password@host/...?token=...`
    if let Some(i) = w.find("://") {
        return scrub_url(w, i);
    }
    if w.contains("[redacted") {
        return None;
    }
    // `name=value` / `name:value` with a secret name.
    for sep in ['=', ':'] {
        if let Some((name, value)) = w.split_once(sep)
            && !value.is_empty()
            && is_secret_name(name)
        {
            return Some(format!("{name}{sep}{}", mailgate_doctor::REDACTED));
        }
    }
    // Placeholders (`SG.<id>.<secret>`) are no secrets; decision ids are no secrets, also
    // inside a path (`/mailgate/v1/decisions/01M8...`), but what is around them may be.
    if w.contains('<') || constant_name(w) {
        return None;
    }
    let masked = mask_decision_ids(w);
    if let Some(kind) = mailgate_auth::redact::secret_kind(&masked) {
        return Some(format!("[redacted: {kind}]"));
    }
    if auth_plain_blob(w) {
        return Some("[redacted: looks like SMTP AUTH credentials]".to_owned());
    }
    None
}

/// A URL with its `user:password@` and the values of secret-named query parameters redacted.
fn scrub_url(w: &str, scheme_end: usize) -> Option<String> {
    let (head, after) = w.split_at(scheme_end + 3);
    let auth_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(auth_end);
    let mut out = head.to_owned();
    let mut changed = false;
    match authority.rfind('@') {
        Some(at) => {
            out.push_str(mailgate_doctor::REDACTED);
            out.push_str(&authority[at..]);
            changed = true;
        }
        None => out.push_str(authority),
    }
    match rest.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, v)) if !v.is_empty() && is_secret_name(k) => {
                        changed = true;
                        format!("{k}={}", mailgate_doctor::REDACTED)
                    }
                    _ => p.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(rest),
    }
    changed.then_some(out)
}

/// A constant's name such as a cipher suite (`TLS13_AES_256_GCM_SHA384`): short upper-case
/// parts joined by `_`.
fn constant_name(w: &str) -> bool {
    w.contains('_')
        && w.split('_').all(|p| {
            (1..=8).contains(&p.len())
                && p.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        })
}

/// `w` with every decision id in it replaced by `ID`.
fn mask_decision_ids(w: &str) -> String {
    let mut out = String::with_capacity(w.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if is_decision_id(run) {
            out.push_str("ID");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in w.chars() {
        if c.is_ascii_digit() || c.is_ascii_uppercase() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A decision id: 26 characters of Crockford's base32, as Mailgate makes them. An id, not a
/// secret, and what support needs to find the decision.
fn is_decision_id(w: &str) -> bool {
    w.len() == 26
        && w.starts_with('0')
        && w.bytes()
            .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b))
}

/// Base64 of `authzid NUL login NUL password` (SMTP AUTH PLAIN): two NULs, the rest text.
fn auth_plain_blob(w: &str) -> bool {
    use base64::Engine as _;
    if w.len() < 8 {
        return false;
    }
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(w) else {
        return false;
    };
    bytes.iter().filter(|b| **b == 0).count() == 2
        && std::str::from_utf8(&bytes)
            .is_ok_and(|t| t.chars().all(|c| c == '\0' || !c.is_control()))
}

// ---------------------------------------------------------------------------------------------
// README.txt and the archive.

fn readme(
    decision: Option<&str>,
    summary: &str,
    files: &[File],
    data_dir: &Path,
    now_ms: u64,
) -> String {
    let mut s = String::new();
    let mut lines = |ls: &[&str]| {
        for l in ls {
            s.push_str(l);
            s.push('\n');
        }
    };
    lines(&[&format!(
        "Mailgate support bundle, made {} by mailgate {}.",
        mailgate_core::engine::rfc3339_ms(now_ms),
        env!("CARGO_PKG_VERSION")
    )]);
    match decision {
        Some(_) => lines(&["", summary.trim_end()]),
        None => lines(&[
            "",
            "No decision was named: refusals.txt lists the most recent refusals. Make a bundle",
            "for one with `mailgate support-bundle --decision ID -o bundle.tar.gz`.",
        ]),
    }
    lines(&["", "What is in it", "  README.txt             this file"]);
    for f in files {
        lines(&[&format!("  {:<22} {}", f.name, f.about)]);
    }
    lines(&[
        "",
        "What was removed",
        "- Password hashes of users, SHA-256 hashes of API keys, hashes of OAuth client secrets",
        &format!("  and domain verification tokens: each shown as {REMOVED}."),
        "- Smarthost passwords: only their password_ref (env:VARIABLE or file:/path) is shown.",
        "- Never included: plain passwords and keys (Mailgate stores none), admin tokens, OAuth",
        "  access and refresh tokens, service-account private keys (Mailgate keeps only the",
        "  public keys, which are shown), message bodies and headers.",
        "- The doctor report (if any): the values of secret-named fields (password, token,",
        "  client_secret, ...), what follows such a name as a label (password: ... to the end",
        "  of the line) or a flag (--password X), credentials in URLs, and every word that",
        "  looks like a secret (API keys, OAuth tokens, JWTs, password hashes, PEM blocks, SMTP",
        "  AUTH blobs, long random strings) are replaced by [redacted...].",
        "- Every secret this command could know of (the stored hashes, the demo credentials, the",
        "  smarthost passwords and the secrets found in the doctor report) was then removed from",
        "  every file once more.",
        "Not removed: addresses, names, client IP addresses, host names and the organisation's",
        "settings, which support needs. Read the files before you send them.",
    ]);
    let id = decision.unwrap_or("<decision id>");
    let at = summary
        .lines()
        .next()
        .and_then(|l| l.rsplit_once(" at "))
        .map(|(_, t)| format!(" (the decision was made at {t})"))
        .unwrap_or_default();
    lines(&[
        "",
        "Log lines",
        "Mailgate writes its log to standard error only (the journal under systemd, or wherever",
        "its service manager sends it) and keeps no log file this command could read, so this",
        &format!("bundle holds no log lines. To add the lines about a decision{at}:"),
        &format!(
            "  journalctl -u mailgate --since \"<10 minutes before>\" --until \"<10 minutes after>\" | grep {id}"
        ),
        "Log lines hold no secrets by design; read them before you send them too.",
        "",
        "How to read it",
        "- decision.json: `verdict` and `code` say what happened; `decision.denial` names the",
        "  failed check, the object at fault, the message and the remedy; `decision.checks`",
        "  lists every check in the order the engine ran them, each with its outcome (pass,",
        "  fail, not_applicable, ...) and detail; `attempt` holds the facts the door gathered",
        "  (door, TLS, client IP, the credential by id, senders, recipients, size). Reason codes",
        "  are in docs/reasons.md; `mailgate explain` re-runs a send against today's directory.",
        "- directory.yaml: the objects as `mailgate export` writes them (docs/directory.md).",
        "- directory-summary.txt, refusals.txt: one line per object or refusal.",
        "- config.json: the configuration in force under docs/config.md's key names, defaults",
        &format!("  filled in (data directory {}).", data_dir.display()),
        "- doctor.json: the doctor's steps with their evidence and diagnosis (reason code, cause,",
        "  remedy), and the problems found (docs/doctor.md).",
    ]);
    s
}

/// A gzipped tar of `files` under `mailgate-support/`, each 0600.
fn archive(files: &[File], now_ms: u64) -> anyhow::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for f in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(f.text.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(now_ms / 1000);
        h.set_cksum();
        tar.append_data(&mut h, format!("{TOP}/{}", f.name), f.text.as_bytes())
            .context("cannot build the archive")?;
    }
    let gz = tar.into_inner().context("cannot build the archive")?;
    gz.finish().context("cannot compress the archive")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_looking_words_are_scrubbed_and_ids_stay() {
        let text = "AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAGh1bnRlcjI= failed; key \
                    SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE refused; \
                    --password hunter2hunter2 and client_secret=s3cr3t-value \
                    https://bob:pw123456@smtp.example.com/x Decision 01M8P4RMVSJ21JXVJAWP60ZA8R \
                    for alice@example.com; GET /mailgate/v1/decisions/01M8P4RMVSJ21JXVJAWP60ZA8R) \
                    (SG.<id>.<secret>) cipher TLS13_AES_256_GCM_SHA384 key id \
                    2b93812ead4be5c3853e68659204b6089197fbe9, key id SG.abcdefgh.ijklmnopqrstuvwxyz \
                    --password 'two words' then https://oauth2.example/token?client_id=x&refresh_token=1//0gRfq9";
        let out = scrub_text(text);
        for secret in [
            "AGFsaWNlQGV4YW1wbGUuY29tAGh1bnRlcjI=",
            "DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE",
            "hunter2hunter2",
            "s3cr3t-value",
            "pw123456",
            "1//0gRfq9",
            "ijklmnopqrstuvwxyz",
            "two words",
        ] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        for kept in [
            "01M8P4RMVSJ21JXVJAWP60ZA8R",
            "alice@example.com",
            "smtp.example.com/x",
            "refused;",
            "GET /mailgate/v1/decisions/01M8P4RMVSJ21JXVJAWP60ZA8R)",
            "(SG.<id>.<secret>)",
            "TLS13_AES_256_GCM_SHA384",
            "key id 2b93812ead4be5c3853e68659204b6089197fbe9,",
            "--password [redacted] then",
            "https://oauth2.example/token?client_id=x&refresh_token=[redacted]",
        ] {
            assert!(out.contains(kept), "{kept} missing from {out}");
        }
    }

    #[test]
    fn secret_fields_are_taken_and_redacted_everywhere() {
        let mut secrets = Secrets::default();
        let mut v = json!({
            "target": "smtp.example.com:587",
            "options": {"password": "correct horse battery staple", "user": "alice@example.com"},
            "steps": [{"evidence": ["AUTH with correct horse battery staple refused"]}],
        });
        take_secret_fields(&mut v, &mut secrets);
        scrub_value(&mut v, &secrets);
        let text = v.to_string();
        assert!(!text.contains("horse"), "{text}");
        assert!(text.contains("alice@example.com"), "{text}");
    }

    /// A delegated send by a service account touches the account, its grant and project, the
    /// subject with its units, and not the users it did not name.
    #[test]
    fn a_delegated_send_touches_the_account_its_grant_and_the_subject() {
        let dir =
            mailgate_core::orgfile::OrgFile::parse(include_str!("../../../docs/examples/org.yaml"))
                .unwrap()
                .directory;
        let doc = json!({
            "principal": "carol@example.com",
            "attempt": {
                "credential": {
                    "kind": "service_account",
                    "email": "mailer@acme-app.iam.example.com",
                    "project": "acme-app",
                    "scopes": ["https://www.googleapis.com/auth/gmail.send"],
                    "subject": "carol@example.com",
                },
                "recipients": ["alice@example.com", "x@competitor.test"],
            },
            "decision": {"denial": {"code": "account.mail_disabled", "object_at_fault": "org unit /frozen"}},
        });
        let t = redacted(touched(&dir, &doc));
        let emails = |v: Vec<&str>| v.join(" ");
        assert_eq!(
            emails(t.users.iter().map(|u| u.email.as_str()).collect()),
            "carol@example.com"
        );
        assert_eq!(t.service_accounts.len(), 1);
        assert_eq!(t.domain_wide_delegation.len(), 1);
        assert_eq!(
            t.domain_wide_delegation[0].client_id,
            "104500000000000000001"
        );
        assert_eq!(
            emails(t.org_units.iter().map(|o| o.path.as_str()).collect()),
            "/ /frozen"
        );
        assert_eq!(
            emails(t.projects.iter().map(|p| p.id.as_str()).collect()),
            "acme-app"
        );
        assert!(t.api_keys.is_empty() && t.oauth_clients.is_empty());
        assert_eq!(
            t.users[0].password_hash, None,
            "the demo file holds plain passwords only"
        );
        assert!(t.users[0].password.is_none());
    }

    #[test]
    fn a_decision_id_tells_its_time() {
        let id = mailgate_gateway::new_decision_id(1_796_039_529_337);
        assert_eq!(decision_time_ms(&id), Some(1_796_039_529_337));
        assert_eq!(decision_time_ms("not-an-id"), None);
        assert_eq!(decision_time_ms("01M8P4RMVSJ21JXVJAWP60ZA8!"), None);
    }

    /// The doctor's own prose about flags and headers stays as written.
    #[test]
    fn prose_about_secrets_is_no_secret() {
        for text in [
            "no --user with --password or --xoauth2-token given: MAIL FROM shows whether",
            "send a credential: an OAuth access token (Authorization: Bearer), an API key, or SMTP AUTH",
            "`curl -H 'Authorization: Bearer <key>' https://api.sendgrid.com/v3/scopes`: `mail.send`",
            "the first characters of its id (the part after `SG.`).",
        ] {
            assert_eq!(scrub_text(text), text);
        }
        assert_eq!(
            scrub_text("curl -H 'Authorization: Bearer SG.x.y' https://api.sendgrid.com"),
            "curl -H 'Authorization: [redacted]' https://api.sendgrid.com"
        );
    }

    #[test]
    fn a_labels_value_is_redacted_to_the_end_of_the_line() {
        let out = scrub_text(
            "password: my long pass phrase\nAuthorization: Basic YWxpY2U6c2VjcmV0\n535 5.7.8 Username and Password not accepted",
        );
        assert_eq!(
            out,
            "password: [redacted]\nAuthorization: [redacted]\n535 5.7.8 Username and Password not accepted"
        );
    }

    #[test]
    fn ancestors_of_an_org_unit() {
        assert_eq!(ancestors("/a/b"), ["/", "/a", "/a/b"]);
        assert_eq!(ancestors("/"), ["/"]);
    }
}
