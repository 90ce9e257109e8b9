//! `mailgate why`: what an error message from Google's APIs, Google's token endpoint, SendGrid,
//! an SMTP server or Mailgate itself can mean, most likely cause first, each with how to confirm
//! it and the remedy, mapped onto Mailgate's reason codes ([`crate::catalogue`]).
//!
//! The CLI (`mailgate why`) and the admin API (`POST /mailgate/v1/why`) call [`why`] /
//! [`why_json`] / [`why_text`]; `docs/why.md` is generated from the same [`TABLE`] by
//! [`render_why_md`] (a unit test fails when the file is stale; regenerate with
//! `MAILGATE_BLESS=1 cargo test -p mailgate-core why`).
//!
//! # How text is matched
//!
//! - **Mailgate's own answers first.** A refusal from Mailgate carries its reason code:
//!   `[mailgate: <code>` (SMTP), `"code": "<code>"` (the Gmail door's `mailgate` ErrorInfo, the
//!   token endpoint's `mailgate` object, the admin API), `mailgate <code>:` (the SendGrid door's
//!   `help`) or an `X-Mailgate-Code: <code>` header. When one of these names a catalogue code,
//!   that code is the answer, alone: it is what Mailgate decided, not a guess.
//! - **Otherwise the table.** Before matching, the text is lower-cased, JSON string escapes
//!   (`\"`, `\n`) are undone, runs of white space become one space, and an SMTP continuation
//!   line's `535-5.7.8` reads `535 5.7.8`. A row matches when, for one of its pattern groups,
//!   every pattern of the group occurs in the text *as whole words*: the characters around it are
//!   not letters, digits or `_` (so `rateLimitExceeded` does not match inside
//!   `userRateLimitExceeded`, nor `5.7.8` inside `5.7.80`). No regular expressions: patterns are
//!   plain lower-case ASCII text, a test holds them to that.
//! - **Every matching row is reported**, in table order (the table lists a more specific row
//!   before a more general one that can match the same text, e.g. `userRateLimitExceeded` before
//!   `rateLimitExceeded`), except a row whose every occurrence lies inside a longer occurrence
//!   of another matching row's pattern: `invalid credentials` inside `invalid credentials for
//!   relay` is the relay's text. Each row's causes are in likelihood order: the first is the one
//!   to check first.
//! - **Unknown text is said to be unknown**, with the questions whose answers narrow it down
//!   ([`QUESTIONS`]); no cause is ever invented for it.
//!
//! # Sources
//!
//! Each row records where its text was checked (`source`): the service's own documentation where
//! it prints the string, otherwise a public issue thread quoting the service's answer verbatim.
//! Mailgate's doors render the same strings (docs/reasons.md), so a row's first cause is also what
//! Mailgate answers with that text.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::catalogue::Reason;

/// Which service sends a row's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Google's Gmail API (`gmail.googleapis.com`).
    GmailApi,
    /// Google's OAuth 2.0 token endpoint (`oauth2.googleapis.com/token`).
    GoogleToken,
    /// SendGrid's v3 API.
    SendGrid,
    /// Gmail's SMTP servers (`smtp.gmail.com`, `smtp-relay.gmail.com`).
    GmailSmtp,
    /// Microsoft 365 / Exchange Online SMTP (`smtp.office365.com`).
    Microsoft365,
    /// Postfix.
    Postfix,
    /// Another SMTP server or provider.
    Smtp,
    /// Mailgate itself (its reason code is in the text).
    Mailgate,
}

impl Service {
    /// The service's name as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::GmailApi => "Gmail API",
            Service::GoogleToken => "Google OAuth token endpoint",
            Service::SendGrid => "SendGrid API",
            Service::GmailSmtp => "Gmail SMTP",
            Service::Microsoft365 => "Microsoft 365 SMTP",
            Service::Postfix => "Postfix",
            Service::Smtp => "SMTP server",
            Service::Mailgate => "Mailgate",
        }
    }
}

/// One thing an error can mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cause {
    /// The Mailgate reason code it corresponds to.
    pub code: Reason,
    /// What is wrong, in the real service's terms.
    pub cause: &'static str,
    /// How to confirm this is the cause.
    pub confirm: &'static str,
    /// What fixes it (on the real service; behind Mailgate, the code's remedy in docs/reasons.md).
    pub remedy: &'static str,
}

/// One row of the table: a real error text and what it can mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Stable id, e.g. `gmail.precondition_failed`.
    pub id: &'static str,
    /// The service that sends it.
    pub service: Service,
    /// The text as the service sends it (an example: placeholders filled with example values).
    pub text: &'static str,
    /// Pattern groups: the row matches when every pattern of one group occurs (see module docs).
    pub patterns: &'static [&'static [&'static str]],
    /// Where the text was checked.
    pub source: &'static str,
    /// The causes, most likely first.
    pub causes: &'static [Cause],
}

const fn c(
    code: Reason,
    cause: &'static str,
    confirm: &'static str,
    remedy: &'static str,
) -> Cause {
    Cause {
        code,
        cause,
        confirm,
        remedy,
    }
}

const GMAIL_ERRORS_DOC: &str = "https://developers.google.com/gmail/api/guides/handle-errors";

/// The table, in matching order.
pub static TABLE: &[Row] = &[
    // ---------------------------------------------------------------- Gmail API
    Row {
        id: "gmail.precondition_failed",
        service: Service::GmailApi,
        text: r#"{"error": {"code": 400, "message": "Precondition check failed.", "errors": [{"message": "Precondition check failed.", "domain": "global", "reason": "failedPrecondition"}], "status": "FAILED_PRECONDITION"}}"#,
        patterns: &[&["precondition check failed"]],
        source: "https://github.com/googleapis/google-api-java-client/issues/1648 (the body); https://github.com/airbytehq/airbyte/pull/83233 (a service-account token without `sub`)",
        causes: &[
            c(
                Reason::DelegationNotConfigured,
                "A service account called the Gmail API as itself: its token has no `sub` (subject), and a service account has no mailbox of its own.",
                "Look at the code that builds the credentials: is a subject set (`subject=` in google-auth, `sub` in the JWT, `User` in .NET)? GAM's `check serviceaccount` requests a token with `sub` for each scope.",
                "Request the token with `sub` set to the user whose mailbox sends, and make sure the service account's client ID has domain-wide delegation for the Gmail scope.",
            ),
            c(
                Reason::DelegationSubjectUnknown,
                "The subject (`sub`) or `userId` is not a user of the Workspace domain (a typo, an alias, a group, a deleted user or a consumer account).",
                "Find the address in Google Admin console > Directory > Users; an alias or a group is not a user.",
                "Use the user's primary address as the subject.",
            ),
            c(
                Reason::AccountMailDisabled,
                "The user exists but has no Gmail service (no licence with Gmail, or Gmail turned off for the user's organisational unit).",
                "Google Admin console > Apps > Google Workspace > Gmail: service status of the user's organisational unit; the user's licences.",
                "Turn Gmail on for the organisational unit or assign a licence that includes Gmail.",
            ),
        ],
    },
    Row {
        id: "gmail.mail_service_not_enabled",
        service: Service::GmailApi,
        text: r#"{"error": {"code": 400, "message": "Mail service not enabled", "errors": [{"message": "Mail service not enabled", "domain": "global", "reason": "failedPrecondition"}], "status": "FAILED_PRECONDITION"}}"#,
        patterns: &[&["mail service not enabled"]],
        source: "https://github.com/WPManageNinja/fluent-smtp/issues/152",
        causes: &[
            c(
                Reason::AccountMailDisabled,
                "The mailbox's user has no Gmail service: Gmail is off for the user's organisational unit, or the user's licence has no Gmail.",
                "Google Admin console > Apps > Google Workspace > Gmail > Service status for the user's organisational unit; Directory > Users > the user > Licences.",
                "Turn Gmail on for that organisational unit, or assign a licence with Gmail (changes can take up to 24 hours).",
            ),
            c(
                Reason::AccountMailDisabled,
                "The Google account has no Gmail mailbox at all (a Google account created with another provider's address).",
                "Sign in as the user at mail.google.com: no inbox is offered.",
                "Send as an account that has a Gmail mailbox.",
            ),
        ],
    },
    Row {
        id: "gmail.delegation_denied",
        service: Service::GmailApi,
        text: r#"{"error": {"code": 403, "message": "Delegation denied for alice@example.com", "errors": [{"message": "Delegation denied for alice@example.com", "domain": "global", "reason": "forbidden"}], "status": "PERMISSION_DENIED"}}"#,
        patterns: &[&["delegation denied for"]],
        source: "https://github.com/home-assistant/core/issues/87920; https://github.com/googleworkspace/python-samples/issues/80",
        causes: &[
            c(
                Reason::ImpersonationDenied,
                "The request's `userId` names a mailbox other than the token's user (the address named after \"for\" is the token's user).",
                "Compare the `userId` in the request URL (`/gmail/v1/users/<userId>/...`) with the user who granted the token.",
                "Use `userId` `me`; to act for another mailbox, get a token for that user (domain-wide delegation with `sub` set to it).",
            ),
            c(
                Reason::SenderNotOwned,
                "The `userId` is an alias or send-as address of the token's user rather than the user itself.",
                "The `userId` differs from the primary address only by being an alias (Gmail settings > Accounts > Send mail as lists the send-as addresses).",
                "Use `userId` `me` and put the alias in the message's From header; it must be a verified send-as address.",
            ),
        ],
    },
    Row {
        id: "gmail.insufficient_scopes",
        service: Service::GmailApi,
        text: r#"{"error": {"code": 403, "message": "Request had insufficient authentication scopes.", "errors": [{"message": "Insufficient Permission", "domain": "global", "reason": "insufficientPermissions"}], "status": "PERMISSION_DENIED", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT", "domain": "googleapis.com"}]}}"#,
        patterns: &[
            &["request had insufficient authentication scopes"],
            &["insufficient permission"],
            &["insufficientpermissions"],
            &["access_token_scope_insufficient"],
        ],
        source: "https://github.com/googleworkspace/cli/issues/282; https://github.com/googleworkspace/apps-script-oauth2/issues/177 (the legacy body)",
        causes: &[
            c(
                Reason::ScopeInsufficient,
                "The access token was granted without a scope that allows this call (sending needs https://www.googleapis.com/auth/gmail.send, gmail.compose, gmail.modify or https://mail.google.com/).",
                "Ask Google which scopes the token has: `curl 'https://oauth2.googleapis.com/tokeninfo?access_token=<token>'` and read `scope`; the answer's `WWW-Authenticate` header lists the scopes that would do.",
                "Request the send scope and get a new token (a stored refresh token keeps the scopes it was granted with: the user consents again).",
            ),
            c(
                Reason::DelegationScopeNotGranted,
                "A service account's token was requested with other scopes than the send scope its domain-wide delegation grants.",
                "Compare the scopes the code requests with the ones listed for the client ID in Google Admin console > Security > Access and data control > API controls > Manage Domain Wide Delegation.",
                "Request the granted send scope, or add it to the client ID's delegation (the exact scope URL).",
            ),
        ],
    },
    Row {
        id: "gmail.invalid_credentials",
        service: Service::GmailApi,
        text: r#"{"error": {"code": 401, "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.", "errors": [{"message": "Invalid Credentials", "domain": "global", "reason": "authError", "location": "Authorization", "locationType": "header"}], "status": "UNAUTHENTICATED"}}"#,
        patterns: &[
            &["invalid credentials"],
            &["request had invalid authentication credentials"],
        ],
        source: GMAIL_ERRORS_DOC,
        causes: &[
            c(
                Reason::AuthExpired,
                "The access token expired (they last one hour) and was not refreshed.",
                "`curl 'https://oauth2.googleapis.com/tokeninfo?access_token=<token>'` answers `invalid_token` for an expired token; check when it was issued.",
                "Refresh the token with the refresh token (client libraries do it when given the refresh token, client ID and secret) or request a new one.",
            ),
            c(
                Reason::AuthRevoked,
                "The user revoked the app's access, changed the password (for tokens with Gmail scopes), or an administrator removed access.",
                "Refreshing fails with `invalid_grant` \"Token has been expired or revoked.\"; https://myaccount.google.com/permissions no longer lists the app.",
                "Send the user through the consent flow again.",
            ),
            c(
                Reason::AuthInvalid,
                "The Authorization header does not carry a Google access token (an ID token, an API key, a truncated or quoted token, or `Bearer` missing).",
                "Print the header's shape (never the token): it must be `Authorization: Bearer ya29....`.",
                "Send the access token from the token endpoint's `access_token` field.",
            ),
        ],
    },
    Row {
        id: "gmail.api_not_enabled",
        service: Service::GmailApi,
        text: r#"{"error": {"code": 403, "message": "Gmail API has not been used in project 861228239640 before or it is disabled. Enable it by visiting https://console.developers.google.com/apis/api/gmail.googleapis.com/overview?project=861228239640 then retry. If you enabled this API recently, wait a few minutes for the action to propagate to our systems and retry.", "errors": [{"domain": "usageLimits", "reason": "accessNotConfigured"}], "status": "PERMISSION_DENIED", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED"}]}}"#,
        patterns: &[
            &["accessnotconfigured"],
            &["has not been used in project"],
            &["service_disabled"],
            &["access not configured"],
        ],
        source: "https://github.com/googleworkspace/python-samples/issues/23",
        causes: &[
            c(
                Reason::ProjectApiDisabled,
                "The Gmail API is not enabled in the Google Cloud project that owns the OAuth client or service account (the project number is in the message).",
                "Open the URL in the message, or Google Cloud console > APIs & Services > Enabled APIs & services for that project.",
                "Enable the Gmail API in that project (APIs & Services > Library > Gmail API > Enable).",
            ),
            c(
                Reason::ProjectApiDisabled,
                "The API was enabled a moment ago and the change has not reached every Google server yet.",
                "The console shows the Gmail API enabled.",
                "Wait a few minutes and retry.",
            ),
        ],
    },
    Row {
        id: "gmail.daily_limit_exceeded",
        service: Service::GmailApi,
        text: r#"{"error": {"errors": [{"domain": "usageLimits", "reason": "dailyLimitExceeded", "message": "Daily Limit Exceeded"}], "code": 403, "message": "Daily Limit Exceeded"}}"#,
        patterns: &[&["dailylimitexceeded"], &["daily limit exceeded"]],
        source: GMAIL_ERRORS_DOC,
        causes: &[c(
            Reason::LimitDailyMessages,
            "The project's daily API quota is used up.",
            "Google Cloud console > APIs & Services > Gmail API > Quotas & system limits for the project.",
            "Wait for the quota to reset, or request a higher quota for the project.",
        )],
    },
    Row {
        id: "gmail.user_rate_limit_exceeded",
        service: Service::GmailApi,
        text: r#"{"error": {"errors": [{"domain": "usageLimits", "reason": "userRateLimitExceeded", "message": "User Rate Limit Exceeded"}], "code": 403, "message": "User Rate Limit Exceeded"}}"#,
        patterns: &[
            &["userratelimitexceeded"],
            &["user rate limit exceeded"],
            &["user-rate limit exceeded"],
        ],
        source: GMAIL_ERRORS_DOC,
        causes: &[
            c(
                Reason::LimitRate,
                "This user's per-user quota (quota units per second) is spent: too many calls for one mailbox.",
                "The message has no \"(Mail sending)\"; the requests for this user come in bursts.",
                "Retry with exponential backoff; spread the calls out over time.",
            ),
            c(
                Reason::LimitDailyMessages,
                "The user's daily sending limit is reached (the message ends in \"(Mail sending)\" and names the time sending resumes).",
                "\"(Mail sending)\" in the message; the Retry after time is hours away.",
                "Wait until the time named; send from several users, or use the SMTP relay service for volume.",
            ),
        ],
    },
    Row {
        id: "gmail.rate_limit_exceeded",
        service: Service::GmailApi,
        text: r#"{"error": {"errors": [{"domain": "usageLimits", "reason": "rateLimitExceeded", "message": "Rate Limit Exceeded"}], "code": 403, "message": "Rate Limit Exceeded"}}"#,
        patterns: &[&["ratelimitexceeded"], &["rate limit exceeded"]],
        source: GMAIL_ERRORS_DOC,
        causes: &[
            c(
                Reason::LimitRate,
                "The project's (or the user's) request rate is over its limit.",
                "Google Cloud console > APIs & Services > Gmail API > Quotas: the per-minute usage graph peaks at the limit.",
                "Retry with exponential backoff; lower the request rate or request a higher quota.",
            ),
            c(
                Reason::LimitConcurrency,
                "Too many requests run in parallel for one user.",
                "Count the requests in flight for that user when it happens.",
                "Send fewer requests at once for each user.",
            ),
        ],
    },
    Row {
        id: "gmail.domain_policy",
        service: Service::GmailApi,
        text: r#"{"error": {"errors": [{"domain": "global", "reason": "domainPolicy", "message": "The domain administrators have disabled Gmail apps."}], "code": 403, "message": "The domain administrators have disabled Gmail apps."}}"#,
        patterns: &[
            &["domainpolicy"],
            &["the domain administrators have disabled gmail apps"],
        ],
        source: GMAIL_ERRORS_DOC,
        causes: &[c(
            Reason::PolicyDenied,
            "The Workspace administrators do not allow this app (or third-party apps) to use Gmail data for the user.",
            "Google Admin console > Security > Access and data control > API controls > Manage third-party app access: the app's access, and the Gmail setting for unconfigured apps.",
            "An administrator marks the app Trusted (or Limited with Gmail allowed) for the user's organisational unit.",
        )],
    },
    // ---------------------------------------------------------------- Google's token endpoint
    Row {
        id: "token.unauthorized_client",
        service: Service::GoogleToken,
        text: r#"{"error": "unauthorized_client", "error_description": "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."}"#,
        patterns: &[
            &["unauthorized_client"],
            &["client is unauthorized to retrieve access tokens"],
            &["unauthorized client or scope in request"],
        ],
        source: "https://github.com/googleapis/google-api-php-client/issues/2214; https://github.com/googleapis/google-api-php-client/issues/995",
        causes: &[
            c(
                Reason::DelegationNotConfigured,
                "The service account's client ID has no domain-wide delegation in the Workspace domain of the subject (`sub`).",
                "Look for the key file's `client_id` (a number, not the e-mail) in Google Admin console > Security > Access and data control > API controls > Manage Domain Wide Delegation.",
                "Add the client ID there with the Gmail scope the code requests (a super administrator of the subject's domain).",
            ),
            c(
                Reason::DelegationScopeNotGranted,
                "The client ID is delegated, but not for every scope the token request names (each must match exactly, e.g. https://www.googleapis.com/auth/gmail.send).",
                "Compare the scopes in the code with the ones listed for the client ID; request one scope at a time to find the missing one (GAM's `check serviceaccount` does).",
                "Add the missing scope to the client ID's delegation, or stop requesting it.",
            ),
            c(
                Reason::DelegationNotConfigured,
                "The delegation was added a moment ago: it can take from minutes to 24 hours to apply.",
                "The client ID and scopes are listed correctly.",
                "Wait and retry.",
            ),
        ],
    },
    Row {
        id: "token.not_a_valid_email",
        service: Service::GoogleToken,
        text: r#"{"error": "invalid_grant", "error_description": "Not a valid email."}"#,
        patterns: &[&["not a valid email"]],
        source: "https://github.com/googleapis/google-api-php-client/issues/783",
        causes: &[
            c(
                Reason::DelegationSubjectUnknown,
                "The subject (`sub`) is not an e-mail address (empty, a user name without domain, or a quoted value).",
                "Print the subject the code passes (`subject=`, `sub`).",
                "Set the subject to the user's full primary address.",
            ),
            c(
                Reason::AuthInvalid,
                "The issuer (`iss`, the key file's `client_email`) is not the service account's address.",
                "Compare `iss` with `client_email` in the key file.",
                "Build the credentials from the key file itself rather than from copied fields.",
            ),
        ],
    },
    Row {
        id: "token.invalid_email_or_user_id",
        service: Service::GoogleToken,
        text: r#"{"error": "invalid_grant", "error_description": "Invalid email or User ID"}"#,
        patterns: &[&["invalid email or user id"]],
        source: "https://github.com/SCRT-HQ/PSGSuite/issues/267; https://github.com/DoliCloud/DoliMods/issues/30",
        causes: &[
            c(
                Reason::DelegationSubjectUnknown,
                "The subject (`sub`) names no user of a Workspace domain (a typo, an alias, a group, a deleted user, a consumer Gmail address).",
                "Look the address up in Google Admin console > Directory > Users.",
                "Use an existing user's primary address as the subject.",
            ),
            c(
                Reason::AuthInvalid,
                "The issuer (`iss`) is not the key's service account, or the service account was just created and is not known everywhere yet.",
                "Compare `iss` with `client_email` in the key file; check how old the service account is.",
                "Use the key file's `client_email`; for a new service account, wait a few minutes.",
            ),
        ],
    },
    Row {
        id: "token.invalid_jwt_signature",
        service: Service::GoogleToken,
        text: r#"{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}"#,
        patterns: &[&["invalid jwt signature"]],
        source: "https://github.com/googleapis/google-cloud-python/issues/10004; https://github.com/google-github-actions/setup-gcloud/issues/76 (a rotated key)",
        causes: &[
            c(
                Reason::AuthInvalid,
                "The key was deleted or rotated: Google no longer has the public key for the key file's `private_key_id`.",
                "Google Cloud console > IAM & Admin > Service accounts > the account > Keys: is the key file's `private_key_id` listed?",
                "Create a new key for the service account and use its key file.",
            ),
            c(
                Reason::AuthInvalid,
                "The private key and the issuer do not belong together (a key file of one service account with another account's e-mail).",
                "Compare the key file's `client_email` with the issuer the code sends.",
                "Use `client_email` and `private_key` from the same key file.",
            ),
        ],
    },
    Row {
        id: "token.jwt_timeframe",
        service: Service::GoogleToken,
        text: r#"{"error": "invalid_grant", "error_description": "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your 'iat' and 'exp' values in the JWT claim."}"#,
        patterns: &[&["token must be a short-lived token"]],
        source: "https://github.com/erebusnz/gapi-google-analytics-php-interface/issues/147",
        causes: &[c(
            Reason::AuthExpired,
            "The machine's clock is off, so the assertion's `iat`/`exp` are outside Google's window (or `exp` is more than an hour after `iat`).",
            "Compare the machine's time with a time server (`date -u` against the `Date` header of any Google answer).",
            "Synchronise the clock (NTP); keep `exp` at most one hour after `iat`.",
        )],
    },
    Row {
        id: "token.expired_or_revoked",
        service: Service::GoogleToken,
        text: r#"{"error": "invalid_grant", "error_description": "Token has been expired or revoked."}"#,
        patterns: &[&["token has been expired or revoked"]],
        source: "https://developers.google.com/identity/protocols/oauth2#expiration; https://github.com/jeremyephron/simplegmail/pull/135 (seven days in Testing)",
        causes: &[
            c(
                Reason::AuthRevoked,
                "The refresh token was revoked: the user removed the app's access, changed the password (Gmail scopes), or an administrator revoked it.",
                "https://myaccount.google.com/permissions (as the user) no longer lists the app.",
                "Send the user through the consent flow again and store the new refresh token.",
            ),
            c(
                Reason::AuthExpired,
                "The refresh token expired: the OAuth consent screen is in Testing (refresh tokens last 7 days), or it was unused for six months.",
                "Google Cloud console > APIs & Services > OAuth consent screen: publishing status.",
                "Publish the app (In production) and get a new refresh token.",
            ),
        ],
    },
    Row {
        id: "token.invalid_scope",
        service: Service::GoogleToken,
        text: r#"{"error": "invalid_scope", "error_description": "Invalid OAuth scope or ID token audience provided."}"#,
        patterns: &[&["invalid_scope"]],
        source: "https://github.com/oneduo/laravel-recaptcha-enterprise/issues/10; https://datatracker.ietf.org/doc/html/rfc6749#section-5.2",
        causes: &[
            c(
                Reason::ScopeInsufficient,
                "A requested scope is not a Google scope as written (a short name like `gmail.send` without the https://www.googleapis.com/auth/ prefix, scopes joined with commas, or a typo).",
                "Print the `scope` parameter (or the JWT's `scope` claim) the code sends: scopes are full URLs separated by spaces.",
                "Request https://www.googleapis.com/auth/gmail.send (or https://mail.google.com/ for SMTP) exactly.",
            ),
            c(
                Reason::ScopeInsufficient,
                "No scope was requested at all (service-account credentials built without scopes).",
                "The credentials are created from the key file without `scopes=`.",
                "Pass the Gmail scope when building the credentials.",
            ),
        ],
    },
    Row {
        id: "token.access_denied",
        service: Service::GoogleToken,
        text: r#"{"error": "access_denied", "error_description": "Access denied."}"#,
        patterns: &[&["access_denied"], &["admin_policy_enforced"]],
        source: "https://datatracker.ietf.org/doc/html/rfc6749#section-4.1.2.1",
        causes: &[
            c(
                Reason::PolicyDenied,
                "The Workspace administrators block this app for the user (`admin_policy_enforced` says so outright).",
                "Google Admin console > Security > Access and data control > API controls > Manage third-party app access: the app's access.",
                "An administrator trusts the app for the user's organisational unit.",
            ),
            c(
                Reason::AuthMissing,
                "The user declined the consent screen, so no authorization was given.",
                "The redirect back carried `error=access_denied` right after the consent screen.",
                "Ask the user to consent again and accept the requested scopes.",
            ),
            c(
                Reason::ClientDisabled,
                "The OAuth consent screen is in Testing and the user is not one of its test users (or the app awaits Google's verification).",
                "Google Cloud console > APIs & Services > OAuth consent screen: publishing status and test users.",
                "Add the user as a test user, or publish the app.",
            ),
        ],
    },
    Row {
        id: "token.client_disabled",
        service: Service::GoogleToken,
        text: r#"{"error": "disabled_client", "error_description": "The OAuth client was disabled."}"#,
        patterns: &[
            &["disabled_client"],
            &["deleted_client"],
            &["the oauth client was deleted"],
        ],
        source: "https://github.com/websightgmbh/l5-google-cloud-storage/issues/6 (deleted_client)",
        causes: &[c(
            Reason::ClientDisabled,
            "The OAuth client or service account was disabled or deleted in its Google Cloud project.",
            "Google Cloud console > APIs & Services > Credentials (OAuth clients) or IAM & Admin > Service accounts: status.",
            "Enable it again (a deleted one can be undeleted for 30 days), or create a new one.",
        )],
    },
    Row {
        id: "token.invalid_client",
        service: Service::GoogleToken,
        text: r#"{"error": "invalid_client", "error_description": "Unauthorized"}"#,
        patterns: &[&["invalid_client"]],
        source: "https://datatracker.ietf.org/doc/html/rfc6749#section-5.2 (invalid_client: client authentication failed); Google answers a wrong client_secret with error_description \"Unauthorized\" and an unknown client_id with \"The OAuth client was not found.\"",
        causes: &[
            c(
                Reason::AuthInvalid,
                "The client_secret does not belong to the client_id: it was reset, or copied from another client.",
                "Google Cloud console > APIs & Services > Credentials > the OAuth client: compare the client ID, and the secret's creation date with when the app's copy was made.",
                "Copy the current client secret (or add a new one) into the app's configuration.",
            ),
            c(
                Reason::ClientDisabled,
                "The client_id names no OAuth client (\"The OAuth client was not found.\"): it was deleted, or belongs to another project.",
                "Google Cloud console > APIs & Services > Credentials: is the client ID listed in the project the app uses?",
                "Use an existing client's ID and secret, or undelete the client (possible for 30 days).",
            ),
        ],
    },
    // ---------------------------------------------------------------- SendGrid
    Row {
        id: "sendgrid.wrong_credentials",
        service: Service::SendGrid,
        text: r#"{"errors": [{"message": "Permission denied, wrong credentials", "field": null, "help": null}]}"#,
        patterns: &[&["permission denied, wrong credentials"]],
        source: "https://support.sendgrid.com/hc/en-us/articles/18322114821403-4XX-API-Errors-and-Troubleshooting-Suggestions",
        causes: &[
            c(
                Reason::AuthMissing,
                "The request carries no usable Authorization header (missing, or not `Bearer <key>`).",
                "Print the header's shape (never the key): `Authorization: Bearer SG.xxxx.yyyy`.",
                "Send `Authorization: Bearer` followed by the whole API key.",
            ),
            c(
                Reason::AuthInvalid,
                "The key is not a SendGrid API key (an environment variable not set, a truncated key, quotes or a newline kept in it).",
                "Check the key's length and that it starts with `SG.` and has two dots.",
                "Set the key exactly as SendGrid showed it when it was created.",
            ),
        ],
    },
    Row {
        id: "sendgrid.grant_invalid",
        service: Service::SendGrid,
        text: r#"{"errors": [{"message": "The provided authorization grant is invalid, expired, or revoked", "field": null, "help": null}]}"#,
        patterns: &[&["the provided authorization grant is invalid, expired, or revoked"]],
        source: "https://support.sendgrid.com/hc/en-us/articles/18322114821403-4XX-API-Errors-and-Troubleshooting-Suggestions",
        causes: &[
            c(
                Reason::AuthInvalid,
                "The key does not exist: deleted, mistyped, or from another SendGrid account or subuser.",
                "SendGrid > Settings > API Keys lists the key's name and the first characters of its id (the part after `SG.`).",
                "Create a new API key with Mail Send permission and use it.",
            ),
            c(
                Reason::AuthRevoked,
                "The key was revoked (deleted) since it last worked.",
                "The key is gone from Settings > API Keys.",
                "Create a new key; a deleted key never comes back.",
            ),
        ],
    },
    Row {
        id: "sendgrid.not_authorized_to_send",
        service: Service::SendGrid,
        text: r#"{"errors": [{"message": "Authenticated user is not authorized to send mail", "field": null, "help": null}]}"#,
        patterns: &[&["authenticated user is not authorized to send mail"]],
        source: "https://www.twilio.com/docs/api/errors/60604; https://github.com/sendgrid/sendgrid-php/issues/181",
        causes: &[
            c(
                Reason::PermissionMissing,
                "The API key has no Mail Send permission (a restricted key).",
                "`curl -H 'Authorization: Bearer <key>' https://api.sendgrid.com/v3/scopes`: `mail.send` is not in `scopes`.",
                "SendGrid > Settings > API Keys > the key > Edit: Mail Send, Full Access (or create a key that has it).",
            ),
            c(
                Reason::KeyIpBlocked,
                "Behind Mailgate's SendGrid door: the key's owner may not send now (key restricted to other IPs, account suspended, under review or sending revoked); the `help` field and the X-Mailgate-Code header name which.",
                "Read `help` (`mailgate <code>: ...`) or run `mailgate why` on the whole answer.",
                "The remedy of the code `help` names (docs/reasons.md).",
            ),
        ],
    },
    Row {
        id: "sendgrid.sender_identity",
        service: Service::SendGrid,
        text: r#"{"errors": [{"message": "The from address does not match a verified Sender Identity. Mail cannot be sent until this error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ to see the Sender Identity requirements", "field": "from", "help": null}]}"#,
        patterns: &[&["does not match a verified sender identity"]],
        source: "https://github.com/sendgrid/sendgrid-ruby/pull/489; https://github.com/sendgrid/sendgrid-nodejs/issues/1088",
        causes: &[
            c(
                Reason::SenderNotOwned,
                "The From address is neither a verified Single Sender nor in an authenticated domain of the account.",
                "SendGrid > Settings > Sender Authentication: Single Sender Verification and Domain Authentication lists.",
                "Send from a verified sender, or verify this address (Single Sender) or its domain (Domain Authentication).",
            ),
            c(
                Reason::SenderUnverified,
                "The address was added as a Single Sender but its verification e-mail was never confirmed.",
                "The sender shows as not verified in Single Sender Verification.",
                "Click the link in the verification e-mail (or resend it).",
            ),
            c(
                Reason::SenderDomainUnverified,
                "The domain was added for Domain Authentication but its DNS records do not verify.",
                "Settings > Sender Authentication > the domain: Verify shows which CNAME records fail.",
                "Publish the CNAME records SendGrid gives, then Verify.",
            ),
        ],
    },
    Row {
        id: "sendgrid.access_forbidden",
        service: Service::SendGrid,
        text: r#"{"errors": [{"field": null, "message": "access forbidden"}]}"#,
        patterns: &[&["access forbidden"]],
        source: "https://github.com/sendgrid/sendgrid-ruby/issues/393; https://github.com/sendgrid/docs/issues/2248",
        causes: &[
            c(
                Reason::PermissionMissing,
                "The API key lacks the scope this endpoint needs (a restricted key).",
                "`curl -H 'Authorization: Bearer <key>' https://api.sendgrid.com/v3/scopes` and compare with the endpoint's required scope.",
                "Give the key that permission in Settings > API Keys > Edit, or use a key that has it.",
            ),
            c(
                Reason::KeyIpBlocked,
                "IP Access Management is on and the calling machine's address is not allowed.",
                "SendGrid > Settings > IP Access Management: the allowed addresses and the recent access attempts.",
                "Add the machine's public IP address (or range) to the allowed list.",
            ),
        ],
    },
    // ---------------------------------------------------------------- SMTP
    Row {
        id: "smtp.starttls_required",
        service: Service::GmailSmtp,
        text: "530 5.7.0 Must issue a STARTTLS command first.",
        patterns: &[&["must issue a starttls command first"]],
        source: "https://support.google.com/a/answer/3726730",
        causes: &[
            c(
                Reason::TlsRequired,
                "The client sent AUTH or MAIL FROM on a plaintext connection; the server requires STARTTLS first.",
                "The client's settings: port 587 with STARTTLS (or `secure`/`starttls`) turned off.",
                "Turn STARTTLS on for port 587, or use port 465 with implicit TLS.",
            ),
            c(
                Reason::TlsRequired,
                "Something between the client and the server (antivirus, firewall) removes STARTTLS from the EHLO answer.",
                "`openssl s_client -starttls smtp -connect <server>:587` from the same machine succeeds while the client does not see STARTTLS.",
                "Turn off the mail scanning of that middlebox, or use port 465.",
            ),
        ],
    },
    Row {
        id: "postfix.authentication_failed",
        service: Service::Postfix,
        text: "535 5.7.8 Error: authentication failed: authentication failure",
        patterns: &[&["error: authentication failed"]],
        source: "https://www.postfix.org/SASL_README.html; Postfix's src/smtpd/smtpd_sasl_glue.c (smtpd_sasl_authenticate: \"535 5.7.8 Error: authentication failed: %s\", the SASL back-end's reason)",
        causes: &[c(
            Reason::AuthInvalid,
            "The server's SASL back-end (Cyrus SASL or Dovecot) refused the user name or password: a wrong password, or the user name in another form than the back-end stores (with or without @domain).",
            "The server's mail log has `SASL PLAIN authentication failed` (or LOGIN) with the sasl_username it tried; `doveadm auth test <user>` or `testsaslauthd -u <user> -p <password>` on the server checks the same credentials.",
            "Use the right password, and the user name as the server stores it (often the full address).",
        )],
    },
    Row {
        id: "smtp.bad_credentials",
        service: Service::GmailSmtp,
        text: "535-5.7.8 Username and Password not accepted. For more information, go to\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials",
        patterns: &[
            &["username and password not accepted"],
            &["535", "5.7.8"],
            &["badcredentials"],
        ],
        source: "https://support.google.com/mail/?p=BadCredentials; https://daimto.com/how-to-fix-username-and-password-when-accessing-googles-smtp-server",
        causes: &[
            c(
                Reason::AuthInvalid,
                "The account's normal password was used: Google accepts only an App Password (with 2-Step Verification on) or an OAuth token (XOAUTH2) for SMTP.",
                "Is the password the one used to sign in to Google? Is 2-Step Verification on for the account?",
                "Create an App Password (https://myaccount.google.com/apppasswords) and use it, or send with XOAUTH2.",
            ),
            c(
                Reason::AuthInvalid,
                "The user name or password is wrong (a typo, spaces copied into the App Password, another account's address).",
                "Sign in with the same address in a browser; compare the App Password's length (16 letters, no spaces).",
                "Enter the full address as the user name and the App Password without spaces.",
            ),
            c(
                Reason::AuthRevoked,
                "The App Password was revoked (App Passwords are revoked when the account's password changes).",
                "https://myaccount.google.com/apppasswords no longer lists it.",
                "Create a new App Password.",
            ),
        ],
    },
    Row {
        id: "smtp.mail_relay_denied",
        service: Service::GmailSmtp,
        text: "550 5.7.0 Mail relay denied [203.0.113.10]. Invalid credentials for relay for one of the domains in: example.com (as obtained from HELO and MAIL FROM).",
        patterns: &[&["mail relay denied"], &["invalid credentials for relay"]],
        source: "https://support.google.com/a/answer/6140680",
        causes: &[
            c(
                Reason::RelayIpNotAllowed,
                "smtp-relay.gmail.com does not know the sending IP address: it is not in the SMTP relay service's allowed addresses.",
                "Google Admin console > Apps > Google Workspace > Gmail > Routing > SMTP relay service: the allowed IP addresses, against the address in brackets in the reply.",
                "Add the sending machine's public IP address to the SMTP relay service setting (or require SMTP AUTH and authenticate).",
            ),
            c(
                Reason::AuthMissing,
                "The SMTP relay service setting requires SMTP authentication and the client did not authenticate.",
                "The setting's \"Require SMTP Authentication\" is on; the client's log shows no AUTH.",
                "Authenticate (a Workspace user and App Password) over TLS.",
            ),
            c(
                Reason::SenderNotOwned,
                "Neither the HELO name nor the MAIL FROM domain is one of the organisation's domains, so Google cannot tell whose relay setting applies.",
                "The domains named in the reply (\"as obtained from HELO and MAIL FROM\").",
                "Send with MAIL FROM in one of your domains and a HELO naming your domain.",
            ),
        ],
    },
    Row {
        id: "smtp.try_again_later",
        service: Service::GmailSmtp,
        text: "421 4.7.0 Try again later, closing connection.",
        patterns: &[&["421", "4.7.0", "try again later"]],
        source: "https://support.google.com/a/answer/3726730",
        causes: &[
            c(
                Reason::LimitConcurrency,
                "Too many connections at once from this client (Google: this reply usually means denial-of-service protection of the SMTP relay at the HELO stage).",
                "Count the client's simultaneous SMTP connections when it happens; the reply comes right after EHLO/HELO.",
                "Use fewer connections and send several messages per connection; retry later (4xx is temporary).",
            ),
            c(
                Reason::LimitRate,
                "The sender's rate is over the server's limit for now.",
                "The reply comes after a burst of messages.",
                "Slow down and retry with backoff.",
            ),
        ],
    },
    Row {
        id: "smtp.too_many_login_attempts",
        service: Service::GmailSmtp,
        text: "454 4.7.0 Too many login attempts, please try again later.",
        patterns: &[&["too many login attempts"]],
        source: "https://support.google.com/a/answer/3726730",
        causes: &[
            c(
                Reason::AuthLocked,
                "Repeated failed logins (usually a stored wrong password retried by a client) locked logins for a while.",
                "Earlier replies were 535 5.7.8; several clients may use the same account.",
                "Fix the stored password in every client, then wait before trying again.",
            ),
            c(
                Reason::LimitRate,
                "Too many logins in a short time, even successful ones (a new connection and AUTH for each message).",
                "The client opens a connection per message.",
                "Keep one authenticated connection open and send several messages over it.",
            ),
        ],
    },
    Row {
        id: "smtp.not_authorized_on_behalf",
        service: Service::Smtp,
        text: "550 5.7.1 [M12] User [alice@example.com] not authorized to send on behalf of <boss@example.com>",
        patterns: &[&["not authorized to send on behalf of"]],
        source: "https://github.com/louislam/uptime-kuma/issues/5411",
        causes: &[
            c(
                Reason::SenderNotOwned,
                "The From (or MAIL FROM) address is not one the authenticated user may send as on this provider.",
                "Compare the user named first with the address named after \"on behalf of\"; the provider's list of the account's verified senders or domains.",
                "Send from the authenticated user's own address, or add the From address (or its domain) as an allowed sender for the account.",
            ),
            c(
                Reason::ImpersonationDenied,
                "The address belongs to another mailbox, and the user has no delegated right to send for it.",
                "The mail system's delegation settings for the address named after \"on behalf of\".",
                "Grant the user the right to send as (or on behalf of) that mailbox, or send from the user's own address.",
            ),
        ],
    },
    Row {
        id: "m365.send_as_permission",
        service: Service::Microsoft365,
        text: "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        patterns: &[&["client does not have permissions to send as this sender"]],
        source: "https://github.com/gophish/gophish/issues/1600",
        causes: &[
            c(
                Reason::SenderNotOwned,
                "The From (or MAIL FROM) address is not the authenticated mailbox's own and the mailbox has no Send As right on it.",
                "Compare the authenticated user with the From address; Exchange admin center > Recipients > Mailboxes > the From mailbox > Delegation > Send as.",
                "Send from the authenticated mailbox's address, or grant it Send As on the From mailbox.",
            ),
            c(
                Reason::ImpersonationDenied,
                "The mailbox has Send on Behalf but not Send As on the From mailbox.",
                "Delegation > Send on behalf lists the user, Send as does not.",
                "Grant Send As, or send with Sender: the authenticated user and From: the other mailbox.",
            ),
        ],
    },
    Row {
        id: "m365.send_as_denied",
        service: Service::Microsoft365,
        text: "554 5.2.0 SendAsDenied; alice@example.com not allowed to send as boss@example.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message Cannot submit message.",
        patterns: &[
            &["sendasdenied"],
            &["sendasdeniedexception"],
            &["mapiexceptionsendasdenied"],
        ],
        source: "https://github.com/dolthub/doltlab-issues/issues/43; http://www.kouhan.cn/en/article/00038744",
        causes: &[
            c(
                Reason::SenderNotOwned,
                "The authenticated mailbox sent with a From address it has no Send As right on (another mailbox, a shared mailbox, a group).",
                "Exchange admin center > Recipients > Mailboxes (or Groups) > the From address > Delegation > Send as.",
                "Grant the authenticated mailbox Send As on that address, or send from its own address.",
            ),
            c(
                Reason::SenderNotOwned,
                "The From address is an alias (proxy address) of the mailbox and sending from aliases is not turned on.",
                "`Get-OrganizationConfig | Format-List SendFromAliasEnabled` is False.",
                "`Set-OrganizationConfig -SendFromAliasEnabled $true`, or send from the primary address.",
            ),
        ],
    },
    Row {
        id: "m365.client_not_authenticated",
        service: Service::Microsoft365,
        text: "530 5.7.57 Client not authenticated to send mail. [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]",
        patterns: &[&["client not authenticated to send mail"], &["5.7.57"]],
        source: "https://docs.bookyourpto.com/features/smtp-troubleshoot",
        causes: &[
            c(
                Reason::AuthMissing,
                "The client sent MAIL FROM without authenticating (no user name and password, or authentication turned off in its settings).",
                "The client's settings: authentication on, the mailbox's full address as the user name.",
                "Turn on SMTP authentication in the client (smtp.office365.com, port 587, STARTTLS).",
            ),
            c(
                Reason::TlsRequired,
                "The client did not start TLS on port 587, so Microsoft 365 never offered AUTH.",
                "`openssl s_client -starttls smtp -connect smtp.office365.com:587` shows AUTH after STARTTLS only.",
                "Turn STARTTLS on.",
            ),
        ],
    },
    Row {
        id: "m365.smtp_auth_disabled",
        service: Service::Microsoft365,
        text: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        patterns: &[
            &["smtpclientauthentication is disabled"],
            &["5.7.139", "authentication unsuccessful"],
        ],
        source: "https://docs.bookyourpto.com/features/smtp-troubleshoot; https://learn.microsoft.com/en-us/exchange/clients-and-mobile-in-exchange-online/authenticated-client-smtp-submission",
        causes: &[
            c(
                Reason::PolicyDenied,
                "SMTP AUTH (authenticated client submission) is turned off for the tenant or for the mailbox.",
                "`Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled` (tenant) and `Get-CASMailbox <user> | Format-List SmtpClientAuthenticationDisabled` (mailbox); Microsoft 365 admin center > Users > the user > Mail > Manage email apps > Authenticated SMTP.",
                "Turn Authenticated SMTP on for the mailbox (and the tenant), or send with OAuth / the Graph API instead.",
            ),
            c(
                Reason::PolicyDenied,
                "Security defaults (or a Conditional Access policy) block basic authentication for the user (\"user is locked by your organization's security defaults policy\").",
                "Microsoft Entra admin center > Identity > Overview > Properties > Manage security defaults.",
                "Use OAuth (XOAUTH2) for SMTP, or exclude the sending account from the policy.",
            ),
            c(
                Reason::AuthInvalid,
                "The credentials were refused (\"the request did not meet the criteria to be authenticated successfully\": a wrong password, or MFA without an app password).",
                "Sign in to Outlook on the web with the same user name and password.",
                "Use the right password or an app password, or OAuth.",
            ),
        ],
    },
    Row {
        id: "m365.authentication_unsuccessful",
        service: Service::Microsoft365,
        text: "535 5.7.3 Authentication unsuccessful",
        patterns: &[&["535", "5.7.3"]],
        source: "https://mytechblaze.com/?p=247",
        causes: &[c(
            Reason::AuthInvalid,
            "The user name or password was refused (a typo, an expired password, MFA on the account without an app password).",
            "Sign in to Outlook on the web with the same credentials.",
            "Use the right credentials (the full address as the user name), an app password, or OAuth.",
        )],
    },
    Row {
        id: "postfix.relay_access_denied",
        service: Service::Postfix,
        text: "554 5.7.1 <bob@example.org>: Relay access denied",
        patterns: &[&["relay access denied"]],
        source: "https://www.postfix.org/SMTPD_ACCESS_README.html",
        causes: &[
            c(
                Reason::AuthMissing,
                "The client did not authenticate, and the recipient is not in a domain the server receives mail for.",
                "The client's log shows no AUTH before MAIL FROM; the server offers AUTH only after STARTTLS.",
                "Authenticate (SMTP AUTH over TLS) before sending.",
            ),
            c(
                Reason::RelayIpNotAllowed,
                "The client's address is not in the server's trusted networks (Postfix `mynetworks`).",
                "`postconf mynetworks smtpd_relay_restrictions` on the server, against the client's address.",
                "Add the client's address to `mynetworks`, or authenticate.",
            ),
        ],
    },
    Row {
        id: "postfix.sender_not_owned",
        service: Service::Postfix,
        text: "553 5.7.1 <support@example.com>: Sender address rejected: not owned by user alice@example.com",
        patterns: &[&["sender address rejected: not owned by user"]],
        source: "https://www.postfix.org/postconf.5.html#smtpd_sender_login_maps",
        causes: &[c(
            Reason::SenderNotOwned,
            "The MAIL FROM address is not one the authenticated login may use (Postfix `smtpd_sender_login_maps`).",
            "`postmap -q <address> <smtpd_sender_login_maps table>` on the server names the logins that own it.",
            "Send from an address the login owns, or add the login to the address's entry in that table.",
        )],
    },
    Row {
        id: "postfix.recipient_rejected",
        service: Service::Postfix,
        text: "554 5.7.1 <bob@external.test>: Recipient address rejected: Access denied",
        patterns: &[&["recipient address rejected", "5.7.1"]],
        source: "https://www.postfix.org/access.5.html (REJECT in a check_recipient_access table); Postfix's src/smtpd/smtpd_check.c (\"Access denied\" when the table gives no text)",
        causes: &[c(
            Reason::PolicyRecipientRestricted,
            "The server's policy refuses this recipient for this client or sender (Postfix: a check_recipient_access table or a policy service rejects it; the 5.7.1 says it is policy, not an unknown mailbox).",
            "The reply names the recipient; the server's mail log has `NOQUEUE: reject: RCPT ... Recipient address rejected` with the sender and recipient; on Postfix `postmap -q <recipient> <table>` shows the entry.",
            "Send to a recipient the policy allows, or ask the server's operator to change the rule that bars it (the access table entry or the policy).",
        )],
    },
];

/// What to ask when the text matches nothing in the table.
pub const QUESTIONS: &[&str] = &[
    "Which service answered: Google's Gmail API, Google's token endpoint (oauth2.googleapis.com), SendGrid, or an SMTP server (which host and port)?",
    "At which step: getting a token, calling the API, the SMTP AUTH, MAIL FROM or RCPT TO command, or after DATA?",
    "What is the HTTP status, or the SMTP reply code and enhanced status code (e.g. 403, 535 5.7.8)?",
    "Can you paste the whole answer (the JSON error body, or every line of the SMTP reply) rather than the library's summary?",
    "Which credential: a service account with domain-wide delegation (and which subject), a user's OAuth token, an API key, or a password?",
    "Which From address, and is it the authenticated user's own address?",
    "Did it ever work, and what changed since?",
];

/// One row (or Mailgate's own code) that the text matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Row id (`mailgate` for Mailgate's own answer).
    pub id: &'static str,
    /// The service.
    pub service: Service,
    /// What in the text matched (the patterns, as written in the table).
    pub matched: String,
    /// Where the row's text was checked.
    pub source: &'static str,
    /// The causes, most likely first.
    pub causes: Vec<Cause>,
}

/// Lower-cases, undoes JSON string escapes, collapses white space, and reads an SMTP
/// continuation line's `535-5.7.8` as `535 5.7.8`.
fn normalize(text: &str) -> String {
    let lower = text
        .to_lowercase()
        .replace("\\r", " ")
        .replace("\\n", " ")
        .replace("\\\"", "\"");
    let mut out = String::with_capacity(lower.len());
    let mut space = false;
    for ch in lower.chars() {
        if ch.is_whitespace() {
            if !space {
                out.push(' ');
            }
            space = true;
        } else {
            out.push(ch);
            space = false;
        }
    }
    let bytes = out.as_bytes();
    let mut fixed = bytes.to_vec();
    for i in 3..bytes.len().saturating_sub(2) {
        if bytes[i] == b'-'
            && bytes[i - 3..i].iter().all(u8::is_ascii_digit)
            && (i == 3 || !is_word(bytes[i - 4]))
            && bytes[i + 1].is_ascii_digit()
            && bytes[i + 2] == b'.'
        {
            fixed[i] = b' ';
        }
    }
    // Only an ASCII byte was replaced by another: still UTF-8.
    String::from_utf8(fixed).unwrap_or(out)
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Where `needle` (lower-case ASCII) occurs in `hay` with no letter, digit or `_` right before
/// or after it: byte ranges.
fn find_words(hay: &str, needle: &str) -> Vec<(usize, usize)> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    let (Some(&first), Some(&last)) = (n.first(), n.last()) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = hay.get(from..).and_then(|rest| rest.find(needle)) {
        let at = from + i;
        let end = at + n.len();
        let before = at == 0 || !is_word(h[at - 1]) || !is_word(first);
        let after = end == h.len() || !is_word(h[end]) || !is_word(last);
        if before && after {
            found.push((at, end));
        }
        // `needle` starts with an ASCII byte, so `at + 1` is a character boundary.
        from = at + 1;
    }
    found
}

#[cfg(test)]
fn contains_word(hay: &str, needle: &str) -> bool {
    !find_words(hay, needle).is_empty()
}

/// In an `explain` answer or a decision trace every check names its code: one whose `outcome`
/// (in the same JSON object) is not `fail` is no refusal.
fn passed_check(after_code: &str) -> bool {
    let object = after_code.split('}').next().unwrap_or("");
    object.contains("\"outcome\"") && !object.contains("\"fail\"")
}

/// The reason code a Mailgate answer carries, if the text has one.
fn mailgate_code(norm: &str) -> Option<(Reason, String)> {
    for marker in [
        "[mailgate: ",
        "\"code\": \"",
        "\"code\":\"",
        "x-mailgate-code: ",
        "mailgate ",
    ] {
        let mut from = 0;
        while let Some(i) = norm.get(from..).and_then(|rest| rest.find(marker)) {
            let start = from + i + marker.len();
            let code: String = norm[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            if let Some(r) = Reason::from_code(code.trim_end_matches('.'))
                && !passed_check(&norm[start..])
            {
                return Some((r, format!("{marker}{}", r.code())));
            }
            from = start;
        }
    }
    None
}

/// A matching row, the pattern group that matched first, and where its patterns occur.
type Hit<'a> = (&'a Row, &'a [&'a str], Vec<(usize, usize)>);

/// What `text` can mean: Mailgate's own code when it carries one, else every matching row of
/// [`TABLE`] in table order. Empty: unknown (ask [`QUESTIONS`]).
pub fn why(text: &str) -> Vec<Match> {
    let norm = normalize(text);
    if let Some((reason, matched)) = mailgate_code(&norm) {
        let spec = reason.spec();
        return vec![Match {
            id: "mailgate",
            service: Service::Mailgate,
            matched,
            source: "docs/reasons.md",
            causes: vec![Cause {
                code: reason,
                cause: spec.message,
                confirm: "the answer names the decision: `GET /mailgate/v1/decisions/<id>` shows every check; `mailgate explain` with the same facts lists every failing one",
                remedy: spec.remedy,
            }],
        }];
    }
    table_matches(&norm)
}

/// Every matching row of [`TABLE`] for `text`, ignoring a Mailgate reason code it may carry:
/// what the text would mean had a real Google, SendGrid or SMTP server sent it (`mailgate
/// doctor` diagnoses from this, so it reads Mailgate's answers as it reads the real services').
pub fn why_table(text: &str) -> Vec<Match> {
    table_matches(&normalize(text))
}

fn table_matches(norm: &str) -> Vec<Match> {
    let norm = norm.to_owned();
    // Each matching row with the places its patterns occur.
    let hits: Vec<Hit<'_>> = TABLE
        .iter()
        .filter_map(|row| {
            let groups: Vec<&[&str]> = row
                .patterns
                .iter()
                .copied()
                .filter(|g| g.iter().all(|p| !find_words(&norm, p).is_empty()))
                .collect();
            let first = *groups.first()?;
            let spans = groups
                .iter()
                .flat_map(|g| g.iter())
                .flat_map(|p| find_words(&norm, p))
                .collect();
            Some((row, first, spans))
        })
        .collect();
    // A row whose every occurrence lies inside a longer occurrence of another row's pattern is
    // that other row's text, not its own (`invalid credentials` in `invalid credentials for
    // relay`).
    let inside = |(a, b): (usize, usize), of: &[(usize, usize)]| {
        of.iter().any(|&(c, d)| c <= a && b <= d && d - c > b - a)
    };
    hits.iter()
        .enumerate()
        .filter(|(i, (_, _, spans))| {
            !spans.iter().all(|&s| {
                hits.iter()
                    .enumerate()
                    .any(|(j, (_, _, other))| j != *i && inside(s, other))
            })
        })
        .map(|(_, (row, group, _))| Match {
            id: row.id,
            service: row.service,
            matched: group.join(" + "),
            source: row.source,
            causes: row.causes.to_vec(),
        })
        .collect()
}

/// The answer as JSON (`mailgate why --json` and `POST /mailgate/v1/why`):
/// `{"understood", "matches": [{"id", "service", "matched", "source", "causes": [{"code",
/// "cause", "confirm", "remedy"}]}], "questions"}`; `questions` is empty when understood.
pub fn why_json(text: &str) -> Value {
    let matches = why(text);
    let understood = !matches.is_empty();
    let matches: Vec<Value> = matches
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "service": m.service.as_str(),
                "matched": m.matched,
                "source": m.source,
                "causes": m.causes.iter().map(|c| json!({
                    "code": c.code.code(),
                    "cause": c.cause,
                    "confirm": c.confirm,
                    "remedy": c.remedy,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let questions: &[&str] = if understood { &[] } else { QUESTIONS };
    json!({"understood": understood, "matches": matches, "questions": questions})
}

/// The answer as text (`mailgate why`).
pub fn why_text(text: &str) -> String {
    let matches = why(text);
    let mut out = String::new();
    if matches.is_empty() {
        out.push_str(
            "Unknown: this text matches no error in Mailgate's table (docs/why.md), so no cause is guessed.\n\
             These questions narrow it down:\n",
        );
        for q in QUESTIONS {
            let _ = writeln!(out, "  - {q}");
        }
        return out;
    }
    for (i, m) in matches.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{} ({}; matched: {})",
            m.service.as_str(),
            m.id,
            m.matched
        );
        for (n, c) in m.causes.iter().enumerate() {
            let _ = writeln!(out, "  {}. {}: {}", n + 1, c.code.code(), c.cause);
            let _ = writeln!(out, "     confirm: {}", c.confirm);
            let _ = writeln!(out, "     remedy:  {}", c.remedy);
        }
        let _ = writeln!(out, "  source: {}", m.source);
    }
    out
}

fn md(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Renders `docs/why.md` from [`TABLE`].
pub fn render_why_md() -> String {
    let mut out = String::new();
    out.push_str("# What an error means: `mailgate why`\n\n");
    out.push_str(
        "<!-- Generated from crates/mailgate-core/src/why.rs: do not edit by hand.\n     \
         Regenerate with `MAILGATE_BLESS=1 cargo test -p mailgate-core why`. -->\n\n",
    );
    out.push_str(
        "Paste an error message, or a whole error body, from Google's Gmail API, Google's OAuth \
         token endpoint, SendGrid, an SMTP server (Gmail, Microsoft 365, Postfix) or Mailgate \
         itself, and `mailgate why` names the causes it can mean, most likely first, each with \
         how to confirm it and the remedy, and the Mailgate reason code ([reasons.md](reasons.md)) \
         it corresponds to. `-` reads the text from standard input; `--json` prints the same \
         answer as `POST /mailgate/v1/why` ([admin-api.md](admin-api.md)). It needs no server \
         and no store. Exit status: 0 understood, 3 unknown.\n\n",
    );
    out.push_str("```sh\nmailgate why 'Delegation denied for alice@example.com'\n```\n\n");
    out.push_str(
        "A text the table does not know is said to be unknown, with the questions that narrow \
         it down; no cause is invented:\n\n",
    );
    out.push_str("<!-- exit: 3 -->\n```sh\nmailgate why 'hello world'\n```\n\n");
    out.push_str(
        "## How text is matched\n\n\
         - **Mailgate's own answers** carry their reason code (`[mailgate: <code>` on SMTP, \
         `\"code\": \"<code>\"` in the Gmail door's `mailgate` ErrorInfo, the token endpoint's \
         `mailgate` object and the admin API, `mailgate <code>:` in the SendGrid door's `help`, \
         the `X-Mailgate-Code` header): that code is the answer.\n\
         - **Otherwise the table below.** The text is lower-cased, JSON escapes (`\\\"`, `\\n`) \
         undone and white space collapsed (an SMTP continuation `535-5.7.8` reads `535 5.7.8`). \
         A row matches when every pattern of one of its groups occurs as whole words (no letter, \
         digit or `_` right before or after it). Every matching row is reported, in table order, \
         but one whose every occurrence lies inside a longer occurrence of another row's pattern \
         (`invalid credentials` inside `invalid credentials for relay`); its causes are in \
         likelihood order.\n\
         - **Unknown text**: the answer says so and asks the questions at the end of this page.\n\n",
    );
    out.push_str("## The table\n\n| id | service | text | matched by | first cause |\n|---|---|---|---|---|\n");
    for row in TABLE {
        let groups: Vec<String> = row
            .patterns
            .iter()
            .map(|g| {
                g.iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            })
            .collect();
        let first = row
            .causes
            .first()
            .map_or(String::new(), |c| format!("`{}`", c.code.code()));
        let _ = writeln!(
            out,
            "| [`{}`](#{}) | {} | {} | {} | {} |",
            row.id,
            row.id.replace('.', ""),
            row.service.as_str(),
            md(&short(row.text)),
            groups.join(" or "),
            first
        );
    }
    out.push('\n');
    for row in TABLE {
        let _ = writeln!(out, "### {}\n", row.id);
        let _ = writeln!(out, "{}, as sent:\n", row.service.as_str());
        let lang = if row.text.starts_with('{') {
            "json"
        } else {
            "text"
        };
        let _ = writeln!(out, "```{lang}\n{}\n```\n", row.text);
        let _ = writeln!(out, "Source: {}\n", row.source);
        for (n, c) in row.causes.iter().enumerate() {
            let _ = writeln!(
                out,
                "{}. **`{}`**: {}\n   - confirm: {}\n   - remedy: {}",
                n + 1,
                c.code.code(),
                c.cause,
                c.confirm,
                c.remedy
            );
        }
        out.push('\n');
    }
    out.push_str("## When the text is unknown\n\n`mailgate why` asks:\n\n");
    for q in QUESTIONS {
        let _ = writeln!(out, "- {q}");
    }
    out
}

/// The human part of a row's text for the summary table: the `message` of a JSON body.
fn short(text: &str) -> String {
    let v: Option<Value> = serde_json::from_str(text).ok();
    let msg = v.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.pointer("/error_description"))
            .or_else(|| v.pointer("/errors/0/message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    match (
        msg,
        v.as_ref()
            .and_then(|v| v.pointer("/error"))
            .and_then(Value::as_str),
    ) {
        (Some(m), Some(e)) => format!("`{e}`: {m}"),
        (Some(m), None) => m,
        _ => text.lines().next().unwrap_or(text).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn first_code(text: &str) -> Option<&'static str> {
        why(text)
            .first()
            .and_then(|m| m.causes.first())
            .map(|c| c.code.code())
    }

    /// The strings issue 14 names, as the services send them (or as a library prints them),
    /// each mapped to its most likely cause.
    #[rstest]
    #[case::precondition("Precondition check failed.", "delegation.not_configured")]
    #[case::precondition_python(
        "<HttpError 400 when requesting https://gmail.googleapis.com/gmail/v1/users/me/messages/send?alt=json returned \"Precondition check failed.\". Details: \"Precondition check failed.\">",
        "delegation.not_configured"
    )]
    #[case::mail_service("Mail service not enabled", "account.mail_disabled")]
    #[case::delegation_denied("Delegation denied for alice@example.com", "impersonation.denied")]
    #[case::insufficient_permission("403 Insufficient Permission", "scope.insufficient")]
    #[case::insufficient_scopes(
        "Request had insufficient authentication scopes.",
        "scope.insufficient"
    )]
    #[case::invalid_credentials("401 Invalid Credentials", "auth.expired")]
    #[case::access_not_configured("403 accessNotConfigured", "project.api_disabled")]
    #[case::not_used_in_project(
        "Access Not Configured. Gmail API has not been used in project 479857586348 before or it is disabled.",
        "project.api_disabled"
    )]
    #[case::daily_limit("dailyLimitExceeded", "limit.daily_messages")]
    #[case::user_rate_limit("userRateLimitExceeded", "limit.rate")]
    #[case::rate_limit("rateLimitExceeded", "limit.rate")]
    #[case::domain_policy("domainPolicy", "policy.denied")]
    #[case::unauthorized_client(
        "unauthorized_client: Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
        "delegation.not_configured"
    )]
    #[case::not_a_valid_email(
        r#"{"error": "invalid_grant", "error_description": "Not a valid email."}"#,
        "delegation.subject_unknown"
    )]
    #[case::invalid_email_or_user_id(
        "Error:\"invalid_grant\", Description:\"Invalid email or User ID\", Uri:\"\"",
        "delegation.subject_unknown"
    )]
    #[case::invalid_jwt_signature(
        "google.auth.exceptions.RefreshError: ('invalid_grant: Invalid JWT Signature.', '{\"error\":\"invalid_grant\",\"error_description\":\"Invalid JWT Signature.\"}')",
        "auth.invalid"
    )]
    #[case::invalid_scope(
        r#"{"error": "invalid_scope", "error_description": "Invalid OAuth scope or ID token audience provided."}"#,
        "scope.insufficient"
    )]
    #[case::access_denied("error=access_denied", "policy.denied")]
    #[case::sg_wrong_credentials("Permission denied, wrong credentials", "auth.missing")]
    #[case::sg_grant_invalid(
        "The provided authorization grant is invalid, expired, or revoked",
        "auth.invalid"
    )]
    #[case::sg_not_authorized(
        "Authenticated user is not authorized to send mail",
        "permission.missing"
    )]
    #[case::sg_sender_identity(
        "550 The from address does not match a verified Sender Identity. Mail cannot be sent until this error is resolved.",
        "sender.not_owned"
    )]
    #[case::sg_access_forbidden(
        r#"{"errors":[{"field":null,"message":"access forbidden"}]}"#,
        "permission.missing"
    )]
    #[case::starttls("530 5.7.0 Must issue a STARTTLS command first.", "tls.required")]
    #[case::bad_credentials(
        "535-5.7.8 Username and Password not accepted. Learn more at\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials lf4-20020a170902fb4400b0019b4ee071ddsm4794plb.2999 - gsmtp",
        "auth.invalid"
    )]
    #[case::postfix_auth_failed(
        "535 5.7.8 Error: authentication failed: authentication failure",
        "auth.invalid"
    )]
    #[case::relay_denied(
        "550 5.7.0 Mail relay denied [203.0.113.10]. Invalid credentials for relay for one of the domains in: example.com (as obtained from HELO and MAIL FROM).",
        "relay.ip_not_allowed"
    )]
    #[case::try_again_later("421 4.7.0 Try again later, closing connection.", "limit.concurrency")]
    #[case::too_many_logins(
        "454 4.7.0 Too many login attempts, please try again later.",
        "auth.locked"
    )]
    #[case::on_behalf(
        "Mail command failed: 550 5.7.1 [M12] User [alice@example.com] not authorized to send on behalf of <boss@example.com> (ec22bc0e)",
        "sender.not_owned"
    )]
    #[case::m365_send_as(
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        "sender.not_owned"
    )]
    #[case::send_as_denied(
        "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message Cannot submit message.",
        "sender.not_owned"
    )]
    #[case::m365_57("5.7.57 Client not authenticated to send mail", "auth.missing")]
    #[case::m365_139(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        "policy.denied"
    )]
    #[case::postfix_relay("554 5.7.1 <bob@example.org>: Relay access denied", "auth.missing")]
    #[case::postfix_recipient_access(
        "554 5.7.1 <bob@external.test>: Recipient address rejected: Access denied",
        "policy.recipient_restricted"
    )]
    fn each_real_string_maps_to_its_most_likely_cause(#[case] text: &str, #[case] code: &str) {
        assert_eq!(first_code(text), Some(code), "{text}: {:?}", why(text));
    }

    /// Every row's own text is understood by that row, and its first cause comes first.
    #[test]
    fn every_row_matches_its_own_text_first() {
        for row in TABLE {
            let m = why(row.text);
            assert_eq!(m.first().map(|m| m.id), Some(row.id), "{}: {m:?}", row.id);
            assert_eq!(m[0].causes.first(), row.causes.first(), "{}", row.id);
        }
    }

    #[test]
    fn the_table_is_well_formed() {
        let mut ids: Vec<_> = TABLE.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate row ids");
        for row in TABLE {
            assert!(!row.causes.is_empty(), "{}", row.id);
            assert!(!row.patterns.is_empty(), "{}", row.id);
            assert!(row.source.contains("https://"), "{}: no source URL", row.id);
            if row.text.starts_with('{') {
                assert!(
                    serde_json::from_str::<Value>(row.text).is_ok(),
                    "{}: the text is not JSON",
                    row.id
                );
            }
            for p in row.patterns.iter().flat_map(|g| g.iter()) {
                assert!(
                    !p.is_empty() && p.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()),
                    "{}: pattern `{p}` must be lower-case ASCII",
                    row.id
                );
            }
        }
    }

    #[rstest]
    #[case::hello("hello world")]
    #[case::empty("")]
    #[case::blank("   \n\t ")]
    #[case::numbers("error 42")]
    #[case::near_miss("rateLimitExceededness and 535 5.7.80")]
    fn noise_is_unknown_with_the_questions(#[case] text: &str) {
        assert!(why(text).is_empty(), "{text}: {:?}", why(text));
        let v = why_json(text);
        assert_eq!(v["understood"], false);
        assert_eq!(v["matches"], json!([]));
        assert_eq!(
            v["questions"].as_array().map(Vec::len),
            Some(QUESTIONS.len())
        );
        let t = why_text(text);
        assert!(t.starts_with("Unknown"), "{t}");
        for q in QUESTIONS {
            assert!(t.contains(q), "{t}");
        }
    }

    #[test]
    fn whole_bodies_are_understood() {
        // Google's Gmail API, as google-api-php-client prints it.
        let google = r#"PHP Fatal error:  Uncaught Google\Service\Exception: {
  "error": {
    "code": 400,
    "message": "Precondition check failed.",
    "errors": [
      {
        "message": "Precondition check failed.",
        "domain": "global",
        "reason": "failedPrecondition"
      }
    ],
    "status": "FAILED_PRECONDITION"
  }
}"#;
        let v = why_json(google);
        assert_eq!(v["understood"], true);
        assert_eq!(v["matches"][0]["id"], "gmail.precondition_failed");
        assert_eq!(
            v["matches"][0]["causes"][0]["code"],
            "delegation.not_configured"
        );
        assert_eq!(v["questions"], json!([]));
        // SendGrid's body, as sendgrid-ruby's Response#body holds it (escaped JSON).
        let sendgrid = r#"@status_code="403", @body="{\"errors\":[{\"message\":\"The from address does not match a verified Sender Identity. Mail cannot be sent until this error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ to see the Sender Identity requirements\",\"field\":\"from\",\"help\":null}]}""#;
        assert_eq!(first_code(sendgrid), Some("sender.not_owned"));
        // The legacy user-rate body matches the specific row before the general one.
        let ids: Vec<_> = why(r#"{"reason": "rateLimitExceeded", "message": "User-rate limit exceeded.  Retry after 2026-11-30T10:00:00.000Z (Mail sending)"}"#)
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(
            ids,
            [
                "gmail.user_rate_limit_exceeded",
                "gmail.rate_limit_exceeded"
            ]
        );
    }

    #[test]
    fn mailgates_own_answers_map_to_their_code() {
        let smtp = "550 5.7.0 Mail Sending denied [mailgate: account.suspended, decision 01M8NTDMNZ9AJHT3SB8TFP6RNP] Remedy: run `mailgate user unsuspend bob@example.com`";
        let gmail = r#"{"error": {"code": 403, "message": "Delegation denied for bob@example.com", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "sender.not_owned", "domain": "mailgate", "metadata": {"code": "sender.not_owned"}}]}}"#;
        let sendgrid = r#"{"errors":[{"message":"Authenticated user is not authorized to send mail","field":null,"help":"mailgate key.ip_blocked: the caller is outside the key's allowed IPs. Object at fault: api_keys[k]. Remedy: add it. Decision: 01M8"}]}"#;
        let token = r#"{"error": "invalid_grant", "error_description": "Invalid email or User ID", "mailgate": {"code": "delegation.subject_unknown", "check": "delegation"}}"#;
        let store = "451 4.3.0 Temporary system problem. Try again later. [mailgate: store.unavailable] Remedy: retry later";
        for (text, code) in [
            (smtp, "account.suspended"),
            (gmail, "sender.not_owned"),
            (sendgrid, "key.ip_blocked"),
            (token, "delegation.subject_unknown"),
            (store, "store.unavailable"),
        ] {
            let m = why(text);
            assert_eq!(m.len(), 1, "{text}: {m:?}");
            assert_eq!(m[0].service, Service::Mailgate);
            assert_eq!(m[0].causes[0].code.code(), code, "{text}");
            assert_eq!(m[0].causes[0].remedy, m[0].causes[0].code.spec().remedy);
        }
        // A check that passed, in an explain answer, is not the refusal; the failing one is.
        let explain = r#"{"allowed": false, "checks": [{"check": "transport", "code": "tls.required", "outcome": "pass", "detail": "ok"}, {"check": "account", "code": "account.suspended", "outcome": "fail"}]}"#;
        assert_eq!(first_code(explain), Some("account.suspended"));
        // A `"code"` that is not a reason code (Google's HTTP status) is not Mailgate's.
        assert_eq!(
            why(r#"{"error": {"code": 403, "message": "Delegation denied for a@b.c"}}"#)[0].id,
            "gmail.delegation_denied"
        );
    }

    #[test]
    fn words_match_whole() {
        assert!(contains_word("x ratelimitexceeded y", "ratelimitexceeded"));
        assert!(!contains_word("userratelimitexceeded", "ratelimitexceeded"));
        assert!(contains_word("535 5.7.8 x", "5.7.8"));
        assert!(!contains_word("535 5.7.80", "5.7.8"));
        assert!(!contains_word("", "a"));
        assert!(contains_word("é 5.7.57", "5.7.57"));
        assert_eq!(normalize("535-5.7.8  A\\nB"), "535 5.7.8 a b");
    }

    /// `docs/why.md` is generated from the table. When this fails, regenerate it with
    /// `MAILGATE_BLESS=1 cargo test -p mailgate-core why` and commit the file.
    #[test]
    fn docs_why_md_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/why.md");
        let want = render_why_md();
        if std::env::var_os("MAILGATE_BLESS").is_some() {
            std::fs::write(path, &want).unwrap();
            return;
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/why.md is stale: run `MAILGATE_BLESS=1 cargo test -p mailgate-core why` and commit it"
        );
    }
}
