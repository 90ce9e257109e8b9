//! `POST /v3/mail/send`: the request as the official clients emit it (docs/sendgrid.md),
//! validated with SendGrid's messages and field paths (every problem at once), turned into one
//! MIME message per personalization (mail-builder), decided by the engine and stored by the
//! gateway before the `202`.
//!
//! The body is read only once the key in the headers was accepted, and parsed (on the blocking
//! pool) into the typed, size-capped slots of `wire.rs`, not a `Value` tree: unknown and legacy
//! keys (`sections`, `mail_settings.bcc`, `spam_check`, `ganalytics`, ...) are skipped unread, and
//! a value of the wrong type becomes SendGrid's message for that field instead of a serde error.
//! Building the messages is bounded too: each personalization's message at most 30 MB with its
//! substitutions applied (one linear pass per text), all of a request's at most 64 MiB, checked
//! up front where the size is known before any is built.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use mailgate_core::catalogue::Reason;
use mailgate_core::engine::{Body as MsgBody, Credential, Door, RequestProblem, SendAttempt};
use mailgate_gateway::body::{ReadFail, discard_rest, read_held};
use mailgate_gateway::budget::MemoryLease;
use mailgate_gateway::{Accepted, Decided, Message};
use serde_json::Value;

use crate::errors::{FieldError, busy, denial_response, fault, internal, mark, simple};
use crate::wire::{
    self, ATTACHMENTS_KEPT, CATEGORIES_KEPT, CONTENT_KEPT, Json, List, Loose,
    MAX_TEMPLATE_DATA_NODES, Obj, PARSE_BUDGET_BYTES, ParseError, RawAddr, RawAttachment,
    RawContent, RawMail, RawPersonalization, StrMap,
};
use crate::{ConnFacts, MAX_REQUEST_BYTES, SendgridState};

/// At most this many personalizations per request.
pub(crate) const MAX_PERSONALIZATIONS: usize = 1000;
/// At most this many recipients (to + cc + bcc) per request.
pub(crate) const MAX_RECIPIENTS: usize = 1000;
/// Longest address.
const MAX_ADDRESS: usize = 320;
/// `send_at` at most this far ahead.
const MAX_SCHEDULE_SECS: i64 = 72 * 3600;

const FROM_REQUIRED: &str = "The from object must be provided for every email send. It is an object that requires the email parameter, but may also contain a name parameter.  e.g. {\"email\" : \"example@example.com\"}  or {\"email\" : \"example@example.com\", \"name\" : \"Example Recipient\"}.";
const TO_REQUIRED: &str = "The to array is required for all personalization objects, and must have at least one email object with a valid email address.";
const CONTENT_REQUIRED: &str = "Unless a valid template_id is provided, the content parameter is required. There must be at least one defined content block. We typically suggest both text/plain and text/html blocks are included, but only one block is required.";
const SUBJECT_REQUIRED: &str = "The subject is required. You can get around this requirement if you use a template with a subject defined or if every personalization has a subject defined.";
const SUBJECT_STRING: &str =
    "The subject of your email must be a string at least one character in length.";
const CONTENT_ORDER: &str = "Following RFC 1341, section 7.2, if either text/html or text/plain are to be sent in your email: text/plain needs to be first, followed by text/html, followed by any other content.";
const REPLY_TO_INVALID: &str = "The reply_to object, when used, must at least have an email parameter with a valid email address and it may also contain a name parameter. e.g. {\"email\" : \"example@example.com\"}  or {\"email\" : \"example@example.com\", \"name\" : \"Example Recipient\"}.";
const SEND_AT_INT: &str = "The send_at parameter is expecting a Unix timestamp as an integer. We will send immediately if you include a send_at timestamp that is in the past.";
const RESERVED_HEADERS: &[&str] = &[
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
];

/// An address with an optional display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Addr {
    pub(crate) email: String,
    pub(crate) name: Option<String>,
}

/// One attachment, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attachment {
    pub(crate) content: Vec<u8>,
    pub(crate) filename: String,
    pub(crate) content_type: Option<String>,
    pub(crate) inline: bool,
    pub(crate) content_id: Option<String>,
}

/// One personalization: its recipients and overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Personalization {
    pub(crate) to: Vec<Addr>,
    pub(crate) cc: Vec<Addr>,
    pub(crate) bcc: Vec<Addr>,
    pub(crate) from: Option<Addr>,
    pub(crate) subject: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) substitutions: Vec<(String, String)>,
    pub(crate) dynamic_template_data: Option<Value>,
}

impl Personalization {
    /// Envelope recipients: to, cc, bcc.
    pub(crate) fn recipients(&self) -> Vec<String> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|a| a.email.clone())
            .collect()
    }
}

/// A valid mail/send request, as far as Mailgate uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MailSend {
    pub(crate) personalizations: Vec<Personalization>,
    pub(crate) from: Option<Addr>,
    pub(crate) reply_to: Vec<Addr>,
    pub(crate) subject: Option<String>,
    /// (type, value) in request order.
    pub(crate) content: Vec<(String, String)>,
    pub(crate) attachments: Vec<Attachment>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) template_id: Option<String>,
    pub(crate) sandbox: bool,
}

/// What validation found: the request as far as it parsed, and every problem.
pub(crate) struct Checked {
    pub(crate) mail: MailSend,
    pub(crate) errors: Vec<FieldError>,
}

/// A syntactically plausible address (SendGrid's "Does not contain a valid address.").
pub(crate) fn valid_address(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';'))
}

fn has_crlf(s: &str) -> bool {
    s.contains('\r') || s.contains('\n')
}

/// Reads `{email, name?}`; the problem when it is not one.
fn addr(v: &Obj<RawAddr>) -> Result<Addr, &'static str> {
    let a = v.get().ok_or("missing")?;
    let email = a.email.as_str().ok_or("missing")?.trim().to_owned();
    if email.chars().count() > MAX_ADDRESS {
        return Err("long");
    }
    if !valid_address(&email) {
        return Err("invalid");
    }
    let name = a
        .name
        .as_str()
        .filter(|n| !n.is_empty() && !has_crlf(n))
        .map(str::to_owned);
    Ok(Addr { email, name })
}

fn check_headers<const CAP: usize>(
    v: StrMap<CAP>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<(String, String)> {
    let StrMap::Ok { entries, len, .. } = v else {
        errors.push(FieldError::at(field, "The header values must be strings."));
        return Vec::new();
    };
    if len > CAP {
        errors.push(FieldError::at(
            field,
            format!("Mailgate takes at most {CAP} headers here; you provided {len}."),
        ));
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (k, val) in entries {
        let Loose::Str(s) = val else {
            errors.push(FieldError::at(field, "The header values must be strings."));
            continue;
        };
        if k.is_empty() || !k.is_ascii() || k.contains(' ') || k.contains(':') || has_crlf(&k) {
            errors.push(FieldError::at(
                field,
                "Header keys cannot contain non-ASCII characters and empty spaces.",
            ));
            continue;
        }
        if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            errors.push(FieldError::at(
                field,
                "Header can not be one of the reserved keys.",
            ));
            continue;
        }
        if !seen.insert(k.to_ascii_lowercase()) {
            errors.push(FieldError::at(
                field,
                "The headers cannot contain duplicate keys.",
            ));
            continue;
        }
        if has_crlf(&s) {
            errors.push(FieldError::at(field, "The header values must be strings."));
            continue;
        }
        out.push((k, s));
    }
    out
}

fn check_send_at(v: &Loose, field: &str, now_secs: i64, errors: &mut Vec<FieldError>) {
    match v {
        Loose::Absent => {}
        Loose::Int(t) if *t > now_secs + MAX_SCHEDULE_SECS => errors.push(FieldError::at(
            field,
            "Scheduling more than 72 hours in advance is forbidden.",
        )),
        Loose::Int(_) => {}
        _ => errors.push(FieldError::at(field, SEND_AT_INT)),
    }
}

fn check_custom_args(v: &StrMap<0>, field: &str, errors: &mut Vec<FieldError>) -> usize {
    match v {
        StrMap::Absent => 0,
        StrMap::Ok {
            all_strings: true,
            bytes,
            ..
        } => *bytes,
        // SendGrid's OpenAPI types it as a string (a spec bug); clients send an object.
        StrMap::Wrong(Loose::Str(_)) => 0,
        _ => {
            errors.push(FieldError::at(
                field,
                "All values of custom arguments object must be strings",
            ));
            0
        }
    }
}

fn subject_of(v: Loose, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match v {
        Loose::Absent => None,
        Loose::Str(s) if !s.is_empty() => Some(s),
        _ => {
            errors.push(FieldError::at(field, SUBJECT_STRING));
            None
        }
    }
}

/// Validates a request body: every problem SendGrid would name, with its field path. Takes the
/// parsed body by value: strings move into the result rather than being copied.
pub(crate) fn check(body: RawMail, now_secs: i64) -> Checked {
    let mut errors = Vec::new();
    let mut mail = MailSend::default();

    // from
    if body.from.is_none() {
        errors.push(FieldError::at("from.email", FROM_REQUIRED));
    } else {
        match addr(&body.from) {
            Ok(a) => mail.from = Some(a),
            Err("missing") => errors.push(FieldError::at("from.email", FROM_REQUIRED)),
            Err("long") => errors.push(FieldError::at(
                "from.email",
                "The From email exceeds the maximum total length of 320 characters",
            )),
            Err(_) => errors.push(FieldError::at(
                "from.email",
                "The from email does not contain a valid address.",
            )),
        }
    }

    // personalizations
    let global_args = check_custom_args(&body.custom_args, "custom_args", &mut errors);
    let required = || FieldError {
        message:
            "The personalizations field is required and must have at least one personalization."
                .into(),
        field: Some("personalizations".into()),
        help: Some(format!(
            "{}#-Personalizations-Errors",
            crate::errors::HELP_BASE
        )),
    };
    let subject_present = !matches!(body.subject, Loose::Absent);
    match body.personalizations {
        List::Ok { len: 0, .. } | List::Absent | List::Wrong(_) => errors.push(required()),
        List::Ok { len, .. } if len > MAX_PERSONALIZATIONS => errors.push(FieldError::at(
            "personalizations",
            format!(
                "The personalization block is limited to 1000 personalizations per API request. You have provided {len} personalizations. Please consider splitting this into multiple requests and resending your request."
            ),
        )),
        List::Ok { items, .. } => {
            let mut total = 0usize;
            for (i, p) in items.into_iter().enumerate() {
                let (pers, recipients) =
                    check_personalization(p, i, now_secs, global_args, &mut errors);
                total += recipients;
                mail.personalizations.push(pers);
            }
            if total > MAX_RECIPIENTS {
                errors.push(FieldError::at(
                    "personalizations",
                    "There is a limit of 1000 total recipients (to + cc + bcc) per request.",
                ));
            }
        }
    }

    // reply_to / reply_to_list
    let has_reply_to = !body.reply_to.is_none();
    let has_reply_to_list = !body.reply_to_list.is_none();
    if has_reply_to && has_reply_to_list {
        errors.push(FieldError::at(
            "reply_to_list",
            "The reply_to and reply_to_list parameters cannot be used together.",
        ));
    }
    if has_reply_to {
        match addr(&body.reply_to) {
            Ok(a) => mail.reply_to.push(a),
            Err("long") => errors.push(FieldError::at(
                "reply_to.email",
                "The Reply-To email exceeds the maximum total length of 320 characters",
            )),
            Err(_) => errors.push(FieldError::at("reply_to.email", REPLY_TO_INVALID)),
        }
    }
    if has_reply_to_list {
        match &body.reply_to_list {
            List::Ok { items, len } if *len <= 1000 => {
                for (i, r) in items.iter().enumerate() {
                    match addr(r) {
                        Ok(a) if mail.reply_to.iter().any(|x| x.email == a.email) => {
                            errors.push(FieldError::at(
                                &format!("reply_to_list.{i}.email"),
                                "The reply_to_list must be a unique list of email addresses.",
                            ))
                        }
                        Ok(a) => mail.reply_to.push(a),
                        Err(_) => errors.push(FieldError::at(
                            &format!("reply_to_list.{i}.email"),
                            REPLY_TO_INVALID,
                        )),
                    }
                }
            }
            _ => errors.push(FieldError::at(
                "reply_to_list",
                "The reply_to_list must be an array of at most 1000 email objects.",
            )),
        }
    }

    // template_id
    match body.template_id {
        Loose::Absent | Loose::Null => {}
        Loose::Str(s) if !s.is_empty() => mail.template_id = Some(s),
        other => errors.push(FieldError::at(
            "template_id",
            format!(
                "The template ID must be a string, you provided {}.",
                other.shown()
            ),
        )),
    }

    // subject
    mail.subject = subject_of(body.subject, "subject", &mut errors);
    let every_has_subject = !mail.personalizations.is_empty()
        && mail.personalizations.iter().all(|p| p.subject.is_some());
    if mail.subject.is_none()
        && !subject_present
        && mail.template_id.is_none()
        && !every_has_subject
    {
        errors.push(FieldError::at("subject", SUBJECT_REQUIRED));
    }

    // content
    check_content(body.content, &mut mail, &mut errors);

    // attachments
    match body.attachments {
        List::Absent | List::Wrong(Loose::Null) => {}
        List::Ok { len, .. } if len > ATTACHMENTS_KEPT => errors.push(FieldError::at(
            "attachments",
            format!(
                "Mailgate takes at most {ATTACHMENTS_KEPT} attachments per request; you provided {len}."
            ),
        )),
        List::Ok { items, .. } => {
            for (i, a) in items.into_iter().enumerate() {
                if let Some(att) = check_attachment(a, i, &mut errors) {
                    mail.attachments.push(att);
                }
            }
        }
        List::Wrong(_) => errors.push(FieldError::at(
            "attachments",
            "The attachments must be an array of attachment objects.",
        )),
    }

    // headers
    if !body.headers.is_none() {
        mail.headers = check_headers(body.headers, "headers", &mut errors);
    }

    // categories
    if !body.categories.is_none() {
        check_categories(&body.categories, &mut errors);
    }

    check_send_at(&body.send_at, "send_at", now_secs, &mut errors);
    if !body.batch_id.is_none() && body.batch_id.as_str().is_none() {
        errors.push(FieldError::at("batch_id", "The batch_id must be a string."));
    }
    if !body.ip_pool_name.is_none() && body.ip_pool_name.as_str().is_none() {
        errors.push(FieldError::at(
            "ip_pool_name",
            "The name of your IP pool must be a string.",
        ));
    }
    if !body.asm.is_none()
        && !body
            .asm
            .get()
            .is_some_and(|a| matches!(a.group_id, Loose::Int(_)))
    {
        errors.push(FieldError::at(
            "asm.group_id",
            "The ASM group ID must be an integer.",
        ));
    }

    // mail_settings.sandbox_mode
    if let Some(s) = body.mail_settings.get().and_then(|m| m.sandbox_mode.get()) {
        match s.enable {
            Loose::Absent => {}
            Loose::Bool(b) => mail.sandbox = b,
            _ => errors.push(FieldError::at(
                "mail_settings.sandbox_mode.enable",
                "The sandbox mode enable param should be a boolean value.",
            )),
        }
    }

    Checked { mail, errors }
}

/// One personalization, and how many recipients it names (valid or not).
fn check_personalization(
    p: Obj<RawPersonalization>,
    i: usize,
    now_secs: i64,
    global_args: usize,
    errors: &mut Vec<FieldError>,
) -> (Personalization, usize) {
    let mut out = Personalization::default();
    let base = format!("personalizations.{i}");
    let Obj::Ok(p) = p else {
        errors.push(FieldError::at(&format!("{base}.to"), TO_REQUIRED));
        return (out, 0);
    };
    let p = *p;
    let mut seen: HashSet<String> = HashSet::new();
    let mut duplicate_reported = false;
    let mut named = 0usize;
    for (kind, list) in [("to", &p.to), ("cc", &p.cc), ("bcc", &p.bcc)] {
        let field = format!("{base}.{kind}");
        let items = match list {
            List::Absent | List::Wrong(Loose::Null) => {
                if kind == "to" {
                    errors.push(FieldError::at(&field, TO_REQUIRED));
                }
                continue;
            }
            List::Ok { items, len } if *len > 0 || kind != "to" => {
                named += len;
                items
            }
            _ => {
                errors.push(FieldError::at(&field, TO_REQUIRED));
                continue;
            }
        };
        for (j, r) in items.iter().enumerate() {
            let f = format!("{field}.{j}.email");
            match addr(r) {
                Ok(a) => {
                    if !seen.insert(a.email.to_ascii_lowercase()) && !duplicate_reported {
                        duplicate_reported = true;
                        errors.push(FieldError::at(
                            &base,
                            format!(
                                "Each email address in the personalization block should be unique between to, cc, and bcc. We found the first duplicate instance of [{}] in the {field} field.",
                                a.email
                            ),
                        ));
                    }
                    match kind {
                        "to" => out.to.push(a),
                        "cc" => out.cc.push(a),
                        _ => out.bcc.push(a),
                    }
                }
                Err("long") => errors.push(FieldError::at(
                    &f,
                    format!(
                        "The {} email exceeds the maximum total length of 320 characters",
                        match kind {
                            "to" => "To",
                            "cc" => "CC",
                            _ => "BCC",
                        }
                    ),
                )),
                Err(_) => errors.push(FieldError::at(&f, "Does not contain a valid address.")),
            }
        }
    }
    if !p.from.is_none() {
        match addr(&p.from) {
            Ok(a) => out.from = Some(a),
            Err(_) => errors.push(FieldError::at(
                &format!("{base}.from.email"),
                "The from email does not contain a valid address.",
            )),
        }
    }
    out.subject = subject_of(p.subject, &format!("{base}.subject"), errors);
    if !p.headers.is_none() {
        out.headers = check_headers(p.headers, &format!("{base}.headers"), errors);
    }
    if !p.substitutions.is_none() {
        let field = format!("{base}.substitutions");
        match p.substitutions {
            StrMap::Ok { len, .. } if len > MAX_SUBSTITUTIONS => errors.push(FieldError::at(
                &field,
                "You are limited to 10,000 substitutions.",
            )),
            StrMap::Ok { bytes, .. } if bytes > MAX_SUBSTITUTION_BYTES => {
                errors.push(FieldError::at(
                    &field,
                    "Substitutions are limited to 50,000 bytes per personalization block.",
                ))
            }
            StrMap::Ok {
                entries,
                all_strings: true,
                ..
            } => {
                out.substitutions = entries
                    .into_iter()
                    .filter_map(|(k, v)| match v {
                        Loose::Str(s) => Some((k, s)),
                        _ => None,
                    })
                    .collect();
            }
            _ => errors.push(FieldError::at(
                &field,
                "The substitution values must be an object of key/value pairs, where the values are all strings.",
            )),
        }
    }
    match p.dynamic_template_data {
        Json::Absent | Json::Value(Value::Null) => {}
        Json::Value(v) => out.dynamic_template_data = Some(v),
        Json::TooBig => errors.push(FieldError::at(
            &format!("{base}.dynamic_template_data"),
            format!(
                "Mailgate takes dynamic_template_data of at most {MAX_TEMPLATE_DATA_NODES} values per personalization."
            ),
        )),
    }
    let args = check_custom_args(&p.custom_args, &format!("{base}.custom_args"), errors);
    if args + global_args > 10_000 {
        errors.push(FieldError::at(
            &format!("{base}.custom_args"),
            "The combined size of both global and personalization custom arguments may not exceed 10,000 bytes per personalization.",
        ));
    }
    check_send_at(&p.send_at, &format!("{base}.send_at"), now_secs, errors);
    (out, named)
}

fn check_content(
    v: List<Obj<RawContent>, CONTENT_KEPT>,
    mail: &mut MailSend,
    errors: &mut Vec<FieldError>,
) {
    let list = match v {
        List::Absent | List::Wrong(Loose::Null) => {
            if mail.template_id.is_none() {
                errors.push(FieldError::at("content", CONTENT_REQUIRED));
            }
            return;
        }
        List::Ok { len, .. } if len > CONTENT_KEPT => {
            errors.push(FieldError::at(
                "content",
                format!(
                    "Mailgate takes at most {CONTENT_KEPT} content blocks; you provided {len}."
                ),
            ));
            return;
        }
        List::Ok { items, .. } if !items.is_empty() => items,
        List::Ok { .. } if mail.template_id.is_some() => return,
        _ => {
            errors.push(FieldError::at("content", CONTENT_REQUIRED));
            return;
        }
    };
    for (i, c) in list.into_iter().enumerate() {
        let c = match c {
            Obj::Ok(c) => *c,
            _ => RawContent::default(),
        };
        let ty = match c.kind {
            Loose::Absent | Loose::Null => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "A content type is required, this tells email clients how to display the email.",
                ));
                None
            }
            Loose::Str(s) if s.is_empty() => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "Your content type must be a string with length of at least one character.",
                ));
                None
            }
            Loose::Str(s) if s.contains(';') || has_crlf(&s) => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "Cannot contain ';', or CRLF characters.",
                ));
                None
            }
            Loose::Str(s) => Some(s.to_ascii_lowercase()),
            _ => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "Your content type must be a string with length of at least one character.",
                ));
                None
            }
        };
        let value = match c.value {
            Loose::Str(s) if !s.is_empty() => Some(s),
            _ => {
                errors.push(FieldError::at(
                    &format!("content.{i}.value"),
                    "The content value must be a string at least one character in length.",
                ));
                None
            }
        };
        if let (Some(t), Some(v)) = (ty, value) {
            mail.content.push((t, v));
        }
    }
    let count = |t: &str| mail.content.iter().filter(|(x, _)| x == t).count();
    if count("text/plain") > 1 || count("text/html") > 1 {
        errors.push(FieldError {
            message: "If present, text/plain and text/html may only be provided once.".into(),
            field: Some("content".into()),
            help: None,
        });
        return;
    }
    let rank = |t: &str| match t {
        "text/plain" => 0,
        "text/html" => 1,
        _ => 2,
    };
    if mail
        .content
        .windows(2)
        .any(|w| rank(&w[0].0) > rank(&w[1].0) && rank(&w[1].0) < 2)
    {
        errors.push(FieldError::at("content", CONTENT_ORDER));
    }
}

fn check_attachment(
    a: Obj<RawAttachment>,
    i: usize,
    errors: &mut Vec<FieldError>,
) -> Option<Attachment> {
    let f = |name: &str| format!("attachments.{i}.{name}");
    let before = errors.len();
    let a = match a {
        Obj::Ok(a) => *a,
        _ => RawAttachment::default(),
    };
    let content = match a.content {
        Loose::Str(s) if !s.is_empty() => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let decoded = if s.bytes().any(|c| c.is_ascii_whitespace()) {
                let compact: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
                drop(s);
                b64.decode(&compact)
            } else {
                b64.decode(s.as_bytes())
            };
            match decoded {
                Ok(b) => Some(b),
                Err(_) => {
                    errors.push(FieldError::at(
                        &f("content"),
                        "The attachment content must be base64 encoded.",
                    ));
                    None
                }
            }
        }
        _ => {
            errors.push(FieldError::at(
                &f("content"),
                "The attachment content must be a string at least one character in length.",
            ));
            None
        }
    };
    let filename = match a.filename {
        Loose::Str(s) if has_crlf(&s) => {
            errors.push(FieldError::at(
                &f("filename"),
                "The filename of your attachment cannot contain CRLF characters.",
            ));
            None
        }
        Loose::Str(s) if !s.is_empty() => Some(s),
        Loose::Str(_) | Loose::Absent | Loose::Null => {
            errors.push(FieldError::at(&f("filename"), "filename is required."));
            None
        }
        _ => {
            errors.push(FieldError::at(
                &f("filename"),
                "The filename of your attachment must be a string.",
            ));
            None
        }
    };
    let content_type = match a.kind {
        Loose::Absent | Loose::Null => None,
        Loose::Str(s) if s.contains(';') || has_crlf(&s) => {
            errors.push(FieldError::at(
                &f("type"),
                "The type cannot contain ';', or CRLF characters.",
            ));
            None
        }
        Loose::Str(s) if !s.is_empty() => Some(s),
        _ => {
            errors.push(FieldError::at(
                &f("type"),
                "The attachment type must be a string and at least one character in length.",
            ));
            None
        }
    };
    let inline = match a.disposition {
        Loose::Absent | Loose::Null => false,
        Loose::Str(s) if s == "attachment" => false,
        Loose::Str(s) if s == "inline" => true,
        other => {
            let shown = match &other {
                Loose::Str(s) => s.clone(),
                o => o.shown(),
            };
            errors.push(FieldError::at(
                &f("disposition"),
                format!(
                    "The disposition of your attachment can be either \"inline\" or \"attachment\". You provided [{shown}]."
                ),
            ));
            false
        }
    };
    let content_id = match a.content_id {
        Loose::Absent | Loose::Null => None,
        Loose::Str(s) if has_crlf(&s) => {
            errors.push(FieldError::at(
                &f("content_id"),
                "The content ID of your attachment cannot contain CRLF characters.",
            ));
            None
        }
        Loose::Str(s) => Some(s),
        other => {
            errors.push(FieldError::at(
                &f("content_id"),
                format!(
                    "The content ID of your attachment must be a string. You provided [{}].",
                    other.shown()
                ),
            ));
            None
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(Attachment {
        content: content?,
        filename: filename?,
        content_type,
        inline,
        content_id,
    })
}

fn check_categories(v: &List<Loose, CATEGORIES_KEPT>, errors: &mut Vec<FieldError>) {
    let List::Ok { items, len } = v else {
        errors.push(FieldError::at(
            "categories",
            "Categories must be an array of strings.",
        ));
        return;
    };
    if *len > 10 {
        errors.push(FieldError::at(
            "categories",
            format!(
                "There is a limit of 10 categories for each email that is sent. You provided {len} categories."
            ),
        ));
    }
    let mut seen = HashSet::new();
    for c in items {
        let Some(s) = c.as_str() else {
            errors.push(FieldError::at(
                "categories",
                "Categories must be an array of strings.",
            ));
            return;
        };
        if s.chars().count() > 255 {
            errors.push(FieldError::at(
                "categories",
                format!(
                    "Each category must not be longer than 255 characters. [{s}] exceeds this limit"
                ),
            ));
        }
        if !s.is_ascii() {
            errors.push(FieldError::at(
                "categories",
                "Categories can not contain non-ASCII characters.",
            ));
        }
        if !seen.insert(s) {
            errors.push(FieldError::at(
                "categories",
                format!("The categories must be a unique list, and you have included [{s}] more than once. "),
            ));
        }
    }
}

/// Most substitutions per personalization (SendGrid's limit).
pub(crate) const MAX_SUBSTITUTIONS: usize = 10_000;
/// Bytes of substitution tags and values per personalization (SendGrid's documented limit).
pub(crate) const MAX_SUBSTITUTION_BYTES: usize = 50_000;
/// Largest message one personalization may make, substitutions applied (SendGrid's 30 MB).
pub const MAX_MESSAGE_BYTES: usize = MAX_REQUEST_BYTES;
/// Bytes of messages one request may make, all personalizations together (Mailgate's limit):
/// each personalization is a message of its own, so a request's content and attachments are
/// copied once per personalization, and its substitutions can make each copy larger.
pub const MAX_EXPANDED_BYTES: usize = 64 * 1024 * 1024;

/// One personalization's substitution tags, found in one pass over a text (Aho-Corasick,
/// leftmost-longest), so the work is linear in the text whatever the tags. Substituted values are
/// not searched again.
pub(crate) struct Substituter<'a> {
    finder: Option<AhoCorasick>,
    values: Vec<&'a str>,
    /// Whether a substituted text can be longer than the text (a value longer than a tag).
    can_grow: bool,
}

impl<'a> Substituter<'a> {
    pub(crate) fn new(subs: &'a [(String, String)]) -> Result<Substituter<'a>, String> {
        let pairs: Vec<&(String, String)> = subs.iter().filter(|(k, _)| !k.is_empty()).collect();
        if pairs.is_empty() {
            return Ok(Substituter {
                finder: None,
                values: Vec::new(),
                can_grow: false,
            });
        }
        let shortest_tag = pairs.iter().map(|(k, _)| k.len()).min().unwrap_or(0);
        let longest_value = pairs.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(pairs.iter().map(|(k, _)| k.as_str()))
            .map_err(|e| e.to_string())?;
        Ok(Substituter {
            finder: Some(finder),
            values: pairs.iter().map(|(_, v)| v.as_str()).collect(),
            can_grow: longest_value > shortest_tag,
        })
    }

    /// The length of `text` substituted, without writing it; `None` as soon as it passes
    /// `room`. One pass, like [`Substituter::apply`], but no copying: what a refusal costs.
    pub(crate) fn measure(&self, text: &str, room: usize) -> Option<usize> {
        let Some(finder) = self.finder.as_ref().filter(|_| self.can_grow) else {
            return (text.len() <= room).then_some(text.len());
        };
        let mut len = text.len();
        for m in finder.find_iter(text) {
            let value = self
                .values
                .get(m.pattern().as_usize())
                .map_or(0, |v| v.len());
            len = len
                .saturating_sub(m.end() - m.start())
                .saturating_add(value);
            if len > room {
                return None;
            }
        }
        (len <= room).then_some(len)
    }

    /// `text` with every tag replaced; `None` when the result would pass `room` bytes (else
    /// `room` is reduced by its length). Stops writing at the limit: the cost of a refused
    /// expansion is bounded by the limit, not by what it would have made.
    pub(crate) fn apply<'t>(&self, text: &'t str, room: &mut usize) -> Option<Cow<'t, str>> {
        let Some(finder) = &self.finder else {
            *room = room.checked_sub(text.len())?;
            return Some(Cow::Borrowed(text));
        };
        let mut out = String::new();
        let mut last = 0;
        let mut matched = false;
        for m in finder.find_iter(text) {
            matched = true;
            let value = self
                .values
                .get(m.pattern().as_usize())
                .copied()
                .unwrap_or("");
            let piece = text.get(last..m.start()).unwrap_or("");
            *room = room.checked_sub(piece.len() + value.len())?;
            out.push_str(piece);
            out.push_str(value);
            last = m.end();
        }
        let rest = text.get(last..).unwrap_or("");
        *room = room.checked_sub(rest.len())?;
        if !matched {
            return Some(Cow::Borrowed(text));
        }
        out.push_str(rest);
        Some(Cow::Owned(out))
    }
}

fn to_address(a: &Addr) -> Address<'_> {
    Address::new_address(a.name.as_deref(), a.email.as_str())
}

fn list(addrs: &[Addr]) -> Address<'_> {
    Address::new_list(addrs.iter().map(to_address).collect())
}

/// Why a message could not be built.
#[derive(Debug)]
pub(crate) enum BuildError {
    /// Substituted, it would pass the room it was given.
    TooBig,
    /// A bug (mail-builder's writer, the substitution automaton).
    Fault(String),
}

/// The RFC 5322 message for personalization `p` (Bcc not written), with `from` as the sender.
/// Substituted text may take at most `room` bytes (reduced by what it took).
pub(crate) fn build_message(
    mail: &MailSend,
    p: &Personalization,
    from: &Addr,
    room: &mut usize,
) -> Result<Vec<u8>, BuildError> {
    let subs = Substituter::new(&p.substitutions).map_err(BuildError::Fault)?;
    let mut b = MessageBuilder::new().from(to_address(from));
    if !p.to.is_empty() {
        b = b.to(list(&p.to));
    }
    if !p.cc.is_empty() {
        b = b.cc(list(&p.cc));
    }
    if !mail.reply_to.is_empty() {
        b = b.reply_to(list(&mail.reply_to));
    }
    if let Some(s) = p.subject.as_ref().or(mail.subject.as_ref()) {
        b = b.subject(Text::new(subs.apply(s, room).ok_or(BuildError::TooBig)?));
    }
    // Message headers, then the personalization's (which win on the same name).
    for (k, v) in &mail.headers {
        if !p.headers.iter().any(|(pk, _)| pk.eq_ignore_ascii_case(k)) {
            b = b.header(k.as_str(), Text::new(v.as_str()));
        }
    }
    for (k, v) in &p.headers {
        b = b.header(k.as_str(), Text::new(v.as_str()));
    }
    let mut parts: Vec<MimePart<'_>> = Vec::with_capacity(mail.content.len() + 1);
    for (t, v) in &mail.content {
        let text = subs.apply(v, room).ok_or(BuildError::TooBig)?;
        parts.push(MimePart::new(
            ContentType::new(t.as_str()),
            BodyPart::Text(text),
        ));
    }
    if parts.is_empty() {
        // A SendGrid template: Mailgate has no template store, so the message says which
        // template was asked for and carries its data (docs/sendgrid.md).
        let id = mail.template_id.clone().unwrap_or_default();
        b = b.header("X-Mailgate-Template-Id", Text::new(id.clone()));
        let data = p
            .dynamic_template_data
            .as_ref()
            .and_then(|d| serde_json::to_string_pretty(d).ok())
            .unwrap_or_else(|| "{}".into());
        parts.push(MimePart::new(
            ContentType::new("text/plain"),
            BodyPart::Text(Cow::Owned(format!(
                "SendGrid template {id} (not rendered by Mailgate).\r\n\r\n{data}\r\n"
            ))),
        ));
    }
    let alternative = if parts.len() == 1 {
        parts.remove(0)
    } else {
        MimePart::new(
            ContentType::new("multipart/alternative"),
            BodyPart::Multipart(parts),
        )
    };
    let body = if mail.attachments.is_empty() {
        alternative
    } else {
        let mut mixed = vec![alternative];
        for a in &mail.attachments {
            let ct = a
                .content_type
                .as_deref()
                .unwrap_or("application/octet-stream");
            let mut part = MimePart::new(
                ContentType::new(ct),
                BodyPart::Binary(Cow::Borrowed(a.content.as_slice())),
            );
            if a.inline {
                part = part.header(
                    "Content-Disposition",
                    ContentType::new("inline").attribute("filename", a.filename.as_str()),
                );
            } else {
                part = part.attachment(a.filename.as_str());
            }
            if let Some(cid) = &a.content_id {
                part = part.cid(cid.as_str());
            }
            mixed.push(part);
        }
        MimePart::new(
            ContentType::new("multipart/mixed"),
            BodyPart::Multipart(mixed),
        )
    };
    b.body(body)
        .write_to_vec()
        .map_err(|e| BuildError::Fault(e.to_string()))
}

/// What the messages of a request will take at least, before substitution: each
/// personalization copies the subject, the content and the attachments (base64, 4/3 of their
/// size plus line breaks), plus a header allowance.
pub(crate) fn expected_size(mail: &MailSend) -> usize {
    let content: usize = mail
        .subject
        .as_ref()
        .map_or(0, String::len)
        .saturating_add(mail.content.iter().map(|(_, v)| v.len()).sum::<usize>());
    let attachments: usize = mail
        .attachments
        .iter()
        .map(|a| a.content.len() / 3 * 4 + a.content.len() / 57 * 2 + 512)
        .sum();
    let per_message = content.saturating_add(attachments).saturating_add(1024);
    per_message.saturating_mul(mail.personalizations.len())
}

/// Why the messages of a request could not be built.
pub(crate) enum BuildProblem {
    /// Personalization `i` would pass [`MAX_MESSAGE_BYTES`] or the request [`MAX_EXPANDED_BYTES`].
    TooBig(usize),
    /// The process's memory budget is spent.
    Busy,
    Fault(String),
}

/// Every personalization's message, in order, each built with its own `from` (the request's
/// unless it has one). Runs on the blocking pool. Charges each message to `lease`.
pub(crate) fn build_all(
    mail: &MailSend,
    lease: &mut Option<MemoryLease>,
) -> Result<Vec<Vec<u8>>, BuildProblem> {
    let mut remaining = MAX_EXPANDED_BYTES;
    let mut out = Vec::with_capacity(mail.personalizations.len());
    for (i, p) in mail.personalizations.iter().enumerate() {
        let Some(from) = p.from.as_ref().or(mail.from.as_ref()) else {
            return Err(BuildProblem::Fault("validated request without from".into()));
        };
        let mut room = MAX_MESSAGE_BYTES.min(remaining);
        let raw = match build_message(mail, p, from, &mut room) {
            Ok(r) => r,
            Err(BuildError::TooBig) => return Err(BuildProblem::TooBig(i)),
            Err(BuildError::Fault(e)) => return Err(BuildProblem::Fault(e)),
        };
        remaining = remaining
            .checked_sub(raw.len())
            .ok_or(BuildProblem::TooBig(i))?;
        if let Some(l) = lease.as_mut()
            && !l.grow(raw.len())
        {
            return Err(BuildProblem::Busy);
        }
        out.push(raw);
    }
    Ok(out)
}

/// The refusal of a request whose substitutions make too much.
fn expansion_error(i: usize) -> FieldError {
    FieldError::at(
        &format!("personalizations.{i}.substitutions"),
        format!(
            "With its substitutions applied, this personalization's message would pass Mailgate's limits ({MAX_MESSAGE_BYTES} bytes per message, {MAX_EXPANDED_BYTES} bytes for all the personalizations of one request). Use fewer or shorter substitution values, or split the request."
        ),
    )
}

/// 405 for any method but POST, before any credential check (as SendGrid does).
pub(crate) async fn method_not_allowed() -> Response {
    simple(405, "POST method allowed only")
}

/// What was wrong with the request before any personalization could be decided.
enum Problem {
    /// Validation errors (400), all of them.
    Invalid(Vec<FieldError>),
    /// 415 with this message; the problem names the catalogue's remedy Mailgate adds in `help`.
    Media(&'static str, RequestProblem),
    /// 400: the body is not JSON (what is wrong with it, with line and column).
    Syntax(String),
    /// Over SendGrid's 30 MB: the request's size (at least what was read of it).
    TooLarge(u64),
    /// Within 30 MB but too costly to hold once parsed (past [`PARSE_BUDGET_BYTES`]).
    OverBudget,
}

/// 22 characters of base64url, like SendGrid's `X-Message-Id`.
fn sendgrid_message_id() -> String {
    mailgate_auth::random_token::<16>().unwrap_or_else(|_| {
        let n = mailgate_gateway::now_ms();
        format!("{n:022}")
    })
}

/// Parses and validates a body (on the blocking pool): the request, and the bytes its parsed
/// form was charged.
fn parse_body(bytes: Bytes, now_secs: i64) -> Result<(MailSend, usize), Problem> {
    if std::str::from_utf8(&bytes).is_err() {
        return Err(Problem::Media(
            "Invalid UTF8 in request",
            RequestProblem::NotUtf8,
        ));
    }
    let (raw, used) = match wire::parse(&bytes, PARSE_BUDGET_BYTES) {
        Ok(x) => x,
        Err(ParseError::Syntax(detail)) => return Err(Problem::Syntax(detail)),
        Err(ParseError::OverBudget) => return Err(Problem::OverBudget),
    };
    drop(bytes);
    let checked = check(raw, now_secs);
    if !checked.errors.is_empty() {
        return Err(Problem::Invalid(checked.errors));
    }
    let expected = expected_size(&checked.mail);
    if expected > MAX_EXPANDED_BYTES {
        return Err(Problem::Invalid(vec![FieldError::at(
            "personalizations",
            format!(
                "Mailgate makes one message per personalization: this request would make at least {expected} bytes of messages, over its limit of {MAX_EXPANDED_BYTES} bytes per request. Send fewer personalizations per request, or a smaller message."
            ),
        )]));
    }
    if let Err(i) = measure_expansion(&checked.mail) {
        return Err(Problem::Invalid(vec![expansion_error(i)]));
    }
    Ok((checked.mail, used))
}

/// Checks, before anything is built, that no personalization's substituted text passes
/// [`MAX_MESSAGE_BYTES`] and all of them together (with their attachments) stay within
/// [`MAX_EXPANDED_BYTES`]: one counting pass per text whose substitutions can lengthen it (a
/// value longer than a tag), none otherwise. `Err(i)`: personalization `i` is the one over.
pub(crate) fn measure_expansion(mail: &MailSend) -> Result<(), usize> {
    let attachments: usize = mail
        .attachments
        .iter()
        .map(|a| a.content.len() / 3 * 4 + a.content.len() / 57 * 2)
        .sum();
    let mut total = 0usize;
    for (i, p) in mail.personalizations.iter().enumerate() {
        let subs = Substituter::new(&p.substitutions).map_err(|_| i)?;
        let room = MAX_MESSAGE_BYTES.min(MAX_EXPANDED_BYTES.saturating_sub(total));
        let subject = p.subject.as_ref().or(mail.subject.as_ref());
        let mut used = 0usize;
        for text in subject
            .into_iter()
            .chain(mail.content.iter().map(|(_, v)| v))
        {
            used += subs.measure(text, room.saturating_sub(used)).ok_or(i)?;
        }
        total = total.saturating_add(used).saturating_add(attachments);
        if used > room || total > MAX_EXPANDED_BYTES {
            return Err(i);
        }
    }
    Ok(())
}

pub(crate) async fn send(
    State(st): State<std::sync::Arc<SendgridState>>,
    Extension(conn): Extension<ConnFacts>,
    headers: HeaderMap,
    mut body: Body,
) -> Response {
    let now = mailgate_gateway::now_ms();
    let credential = st.credential(&headers);
    let mut base = SendAttempt::new(Door::Sendgrid, credential);
    base.transport = conn.transport(&headers);

    // Who may act is known from the headers alone: a refusal there (no key, a wrong, revoked
    // or blocked key, a suspended account) is answered with the body unread and unparsed.
    match st.gateway.screen_before_message("sendgrid", &base).await {
        Err(e) => return fault(&e),
        Ok(Some(refused)) => {
            return match refused.decision.denial() {
                Some(d) => denial_response(d, &refused.id, now, &[]),
                None => internal("refused without a denial"),
            };
        }
        Ok(None) => {}
    }
    if !matches!(base.credential, Credential::ApiKey { .. }) {
        return internal("a request without a matching key passed the credential checks");
    }

    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    let media = if headers.contains_key(header::CONTENT_ENCODING) {
        Some(Problem::Media(
            "Content-Encoding is not supported.",
            RequestProblem::ContentEncoding,
        ))
    } else if !json_type {
        Some(Problem::Media(
            "Content-Type should be application/json.",
            RequestProblem::ContentType,
        ))
    } else {
        None
    };
    if let Some(p) = media {
        // The key passed: the body is read and dropped (bounded, nothing kept) before the 415,
        // so a client that writes it all before reading gets the answer, not a broken pipe.
        discard_rest(&headers, &mut body, 0).await;
        return refuse_request(&st, base, p, now).await;
    }

    // Memory for the body is reserved from the process's budget as it arrives; when the budget
    // is spent the body is read and dropped (bounded) before the 503, as for a body too large.
    let memory = st.gateway.budget().data_memory().clone();
    let held = match read_held(&headers, body, MAX_REQUEST_BYTES, Some(&memory), 1).await {
        Ok(h) => h,
        Err(ReadFail::TooLarge(seen)) => {
            let size = seen.max(MAX_REQUEST_BYTES as u64 + 1);
            return refuse_request(&st, base, Problem::TooLarge(size), now).await;
        }
        Err(ReadFail::Busy) => return busy(&memory),
        // The client went away or sent a broken chunk: nobody is likely to read this answer.
        Err(ReadFail::Broken) => return simple(400, "Bad Request"),
    };
    let mut lease = held.lease;
    let bytes = Bytes::from(held.bytes);
    let now_secs = (now / 1000) as i64;
    // Parsing 30 MB and building the messages are CPU work: off the async workers.
    let (mail, used) = match st.heavy(move || parse_body(bytes, now_secs)).await {
        Some(Ok(x)) => x,
        Some(Err(p)) => return refuse_request(&st, base, p, now).await,
        None => return internal("the parse task failed"),
    };
    if let Some(l) = lease.as_mut()
        && !l.grow(used)
    {
        return busy(&memory);
    }
    let mail = Arc::new(mail);
    let built = {
        let mail = mail.clone();
        st.heavy(move || {
            let r = build_all(&mail, &mut lease);
            (r, lease)
        })
        .await
    };
    let (raws, _lease) = match built {
        Some((Ok(raws), lease)) => (raws, lease),
        Some((Err(BuildProblem::TooBig(i)), _)) => {
            let p = Problem::Invalid(vec![expansion_error(i)]);
            return refuse_request(&st, base, p, now).await;
        }
        Some((Err(BuildProblem::Busy), _)) => return busy(&memory),
        Some((Err(BuildProblem::Fault(e)), _)) => return internal(&e),
        None => return internal("the build task failed"),
    };

    // One attempt, one message per personalization; all are decided before any is stored, so
    // a refusal stores nothing.
    let mut planned: Vec<(SendAttempt, Decided, Message)> = Vec::new();
    for (i, (p, raw)) in mail.personalizations.iter().zip(raws).enumerate() {
        let Some(from) = p.from.as_ref().or(mail.from.as_ref()) else {
            return internal("validated request without from");
        };
        let recipients = p.recipients();
        let mut attempt = base
            .clone()
            .from(from.email.clone())
            .to(recipients.clone())
            .parsed(raw.len() as u64);
        // The From and Sender fields as built (a custom `Sender` header included): the engine
        // checks every address of what will be sent.
        attempt.header = Some(mailgate_gateway::message::originator_of(&raw));
        let decided = match st.gateway.decide("sendgrid", &attempt).await {
            Ok(d) => d,
            Err(e) => return fault(&e),
        };
        if let Some(d) = decided.decision.denial() {
            if d.code == Reason::PolicyTooManyRecipients {
                return crate::errors::too_many_recipients(d, &decided.id, i, recipients.len());
            }
            return denial_response(d, &decided.id, now, &[]);
        }
        if !decided.decision.complete {
            return internal("decision incomplete with every fact known");
        }
        // Up to 1,000 decisions in a row complete without waiting for anything: let the
        // worker serve other requests between them.
        tokio::task::yield_now().await;
        let mut raw = raw;
        let mut envelope_from = from.email.clone();
        if let Some(r) = decided
            .decision
            .rewrites
            .iter()
            .find(|r| r.header == "From")
        {
            let rewritten = Addr {
                email: r.replacement.clone(),
                name: from.name.clone(),
            };
            let (m, rw) = (mail.clone(), rewritten.clone());
            let rebuilt = st
                .heavy(move || {
                    let p = m
                        .personalizations
                        .get(i)
                        .ok_or_else(|| BuildError::Fault("personalization vanished".into()))?;
                    let mut room = MAX_MESSAGE_BYTES;
                    build_message(&m, p, &rw, &mut room)
                })
                .await;
            raw = match rebuilt {
                Some(Ok(r)) => r,
                Some(Err(BuildError::TooBig)) => {
                    let p = Problem::Invalid(vec![expansion_error(i)]);
                    return refuse_request(&st, base, p, now).await;
                }
                Some(Err(BuildError::Fault(e))) => return internal(&e),
                None => return internal("the build task failed"),
            };
            envelope_from = rewritten.email;
        }
        planned.push((
            attempt,
            decided,
            Message {
                envelope_from,
                recipients,
                raw,
            },
        ));
    }

    let ids: Vec<String> = planned.iter().map(|(_, d, _)| d.id.clone()).collect();
    if mail.sandbox {
        // Valid and allowed, but not queued (SendGrid's sandbox answers 200).
        let mut r = StatusCode::OK.into_response();
        mark_many(r.headers_mut(), &ids);
        return r;
    }

    let mut stored = Vec::new();
    for (attempt, decided, message) in planned {
        match st
            .gateway
            .accept("sendgrid", &attempt, &decided, message)
            .await
        {
            Ok(Accepted::Stored { message_id, .. }) => stored.push(message_id),
            Ok(Accepted::Refused(again)) => {
                if !stored.is_empty() {
                    tracing::warn!(
                        decision_id = %again.id,
                        queued = stored.len(),
                        "a limit ran out part-way through a multi-personalization request; earlier personalizations stay queued"
                    );
                }
                return match again.decision.denial() {
                    Some(d) => denial_response(d, &again.id, now, &[]),
                    None => internal("refused without a denial"),
                };
            }
            Err(e) => return fault(&e),
        }
    }
    let mut r = StatusCode::ACCEPTED.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&sendgrid_message_id()) {
        h.insert("x-message-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&stored.join(",")) {
        h.insert("x-mailgate-message-ids", v);
    }
    mark_many(h, &ids);
    r
}

fn mark_many(h: &mut HeaderMap, ids: &[String]) {
    if let Ok(v) = HeaderValue::from_str(&ids.join(",")) {
        h.insert("x-mailgate-decision", v);
    }
}

/// A request that could not be turned into messages: the engine still decides (so a refusal
/// has a decision id), with the problem as the message's fact: the request's size over SendGrid's
/// 30 MB (`Door::max_message_bytes`), or what is wrong with its form as a [`RequestProblem`],
/// whose remedy is the catalogue's. The door keeps SendGrid's status, message and field.
async fn refuse_request(
    st: &SendgridState,
    mut attempt: SendAttempt,
    problem: Problem,
    now: u64,
) -> Response {
    match &problem {
        Problem::TooLarge(size) => {
            attempt.size = Some(*size);
            attempt.body = MsgBody::Valid;
        }
        Problem::OverBudget => {
            attempt.size = Some(0);
            attempt.body = MsgBody::Unreadable {
                problem: RequestProblem::TooManyItems {
                    budget: PARSE_BUDGET_BYTES as u64,
                },
                detail: format!(
                    "this request holds so many small items that reading it would take more than {PARSE_BUDGET_BYTES} bytes of memory"
                ),
            };
        }
        Problem::Media(m, p) => {
            attempt.size = Some(0);
            attempt.body = MsgBody::Unreadable {
                problem: *p,
                detail: (*m).to_owned(),
            };
        }
        Problem::Syntax(detail) => {
            attempt.size = Some(0);
            attempt.body = MsgBody::Unreadable {
                problem: RequestProblem::NotJson,
                detail: detail.clone(),
            };
        }
        Problem::Invalid(errs) => {
            attempt.size = Some(0);
            attempt.body = MsgBody::Invalid {
                detail: errs
                    .first()
                    .map_or("Bad Request".to_owned(), |e| e.message.clone()),
                field: errs.first().and_then(|e| e.field.clone()),
            };
        }
    }
    let decided = match st.gateway.decide("sendgrid", &attempt).await {
        Ok(d) => d,
        Err(e) => return fault(&e),
    };
    let Some(d) = decided.decision.denial() else {
        return internal("a request the door could not read was not refused");
    };
    match problem {
        // An earlier check failed (credential, account, limits): that is the answer.
        _ if d.code != Reason::MessageInvalid && d.code != Reason::MessageTooLarge => {
            denial_response(d, &decided.id, now, &[])
        }
        Problem::Invalid(errs) => denial_response(d, &decided.id, now, &errs),
        Problem::Media(m, _) => {
            let mut r = crate::errors::envelope(
                415,
                &[FieldError {
                    message: m.to_owned(),
                    field: None,
                    help: Some(crate::errors::explanation(d, &decided.id)),
                }],
            );
            mark(r.headers_mut(), &decided.id, d.code.code());
            r
        }
        Problem::Syntax(detail) => {
            // SendGrid says only "Bad Request"; what is wrong, and where, follows it.
            let mut r = crate::errors::envelope(
                400,
                &[FieldError {
                    message: format!("Bad Request: {detail}"),
                    field: None,
                    help: Some(crate::errors::explanation(d, &decided.id)),
                }],
            );
            mark(r.headers_mut(), &decided.id, d.code.code());
            r
        }
        // Over 30 MB or too costly to parse: SendGrid's 413 `content too large`.
        Problem::TooLarge(_) | Problem::OverBudget => denial_response(d, &decided.id, now, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders as _;
    use serde_json::json;

    fn full() -> Value {
        json!({"from":{"name":"Sender","email":"from@example.com"},"subject":"Hi",
         "personalizations":[{"to":[{"name":"A","email":"a@example.com"}],"cc":[{"email":"c@example.com"}],"bcc":[{"email":"b@example.com"}]}],
         "content":[{"type":"text/plain","value":"text"},{"type":"text/html","value":"<p>html</p>"}],
         "attachments":[{"content":"aGVsbG8=","type":"text/plain","filename":"a.txt","disposition":"attachment","content_id":"cid1"}],
         "headers":{"X-Test":"1"},"categories":["cat1"],"custom_args":{"k":"v"},"send_at":1617260400,"batch_id":"batch",
         "asm":{"group_id":1,"groups_to_display":[1,2]},"ip_pool_name":"pool",
         "mail_settings":{"bypass_list_management":{"enable":false},"sandbox_mode":{"enable":true},"spam_check":{"enable":true,"threshold":5}},
         "tracking_settings":{"click_tracking":{"enable":true,"enable_text":false},"open_tracking":{"enable":true,"substitution_tag":"%open%"}},
         "sections":{"a":"b"},
         "reply_to":{"name":"R","email":"r@example.com"}})
    }

    /// Room without a limit, for tests that build one message.
    fn unbounded() -> usize {
        usize::MAX
    }

    const NOW: i64 = 1_700_000_000;

    /// Validates `v` as the door does: serialized, parsed into the typed slots, checked.
    fn checked(v: &Value) -> Checked {
        let bytes = serde_json::to_vec(v).unwrap();
        check(wire::parse(&bytes, PARSE_BUDGET_BYTES).unwrap().0, NOW)
    }

    #[test]
    fn the_python_helpers_full_output_is_valid() {
        let c = checked(&full());
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert!(c.mail.sandbox);
        assert_eq!(
            c.mail.personalizations[0].recipients(),
            vec!["a@example.com", "c@example.com", "b@example.com"]
        );
        assert_eq!(c.mail.attachments[0].content, b"hello");
    }

    #[test]
    fn a_dynamic_template_needs_no_subject_or_content() {
        let v = json!({"from":{"email":"f@example.com"},
            "personalizations":[{"to":[{"email":"a@example.com"}],"dynamic_template_data":{"name":"A"}}],
            "template_id":"d-0123456789abcdef0123456789abcdef"});
        let c = checked(&v);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let raw = build_message(
            &c.mail,
            &c.mail.personalizations[0],
            c.mail.from.as_ref().unwrap(),
            &mut unbounded(),
        )
        .unwrap();
        let text = String::from_utf8(raw).unwrap();
        assert!(text.contains("X-Mailgate-Template-Id: d-0123"), "{text}");
        assert!(text.contains("\"name\": \"A\""), "{text}");
    }

    #[test]
    fn every_problem_is_reported_with_sendgrids_field_paths() {
        let v = json!({"from":{"email":"not-an-address"},
            "personalizations":[{"to":[{"email":"a@example.com"}],"cc":[{"email":"a@example.com"}]},{"cc":[{"email":"x@example.com"}]}],
            "content":[{"type":"text/html","value":"<p>x</p>"},{"type":"text/plain","value":"x"}],
            "attachments":[{"content":"aGVsbG8=","filename":"ok.txt"},{"content":"%%%","filename":"bad.txt","disposition":"sideways"}],
            "subject":"s"});
        let c = checked(&v);
        let got: Vec<(Option<&str>, &str)> = c
            .errors
            .iter()
            .map(|e| (e.field.as_deref(), e.message.as_str()))
            .collect();
        assert!(
            got.contains(&(
                Some("from.email"),
                "The from email does not contain a valid address."
            )),
            "{got:?}"
        );
        assert!(
            got.contains(&(Some("personalizations.1.to"), TO_REQUIRED)),
            "{got:?}"
        );
        assert!(
            got.iter().any(|(f, m)| *f == Some("personalizations.0")
                && m.contains("[a@example.com] in the personalizations.0.cc field")),
            "{got:?}"
        );
        assert!(got.contains(&(Some("content"), CONTENT_ORDER)), "{got:?}");
        assert!(
            got.contains(&(
                Some("attachments.1.content"),
                "The attachment content must be base64 encoded."
            )),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|(f, m)| *f == Some("attachments.1.disposition") && m.contains("[sideways]")),
            "{got:?}"
        );
        let to = c
            .errors
            .iter()
            .find(|e| e.field.as_deref() == Some("personalizations.1.to"))
            .unwrap();
        assert_eq!(
            to.help.as_deref(),
            Some(
                "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message.personalizations.to"
            )
        );
    }

    #[test]
    fn missing_pieces_get_sendgrids_messages() {
        let c = checked(&json!({"personalizations":[{"to":[{"email":"a@example.com"}]}]}));
        let msgs: Vec<&str> = c.errors.iter().map(|e| e.message.as_str()).collect();
        assert!(msgs.contains(&FROM_REQUIRED));
        assert!(msgs.contains(&SUBJECT_REQUIRED));
        assert!(msgs.contains(&CONTENT_REQUIRED));
        let c = checked(
            &json!({"from":{"email":"a@example.com"},"subject":"x","content":[{"type":"text/plain","value":"x"}]}),
        );
        assert_eq!(c.errors[0].field.as_deref(), Some("personalizations"));
        assert!(wire::parse(b"[1]", PARSE_BUDGET_BYTES).is_err());
    }

    #[test]
    fn limits_on_personalizations_and_recipients() {
        let many: Vec<Value> = (0..1001)
            .map(|i| json!({"to":[{"email":format!("r{i}@example.com")}]}))
            .collect();
        let v = json!({"from":{"email":"a@example.com"},"subject":"x","content":[{"type":"text/plain","value":"x"}],"personalizations":many});
        let c = checked(&v);
        assert!(
            c.errors[0]
                .message
                .contains("You have provided 1001 personalizations")
        );
        let to: Vec<Value> = (0..1001)
            .map(|i| json!({"email":format!("r{i}@example.com")}))
            .collect();
        let v = json!({"from":{"email":"a@example.com"},"subject":"x","content":[{"type":"text/plain","value":"x"}],"personalizations":[{"to":to}]});
        let c = checked(&v);
        assert!(c.errors.iter().any(|e| {
            e.message
                .starts_with("There is a limit of 1000 total recipients")
        }));
    }

    #[test]
    fn reserved_headers_categories_and_schedule_are_checked() {
        let mut v = full();
        v["headers"] = json!({"From":"x","X-Ok":"1"});
        v["categories"] = json!(["a", "a"]);
        v["send_at"] = json!(NOW + 73 * 3600);
        v["reply_to_list"] = json!([{"email":"q@example.com"}]);
        let c = checked(&v);
        let msgs: Vec<&str> = c.errors.iter().map(|e| e.message.as_str()).collect();
        assert!(
            msgs.contains(&"Header can not be one of the reserved keys."),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("you have included [a] more than once")),
            "{msgs:?}"
        );
        assert!(
            msgs.contains(&"Scheduling more than 72 hours in advance is forbidden."),
            "{msgs:?}"
        );
        assert!(msgs.iter().any(|m| m.contains("reply_to_list")), "{msgs:?}");
    }

    #[test]
    fn one_mime_message_per_personalization_with_substitutions_and_attachments() {
        let v = json!({"from":{"email":"f@example.com","name":"F"},"subject":"Hi -name-",
            "reply_to_list":[{"email":"r1@example.com"},{"email":"r2@example.com"}],
            "personalizations":[
                {"to":[{"email":"a@example.com"}],"bcc":[{"email":"hidden@example.com"}],"substitutions":{"-name-":"Ann"},"headers":{"X-P":"1"}},
                {"to":[{"email":"b@example.com"}],"subject":"Own subject"}],
            "content":[{"type":"text/plain","value":"Hello -name-"},{"type":"text/html","value":"<b>Hello -name-</b>"}],
            "attachments":[{"content":"AAEC/w==","filename":"bin.dat","type":"application/octet-stream"},
                           {"content":"aGVsbG8=","filename":"logo.png","type":"image/png","disposition":"inline","content_id":"logo"}]});
        let c = checked(&v);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let from = c.mail.from.clone().unwrap();
        let first = build_message(
            &c.mail,
            &c.mail.personalizations[0],
            &from,
            &mut unbounded(),
        )
        .unwrap();
        let m = mail_parser::MessageParser::default().parse(&first).unwrap();
        assert_eq!(m.subject(), Some("Hi Ann"));
        assert!(m.bcc().is_none());
        assert_eq!(m.reply_to().unwrap().iter().count(), 2);
        assert_eq!(m.body_text(0).unwrap().trim(), "Hello Ann");
        assert_eq!(m.header_raw("X-P").map(str::trim), Some("1"));
        let att: Vec<_> = m.attachments().collect();
        assert_eq!(att.len(), 2);
        assert_eq!(att[0].contents(), &[0, 1, 2, 255]);
        assert_eq!(att[0].attachment_name(), Some("bin.dat"));
        assert_eq!(att[1].content_id(), Some("logo"));
        assert_eq!(
            c.mail.personalizations[0].recipients(),
            vec!["a@example.com", "hidden@example.com"]
        );
        let second = build_message(
            &c.mail,
            &c.mail.personalizations[1],
            &from,
            &mut unbounded(),
        )
        .unwrap();
        let m = mail_parser::MessageParser::default()
            .parse(&second)
            .unwrap();
        assert_eq!(m.subject(), Some("Own subject"));
    }

    #[test]
    fn addresses() {
        assert!(valid_address("a@example.com"));
        assert!(!valid_address("a@example"));
        assert!(!valid_address("a example@x.com"));
        assert!(!valid_address("@x.com"));
        assert!(!valid_address("a@x.com\r\nBcc: y@z.com"));
    }

    #[test]
    fn substitution_is_one_pass_longest_first_and_bounded() {
        let subs = vec![
            ("-n-".to_owned(), "-name-".to_owned()),
            ("-name-".to_owned(), "Ann".to_owned()),
            ("".to_owned(), "never".to_owned()),
        ];
        let s = Substituter::new(&subs).unwrap();
        let mut room = usize::MAX;
        // The longest tag wins; a substituted value is not searched again.
        assert_eq!(
            s.apply("Hi -name-, -n-!", &mut room).unwrap(),
            "Hi Ann, -name-!"
        );
        assert_eq!(usize::MAX - room, "Hi Ann, -name-!".len());
        // Measuring agrees with applying, without writing.
        let grow = vec![("a".to_owned(), "xyz".to_owned())];
        let g = Substituter::new(&grow).unwrap();
        assert_eq!(g.measure("banana", usize::MAX), Some(12));
        assert_eq!(g.measure("banana", 11), None);
        assert_eq!(s.measure("Hi -name-, -n-!", usize::MAX), Some(15));
        // No tag: the text itself, not a copy.
        assert!(matches!(
            s.apply("plain", &mut room),
            Some(Cow::Borrowed("plain"))
        ));
        // Over the room: refused, and the room is not spent past it.
        let mut room = 10;
        assert!(s.apply("-name--name--name--name-", &mut room).is_none());
        let mut room = 12;
        assert_eq!(
            s.apply("-name--name--name--name-", &mut room).unwrap(),
            "AnnAnnAnnAnn"
        );
        assert_eq!(room, 0);
        // 10,000 tags over a long text: linear, whatever the tags.
        let many: Vec<(String, String)> = (0..10_000)
            .map(|i| (format!("{{{{t{i}}}}}"), "v".to_owned()))
            .collect();
        let s = Substituter::new(&many).unwrap();
        let text = "{{t9999}} {{t1".repeat(100_000);
        let t = std::time::Instant::now();
        let out = s.apply(&text, &mut unbounded()).unwrap();
        assert_eq!(out.len(), "v {{t1".len() * 100_000);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn substitutions_are_limited_like_sendgrid() {
        let mut v = full();
        let big: serde_json::Map<String, Value> = (0..5000)
            .map(|i| (format!("-tag{i:05}-"), json!("value")))
            .collect();
        v["personalizations"][0]["substitutions"] = Value::Object(big);
        let c = checked(&v);
        assert!(
            c.errors.iter().any(
                |e| e.field.as_deref() == Some("personalizations.0.substitutions")
                    && e.message.contains("50,000 bytes")
            ),
            "{:?}",
            c.errors
        );
        v["personalizations"][0]["substitutions"] = json!({"a": 1});
        let c = checked(&v);
        assert!(
            c.errors
                .iter()
                .any(|e| e.message.contains("values are all strings"))
        );
    }
}
