//! `mailgate explain` and `POST /mailgate/v1/explain`: a dry run of the decision engine against the
//! live directory and counters that evaluates every check, so one pass shows every problem.
//!
//! The same [`ExplainRequest`] is parsed from CLI flags and from the JSON body, so both speak the
//! same vocabulary. Explaining consumes nothing; the decision is kept under a `decision_id` like
//! every real decision.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use mailgate_core::engine::{
    Body, Credential, Decision, DirectoryIndex, Door, Mailbox, MemoryCounters, Mode, Outcome,
    SendAttempt, TlsVersion, Transport, decide,
};
use mailgate_store::{Store, StoredDecision};
use serde::Deserialize;
use serde_json::{Value, json};

/// The Gmail send scope assumed when none is given.
const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";

/// What to explain: who sends, through which door, from what to whom.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExplainRequest {
    /// Send as this user (SMTP login, or the user of an OAuth token on the Gmail door).
    #[arg(long = "as", value_name = "EMAIL")]
    #[serde(default, rename = "as")]
    pub(crate) as_user: Option<String>,
    /// Send with this service account's token.
    #[arg(long, value_name = "EMAIL")]
    #[serde(default)]
    pub(crate) service_account: Option<String>,
    /// Domain-wide delegation subject (with --service-account).
    #[arg(long, value_name = "EMAIL")]
    #[serde(default)]
    pub(crate) subject: Option<String>,
    /// Send with the API key of this name.
    #[arg(long, value_name = "NAME")]
    #[serde(default)]
    pub(crate) api_key_name: Option<String>,
    /// Send with the API key of this id.
    #[arg(long, value_name = "ID")]
    #[serde(default)]
    pub(crate) api_key_id: Option<String>,
    /// OAuth client of the user's token (Gmail door); default: the first client in the directory.
    #[arg(long, value_name = "CLIENT_ID")]
    #[serde(default)]
    pub(crate) oauth_client: Option<String>,
    /// Use the SMTP relay listener without AUTH (the client IP is the credential).
    #[arg(long)]
    #[serde(default)]
    pub(crate) relay: bool,
    /// Door: gmail, sendgrid, smtp, smtp-relay (default: from the credential).
    #[arg(long, value_name = "DOOR")]
    #[serde(default)]
    pub(crate) door: Option<String>,
    /// Envelope sender and header From (default: the sending user).
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub(crate) from: Option<String>,
    /// Header From, when it differs from the envelope sender.
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub(crate) header_from: Option<String>,
    /// Recipient, repeatable.
    #[arg(long = "to", value_name = "ADDR")]
    #[serde(default)]
    pub(crate) to: Vec<String>,
    /// Mailbox acted for (Gmail `userId`), default `me`.
    #[arg(long, value_name = "EMAIL")]
    #[serde(default)]
    pub(crate) mailbox: Option<String>,
    /// TLS version of the connection: 1.0, 1.1, 1.2, 1.3 or none (default 1.3).
    #[arg(long, value_name = "VERSION")]
    #[serde(default)]
    pub(crate) tls: Option<String>,
    /// Client IP address.
    #[arg(long, value_name = "IP")]
    #[serde(default)]
    pub(crate) ip: Option<IpAddr>,
    /// HTTP Referer.
    #[arg(long, value_name = "URL")]
    #[serde(default)]
    pub(crate) referrer: Option<String>,
    /// OAuth scopes of the token, repeatable (default gmail.send; short names like `gmail.send` work).
    #[arg(long = "scopes", value_name = "SCOPE", num_args = 1.., value_delimiter = ' ')]
    #[serde(default)]
    pub(crate) scopes: Vec<String>,
    /// Message size in bytes (default: 1 KiB, a valid message).
    #[arg(long, value_name = "BYTES")]
    #[serde(default)]
    pub(crate) size: Option<u64>,
}

/// A request that cannot be turned into an attempt (the user's mistake, said plainly).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadRequest(String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

fn full_scope(s: &str) -> String {
    if s.starts_with("https://") {
        s.to_owned()
    } else if s == "mail.google.com" {
        "https://mail.google.com/".to_owned()
    } else {
        format!("https://www.googleapis.com/auth/{s}")
    }
}

impl ExplainRequest {
    /// Builds the attempt the engine evaluates.
    pub(crate) fn attempt(&self, index: &DirectoryIndex) -> Result<SendAttempt, BadRequest> {
        let dir = index.directory();
        let scopes: Vec<String> = if self.scopes.is_empty() {
            vec![DEFAULT_SCOPE.to_owned()]
        } else {
            self.scopes.iter().map(|s| full_scope(s)).collect()
        };
        let given = [
            self.as_user.is_some(),
            self.service_account.is_some(),
            self.api_key_name.is_some() || self.api_key_id.is_some(),
            self.relay,
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given > 1 {
            return Err(bad(
                "give one credential: --as, --service-account, --api-key-name/--api-key-id or --relay",
            ));
        }
        let door = match self.door.as_deref() {
            Some("gmail") => Door::Gmail,
            Some("sendgrid") => Door::Sendgrid,
            Some("smtp") => Door::Smtp,
            Some("smtp-relay" | "smtp_relay" | "relay") => Door::SmtpRelay,
            Some(other) => {
                return Err(bad(format!(
                    "unknown door `{other}`; doors: gmail, sendgrid, smtp, smtp-relay"
                )));
            }
            None if self.relay => Door::SmtpRelay,
            None if self.service_account.is_some() => Door::Gmail,
            None if self.api_key_name.is_some() || self.api_key_id.is_some() => Door::Sendgrid,
            None => Door::Smtp,
        };
        let (credential, sender) = if let Some(user) = &self.as_user {
            let cred = match door {
                Door::Gmail => {
                    let client = match &self.oauth_client {
                        Some(c) => index.client(c).ok_or_else(|| {
                            bad(format!("no OAuth client `{c}` in the directory"))
                        })?,
                        None => dir.oauth_clients.first().ok_or_else(|| {
                            bad("the directory has no OAuth client; add one to oauth_clients or explain another door")
                        })?,
                    };
                    Credential::OauthUser {
                        user: user.clone(),
                        client_id: client.client_id.clone(),
                        project: client.project.clone(),
                        scopes: scopes.clone(),
                    }
                }
                Door::Sendgrid => {
                    return Err(bad(
                        "the SendGrid door authenticates with API keys: use --api-key-name or --api-key-id",
                    ));
                }
                Door::Smtp | Door::SmtpRelay => Credential::SmtpLogin { user: user.clone() },
            };
            (cred, Some(user.clone()))
        } else if let Some(sa) = &self.service_account {
            let project = index
                .service_account(sa)
                .map(|s| s.project.clone())
                .ok_or_else(|| bad(format!("no service account `{sa}` in the directory")))?;
            (
                Credential::ServiceAccount {
                    email: sa.clone(),
                    project,
                    scopes: scopes.clone(),
                    subject: self.subject.clone(),
                },
                self.subject.clone(),
            )
        } else if self.api_key_name.is_some() || self.api_key_id.is_some() {
            let key = match (&self.api_key_id, &self.api_key_name) {
                (Some(id), _) => index
                    .key(id)
                    .ok_or_else(|| bad(format!("no API key with id `{id}`")))?,
                (None, Some(name)) => {
                    let mut found = dir.api_keys.iter().filter(|k| &k.name == name);
                    let k = found
                        .next()
                        .ok_or_else(|| bad(format!("no API key named `{name}`")))?;
                    if found.next().is_some() {
                        return Err(bad(format!(
                            "several API keys are named `{name}`; use --api-key-id"
                        )));
                    }
                    k
                }
                (None, None) => return Err(bad("no API key given")),
            };
            (
                Credential::ApiKey {
                    key_id: key.id.clone(),
                },
                Some(key.owner.clone()),
            )
        } else if self.relay {
            (Credential::RelayIp, None)
        } else {
            (Credential::None, None)
        };
        let tls = match self.tls.as_deref() {
            None | Some("1.3") => Some(TlsVersion::Tls13),
            Some("1.2") => Some(TlsVersion::Tls12),
            Some("1.1") => Some(TlsVersion::Tls11),
            Some("1.0") => Some(TlsVersion::Tls10),
            Some("none" | "plain") => None,
            Some(other) => {
                return Err(bad(format!(
                    "unknown TLS version `{other}`; use 1.0, 1.1, 1.2, 1.3 or none"
                )));
            }
        };
        let from = self.from.clone().or(sender);
        let mut attempt = SendAttempt::new(door, credential);
        attempt.transport = Transport {
            tls,
            listener_requires_tls: true,
            client_ip: self.ip,
            referrer: self.referrer.clone(),
        };
        attempt.mailbox = match &self.mailbox {
            None => Mailbox::Me,
            Some(m) if m == "me" => Mailbox::Me,
            Some(m) => Mailbox::Address(m.clone()),
        };
        attempt.envelope_from = from.clone();
        attempt.header_from = self.header_from.clone().or(from);
        if !self.to.is_empty() {
            attempt.recipients = Some(self.to.clone());
        }
        attempt.size = Some(self.size.unwrap_or(1024));
        attempt.body = Body::Valid;
        Ok(attempt)
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Loads the usage counters from the store (the last 24 h of accepted sends and rate states).
pub(crate) async fn load_counters(
    store: &dyn Store,
    now_ms: u64,
) -> anyhow::Result<MemoryCounters> {
    let counters = MemoryCounters::new();
    let since = now_ms.saturating_sub(mailgate_core::engine::counters::DAY_MS) as i64;
    let replay = store.usage_since(since).await?;
    for (principal, e) in replay.sends {
        counters.preload(
            &principal,
            e.at_ms.max(0) as u64,
            1,
            e.recipients.max(0) as u64,
        );
    }
    for (principal, tat) in replay.rate_tat_ms {
        counters.set_rate_and_in_flight(&principal, Some(tat.max(0) as u64), 0);
    }
    Ok(counters)
}

/// A new decision id: a time-ordered 128-bit id (UUIDv7 layout) in Crockford base32, like a ULID.
pub(crate) fn new_decision_id(now_ms: u64) -> String {
    let random: [u8; 10] = mailgate_auth::random_bytes().unwrap_or([0; 10]);
    let mut v: u128 = u128::from(now_ms & 0xFFFF_FFFF_FFFF) << 80;
    for (i, b) in random.iter().enumerate() {
        v |= u128::from(*b) << (8 * (9 - i));
    }
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (25 - i);
        let idx = ((v >> shift) & 0x1F) as usize;
        *slot = ALPHABET.get(idx).copied().unwrap_or(b'0');
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The documented JSON shape:
/// `{"allowed", "verdict", "decision_id", "denial", "denials", "checks": [{"check","code","outcome","detail","remedy"}]}`.
pub(crate) fn to_json(decision: &Decision, decision_id: &str) -> Value {
    let checks: Vec<Value> = decision
        .checks
        .iter()
        .map(|c| {
            let mut v = json!({
                "check": c.stage.as_str(),
                "code": c.code(),
                "outcome": c.outcome,
                "detail": c.detail,
                "remedy": c.remedy(),
            });
            if let (Some(obj), Some(f)) = (v.as_object_mut(), c.object_at_fault()) {
                obj.insert("object_at_fault".into(), json!(f.to_string()));
                if let Some(l) = c.limit() {
                    obj.insert("limit".into(), json!(l));
                }
            }
            v
        })
        .collect();
    let denial = |d: &mailgate_core::engine::Denial| {
        json!({
            "code": d.code.code(),
            "check": d.stage.as_str(),
            "object_at_fault": d.object_at_fault.to_string(),
            "message": d.message,
            "remedy": d.remedy,
            "limit": d.limit,
        })
    };
    json!({
        "allowed": decision.accepted(),
        "verdict": decision.verdict,
        "complete": decision.complete,
        "decision_id": decision_id,
        "denial": decision.denial().map(denial),
        "denials": decision.denials.iter().map(denial).collect::<Vec<_>>(),
        "holds": decision.holds,
        "rewrites": decision.rewrites,
        "checks": checks,
    })
}

/// The human table: every check with ✔ / ✘ / – / …, then each failure's remedy.
pub(crate) fn to_text(decision: &Decision, decision_id: &str) -> String {
    let mut out = String::new();
    let verdict = match decision.verdict {
        mailgate_core::engine::Verdict::Allowed => "ALLOWED".to_owned(),
        mailgate_core::engine::Verdict::Held => "ACCEPTED, delivery HELD".to_owned(),
        mailgate_core::engine::Verdict::Denied => {
            format!("DENIED ({} problem(s))", decision.denials.len())
        }
    };
    out.push_str(&format!("{verdict}   decision {decision_id}\n\n"));
    let width = decision
        .checks
        .iter()
        .map(|c| c.code().len())
        .max()
        .unwrap_or(10);
    for c in &decision.checks {
        let mark = match c.outcome {
            Outcome::Pass => "✔",
            Outcome::Fail => "✘",
            Outcome::Hold => "⏸",
            Outcome::NotApplicable => "–",
            Outcome::Pending => "…",
        };
        out.push_str(&format!(
            "{mark} {:<w$}  {}\n",
            c.code(),
            c.detail,
            w = width
        ));
    }
    if !decision.denials.is_empty() || !decision.holds.is_empty() {
        out.push_str("\nTo fix:\n");
        let mut n = 0;
        for c in decision
            .checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Fail | Outcome::Hold))
        {
            n += 1;
            let fault = c
                .object_at_fault()
                .map(|f| format!(" [{f}]"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{n}. {}{fault}: {}\n",
                c.code(),
                c.remedy().unwrap_or("")
            ));
        }
    }
    out
}

/// Evaluates `req` in explain mode against `index` and the stored counters, keeps the decision,
/// and returns it with its id.
pub(crate) async fn explain(
    store: &dyn Store,
    index: &DirectoryIndex,
    req: &ExplainRequest,
) -> anyhow::Result<Result<(Decision, String), BadRequest>> {
    let attempt = match req.attempt(index) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let now = now_ms();
    let counters = load_counters(store, now).await?;
    let decision = decide(&attempt, index, &counters, now, Mode::Explain);
    let id = new_decision_id(now);
    keep(store, &id, "explain", &attempt, &decision, now).await?;
    Ok(Ok((decision, id)))
}

/// Stores a decision with its trace under `id`.
pub(crate) async fn keep(
    store: &dyn Store,
    id: &str,
    door: &str,
    attempt: &SendAttempt,
    decision: &Decision,
    now_ms: u64,
) -> anyhow::Result<()> {
    let verdict = serde_json::to_value(decision.verdict)?;
    store
        .record_decision(&StoredDecision {
            id: id.to_owned(),
            at_ms: now_ms as i64,
            door: door.to_owned(),
            principal: decision.principal.clone().unwrap_or_default(),
            verdict: verdict.as_str().unwrap_or("").to_owned(),
            code: decision.denial().map(|d| d.code.code().to_owned()),
            body: json!({
                "attempt": attempt,
                "decision": to_json(decision, id),
            }),
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_are_ulid_shaped_and_time_ordered() {
        let a = new_decision_id(1_000);
        let b = new_decision_id(2_000);
        assert_eq!(a.len(), 26);
        assert!(a < b, "{a} {b}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        );
    }

    #[test]
    fn short_scopes_expand() {
        assert_eq!(
            full_scope("gmail.send"),
            "https://www.googleapis.com/auth/gmail.send"
        );
        assert_eq!(full_scope("mail.google.com"), "https://mail.google.com/");
    }
}
