//! Explain requests (`mailgate explain`, `POST /mailgate/v1/explain`): a dry run of the decision
//! engine against the live directory and counters that evaluates every check, so one pass shows
//! every problem. With the `clap` feature, [`ExplainRequest`] is also the CLI's arguments.
//!
//! The same [`ExplainRequest`] is parsed from CLI flags and from the JSON body, so both speak the
//! same vocabulary. Explaining consumes nothing; the decision is kept under a `decision_id` like
//! every real decision.

use std::net::IpAddr;

use mailgate_core::engine::{
    Body, Credential, Decision, DirectoryIndex, Door, Mailbox, Originator, Outcome, SendAttempt,
    TlsVersion, Transport,
};
use mailgate_gateway::{Decided, Gateway, GatewayError};
use serde::Deserialize;

/// The Gmail send scope assumed when none is given.
const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";

/// What to explain: who sends, through which door, from what to whom.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    /// Send as this user (SMTP login, or the user of an OAuth token on the Gmail door).
    #[cfg_attr(feature = "clap", arg(long = "as", value_name = "EMAIL"))]
    #[serde(default, rename = "as")]
    pub as_user: Option<String>,
    /// Send with this service account's token.
    #[cfg_attr(feature = "clap", arg(long, value_name = "EMAIL"))]
    #[serde(default)]
    pub service_account: Option<String>,
    /// Domain-wide delegation subject (with --service-account).
    #[cfg_attr(feature = "clap", arg(long, value_name = "EMAIL"))]
    #[serde(default)]
    pub subject: Option<String>,
    /// Send with the API key of this name.
    #[cfg_attr(feature = "clap", arg(long, value_name = "NAME"))]
    #[serde(default)]
    pub api_key_name: Option<String>,
    /// Send with the API key of this id.
    #[cfg_attr(feature = "clap", arg(long, value_name = "ID"))]
    #[serde(default)]
    pub api_key_id: Option<String>,
    /// OAuth client of the user's token (Gmail door); default: the first client in the directory.
    #[cfg_attr(feature = "clap", arg(long, value_name = "CLIENT_ID"))]
    #[serde(default)]
    pub oauth_client: Option<String>,
    /// Use the SMTP relay listener without AUTH (the client IP is the credential).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub relay: bool,
    /// Door: gmail, sendgrid, smtp, smtp-relay (default: from the credential).
    #[cfg_attr(feature = "clap", arg(long, value_name = "DOOR"))]
    #[serde(default)]
    pub door: Option<String>,
    /// Envelope sender and header From (default: the sending user).
    #[cfg_attr(feature = "clap", arg(long, value_name = "ADDR"))]
    #[serde(default)]
    pub from: Option<String>,
    /// Header From, when it differs from the envelope sender: repeat it for a From that names
    /// several addresses (JSON: one address or a list).
    #[cfg_attr(feature = "clap", arg(long, value_name = "ADDR"))]
    #[serde(default, deserialize_with = "one_or_many")]
    pub header_from: Vec<String>,
    /// Header Sender (RFC 5322 requires one when From names several addresses).
    #[cfg_attr(feature = "clap", arg(long, value_name = "ADDR"))]
    #[serde(default)]
    pub header_sender: Option<String>,
    /// Recipient, repeatable.
    #[cfg_attr(feature = "clap", arg(long = "to", value_name = "ADDR"))]
    #[serde(default)]
    pub to: Vec<String>,
    /// Mailbox acted for (Gmail `userId`), default `me`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "EMAIL"))]
    #[serde(default)]
    pub mailbox: Option<String>,
    /// TLS version of the connection: 1.0, 1.1, 1.2, 1.3 or none (default 1.3).
    #[cfg_attr(feature = "clap", arg(long, value_name = "VERSION"))]
    #[serde(default)]
    pub tls: Option<String>,
    /// Client IP address (without it, what depends on it, such as a key's allowed_ips, is
    /// shown as not checked).
    #[cfg_attr(feature = "clap", arg(long, value_name = "IP"))]
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// HTTP Referer (without it, a key's allowed_referrers is shown as not checked).
    #[cfg_attr(feature = "clap", arg(long, value_name = "URL"))]
    #[serde(default)]
    pub referrer: Option<String>,
    /// OAuth scopes of the token, repeatable (default gmail.send; short names like `gmail.send` work).
    #[cfg_attr(feature = "clap", arg(long = "scopes", value_name = "SCOPE", num_args = 1.., value_delimiter = ' '))]
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Message size in bytes (default: 1 KiB, a valid message).
    #[cfg_attr(feature = "clap", arg(long, value_name = "BYTES"))]
    #[serde(default)]
    pub size: Option<u64>,
}

/// `"a@x"` or `["a@x", "b@x"]` (the JSON of `header_from` before it took a list still works).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// A request that cannot be turned into an attempt (the user's mistake, said plainly).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(String);

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

/// What `explain` says when the request names no principal (the engine answers as a door would,
/// `auth.missing`; this says how to ask the question meant).
pub const NO_PRINCIPAL: &str = "no principal given: name the one that sends with --as EMAIL (a user: SMTP login, or an OAuth user with --door gmail), --service-account EMAIL (with --subject EMAIL to act for a user), --api-key-name NAME or --api-key-id ID (an API key), or --relay (the SMTP relay trusting --ip IP)";

/// [`NO_PRINCIPAL`] for `POST /mailgate/v1/explain`, in the body's field names.
pub const NO_PRINCIPAL_JSON: &str = "no principal given: name the one that sends with \"as\" (a user: SMTP login, or an OAuth user with \"door\": \"gmail\"), \"service_account\" (with \"subject\" to act for a user), \"api_key_name\" or \"api_key_id\" (an API key), or \"relay\": true (the SMTP relay trusting \"ip\")";

impl ExplainRequest {
    /// [`NO_PRINCIPAL`] when the request names no principal.
    pub fn principal_hint(&self) -> Option<&'static str> {
        let named = self.as_user.is_some()
            || self.service_account.is_some()
            || self.api_key_name.is_some()
            || self.api_key_id.is_some()
            || self.relay;
        (!named).then_some(NO_PRINCIPAL)
    }

    /// Builds the attempt the engine evaluates.
    pub fn attempt(&self, index: &DirectoryIndex) -> Result<SendAttempt, BadRequest> {
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
        let header_from = if self.header_from.is_empty() {
            from.into_iter().collect()
        } else {
            self.header_from.clone()
        };
        // No From known (no principal and no --from): the header is not described, so the
        // message check waits for it rather than refusing an empty From nobody wrote.
        attempt.header =
            (!header_from.is_empty() || self.header_sender.is_some()).then(|| Originator {
                from: vec![header_from],
                sender: self.header_sender.iter().map(|s| vec![s.clone()]).collect(),
            });
        if !self.to.is_empty() {
            attempt.recipients = Some(self.to.clone());
        }
        attempt.size = Some(self.size.unwrap_or(1024));
        attempt.body = Body::Valid;
        Ok(attempt)
    }
}

/// Evaluates `req` in explain mode against the live directory and counters (nothing consumed);
/// the decision is kept under its id.
pub async fn explain(
    gateway: &Gateway,
    req: &ExplainRequest,
) -> Result<Result<Decided, BadRequest>, GatewayError> {
    let attempt = match req.attempt(&gateway.live().index) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(gateway.explain(&attempt).await?))
}

/// The human table: every check with ✔ / ✘ / ⏸ / – / … / ?, then each failure's remedy. A
/// check marked `?` was not evaluated because the request did not give its fact (`--ip`,
/// `--referrer`): it neither passes nor fails, and the verdict says so.
pub fn to_text(decision: &Decision, decision_id: &str) -> String {
    use mailgate_core::engine::Verdict;
    let mut out = String::new();
    let unchecked = decision
        .checks
        .iter()
        .filter(|c| c.outcome == Outcome::NotChecked)
        .count();
    let unchecked_note = match unchecked {
        0 => String::new(),
        1 => "1 check not checked: give the fact it names".to_owned(),
        n => format!("{n} checks not checked: give the facts they name"),
    };
    let verdict = match decision.verdict {
        Verdict::Allowed | Verdict::Held if unchecked > 0 => {
            let what = if decision.verdict == Verdict::Held {
                "ACCEPTED, delivery HELD"
            } else {
                "ALLOWED"
            };
            format!("{what} if what was not checked holds ({unchecked_note})")
        }
        Verdict::Allowed => "ALLOWED".to_owned(),
        Verdict::Held => "ACCEPTED, delivery HELD".to_owned(),
        Verdict::Denied if unchecked > 0 => format!(
            "DENIED ({} problem(s); {unchecked_note})",
            decision.denials.len()
        ),
        Verdict::Denied => format!("DENIED ({} problem(s))", decision.denials.len()),
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
            Outcome::NotChecked => "?",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_scopes_expand() {
        assert_eq!(
            full_scope("gmail.send"),
            "https://www.googleapis.com/auth/gmail.send"
        );
        assert_eq!(full_scope("mail.google.com"), "https://mail.google.com/");
    }

    /// `header_from` takes one address (as before) or a list (a From naming several).
    #[test]
    fn header_from_is_one_address_or_a_list() {
        let one: ExplainRequest =
            serde_json::from_str(r#"{"as": "alice@example.com", "header_from": "a@x.com"}"#)
                .unwrap();
        assert_eq!(one.header_from, vec!["a@x.com"]);
        let many: ExplainRequest = serde_json::from_str(
            r#"{"header_from": ["a@x.com", "b@x.com"], "header_sender": "a@x.com"}"#,
        )
        .unwrap();
        assert_eq!(many.header_from, vec!["a@x.com", "b@x.com"]);
        assert_eq!(many.header_sender.as_deref(), Some("a@x.com"));
        let none: ExplainRequest = serde_json::from_str(r#"{"header_from": null}"#).unwrap();
        assert!(none.header_from.is_empty());
        let default: ExplainRequest = serde_json::from_str("{}").unwrap();
        assert!(default.header_from.is_empty());
    }
}
