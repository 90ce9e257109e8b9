//! The decision engine: one pure function that every front door calls with what it learned about a
//! send, and that answers allowed / held / denied with a trace of every check.
//!
//! ```text
//! door --SendAttempt--> decide(attempt, &DirectoryIndex, &dyn Counters, now, mode) --> Decision
//!                                                      door accepts? --> commit(&decision, counters, now)
//! ```
//!
//! * The checks are the rows of the catalogue (docs/reasons.md), evaluated in that order; each check is named by
//!   the reason code it can produce ([`Reason`]).
//! * [`Mode::Enforce`] stops at the first failing check (the trace holds the checks run so far);
//!   [`Mode::Explain`] runs every check and gives every failure its own remedy.
//! * A check whose input is not known yet (no header From at SMTP `MAIL FROM`, no recipients yet)
//!   is [`Outcome::Pending`]; the door calls `decide` again when it knows more.
//! * In [`Mode::Explain`], a check whose fact the request did not give (no client IP, no
//!   referrer) is [`Outcome::NotChecked`]: neither pass nor fail, and the decision is not
//!   complete. In [`Mode::Enforce`] the same absence fails the check: a door always knows the
//!   client IP, and an HTTP request without a Referer has none.
//! * A denial is a value ([`Denial`]), never an `Err`: it names the code, the object at fault, a
//!   message, a remedy and (for limits) the counts and reset time, and renders itself for each
//!   door ([`Denial::gmail`], [`Denial::smtp`], [`Denial::sendgrid`], [`Denial::token`]).

mod checks;
pub mod counters;
pub mod index;
mod inject;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use serde::{Serialize, Serializer};

pub use crate::catalogue::RequestProblem;
use crate::catalogue::{
    GmailReply, Reason, RenderArgs, SendGridReply, SmtpReply, Stage, TokenReply,
};
use crate::directory::{ExceedAction, LimitName};

pub use counters::{
    Admission, Charge, Counters, CountersError, MemoryCounters, Recheck, TatShift, Usage,
    UsageSnapshot, ceiling, exceeded, recheck,
};
pub use index::{DirectoryIndex, Ownership};
pub use inject::{InjectedFault, apply_injected};

/// Scopes that allow `users.messages.send` (docs/gmail.md).
pub const SEND_SCOPES: [&str; 5] = [
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.addons.current.action.compose",
];

/// The only scope XOAUTH2 on SMTP accepts (docs/smtp.md).
pub const SMTP_SCOPE: &str = "https://mail.google.com/";

/// Scopes that may read the profile and the send-as settings (Google's discovery document:
/// `users.getProfile`, `users.settings.sendAs.list` and `get`; docs/gmail.md).
pub const READ_SCOPES: &[&str] = &[
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://www.googleapis.com/auth/gmail.metadata",
    "https://www.googleapis.com/auth/gmail.settings.basic",
];

/// Scopes that may update a send-as address (discovery: `sendAs.update`, `patch`).
pub const BASIC_SCOPES: &[&str] = &[
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.settings.basic",
    "https://www.googleapis.com/auth/gmail.settings.sharing",
];

/// Scopes that may create, delete or verify a send-as address (discovery: `sendAs.create`,
/// `delete`, `verify`).
pub const SHARING_SCOPES: &[&str] = &[
    "https://mail.google.com/",
    "https://www.googleapis.com/auth/gmail.settings.sharing",
];

/// What the caller is trying to do. Every call a door serves is one [`SendAttempt`] with its
/// action, and the engine decides which checks apply to it: a door never picks refusals out of a
/// decision by their stage.
///
/// | action | checks that apply | OAuth scopes ([`Action::scopes`]) | permission ([`Action::permission`]) |
/// |---|---|---|---|
/// | `Send` | every check | the send scopes of the door | `mail.send` |
/// | `Authenticate` | transport, authentication, credential, project, grant, delegation (rows 1–20) | the send scopes of the door | `mail.send` |
/// | `ReadSettings`, `UpdateSettings`, `ManageSendAs` | rows 1–24 (through the account's state) and `policy.denied` | the method's ([`READ_SCOPES`], [`BASIC_SCOPES`], [`SHARING_SCOPES`]) | `mail.send` |
/// | `Manage { permission }` | transport, authentication, credential (rows 1–13) and `permission.missing` | none (API keys) | `permission` (none: any valid key) |
/// | `IssueToken` | authentication, `client.disabled`, delegation (only with a `sub`: every requested scope must be in the grant), `account.suspended`, `account.sending_revoked`, `policy.denied` | any (the grant decides) | none |
/// | `SignIn` | the account's state that refuses an authorization code: `account.suspended`, `account.under_review`, `account.sending_revoked` | any (the consent grants them) | none |
///
/// For every action but `Send`, the checks that need a message fact (sender, recipients, limits,
/// the message) do not apply: they are `not_applicable`, never `pending`, so the decision is
/// complete; nothing is charged ([`Decision::charge`] is `None`) and [`commit`] and the
/// gateway's `accept` refuse it: a non-send action never produces a send acceptance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Send a message (every door's send).
    #[default]
    Send,
    /// Show a credential before any send (SMTP `AUTH`): only who is calling is decided; the
    /// account's state and everything about a message are answered by the send that follows.
    Authenticate,
    /// Read the mailbox's profile or send-as settings (Gmail `getProfile`, `sendAs.list`/`get`).
    ReadSettings,
    /// Update a send-as address's display name or reply-to (Gmail `sendAs.update`/`patch`).
    UpdateSettings,
    /// Create, delete or verify a send-as address (Gmail `sendAs.create`/`delete`/`verify`).
    ManageSendAs,
    /// A management call of an API-key door (SendGrid `/v3/api_keys`, IP access management,
    /// verified senders) that needs `permission` among the key's permissions (`None`: any key
    /// that passed the credential checks).
    Manage {
        /// The key permission (SendGrid scope) the call needs, e.g. `api_keys.read`.
        permission: Option<&'static str>,
    },
    /// Issue an OAuth token (the token endpoint, for a service account's assertion or a
    /// refresh): who is asking, their client, the domain-wide delegation when the token acts for
    /// a user (`sub`), and the account's state. The rest (the API enabled for the project, the
    /// scopes a method takes) is answered when the token is used, as at Google.
    IssueToken,
    /// Sign in on the consent page (authorization code flow) once the password was verified:
    /// whether the account's state lets it grant a code (suspended, under review, sending
    /// revoked). The client, the delegation and the API are answered at the token endpoint and
    /// when the token is used.
    SignIn,
}

impl Action {
    fn is_send_ref(&self) -> bool {
        self.is_send()
    }

    /// Whether this is a send.
    pub fn is_send(self) -> bool {
        self == Action::Send
    }

    /// The OAuth scopes of which a token needs one for this action at `door` (empty: no
    /// OAuth token can do it).
    pub fn scopes(self, door: Door) -> &'static [&'static str] {
        match self {
            Action::Send | Action::Authenticate if door.is_smtp() => &[SMTP_SCOPE],
            Action::Send | Action::Authenticate => &SEND_SCOPES,
            Action::ReadSettings => READ_SCOPES,
            Action::UpdateSettings => BASIC_SCOPES,
            Action::ManageSendAs => SHARING_SCOPES,
            Action::Manage { .. } | Action::IssueToken | Action::SignIn => &[],
        }
    }

    /// The permission this action needs: of the API key for every action, and of the user
    /// (from `organisation.default_permissions` or a role) for all but `Manage`.
    pub fn permission(self) -> Option<&'static str> {
        match self {
            Action::Manage { permission } => permission,
            Action::IssueToken | Action::SignIn => None,
            _ => Some(crate::directory::permissions::MAIL_SEND),
        }
    }

    /// Whether check `r` applies to this action (the table above). A check that does not
    /// apply is recorded as `not_applicable`.
    pub fn applies(self, r: Reason) -> bool {
        match self {
            Action::Send => true,
            Action::Authenticate => r <= Reason::ImpersonationDenied,
            Action::ReadSettings | Action::UpdateSettings | Action::ManageSendAs => {
                r <= Reason::AccountSendingRevoked || r == Reason::PolicyDenied
            }
            Action::Manage { .. } => r <= Reason::ClientDisabled || r == Reason::PermissionMissing,
            Action::IssueToken => matches!(
                r,
                Reason::AuthMissing
                    | Reason::AuthInvalid
                    | Reason::AuthExpired
                    | Reason::AuthRevoked
                    | Reason::AuthLocked
                    | Reason::ClientDisabled
                    | Reason::DelegationNotConfigured
                    | Reason::DelegationScopeNotGranted
                    | Reason::DelegationSubjectUnknown
                    | Reason::AccountSuspended
                    | Reason::AccountSendingRevoked
                    | Reason::PolicyDenied
            ),
            Action::SignIn => matches!(
                r,
                Reason::AccountSuspended
                    | Reason::AccountUnderReview
                    | Reason::AccountSendingRevoked
            ),
        }
    }

    /// How the trace names it (`send`, `read_settings`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Authenticate => "authenticate",
            Action::ReadSettings => "read_settings",
            Action::UpdateSettings => "update_settings",
            Action::ManageSendAs => "manage_send_as",
            Action::Manage { .. } => "manage",
            Action::IssueToken => "issue_token",
            Action::SignIn => "sign_in",
        }
    }
}

/// The Gmail API's upload limit, 35 MiB, attachments included ([`Door::max_message_bytes`]).
pub const GMAIL_MAX_MESSAGE_BYTES: u64 = 36_700_160;

/// The SendGrid v3 API's request limit, 30 MB (30 MiB), attachments included
/// ([`Door::max_message_bytes`]).
pub const SENDGRID_MAX_REQUEST_BYTES: u64 = 31_457_280;

/// The API name of the SMTP doors in `api_keys[].allowed_apis`.
pub const SMTP_API: &str = "smtp";

/// Which front door the attempt came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Door {
    /// Gmail-compatible HTTP API.
    Gmail,
    /// SendGrid-compatible HTTP API.
    Sendgrid,
    /// SMTP submission (587/465).
    Smtp,
    /// SMTP relay listener (Workspace-style relay: IP allowlist and/or AUTH).
    SmtpRelay,
}

impl Door {
    /// The API name used by project enablement and key `allowed_apis`.
    pub fn api(self) -> &'static str {
        match self {
            Door::Gmail => crate::directory::GMAIL_API,
            Door::Sendgrid => crate::directory::SENDGRID_API,
            Door::Smtp | Door::SmtpRelay => SMTP_API,
        }
    }

    /// HTTP API doors (org unit `api_access` applies to them).
    pub fn is_api(self) -> bool {
        matches!(self, Door::Gmail | Door::Sendgrid)
    }

    /// SMTP doors.
    pub fn is_smtp(self) -> bool {
        matches!(self, Door::Smtp | Door::SmtpRelay)
    }

    /// The largest message the door's own protocol takes, whatever `limits.max_message_bytes`
    /// allows: the Gmail API's 35 MiB (docs/gmail.md), the SendGrid API's 30 MB per request
    /// (docs/sendgrid.md); `None` for SMTP (its limit is the directory's, advertised as SIZE).
    pub fn max_message_bytes(self) -> Option<u64> {
        match self {
            Door::Gmail => Some(GMAIL_MAX_MESSAGE_BYTES),
            Door::Sendgrid => Some(SENDGRID_MAX_REQUEST_BYTES),
            Door::Smtp | Door::SmtpRelay => None,
        }
    }

    /// Whose limit the door's own size limit is, as an object at fault, and the remedy of a message over it
    /// (`limit` is [`Door::max_message_bytes`]).
    pub(crate) fn size_limit(self, limit: u64) -> (&'static str, &'static str, String) {
        match self {
            Door::Sendgrid => (
                "the SendGrid-compatible API's",
                "the SendGrid-compatible API's request size limit",
                format!(
                    "send a smaller message or split it: the SendGrid-compatible API takes requests up to {limit} bytes (30 MB), attachments included, whatever limits.max_message_bytes allows"
                ),
            ),
            _ => (
                "the Gmail API's",
                "the Gmail API's message size limit",
                format!(
                    "send a smaller message: the Gmail API takes messages up to {limit} bytes (35 MiB), attachments included, whatever limits.max_message_bytes allows (use SMTP for larger ones)"
                ),
            ),
        }
    }
}

/// Negotiated TLS version (displayed as `TLS 1.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum TlsVersion {
    /// TLS 1.0
    #[serde(rename = "1.0")]
    Tls10,
    /// TLS 1.1
    #[serde(rename = "1.1")]
    Tls11,
    /// TLS 1.2
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsVersion {
    /// The version number as people write it (`1.2`).
    pub fn number(self) -> &'static str {
        match self {
            TlsVersion::Tls10 => "1.0",
            TlsVersion::Tls11 => "1.1",
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS {}", self.number())
    }
}

/// Connection facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Transport {
    /// `None`: plaintext.
    pub tls: Option<TlsVersion>,
    /// Whether this listener requires TLS (all but an explicit loopback dev listener do). The
    /// relay listener also requires it when `smtp_relay.require_tls` is set.
    pub listener_requires_tls: bool,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// HTTP `Referer`.
    pub referrer: Option<String>,
}

/// Why a door could not accept the credential it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    /// Unknown token, bad password, bad signature (`auth.invalid`).
    Invalid,
    /// Past its expiry (`auth.expired`).
    Expired,
    /// Revoked (`auth.revoked`).
    Revoked,
    /// Too many failures (`auth.locked`).
    Locked,
}

/// The credential as the door resolved it (secrets already verified by the door).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    /// Nothing presented.
    None,
    /// An OAuth access token from the authorization-code flow.
    OauthUser {
        /// The user who consented (primary address).
        user: String,
        /// The OAuth client.
        client_id: String,
        /// The client's project (id or number).
        project: String,
        /// Granted scopes.
        scopes: Vec<String>,
    },
    /// A service-account token (JWT-bearer grant).
    ServiceAccount {
        /// The service account.
        email: String,
        /// Its project.
        project: String,
        /// Granted scopes.
        scopes: Vec<String>,
        /// Domain-wide delegation subject (`sub`); `None` when acting as itself.
        subject: Option<String>,
    },
    /// An API key whose secret matched (`SG.<id>.<secret>`).
    ApiKey {
        /// The key id.
        key_id: String,
    },
    /// SMTP AUTH with a password that matched.
    SmtpLogin {
        /// The login (a user's primary address).
        user: String,
    },
    /// No AUTH on the relay listener: the client IP is the credential.
    RelayIp,
    /// Shown but refused by the door (bad secret, expired or revoked token, lockout).
    Refused {
        /// Why.
        state: CredentialState,
        /// What was presented, for the audit (key id, login, client id; never a secret).
        presented: Option<String>,
    },
}

/// The mailbox the request acts for (Gmail `userId`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mailbox {
    /// `me`, or a door without the notion (SMTP, SendGrid).
    #[default]
    Me,
    /// An explicit address.
    Address(String),
}

/// Whether the message parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// Not received yet (SMTP before DATA).
    #[default]
    Unknown,
    /// Parsed.
    Valid,
    /// Did not parse.
    Invalid {
        /// What is wrong (`Invalid To header`).
        detail: String,
        /// The offending field (SendGrid `field`), when known.
        field: Option<String>,
    },
    /// The request could not be read as a message because of its form (the wrong Content-Type,
    /// not JSON, too costly to parse): `message.invalid` or `message.too_large` as the problem
    /// says, with the catalogue's remedy for it ([`RequestProblem::remedy`]).
    Unreadable {
        /// What is wrong with the request's form.
        problem: RequestProblem,
        /// The door's words for it (a JSON syntax error's line and column).
        detail: String,
    },
}

/// Everything a door learned about one send. Unknown facts stay `None`: the checks that need them
/// are pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SendAttempt {
    /// The door.
    pub door: Door,
    /// What the caller is trying to do (a send unless the door says otherwise). Kept in the
    /// trace only when it is not a send, so send traces are as they were.
    #[serde(skip_serializing_if = "Action::is_send_ref")]
    pub action: Action,
    /// Connection facts.
    pub transport: Transport,
    /// The resolved credential.
    pub credential: Credential,
    /// Mailbox acted for.
    pub mailbox: Mailbox,
    /// SMTP `MAIL FROM` (for API doors: the From the door derives the envelope from).
    pub envelope_from: Option<String>,
    /// The header's From and Sender fields, every field and every address; `None` until the
    /// message is known (SMTP before the end of DATA).
    pub header: Option<Originator>,
    /// Every recipient (To, Cc, Bcc / RCPT TO); `None` until known.
    pub recipients: Option<Vec<String>>,
    /// Message size in bytes.
    pub size: Option<u64>,
    /// Whether the message parsed.
    pub body: Body,
}

impl SendAttempt {
    /// An attempt at `door` with `credential` over TLS 1.3 on a TLS-only listener; set the other
    /// facts as the door learns them.
    pub fn new(door: Door, credential: Credential) -> SendAttempt {
        SendAttempt {
            door,
            action: Action::Send,
            transport: Transport {
                tls: Some(TlsVersion::Tls13),
                listener_requires_tls: true,
                client_ip: None,
                referrer: None,
            },
            credential,
            mailbox: Mailbox::Me,
            envelope_from: None,
            header: None,
            recipients: None,
            size: None,
            body: Body::Unknown,
        }
    }

    /// The same attempt for `action` (every other fact unchanged).
    pub fn for_action(mut self, action: Action) -> Self {
        self.action = action;
        self
    }

    /// Sets envelope sender and header From to the same address (API doors): one From field
    /// naming one address, no Sender.
    pub fn from(mut self, addr: impl Into<String>) -> Self {
        let a = addr.into();
        self.envelope_from = Some(a.clone());
        self.header = Some(Originator::from_address(a));
        self
    }

    /// Sets the recipients.
    pub fn to<I: IntoIterator<Item = S>, S: Into<String>>(mut self, rcpts: I) -> Self {
        self.recipients = Some(rcpts.into_iter().map(Into::into).collect());
        self
    }

    /// Marks the message as received and parsed, with its size.
    pub fn parsed(mut self, size: u64) -> Self {
        self.size = Some(size);
        self.body = Body::Valid;
        self
    }
}

/// The originator fields of the message header (RFC 5322 §3.6.2) exactly as the door read
/// them: one entry per field, in header order, each holding every address the field names
/// (the members of a group flattened; an entry that names no address is kept as an empty
/// string, so that it is refused rather than skipped).
///
/// RFC 5322 §3.6 allows exactly one From field and at most one Sender field, and a From that
/// names several mailboxes requires a Sender naming one. The engine refuses any other shape
/// (`message.invalid`, [`Originator::problem`]) and requires every address of a well-formed
/// header to be one the principal may send as (`sender.*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Originator {
    /// Each From field's addresses.
    pub from: Vec<Vec<String>>,
    /// Each Sender field's addresses.
    pub sender: Vec<Vec<String>>,
}

impl Originator {
    /// One From field naming `addr`, no Sender (what the API doors build).
    pub fn from_address(addr: impl Into<String>) -> Originator {
        Originator {
            from: vec![vec![addr.into()]],
            sender: Vec::new(),
        }
    }

    /// Every From address, over every field, in order.
    pub fn from_addresses(&self) -> impl Iterator<Item = &str> {
        self.from.iter().flatten().map(String::as_str)
    }

    /// Every Sender address, over every field, in order.
    pub fn sender_addresses(&self) -> impl Iterator<Item = &str> {
        self.sender.iter().flatten().map(String::as_str)
    }

    /// The From address when the header has one From field naming exactly one address.
    pub fn single_from(&self) -> Option<&str> {
        match self.from.as_slice() {
            [one] => match one.as_slice() {
                [a] => Some(a.as_str()),
                _ => None,
            },
            _ => None,
        }
    }

    /// The first thing wrong with the fields' shape (RFC 5322 §3.6), if any.
    pub fn problem(&self) -> Option<OriginatorProblem> {
        let bad_entry = |fields: &[Vec<String>], header| {
            fields
                .iter()
                .flatten()
                .find(|a| !plausible_address(a))
                .map(|a| OriginatorProblem::NotAnAddress {
                    header,
                    value: shown(a),
                })
        };
        match self.from.len() {
            0 => return Some(OriginatorProblem::NoFrom),
            1 => {}
            n => return Some(OriginatorProblem::SeveralFrom { fields: n }),
        }
        if self.sender.len() > 1 {
            return Some(OriginatorProblem::SeveralSender {
                fields: self.sender.len(),
            });
        }
        if let Some(p) = bad_entry(&self.from, "From").or_else(|| bad_entry(&self.sender, "Sender"))
        {
            return Some(p);
        }
        let from = self.from.first().map_or(0, Vec::len);
        if from == 0 {
            return Some(OriginatorProblem::EmptyFrom);
        }
        match self.sender.first().map(Vec::len) {
            None if from > 1 => Some(OriginatorProblem::SenderRequired { addresses: from }),
            Some(n) if n != 1 => Some(OriginatorProblem::SenderNotOneMailbox { addresses: n }),
            _ => None,
        }
    }
}

/// At most 64 characters of a header value for a message (it may end up in an SMTP reply):
/// anything but printable ASCII becomes `?`.
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

/// Whether `s` has the shape of an addr-spec (`local@domain`) as a header parser returns it:
/// no control characters, a non-empty local part that is quoted or has no whitespace and no
/// specials (no second `@`), and a non-empty domain (a name, or an address literal in
/// brackets).
///
/// It keeps out what a parser salvaged from a broken field (`a@x.com b@y.com`,
/// `<a@x.com> b@y.com` read as one address) so that a mail client cannot show the reader an
/// address the engine never checked.
pub fn plausible_address(s: &str) -> bool {
    if s.chars().any(char::is_control) {
        return false;
    }
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    const SPECIALS: &[char] = &['@', '<', '>', '(', ')', '[', ']', ',', ';', ':', '\\', '"'];
    let bare = |x: &str| !x.is_empty() && !x.contains(SPECIALS) && !x.contains(char::is_whitespace);
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    let domain_ok = if domain.starts_with('[') && domain.ends_with(']') {
        domain.len() > 2 && !domain[1..domain.len() - 1].contains(['[', ']', '\\', ' '])
    } else {
        bare(domain) && !domain.starts_with('.') && !domain.ends_with('.')
    };
    (quoted || bare(local)) && domain_ok
}

/// What is wrong with a header's originator fields (refused as `message.invalid`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum OriginatorProblem {
    /// No From field.
    NoFrom,
    /// Several From fields.
    SeveralFrom {
        /// How many.
        fields: usize,
    },
    /// Several Sender fields.
    SeveralSender {
        /// How many.
        fields: usize,
    },
    /// An entry of a From or Sender field that is not an address (a display name alone,
    /// something a parser salvaged from a broken field).
    NotAnAddress {
        /// `From` or `Sender`.
        header: &'static str,
        /// The entry (at most 64 characters).
        value: String,
    },
    /// The From field names no address (e.g. an empty group).
    EmptyFrom,
    /// The From field names several mailboxes and there is no Sender field.
    SenderRequired {
        /// How many mailboxes From names.
        addresses: usize,
    },
    /// The Sender field names no mailbox or several.
    SenderNotOneMailbox {
        /// How many it names.
        addresses: usize,
    },
}

impl OriginatorProblem {
    /// The header field at fault (`From` or `Sender`).
    pub fn header(&self) -> &'static str {
        match self {
            OriginatorProblem::SeveralSender { .. }
            | OriginatorProblem::SenderNotOneMailbox { .. } => "Sender",
            OriginatorProblem::NotAnAddress { header, .. } => header,
            _ => "From",
        }
    }

    /// What is wrong, in the words of the Gmail door's `message` (`Invalid From header: ...`).
    pub fn detail(&self) -> String {
        format!("Invalid {} header: {}", self.header(), self.what())
    }

    /// What is wrong and what fixes it (`the message has 2 From header fields; RFC 5322
    /// allows exactly one: remove ...`).
    pub fn remedy(&self) -> String {
        format!("{}: {}", self.what(), self.fix())
    }

    fn what(&self) -> String {
        match self {
            OriginatorProblem::NoFrom => {
                "the message has no From header field; RFC 5322 requires exactly one".to_owned()
            }
            OriginatorProblem::SeveralFrom { fields } => {
                format!("the message has {fields} From header fields; RFC 5322 allows exactly one")
            }
            OriginatorProblem::SeveralSender { fields } => format!(
                "the message has {fields} Sender header fields; RFC 5322 allows at most one"
            ),
            OriginatorProblem::NotAnAddress { header, value } if value.is_empty() => {
                format!("an entry of the {header} field names no address")
            }
            OriginatorProblem::NotAnAddress { header, value } => {
                format!("`{value}` in the {header} field is not an address")
            }
            OriginatorProblem::EmptyFrom => "the From field names no address".to_owned(),
            OriginatorProblem::SenderRequired { addresses } => format!(
                "From names {addresses} mailboxes and there is no Sender field; RFC 5322 requires a Sender naming the one that sends"
            ),
            OriginatorProblem::SenderNotOneMailbox { addresses } => {
                format!("the Sender field names {addresses} mailboxes; RFC 5322 allows exactly one")
            }
        }
    }

    fn fix(&self) -> String {
        match self {
            OriginatorProblem::NoFrom => "add one From header field naming the address you send as".to_owned(),
            OriginatorProblem::SeveralFrom { .. } => "remove every From header field but one (one From field may name several authors, with a Sender field then)".to_owned(),
            OriginatorProblem::SeveralSender { .. } => "remove every Sender header field but one".to_owned(),
            OriginatorProblem::NotAnAddress { header, .. } => format!("write each entry of the {header} field as an address (local@domain, optionally `Name <local@domain>`), separated by commas"),
            OriginatorProblem::EmptyFrom => "name the address you send as in the From field".to_owned(),
            OriginatorProblem::SenderRequired { .. } => "add a Sender header field naming the one address that sends (one you may send as), or keep one address in From".to_owned(),
            OriginatorProblem::SenderNotOneMailbox { .. } => "name exactly one address (one you may send as) in the Sender field".to_owned(),
        }
    }
}

/// Enforce (stop at the first failure) or explain (run everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Real sends.
    Enforce,
    /// `mailgate explain`: every check, every failure with its remedy.
    Explain,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Holds.
    Pass,
    /// Fails: the send is denied.
    Fail,
    /// A limit is exceeded and its action is `hold`: accepted, delivery deferred.
    Hold,
    /// Does not apply to this attempt (e.g. key checks for an OAuth token).
    NotApplicable,
    /// Needs a fact the door does not have yet; decide again later.
    Pending,
    /// Explain mode only: the fact this check needs was not given (e.g. `--ip`), so it was not
    /// evaluated. Neither pass nor fail: it denies nothing by itself, and it leaves the decision
    /// incomplete, so it can never let a send through.
    NotChecked,
}

/// What an object at fault is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The connection / listener.
    Connection,
    /// The presented credential.
    Credential,
    /// `users[...]`
    User,
    /// `api_keys[...]`
    ApiKey,
    /// `oauth_clients[...]`
    OauthClient,
    /// `service_accounts[...]`
    ServiceAccount,
    /// `projects[...]`
    Project,
    /// `domain_wide_delegation[...]`
    DelegationGrant,
    /// A mailbox acted for (Gmail `userId`).
    Mailbox,
    /// A sender address.
    Address,
    /// `domains[...]`
    Domain,
    /// `policies[...]`
    Policy,
    /// `org_units[...]`
    OrgUnit,
    /// `smtp_relay.<setting>`
    SmtpRelay,
    /// `limits.<name>` of a principal.
    Limit,
    /// A recipient address.
    Recipient,
    /// The message.
    Message,
    /// A limit of the door's own protocol (the Gmail API's message size), displayed as its id.
    DoorLimit,
}

/// The object at fault: kind and identity, displayed like a path in org.yaml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// Kind.
    pub kind: FaultKind,
    /// Identity (user address, key id, policy id, limit name, ...).
    pub id: String,
}

impl Fault {
    pub(crate) fn new(kind: FaultKind, id: impl Into<String>) -> Fault {
        Fault {
            kind,
            id: id.into(),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let section = match self.kind {
            FaultKind::Connection => return write!(f, "connection ({})", self.id),
            FaultKind::Credential => return write!(f, "credential {}", self.id),
            FaultKind::Mailbox => return write!(f, "mailbox {}", self.id),
            FaultKind::Address => return write!(f, "address {}", self.id),
            FaultKind::Recipient => return write!(f, "recipient {}", self.id),
            FaultKind::Message => return write!(f, "message ({})", self.id),
            FaultKind::DoorLimit => return f.write_str(&self.id),
            FaultKind::SmtpRelay => return write!(f, "smtp_relay.{}", self.id),
            FaultKind::Limit => return write!(f, "limits.{}", self.id),
            FaultKind::User => "users",
            FaultKind::ApiKey => "api_keys",
            FaultKind::OauthClient => "oauth_clients",
            FaultKind::ServiceAccount => "service_accounts",
            FaultKind::Project => "projects",
            FaultKind::DelegationGrant => "domain_wide_delegation",
            FaultKind::Domain => "domains",
            FaultKind::Policy => "policies",
            FaultKind::OrgUnit => "org_units",
        };
        write!(f, "{section}[{}]", self.id)
    }
}

/// A limit's state when a limit check did not pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitState {
    /// Which limit.
    pub name: LimitName,
    /// Current usage (sends in the rate window, messages or recipients in 24 h, sends in flight).
    pub current: u64,
    /// The limit.
    pub limit: u64,
    /// When enough frees up (Unix ms); `None` when it depends on other sends finishing.
    pub reset_at_ms: Option<u64>,
    /// Reject or hold.
    pub action: ExceedAction,
}

/// One check of the trace.
///
/// Kept small (the failure details are boxed): an allowed send records all 37 checks, and the
/// trace is built on every decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// The check, named by the code it produces.
    #[serde(serialize_with = "ser_reason")]
    pub check: Reason,
    /// Its stage.
    #[serde(serialize_with = "ser_stage")]
    pub stage: Stage,
    /// Outcome.
    pub outcome: Outcome,
    /// The facts the check used, or what went wrong.
    pub detail: Cow<'static, str>,
    /// For failures and holds: remedy, object at fault, limit state.
    #[serde(flatten)]
    pub finding: Option<Box<Finding>>,
}

/// What a failing (or holding) check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What fixes it.
    pub remedy: String,
    /// The object at fault.
    pub object_at_fault: Fault,
    /// For limit checks.
    pub limit: Option<LimitState>,
}

impl CheckResult {
    /// The reason code (same as `check`).
    pub fn code(&self) -> &'static str {
        self.check.code()
    }
    /// The remedy, for failures and holds.
    pub fn remedy(&self) -> Option<&str> {
        self.finding.as_ref().map(|f| f.remedy.as_str())
    }
    /// The object at fault, for failures and holds.
    pub fn object_at_fault(&self) -> Option<&Fault> {
        self.finding.as_ref().map(|f| &f.object_at_fault)
    }
    /// The limit state, for limit checks that did not pass.
    pub fn limit(&self) -> Option<&LimitState> {
        self.finding.as_ref().and_then(|f| f.limit.as_ref())
    }
}

/// A refusal: everything a door needs to answer and everything an operator needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denial {
    /// Stable code.
    #[serde(serialize_with = "ser_reason")]
    pub code: Reason,
    /// Stage.
    #[serde(serialize_with = "ser_stage")]
    pub stage: Stage,
    /// The object at fault.
    pub object_at_fault: Fault,
    /// One-line human message.
    pub message: String,
    /// The setting or command that fixes it.
    pub remedy: String,
    /// For limits: counts, limit, reset time, action.
    pub limit: Option<LimitState>,
    /// Values for the door templates.
    #[serde(skip)]
    pub args: RenderArgs,
}

impl Denial {
    /// The name of the failed check as answers show it (`"check": "grant"`).
    pub fn check(&self) -> &'static str {
        self.code.check_name()
    }
    /// The Gmail-door answer (`None` for reasons that never answer there, e.g. TLS version).
    pub fn gmail(&self) -> Option<GmailReply> {
        self.code.gmail_reply(&self.args)
    }
    /// The token-endpoint answer, where the token endpoint refuses for this reason.
    pub fn token(&self) -> Option<TokenReply> {
        self.code.token_reply(&self.args)
    }
    /// The SMTP answer (Google's text; append Mailgate's explanation after it).
    pub fn smtp(&self) -> Option<SmtpReply> {
        self.code.smtp_reply(&self.args)
    }
    /// The SendGrid-door answer (put the remedy in `help`).
    pub fn sendgrid(&self) -> Option<SendGridReply> {
        self.code.sendgrid_reply(&self.args)
    }
    /// The remedy as answers show it: for a limit with a reset time, followed by the usage
    /// (`... (used 3 of 3; resets at 2026-...Z)`).
    pub fn remedy_with_usage(&self) -> Cow<'_, str> {
        match &self.limit {
            Some(l) if let Some(at) = l.reset_at_ms => Cow::Owned(format!(
                "{} (used {} of {}; resets at {})",
                self.remedy,
                l.current,
                l.limit,
                rfc3339_ms(at)
            )),
            _ => Cow::Borrowed(&self.remedy),
        }
    }
    /// `Retry-After` in seconds at `now_ms`, for limits with a reset time.
    pub fn retry_after_secs(&self, now_ms: u64) -> Option<u64> {
        let at = self.limit.as_ref()?.reset_at_ms?;
        Some(at.saturating_sub(now_ms).div_ceil(1000))
    }
}

/// The overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Send it.
    Allowed,
    /// Accept it but hold delivery until the limits in [`Decision::holds`] reset.
    Held,
    /// Refuse it.
    Denied,
}

/// A header rewrite the door must apply (`organisation.on_unowned_from: rewrite`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    /// `From` or `Sender`.
    pub header: &'static str,
    /// The address given.
    pub original: String,
    /// The address to put instead (the sender's primary address).
    pub replacement: String,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What was decided: a send, or another action ([`Action`]).
    pub action: Action,
    /// Allowed, held or denied.
    pub verdict: Verdict,
    /// The mode it was evaluated in.
    pub mode: Mode,
    /// False while some check is pending (decide again with more facts before accepting).
    pub complete: bool,
    /// Every failure with its denial: the first one is the enforcement answer; in explain mode
    /// there is one per failing check.
    pub denials: Vec<Denial>,
    /// Every check evaluated, in order.
    pub checks: Vec<CheckResult>,
    /// Limits that chose `hold` and are exceeded.
    pub holds: Vec<LimitState>,
    /// Header rewrites to apply.
    pub rewrites: Vec<Rewrite>,
    /// Counter key of the principal, when one was identified.
    pub principal: Option<String>,
    /// What committing this decision consumes (`None` when denied or no principal).
    pub charge: Option<Charge>,
}

impl Decision {
    /// True when the call may go on: a send may be accepted (allowed or held); another action
    /// may be served (it is never a send acceptance: see [`Action`]).
    pub fn accepted(&self) -> bool {
        self.verdict != Verdict::Denied
    }

    /// The enforcement answer: the first failure. For a non-send action this is the one refusal
    /// the door renders (its checks are only those that apply to it).
    pub fn denial(&self) -> Option<&Denial> {
        self.denials.first()
    }

    /// The refusal that no fact still to come can change: the first denial, when no check
    /// before it (in catalogue order) is pending. A door asks this before it reads a message
    /// (an HTTP body): an earlier check still waiting for the message (the sender's, say) could
    /// fail once the message is known and would then be the answer, so a later failure
    /// (a limit) is answered only with the message. An injected fault counts at its reason's
    /// place.
    pub fn settled_denial(&self) -> Option<&Denial> {
        let d = self.denials.first()?;
        let earlier_pending = self
            .checks
            .iter()
            .any(|c| c.outcome == Outcome::Pending && c.check < d.code);
        (!earlier_pending).then_some(d)
    }

    /// The first failing check of the trace.
    pub fn first_failure(&self) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.outcome == Outcome::Fail)
    }
}

fn ser_reason<S: Serializer>(r: &Reason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.code())
}

fn ser_stage<S: Serializer>(r: &Stage, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

/// Decides one attempt. Pure: reads the index and a usage snapshot, returns a value.
///
/// `now_ms` is Unix milliseconds (key expiry, GCRA, rolling windows).
pub fn decide(
    attempt: &SendAttempt,
    index: &DirectoryIndex,
    counters: &dyn Counters,
    now_ms: u64,
    mode: Mode,
) -> Decision {
    checks::run(attempt, index, counters, now_ms, mode)
}

/// What [`commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitOutcome {
    /// Counted; call [`Counters::release`] with the decision's principal when the send is done.
    Admitted,
    /// Nothing to count (no principal identified, e.g. a relay IP without sender).
    NothingToCount,
    /// A concurrent send used the limit up since the decision: nothing was counted; decide again
    /// (the new decision carries the proper denial).
    Raced(LimitName),
    /// The decision is a denial or still pending: nothing was counted.
    NotAccepted,
}

/// Records an accepted send decision in the counters (a non-send action is never counted), atomically re-checking the `reject` limits.
pub fn commit(
    decision: &Decision,
    counters: &dyn Counters,
    now_ms: u64,
) -> Result<CommitOutcome, CountersError> {
    if !decision.accepted() || !decision.complete || !decision.action.is_send() {
        return Ok(CommitOutcome::NotAccepted);
    }
    let Some(charge) = &decision.charge else {
        return Ok(CommitOutcome::NothingToCount);
    };
    Ok(match counters.admit(charge, now_ms)? {
        Admission::Admitted => CommitOutcome::Admitted,
        Admission::Raced(l) => CommitOutcome::Raced(l),
    })
}

/// Formats Unix ms as RFC 3339 UTC with milliseconds, as Google writes retry times
/// (`2023-03-07T18:03:15.961Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            ms % 1000
        ),
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests;
