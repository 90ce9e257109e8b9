//! The organisation's directory: who exists and what they may do.
//!
//! These are plain data types, serialised exactly as the directory file (`org.yaml`) spells them, so
//! that `mailgate apply` and `mailgate export` share one definition and cannot drift apart. Each list
//! entry has an identity (its `email`, `name`, `id`, ...) used for idempotent updates and `--prune`.
//!
//! Secrets: plain passwords and key secrets may appear in a file being applied (fields of type
//! [`Secret`]); they are hashed before anything is stored and are never serialised back out.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret given in plain text in a directory file. It is hashed on apply, never serialised, and
/// its `Debug` output is redacted so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a plain secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The plain secret, for hashing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Never reached through `skip_serializing`, but refuse to write the secret out even if a
        // future field forgets that attribute.
        s.serialize_str("[redacted]")
    }
}

/// Accepts a YAML/JSON string or integer as a string: numeric client ids and project numbers are
/// often written unquoted.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Sn {
        S(String),
        N(u64),
    }
    Ok(match Sn::deserialize(d)? {
        Sn::S(s) => s,
        Sn::N(n) => n.to_string(),
    })
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_true(b: &bool) -> bool {
    *b
}
fn yes() -> bool {
    true
}
fn root_ou() -> String {
    "/".to_owned()
}
fn is_root_ou(s: &String) -> bool {
    s == "/"
}

/// The whole directory of one organisation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    /// Organisation-wide settings.
    #[serde(default)]
    pub organisation: Organisation,
    /// Mail domains the organisation owns (or claims).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<Domain>,
    /// Organisational units; settings inherit from parent paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub org_units: Vec<OrgUnit>,
    /// People (mailboxes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Groups (distribution lists).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    /// API projects (Google Cloud style): which APIs are enabled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<Project>,
    /// OAuth 2.0 clients for the authorization-code flow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oauth_clients: Vec<OAuthClient>,
    /// Service accounts (JWT-bearer grant).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccount>,
    /// Domain-wide delegation grants: service-account client id -> scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domain_wide_delegation: Vec<DelegationGrant>,
    /// API keys (SendGrid-style `SG.<id>.<secret>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKey>,
    /// Named sets of permissions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    /// Organisation policies: named rules that forbid certain sends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    /// Organisation-wide default limits.
    #[serde(default, skip_serializing_if = "LimitSettings::is_empty")]
    pub limits: LimitSettings,
    /// The SMTP relay listener's rules.
    #[serde(default)]
    pub smtp_relay: SmtpRelay,
    /// Upstream smarthosts accepted mail is relayed to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub smarthosts: Vec<Smarthost>,
}

/// Organisation-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Organisation {
    /// Display name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Permissions every user has without any role.
    #[serde(default = "default_user_permissions")]
    pub default_permissions: Vec<String>,
    /// What to do when a header From is not owned by the sender.
    #[serde(default)]
    pub on_unowned_from: UnownedFrom,
}

fn default_user_permissions() -> Vec<String> {
    vec![permissions::MAIL_SEND.to_owned()]
}

impl Default for Organisation {
    fn default() -> Self {
        Organisation {
            name: String::new(),
            default_permissions: default_user_permissions(),
            on_unowned_from: UnownedFrom::default(),
        }
    }
}

/// Permission names used by roles and API keys.
pub mod permissions {
    /// May send mail.
    pub const MAIL_SEND: &str = "mail.send";
    /// Every permission Mailgate knows, for validation and documentation.
    pub const KNOWN: &[&str] = &[
        MAIL_SEND,
        "mail.batch.create",
        "mail.batch.read",
        "mail.batch.update",
        "mail.batch.delete",
        "api_keys.create",
        "api_keys.read",
        "api_keys.update",
        "api_keys.delete",
        "access_settings.whitelist.create",
        "access_settings.whitelist.read",
        "access_settings.whitelist.update",
        "access_settings.whitelist.delete",
        "sender_verification_eligible",
        "user.scheduled_sends.create",
        "user.scheduled_sends.read",
        "user.scheduled_sends.update",
        "user.scheduled_sends.delete",
    ];
}

/// Sender policy for a header From the caller does not own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnownedFrom {
    /// Refuse the message (`sender.not_owned`).
    #[default]
    Reject,
    /// Gmail's behaviour: silently replace the From with the primary address.
    Rewrite,
}

/// A mail domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// The domain name, lower case.
    pub name: String,
    /// Whether ownership was proven.
    #[serde(default)]
    pub verified: bool,
    /// The TXT record value that proves ownership; generated on apply when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_token: Option<String>,
}

/// An organisational unit. Unset settings inherit from the parent unit; the root defaults to on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgUnit {
    /// `/` or `/parent/child`.
    pub path: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether users in this unit have the mail service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail_enabled: Option<bool>,
    /// Whether API access (Gmail/SendGrid doors) is allowed for users in this unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_access: Option<bool>,
    /// Whether users in this unit may mail recipients outside the organisation's domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_recipients: Option<bool>,
    /// Limits for users in this unit (overrides the organisation's, overridden by the user's).
    #[serde(default, skip_serializing_if = "LimitSettings::is_empty")]
    pub limits: LimitSettings,
}

/// Account state of a user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    /// May sign in and send.
    #[default]
    Active,
    /// Suspended by an administrator.
    Suspended,
    /// New account waiting for approval before it may send.
    UnderReview,
}

/// The abuse guard's state for a principal: healthy -> warned -> throttled -> revoked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbuseState {
    /// Nothing wrong.
    #[default]
    Healthy,
    /// Suspicious activity seen; sending still allowed.
    Warned,
    /// Sending allowed at a reduced rate.
    Throttled,
    /// Sending revoked (`account.sending_revoked`).
    Revoked,
}

/// Abuse state with the evidence that led to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abuse {
    /// Current state.
    #[serde(default)]
    pub state: AbuseState,
    /// Why (shown in refusals and `explain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
}

impl Abuse {
    fn is_healthy(&self) -> bool {
        self.state == AbuseState::Healthy && self.evidence.is_none()
    }
}

/// Verification state of a send-as address (Gmail's `verificationStatus`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendAsStatus {
    /// Ready to use.
    #[default]
    Accepted,
    /// Awaiting verification by the owner.
    Pending,
}

/// An address a user may put in From besides the primary one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendAs {
    /// The address.
    pub email: String,
    /// Display name for From.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Reply-To to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Verification state.
    #[serde(default)]
    pub status: SendAsStatus,
}

/// A user (mailbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Primary address, lower case.
    pub email: String,
    /// Name shown in From.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Plain password, only in files being applied: hashed with argon2id on apply.
    #[serde(default, skip_serializing)]
    pub password: Option<Secret>,
    /// PHC string of the argon2id hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Account state.
    #[serde(default)]
    pub status: UserStatus,
    /// Whether this user has the mail service (and its org unit must allow it too).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub mail_enabled: bool,
    /// Organisational unit path.
    #[serde(default = "root_ou", skip_serializing_if = "is_root_ou")]
    pub org_unit: String,
    /// Other addresses that deliver to and may send as this user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Send-as addresses (Gmail `settings.sendAs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_as: Vec<SendAs>,
    /// Users allowed to act for this mailbox (Gmail mail delegation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegates: Vec<String>,
    /// Role names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Per-user limits.
    #[serde(default, skip_serializing_if = "LimitSettings::is_empty")]
    pub limits: LimitSettings,
    /// Abuse guard state.
    #[serde(default, skip_serializing_if = "Abuse::is_healthy")]
    pub abuse: Abuse,
}

impl User {
    /// A new active user in the root unit.
    pub fn new(email: impl Into<String>) -> Self {
        User {
            email: email.into(),
            display_name: None,
            password: None,
            password_hash: None,
            status: UserStatus::Active,
            mail_enabled: true,
            org_unit: root_ou(),
            aliases: vec![],
            send_as: vec![],
            delegates: vec![],
            roles: vec![],
            limits: LimitSettings::default(),
            abuse: Abuse::default(),
        }
    }
}

/// A group address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Group address.
    pub email: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Member user addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Whether members may use the group address as From.
    #[serde(default, skip_serializing_if = "is_false")]
    pub members_can_send_as: bool,
}

/// An API project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    /// Project id (`acme-app`).
    pub id: String,
    /// Project number (`123456789012`), shown in Google's error bodies.
    #[serde(deserialize_with = "string_or_number")]
    pub number: String,
    /// APIs enabled, e.g. `gmail.googleapis.com`, `sendgrid.mailgate`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enabled_apis: Vec<String>,
}

/// The service name of the Gmail API, as in Google's `SERVICE_DISABLED` errors.
pub const GMAIL_API: &str = "gmail.googleapis.com";
/// The service name Mailgate uses for its SendGrid-compatible API.
pub const SENDGRID_API: &str = "sendgrid.api";

/// An OAuth 2.0 client (authorization-code flow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthClient {
    /// Client id.
    #[serde(deserialize_with = "string_or_number")]
    pub client_id: String,
    /// Display name on the consent page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Plain client secret, only in files being applied.
    #[serde(default, skip_serializing)]
    pub secret: Option<Secret>,
    /// Argon2id hash (PHC string) of the client secret: what `apply` stores for a plain `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
    /// SHA-256 (hex) of the client secret: how secrets were stored before argon2id; still
    /// accepted (a file may carry it), replaced when the plain secret is applied again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    /// Project the client belongs to.
    pub project: String,
    /// Allowed redirect URIs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_uris: Vec<String>,
    /// Disabled clients cannot obtain or use tokens.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
}

/// The key id of an `SG.<id>.<secret>` API key, if it has that shape.
pub fn api_key_id(full: &str) -> Option<&str> {
    let rest = full.strip_prefix("SG.")?;
    let (id, secret) = rest.split_once('.')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// A public key of a service account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountKey {
    /// Key id (`private_key_id` in the JSON key file, `kid` in the JWT header).
    pub id: String,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

/// A service account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    /// Service account address.
    pub email: String,
    /// Owning project.
    pub project: String,
    /// Numeric OAuth client id (what domain-wide delegation grants name).
    #[serde(deserialize_with = "string_or_number")]
    pub client_id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Registered public keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<ServiceAccountKey>,
    /// Disabled accounts cannot obtain tokens.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
}

/// A domain-wide delegation grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationGrant {
    /// The service account's numeric client id.
    #[serde(deserialize_with = "string_or_number")]
    pub client_id: String,
    /// Scopes the service account may request when impersonating users.
    pub scopes: Vec<String>,
}

/// An API key. Only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Key id: the middle part of `SG.<id>.<secret>`. Derived from `secret` when omitted.
    #[serde(default)]
    pub id: String,
    /// Human name.
    pub name: String,
    /// The full key `SG.<id>.<secret>`, only in files being applied.
    #[serde(default, skip_serializing)]
    pub secret: Option<Secret>,
    /// SHA-256 (hex) of the full key.
    #[serde(default)]
    pub secret_sha256: String,
    /// The user the key acts as.
    pub owner: String,
    /// Project (for API enablement checks); optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Permissions (SendGrid scopes), e.g. `mail.send`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// Client IP ranges allowed to use the key; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
    /// HTTP referrer patterns (`*.example.com/*`); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_referrers: Vec<String>,
    /// APIs the key may call (`gmail.googleapis.com`, `sendgrid.api`, `smtp`); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_apis: Vec<String>,
    /// Expiry (RFC 3339).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<time::OffsetDateTime>,
    /// Revoked keys are refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub revoked: bool,
}

/// A named set of permissions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Role name.
    pub name: String,
    /// Permissions granted.
    #[serde(default)]
    pub permissions: Vec<String>,
}

/// Whom a policy applies to. Empty lists everywhere means everyone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyScope {
    /// Org unit paths (sub-units included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub org_units: Vec<String>,
    /// User addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Group addresses (members).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// What a policy forbids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyRule {
    /// No sending at all (`policy.denied`).
    DenySend,
    /// Only recipients in the organisation's domains (`policy.recipient_restricted`).
    InternalRecipientsOnly,
    /// Recipients only in these domains (`policy.recipient_restricted`).
    AllowRecipientDomains {
        /// Allowed domains.
        domains: Vec<String>,
    },
    /// Never to these domains (`policy.recipient_restricted`).
    DenyRecipientDomains {
        /// Forbidden domains.
        domains: Vec<String>,
    },
}

/// An organisation policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Stable id, named in refusals.
    pub id: String,
    /// What the rule is for, shown in refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whom it applies to.
    #[serde(default)]
    pub applies_to: PolicyScope,
    /// The rule.
    pub rule: PolicyRule,
}

/// The limits Mailgate enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitName {
    /// Quota units per minute (`limit.rate`).
    Rate,
    /// Messages per rolling 24 h (`limit.daily_messages`).
    DailyMessages,
    /// Recipients per rolling 24 h (`limit.daily_recipients`).
    DailyRecipients,
    /// Concurrent sends (`limit.concurrency`).
    Concurrency,
}

/// What to do when a limit is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExceedAction {
    /// Refuse the send.
    #[default]
    Reject,
    /// Accept it but hold delivery until the limit resets.
    Hold,
}

/// Limit settings; unset values inherit (user -> org unit chain -> organisation -> built-in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Messages per rolling 24 h (built-in 2,000, as Google Workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_day: Option<u64>,
    /// Recipients per rolling 24 h (built-in 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_per_day: Option<u64>,
    /// Recipients per message (built-in 100, as Gmail API/SMTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_per_message: Option<u64>,
    /// Quota units per minute (built-in 15,000; a send costs 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_units_per_minute: Option<u64>,
    /// Concurrent sends (built-in 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_sends: Option<u64>,
    /// Largest message in bytes (built-in 36,700,160, as Gmail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<u64>,
    /// Per limit: reject (default) or hold.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub on_exceed: BTreeMap<LimitName, ExceedAction>,
}

impl LimitSettings {
    /// True when nothing is set (so nothing is serialised).
    pub fn is_empty(&self) -> bool {
        *self == LimitSettings::default()
    }

    /// Fills every unset value of `self` from `fallback`.
    pub fn or(&self, fallback: &LimitSettings) -> LimitSettings {
        let mut on_exceed = fallback.on_exceed.clone();
        on_exceed.extend(self.on_exceed.iter().map(|(k, v)| (*k, *v)));
        LimitSettings {
            messages_per_day: self.messages_per_day.or(fallback.messages_per_day),
            recipients_per_day: self.recipients_per_day.or(fallback.recipients_per_day),
            recipients_per_message: self
                .recipients_per_message
                .or(fallback.recipients_per_message),
            rate_units_per_minute: self
                .rate_units_per_minute
                .or(fallback.rate_units_per_minute),
            concurrent_sends: self.concurrent_sends.or(fallback.concurrent_sends),
            max_message_bytes: self.max_message_bytes.or(fallback.max_message_bytes),
            on_exceed,
        }
    }
}

/// Limits with every value resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveLimits {
    /// Messages per rolling 24 h.
    pub messages_per_day: u64,
    /// Recipients per rolling 24 h.
    pub recipients_per_day: u64,
    /// Recipients per message.
    pub recipients_per_message: u64,
    /// Quota units per minute.
    pub rate_units_per_minute: u64,
    /// Concurrent sends.
    pub concurrent_sends: u64,
    /// Largest message in bytes.
    pub max_message_bytes: u64,
    /// Per limit: reject or hold.
    pub on_exceed: BTreeMap<LimitName, ExceedAction>,
}

/// Built-in defaults, taken from Google Workspace's published limits.
pub const BUILTIN_LIMITS: EffectiveLimitsConst = EffectiveLimitsConst {
    messages_per_day: 2_000,
    recipients_per_day: 10_000,
    recipients_per_message: 100,
    rate_units_per_minute: 15_000,
    concurrent_sends: 10,
    max_message_bytes: 36_700_160,
};

/// Quota units one send costs (Gmail's `messages.send` cost).
pub const SEND_COST_UNITS: u64 = 100;

/// The numeric part of the built-in limits (a `const`-friendly twin of [`EffectiveLimits`]).
#[derive(Debug, Clone, Copy)]
pub struct EffectiveLimitsConst {
    /// Messages per rolling 24 h.
    pub messages_per_day: u64,
    /// Recipients per rolling 24 h.
    pub recipients_per_day: u64,
    /// Recipients per message.
    pub recipients_per_message: u64,
    /// Quota units per minute.
    pub rate_units_per_minute: u64,
    /// Concurrent sends.
    pub concurrent_sends: u64,
    /// Largest message in bytes.
    pub max_message_bytes: u64,
}

impl LimitSettings {
    /// Resolves unset values with the built-in defaults.
    pub fn resolve(&self) -> EffectiveLimits {
        let b = BUILTIN_LIMITS;
        EffectiveLimits {
            messages_per_day: self.messages_per_day.unwrap_or(b.messages_per_day),
            recipients_per_day: self.recipients_per_day.unwrap_or(b.recipients_per_day),
            recipients_per_message: self
                .recipients_per_message
                .unwrap_or(b.recipients_per_message),
            rate_units_per_minute: self
                .rate_units_per_minute
                .unwrap_or(b.rate_units_per_minute),
            concurrent_sends: self.concurrent_sends.unwrap_or(b.concurrent_sends),
            max_message_bytes: self.max_message_bytes.unwrap_or(b.max_message_bytes),
            on_exceed: self.on_exceed.clone(),
        }
    }
}

/// Who may appear as envelope sender on the SMTP relay listener (Google's three options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelaySenders {
    /// Only registered users of the organisation.
    RegisteredUsers,
    /// Any address in the organisation's domains.
    #[default]
    DomainAddresses,
    /// Any address (not recommended).
    Any,
}

/// SMTP relay listener settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpRelay {
    /// Client IP ranges allowed to relay without AUTH.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
    /// Which envelope senders are accepted.
    #[serde(default)]
    pub allowed_senders: RelaySenders,
    /// Require SMTP AUTH even from allowed IPs.
    #[serde(default)]
    pub require_auth: bool,
    /// Require TLS.
    #[serde(default)]
    pub require_tls: bool,
}

impl Default for SmtpRelay {
    fn default() -> Self {
        SmtpRelay {
            allowed_ips: vec![],
            allowed_senders: RelaySenders::DomainAddresses,
            require_auth: false,
            require_tls: false,
        }
    }
}

/// How Mailgate speaks TLS to a smarthost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmarthostTls {
    /// STARTTLS, required (port 587/25).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// No TLS: only for a smarthost on loopback in tests.
    None,
}

/// An upstream relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smarthost {
    /// Name used in routes and logs.
    pub name: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS mode.
    #[serde(default)]
    pub tls: SmarthostTls,
    /// Recipient domains routed here; empty means the default route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// AUTH user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Where the AUTH password comes from: `env:VAR` or `file:/path` (never the password itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_ref: Option<String>,
}

/// The kinds of object a directory holds, with their identity field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `organisation` (singleton)
    Organisation,
    /// `domains`
    Domain,
    /// `org_units`
    OrgUnit,
    /// `users`
    User,
    /// `groups`
    Group,
    /// `projects`
    Project,
    /// `oauth_clients`
    OAuthClient,
    /// `service_accounts`
    ServiceAccount,
    /// `domain_wide_delegation`
    DelegationGrant,
    /// `api_keys`
    ApiKey,
    /// `roles`
    Role,
    /// `policies`
    Policy,
    /// `limits` (singleton)
    Limits,
    /// `smtp_relay` (singleton)
    SmtpRelay,
    /// `smarthosts`
    Smarthost,
}

impl Kind {
    /// Every kind, in file order.
    pub const ALL: [Kind; 15] = [
        Kind::Organisation,
        Kind::Domain,
        Kind::OrgUnit,
        Kind::User,
        Kind::Group,
        Kind::Project,
        Kind::OAuthClient,
        Kind::ServiceAccount,
        Kind::DelegationGrant,
        Kind::ApiKey,
        Kind::Role,
        Kind::Policy,
        Kind::Limits,
        Kind::SmtpRelay,
        Kind::Smarthost,
    ];

    /// The section name in the directory file (and the kind name in the store).
    pub fn section(self) -> &'static str {
        match self {
            Kind::Organisation => "organisation",
            Kind::Domain => "domains",
            Kind::OrgUnit => "org_units",
            Kind::User => "users",
            Kind::Group => "groups",
            Kind::Project => "projects",
            Kind::OAuthClient => "oauth_clients",
            Kind::ServiceAccount => "service_accounts",
            Kind::DelegationGrant => "domain_wide_delegation",
            Kind::ApiKey => "api_keys",
            Kind::Role => "roles",
            Kind::Policy => "policies",
            Kind::Limits => "limits",
            Kind::SmtpRelay => "smtp_relay",
            Kind::Smarthost => "smarthosts",
        }
    }

    /// The kind for a section name.
    pub fn from_section(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.section() == s)
    }

    /// Singletons are one object, not a list.
    pub fn is_singleton(self) -> bool {
        matches!(self, Kind::Organisation | Kind::Limits | Kind::SmtpRelay)
    }

    /// The identity field of a list entry (`None` for singletons).
    pub fn identity_field(self) -> Option<&'static str> {
        Some(match self {
            Kind::Organisation | Kind::Limits | Kind::SmtpRelay => return None,
            Kind::Domain | Kind::Role | Kind::Smarthost => "name",
            Kind::OrgUnit => "path",
            Kind::User | Kind::Group | Kind::ServiceAccount => "email",
            Kind::Project | Kind::ApiKey | Kind::Policy => "id",
            Kind::OAuthClient | Kind::DelegationGrant => "client_id",
        })
    }
}

/// One stored object: its kind, identity and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Kind.
    pub kind: Kind,
    /// Identity (empty for singletons).
    pub id: String,
    /// The object as JSON, exactly as the directory file spells it.
    pub body: serde_json::Value,
}

/// A stored object whose body no longer parses (e.g. written by a newer version).
#[derive(Debug, thiserror::Error)]
#[error("stored {kind} `{id}` cannot be read: {source}")]
pub struct ObjectError {
    kind: &'static str,
    id: String,
    #[source]
    source: serde_json::Error,
}

impl Directory {
    /// Splits the directory into stored objects, one per list entry plus the singletons.
    pub fn to_objects(&self) -> Vec<Object> {
        let mut out = Vec::new();
        let whole = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return out,
        };
        for kind in Kind::ALL {
            let section = whole.get(kind.section());
            match (kind.identity_field(), section) {
                (None, Some(v)) => out.push(Object {
                    kind,
                    id: String::new(),
                    body: v.clone(),
                }),
                // `limits` is skipped when empty: store nothing.
                (None, None) => {}
                (Some(field), Some(serde_json::Value::Array(items))) => {
                    for item in items {
                        let id = item
                            .get(field)
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .to_owned();
                        out.push(Object {
                            kind,
                            id,
                            body: item.clone(),
                        });
                    }
                }
                (Some(_), _) => {}
            }
        }
        out
    }

    /// Rebuilds a directory from stored objects.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Result<Self, ObjectError> {
        let mut whole = serde_json::Map::new();
        for o in objects {
            if o.kind.is_singleton() {
                whole.insert(o.kind.section().to_owned(), o.body);
            } else if let serde_json::Value::Array(items) = whole
                .entry(o.kind.section())
                .or_insert_with(|| serde_json::Value::Array(vec![]))
            {
                items.push(o.body);
            }
        }
        serde_json::from_value(serde_json::Value::Object(whole)).map_err(|source| ObjectError {
            kind: "directory",
            id: String::new(),
            source,
        })
    }

    /// Finds a user by primary address (case-insensitive).
    pub fn user(&self, email: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.email.eq_ignore_ascii_case(email))
    }

    /// Finds a user by primary address, mutably.
    pub fn user_mut(&mut self, email: &str) -> Option<&mut User> {
        self.users
            .iter_mut()
            .find(|u| u.email.eq_ignore_ascii_case(email))
    }

    /// Finds an org unit by path.
    pub fn org_unit(&self, path: &str) -> Option<&OrgUnit> {
        self.org_units.iter().find(|o| o.path == path)
    }

    /// Whether `domain` is one of the organisation's domains (verified or not).
    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains
            .iter()
            .any(|d| d.name.eq_ignore_ascii_case(domain))
    }

    /// The org unit chain from the root down to `path` (only the units that exist).
    pub fn org_unit_chain<'a>(&'a self, path: &str) -> Vec<&'a OrgUnit> {
        let mut chain = Vec::new();
        if let Some(root) = self.org_unit("/") {
            chain.push(root);
        }
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            prefix.push('/');
            prefix.push_str(part);
            if let Some(ou) = self.org_unit(&prefix) {
                chain.push(ou);
            }
        }
        chain
    }

    /// The org unit settings in force for `path`, after inheritance. The root defaults to on.
    pub fn effective_org_unit(&self, path: &str) -> EffectiveOrgUnit {
        let mut eff = EffectiveOrgUnit {
            mail_enabled: true,
            api_access: true,
            external_recipients: true,
            decided_by: Default::default(),
        };
        for ou in self.org_unit_chain(path) {
            if let Some(v) = ou.mail_enabled {
                eff.mail_enabled = v;
                eff.decided_by.mail_enabled = Some(ou.path.clone());
            }
            if let Some(v) = ou.api_access {
                eff.api_access = v;
                eff.decided_by.api_access = Some(ou.path.clone());
            }
            if let Some(v) = ou.external_recipients {
                eff.external_recipients = v;
                eff.decided_by.external_recipients = Some(ou.path.clone());
            }
        }
        eff
    }

    /// The limits in force for a user: user, then org unit chain (deepest first), then the
    /// organisation, then the built-in defaults.
    pub fn effective_limits(&self, user: &User) -> EffectiveLimits {
        let mut acc = user.limits.clone();
        for ou in self.org_unit_chain(&user.org_unit).iter().rev() {
            acc = acc.or(&ou.limits);
        }
        acc.or(&self.limits).resolve()
    }
}

/// Org unit settings after inheritance, with the unit that decided each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveOrgUnit {
    /// Mail service on.
    pub mail_enabled: bool,
    /// API access allowed.
    pub api_access: bool,
    /// External recipients allowed.
    pub external_recipients: bool,
    /// Which unit set each value (`None`: the built-in default).
    pub decided_by: DecidedBy,
}

/// Which org unit set each inherited setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecidedBy {
    /// Unit that set `mail_enabled`.
    pub mail_enabled: Option<String>,
    /// Unit that set `api_access`.
    pub api_access: Option<String>,
    /// Unit that set `external_recipients`.
    pub external_recipients: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip() {
        let mut dir = Directory::default();
        dir.domains.push(Domain {
            name: "example.com".into(),
            verified: true,
            verification_token: Some("t".into()),
        });
        let mut u = User::new("alice@example.com");
        u.aliases.push("al@example.com".into());
        dir.users.push(u);
        dir.limits.messages_per_day = Some(5);
        let objects = dir.to_objects();
        assert!(
            objects
                .iter()
                .any(|o| o.kind == Kind::User && o.id == "alice@example.com")
        );
        let back = Directory::from_objects(objects).unwrap();
        assert_eq!(back, dir);
    }

    #[test]
    fn secrets_are_never_serialised_or_debugged() {
        let mut u = User::new("a@example.com");
        u.password = Some(Secret::new("hunter2-plain"));
        let json = serde_json::to_string(&u).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
        assert!(!format!("{u:?}").contains("hunter2"));
    }

    #[test]
    fn org_unit_settings_inherit_and_name_the_deciding_unit() {
        let mut dir = Directory::default();
        dir.org_units.push(OrgUnit {
            path: "/".into(),
            description: None,
            mail_enabled: Some(true),
            api_access: None,
            external_recipients: None,
            limits: LimitSettings::default(),
        });
        dir.org_units.push(OrgUnit {
            path: "/staff".into(),
            description: None,
            mail_enabled: Some(false),
            api_access: None,
            external_recipients: Some(false),
            limits: LimitSettings {
                messages_per_day: Some(7),
                ..Default::default()
            },
        });
        let eff = dir.effective_org_unit("/staff/interns");
        assert!(!eff.mail_enabled);
        assert!(eff.api_access);
        assert_eq!(eff.decided_by.mail_enabled.as_deref(), Some("/staff"));
        let mut u = User::new("x@example.com");
        u.org_unit = "/staff/interns".into();
        assert_eq!(dir.effective_limits(&u).messages_per_day, 7);
        u.limits.messages_per_day = Some(3);
        assert_eq!(dir.effective_limits(&u).messages_per_day, 3);
        assert_eq!(dir.effective_limits(&u).recipients_per_message, 100);
    }
}
