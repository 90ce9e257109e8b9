//! `POST /v3/mail/send`: the request as the official clients emit it (sendgrid-wire.md §1–2),
//! validated with SendGrid's messages and field paths (every problem at once), turned into one
//! MIME message per personalization (mail-builder), decided by the engine and stored by the
//! gateway before the `202`.
//!
//! The JSON is read as a `serde_json::Value` rather than typed structs: unknown and legacy keys
//! (`sections`, `mail_settings.bcc`, `spam_check`, `ganalytics`, ...) are accepted and ignored, and a
//! value of the wrong type becomes SendGrid's message for that field instead of a serde error.

use std::borrow::Cow;
use std::collections::HashSet;

use axum::Extension;
use axum::body::Body;
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
use mailgate_core::engine::{Body as MsgBody, Door, SendAttempt};
use mailgate_gateway::{Accepted, Decided, Message};
use serde_json::Value;

use crate::errors::{FieldError, denial_response, internal, mark, simple};
use crate::{ConnFacts, MAX_REQUEST_BYTES, SendgridState, transport};

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

/// Reads `{email, name?}`; `None` with the problem when it is not one.
fn addr(v: &Value) -> Result<Addr, &'static str> {
    let email = v
        .get("email")
        .and_then(Value::as_str)
        .ok_or("missing")?
        .trim()
        .to_owned();
    if email.chars().count() > MAX_ADDRESS {
        return Err("long");
    }
    if !valid_address(&email) {
        return Err("invalid");
    }
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && !has_crlf(n))
        .map(str::to_owned);
    Ok(Addr { email, name })
}

fn string_map(v: &Value) -> Option<Vec<(String, String)>> {
    let m = v.as_object()?;
    m.iter()
        .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .collect()
}

fn check_headers(v: &Value, field: &str, errors: &mut Vec<FieldError>) -> Vec<(String, String)> {
    let Some(map) = v.as_object() else {
        errors.push(FieldError::at(field, "The header values must be strings."));
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (k, val) in map {
        let Some(s) = val.as_str() else {
            errors.push(FieldError::at(field, "The header values must be strings."));
            continue;
        };
        if k.is_empty() || !k.is_ascii() || k.contains(' ') || k.contains(':') || has_crlf(k) {
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
        if has_crlf(s) {
            errors.push(FieldError::at(field, "The header values must be strings."));
            continue;
        }
        out.push((k.clone(), s.to_owned()));
    }
    out
}

fn check_send_at(v: Option<&Value>, field: &str, now_secs: i64, errors: &mut Vec<FieldError>) {
    let Some(v) = v else { return };
    match v.as_i64() {
        None => errors.push(FieldError::at(field, SEND_AT_INT)),
        Some(t) if t > now_secs + MAX_SCHEDULE_SECS => errors.push(FieldError::at(
            field,
            "Scheduling more than 72 hours in advance is forbidden.",
        )),
        Some(_) => {}
    }
}

fn check_custom_args(v: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) -> usize {
    let Some(v) = v else { return 0 };
    match string_map(v) {
        Some(m) => m.iter().map(|(k, v)| k.len() + v.len()).sum(),
        None => {
            // SendGrid's OpenAPI types it as a string (a spec bug); clients send an object.
            if !v.is_string() {
                errors.push(FieldError::at(
                    field,
                    "All values of custom arguments object must be strings",
                ));
            }
            0
        }
    }
}

fn subject_of(v: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    let v = v?;
    match v.as_str() {
        Some(s) if !s.is_empty() => Some(s.to_owned()),
        _ => {
            errors.push(FieldError::at(field, SUBJECT_STRING));
            None
        }
    }
}

/// Validates a request body: every problem SendGrid would name, with its field path.
pub(crate) fn check(body: &Value, now_secs: i64) -> Checked {
    let mut errors = Vec::new();
    let mut mail = MailSend::default();
    let Some(obj) = body.as_object() else {
        return Checked {
            mail,
            errors: vec![FieldError::plain("Bad Request")],
        };
    };

    // from
    match obj.get("from") {
        None | Some(Value::Null) => errors.push(FieldError::at("from.email", FROM_REQUIRED)),
        Some(v) => match addr(v) {
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
        },
    }

    // personalizations
    let global_args = check_custom_args(obj.get("custom_args"), "custom_args", &mut errors);
    match obj.get("personalizations").and_then(Value::as_array) {
        None => errors.push(FieldError {
            message: "The personalizations field is required and must have at least one personalization.".into(),
            field: Some("personalizations".into()),
            help: Some(format!("{}#-Personalizations-Errors", crate::errors::HELP_BASE)),
        }),
        Some(list) if list.is_empty() => errors.push(FieldError {
            message: "The personalizations field is required and must have at least one personalization.".into(),
            field: Some("personalizations".into()),
            help: Some(format!("{}#-Personalizations-Errors", crate::errors::HELP_BASE)),
        }),
        Some(list) if list.len() > MAX_PERSONALIZATIONS => errors.push(FieldError::at(
            "personalizations",
            format!(
                "The personalization block is limited to 1000 personalizations per API request. You have provided {} personalizations. Please consider splitting this into multiple requests and resending your request.",
                list.len()
            ),
        )),
        Some(list) => {
            let mut total = 0usize;
            for (i, p) in list.iter().enumerate() {
                let pers = check_personalization(p, i, now_secs, global_args, &mut errors);
                total += pers.to.len() + pers.cc.len() + pers.bcc.len();
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
    let reply_to = obj.get("reply_to").filter(|v| !v.is_null());
    let reply_to_list = obj.get("reply_to_list").filter(|v| !v.is_null());
    if reply_to.is_some() && reply_to_list.is_some() {
        errors.push(FieldError::at(
            "reply_to_list",
            "The reply_to and reply_to_list parameters cannot be used together.",
        ));
    }
    if let Some(v) = reply_to {
        match addr(v) {
            Ok(a) => mail.reply_to.push(a),
            Err("long") => errors.push(FieldError::at(
                "reply_to.email",
                "The Reply-To email exceeds the maximum total length of 320 characters",
            )),
            Err(_) => errors.push(FieldError::at("reply_to.email", REPLY_TO_INVALID)),
        }
    }
    if let Some(v) = reply_to_list {
        match v.as_array() {
            Some(list) if list.len() <= 1000 => {
                for (i, r) in list.iter().enumerate() {
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
    match obj.get("template_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if !s.is_empty() => mail.template_id = Some(s.clone()),
        Some(other) => errors.push(FieldError::at(
            "template_id",
            format!("The template ID must be a string, you provided {other}."),
        )),
    }

    // subject
    mail.subject = subject_of(obj.get("subject"), "subject", &mut errors);
    let every_has_subject = !mail.personalizations.is_empty()
        && mail.personalizations.iter().all(|p| p.subject.is_some());
    if mail.subject.is_none()
        && obj.get("subject").is_none()
        && mail.template_id.is_none()
        && !every_has_subject
    {
        errors.push(FieldError::at("subject", SUBJECT_REQUIRED));
    }

    // content
    check_content(obj.get("content"), &mut mail, &mut errors);

    // attachments
    if let Some(v) = obj.get("attachments").filter(|v| !v.is_null()) {
        match v.as_array() {
            Some(list) => {
                for (i, a) in list.iter().enumerate() {
                    if let Some(att) = check_attachment(a, i, &mut errors) {
                        mail.attachments.push(att);
                    }
                }
            }
            None => errors.push(FieldError::at(
                "attachments",
                "The attachments must be an array of attachment objects.",
            )),
        }
    }

    // headers
    if let Some(v) = obj.get("headers").filter(|v| !v.is_null()) {
        mail.headers = check_headers(v, "headers", &mut errors);
    }

    // categories
    if let Some(v) = obj.get("categories").filter(|v| !v.is_null()) {
        check_categories(v, &mut errors);
    }

    check_send_at(obj.get("send_at"), "send_at", now_secs, &mut errors);
    if let Some(v) = obj.get("batch_id").filter(|v| !v.is_null())
        && !v.is_string()
    {
        errors.push(FieldError::at("batch_id", "The batch_id must be a string."));
    }
    if let Some(v) = obj.get("ip_pool_name").filter(|v| !v.is_null())
        && !v.is_string()
    {
        errors.push(FieldError::at(
            "ip_pool_name",
            "The name of your IP pool must be a string.",
        ));
    }
    if let Some(asm) = obj.get("asm").filter(|v| !v.is_null())
        && !asm.get("group_id").is_some_and(Value::is_i64)
    {
        errors.push(FieldError::at(
            "asm.group_id",
            "The ASM group ID must be an integer.",
        ));
    }

    // mail_settings.sandbox_mode
    if let Some(s) = obj
        .get("mail_settings")
        .and_then(|m| m.get("sandbox_mode"))
        .and_then(|s| s.get("enable"))
    {
        match s.as_bool() {
            Some(b) => mail.sandbox = b,
            None => errors.push(FieldError::at(
                "mail_settings.sandbox_mode.enable",
                "The sandbox mode enable param should be a boolean value.",
            )),
        }
    }

    Checked { mail, errors }
}

fn check_personalization(
    p: &Value,
    i: usize,
    now_secs: i64,
    global_args: usize,
    errors: &mut Vec<FieldError>,
) -> Personalization {
    let mut out = Personalization::default();
    let base = format!("personalizations.{i}");
    if !p.is_object() {
        errors.push(FieldError::at(&format!("{base}.to"), TO_REQUIRED));
        return out;
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut duplicate_reported = false;
    for kind in ["to", "cc", "bcc"] {
        let field = format!("{base}.{kind}");
        let list = match p.get(kind) {
            None | Some(Value::Null) => {
                if kind == "to" {
                    errors.push(FieldError::at(&field, TO_REQUIRED));
                }
                continue;
            }
            Some(v) => match v.as_array() {
                Some(l) if !l.is_empty() || kind != "to" => l,
                _ => {
                    errors.push(FieldError::at(&field, TO_REQUIRED));
                    continue;
                }
            },
        };
        for (j, r) in list.iter().enumerate() {
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
    if let Some(v) = p.get("from").filter(|v| !v.is_null()) {
        match addr(v) {
            Ok(a) => out.from = Some(a),
            Err(_) => errors.push(FieldError::at(
                &format!("{base}.from.email"),
                "The from email does not contain a valid address.",
            )),
        }
    }
    out.subject = subject_of(p.get("subject"), &format!("{base}.subject"), errors);
    if let Some(v) = p.get("headers").filter(|v| !v.is_null()) {
        out.headers = check_headers(v, &format!("{base}.headers"), errors);
    }
    if let Some(v) = p.get("substitutions").filter(|v| !v.is_null()) {
        match string_map(v) {
            Some(m) if m.len() <= 10_000 => out.substitutions = m,
            Some(_) => errors.push(FieldError::at(
                &format!("{base}.substitutions"),
                "You are limited to 10,000 substitutions.",
            )),
            None => errors.push(FieldError::at(
                &format!("{base}.substitutions"),
                "The substitution values must be an object of key/value pairs, where the values are all strings.",
            )),
        }
    }
    if let Some(v) = p.get("dynamic_template_data").filter(|v| !v.is_null()) {
        out.dynamic_template_data = Some(v.clone());
    }
    let args = check_custom_args(p.get("custom_args"), &format!("{base}.custom_args"), errors);
    if args + global_args > 10_000 {
        errors.push(FieldError::at(
            &format!("{base}.custom_args"),
            "The combined size of both global and personalization custom arguments may not exceed 10,000 bytes per personalization.",
        ));
    }
    check_send_at(
        p.get("send_at"),
        &format!("{base}.send_at"),
        now_secs,
        errors,
    );
    out
}

fn check_content(v: Option<&Value>, mail: &mut MailSend, errors: &mut Vec<FieldError>) {
    let list = match v {
        None | Some(Value::Null) => {
            if mail.template_id.is_none() {
                errors.push(FieldError::at("content", CONTENT_REQUIRED));
            }
            return;
        }
        Some(v) => match v.as_array() {
            Some(l) if !l.is_empty() => l,
            Some(_) if mail.template_id.is_some() => return,
            _ => {
                errors.push(FieldError::at("content", CONTENT_REQUIRED));
                return;
            }
        },
    };
    for (i, c) in list.iter().enumerate() {
        let ty = match c.get("type") {
            None | Some(Value::Null) => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "A content type is required, this tells email clients how to display the email.",
                ));
                None
            }
            Some(Value::String(s)) if s.is_empty() => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "Your content type must be a string with length of at least one character.",
                ));
                None
            }
            Some(Value::String(s)) if s.contains(';') || has_crlf(s) => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "Cannot contain ';', or CRLF characters.",
                ));
                None
            }
            Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
            Some(_) => {
                errors.push(FieldError::at(
                    &format!("content.{i}.type"),
                    "Your content type must be a string with length of at least one character.",
                ));
                None
            }
        };
        let value = match c.get("value") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
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

fn check_attachment(a: &Value, i: usize, errors: &mut Vec<FieldError>) -> Option<Attachment> {
    let f = |name: &str| format!("attachments.{i}.{name}");
    let before = errors.len();
    let content = match a.get("content") {
        Some(Value::String(s)) if !s.is_empty() => {
            let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
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
    let filename = match a.get("filename") {
        Some(Value::String(s)) if has_crlf(s) => {
            errors.push(FieldError::at(
                &f("filename"),
                "The filename of your attachment cannot contain CRLF characters.",
            ));
            None
        }
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            errors.push(FieldError::at(&f("filename"), "filename is required."));
            None
        }
        Some(_) => {
            errors.push(FieldError::at(
                &f("filename"),
                "The filename of your attachment must be a string.",
            ));
            None
        }
    };
    let content_type = match a.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.contains(';') || has_crlf(s) => {
            errors.push(FieldError::at(
                &f("type"),
                "The type cannot contain ';', or CRLF characters.",
            ));
            None
        }
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::at(
                &f("type"),
                "The attachment type must be a string and at least one character in length.",
            ));
            None
        }
    };
    let inline = match a.get("disposition") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "attachment" => false,
        Some(Value::String(s)) if s == "inline" => true,
        Some(other) => {
            let shown = other.as_str().map_or(other.to_string(), str::to_owned);
            errors.push(FieldError::at(
                &f("disposition"),
                format!(
                    "The disposition of your attachment can be either \"inline\" or \"attachment\". You provided [{shown}]."
                ),
            ));
            false
        }
    };
    let content_id = match a.get("content_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if has_crlf(s) => {
            errors.push(FieldError::at(
                &f("content_id"),
                "The content ID of your attachment cannot contain CRLF characters.",
            ));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            errors.push(FieldError::at(
                &f("content_id"),
                format!(
                    "The content ID of your attachment must be a string. You provided [{other}]."
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

fn check_categories(v: &Value, errors: &mut Vec<FieldError>) {
    let Some(list) = v.as_array() else {
        errors.push(FieldError::at(
            "categories",
            "Categories must be an array of strings.",
        ));
        return;
    };
    if list.len() > 10 {
        errors.push(FieldError::at(
            "categories",
            format!(
                "There is a limit of 10 categories for each email that is sent. You provided {} categories.",
                list.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for c in list {
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

fn substitute(text: &str, subs: &[(String, String)]) -> String {
    let mut out = text.to_owned();
    for (k, v) in subs {
        if !k.is_empty() {
            out = out.replace(k.as_str(), v);
        }
    }
    out
}

fn to_address(a: &Addr) -> Address<'static> {
    Address::new_address(a.name.clone(), a.email.clone())
}

fn list(addrs: &[Addr]) -> Address<'static> {
    Address::new_list(addrs.iter().map(to_address).collect())
}

/// The RFC 5322 message for personalization `p` (Bcc not written), with `from` as the sender.
pub(crate) fn build_message(
    mail: &MailSend,
    p: &Personalization,
    from: &Addr,
) -> std::io::Result<Vec<u8>> {
    let subs = &p.substitutions;
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
        b = b.subject(substitute(s, subs));
    }
    // Message headers, then the personalization's (which win on the same name).
    for (k, v) in &mail.headers {
        if !p.headers.iter().any(|(pk, _)| pk.eq_ignore_ascii_case(k)) {
            b = b.header(k.clone(), Text::new(v.clone()));
        }
    }
    for (k, v) in &p.headers {
        b = b.header(k.clone(), Text::new(v.clone()));
    }
    let mut parts: Vec<MimePart<'static>> = mail
        .content
        .iter()
        .map(|(t, v)| {
            MimePart::new(
                ContentType::new(t.clone()),
                BodyPart::Text(Cow::Owned(substitute(v, subs))),
            )
        })
        .collect();
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
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into());
            let mut part = MimePart::new(
                ContentType::new(ct),
                BodyPart::Binary(Cow::Owned(a.content.clone())),
            );
            if a.inline {
                part = part.header(
                    "Content-Disposition",
                    ContentType::new("inline").attribute("filename", a.filename.clone()),
                );
            } else {
                part = part.attachment(a.filename.clone());
            }
            if let Some(cid) = &a.content_id {
                part = part.cid(cid.clone());
            }
            mixed.push(part);
        }
        MimePart::new(
            ContentType::new("multipart/mixed"),
            BodyPart::Multipart(mixed),
        )
    };
    b.body(body).write_to_vec()
}

/// 405 for any method but POST, before any credential check (as SendGrid does).
pub(crate) async fn method_not_allowed() -> Response {
    simple(405, "POST method allowed only")
}

/// What was wrong with the request before any personalization could be decided.
enum Problem {
    /// Validation errors (400), all of them.
    Invalid(Vec<FieldError>),
    /// 415 with this message.
    Media(&'static str),
    /// Over 30 MB.
    TooLarge,
}

/// 22 characters of base64url, like SendGrid's `X-Message-Id`.
fn sendgrid_message_id() -> String {
    mailgate_auth::random_token::<16>().unwrap_or_else(|_| {
        let n = mailgate_gateway::now_ms();
        format!("{n:022}")
    })
}

pub(crate) async fn send(
    State(st): State<std::sync::Arc<SendgridState>>,
    Extension(conn): Extension<ConnFacts>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let now = mailgate_gateway::now_ms();
    let credential = st.credential(&headers);
    let mut base = SendAttempt::new(Door::Sendgrid, credential);
    base.transport = transport(&conn, &headers);

    let problem = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Err(_) => Err(Problem::TooLarge),
        Ok(bytes) => {
            let json_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.split(';')
                        .next()
                        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
                });
            if headers.contains_key(header::CONTENT_ENCODING) {
                Err(Problem::Media("Content-Encoding is not supported."))
            } else if !json_type {
                Err(Problem::Media("Content-Type should be application/json."))
            } else {
                match std::str::from_utf8(&bytes) {
                    Err(_) => Err(Problem::Media("Invalid UTF8 in request")),
                    Ok(text) => match serde_json::from_str::<Value>(text) {
                        Err(_) => Err(Problem::Invalid(vec![FieldError::plain("Bad Request")])),
                        Ok(v) => {
                            let checked = check(&v, (now / 1000) as i64);
                            if checked.errors.is_empty() {
                                Ok(checked.mail)
                            } else {
                                Err(Problem::Invalid(checked.errors))
                            }
                        }
                    },
                }
            }
        }
    };
    let mail = match problem {
        Ok(m) => m,
        Err(p) => return refuse_request(&st, base, p, now).await,
    };

    // One attempt, one message per personalization; all are decided before any is stored, so
    // a refusal stores nothing.
    let mut planned: Vec<(SendAttempt, Decided, Message)> = Vec::new();
    for p in &mail.personalizations {
        let Some(from) = p.from.as_ref().or(mail.from.as_ref()) else {
            return internal("validated request without from");
        };
        let mut raw = match build_message(&mail, p, from) {
            Ok(r) => r,
            Err(e) => return internal(&e.to_string()),
        };
        let recipients = p.recipients();
        let attempt = base
            .clone()
            .from(from.email.clone())
            .to(recipients.clone())
            .parsed(raw.len() as u64);
        let decided = match st.gateway.decide("sendgrid", &attempt).await {
            Ok(d) => d,
            Err(e) => return internal(&e.to_string()),
        };
        if let Some(d) = decided.decision.denial() {
            return denial_response(d, &decided.id, now, &[]);
        }
        if !decided.decision.complete {
            return internal("decision incomplete with every fact known");
        }
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
            raw = match build_message(&mail, p, &rewritten) {
                Ok(r) => r,
                Err(e) => return internal(&e.to_string()),
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
            Err(e) => return internal(&e.to_string()),
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

/// A request that could not be turned into messages: the engine still decides (so a bad key
/// is refused as such, with a decision id), with the problem as the message's fact.
async fn refuse_request(
    st: &SendgridState,
    mut attempt: SendAttempt,
    problem: Problem,
    now: u64,
) -> Response {
    let (detail, field) = match &problem {
        Problem::Invalid(errs) => (
            errs.first()
                .map_or("Bad Request".to_owned(), |e| e.message.clone()),
            errs.first().and_then(|e| e.field.clone()),
        ),
        Problem::Media(m) => ((*m).to_owned(), None),
        Problem::TooLarge => (String::new(), None),
    };
    match &problem {
        Problem::TooLarge => {
            attempt.size = Some(MAX_REQUEST_BYTES as u64 + 1);
            attempt.body = MsgBody::Valid;
        }
        _ => {
            attempt.size = Some(0);
            attempt.body = MsgBody::Invalid { detail, field };
        }
    }
    let decided = match st.gateway.decide("sendgrid", &attempt).await {
        Ok(d) => d,
        Err(e) => return internal(&e.to_string()),
    };
    let denial = decided.decision.denial();
    match (denial, problem) {
        // An earlier check failed (credential, account, limits): that is the answer.
        (Some(d), _) if d.code != Reason::MessageInvalid && d.code != Reason::MessageTooLarge => {
            denial_response(d, &decided.id, now, &[])
        }
        (Some(d), Problem::Invalid(errs)) => denial_response(d, &decided.id, now, &errs),
        (Some(d), Problem::Media(m)) => {
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
        (Some(d), Problem::TooLarge) => denial_response(d, &decided.id, now, &[]),
        (None, _) => {
            // Within the organisation's own size limit but over SendGrid's 30 MB.
            let mut r = crate::errors::envelope(
                413,
                &[FieldError {
                    message: "content too large".into(),
                    field: None,
                    help: Some(format!(
                        "mailgate message.too_large: the SendGrid-compatible API takes requests up to {MAX_REQUEST_BYTES} bytes (30 MB), attachments included. Remedy: send a smaller message or split it. Decision: {}",
                        decided.id
                    )),
                }],
            );
            mark(r.headers_mut(), &decided.id, "message.too_large");
            r
        }
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

    const NOW: i64 = 1_700_000_000;

    #[test]
    fn the_python_helpers_full_output_is_valid() {
        let c = check(&full(), NOW);
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
        let c = check(&v, NOW);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let raw = build_message(
            &c.mail,
            &c.mail.personalizations[0],
            c.mail.from.as_ref().unwrap(),
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
        let c = check(&v, NOW);
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
        let c = check(
            &json!({"personalizations":[{"to":[{"email":"a@example.com"}]}]}),
            NOW,
        );
        let msgs: Vec<&str> = c.errors.iter().map(|e| e.message.as_str()).collect();
        assert!(msgs.contains(&FROM_REQUIRED));
        assert!(msgs.contains(&SUBJECT_REQUIRED));
        assert!(msgs.contains(&CONTENT_REQUIRED));
        let c = check(
            &json!({"from":{"email":"a@example.com"},"subject":"x","content":[{"type":"text/plain","value":"x"}]}),
            NOW,
        );
        assert_eq!(c.errors[0].field.as_deref(), Some("personalizations"));
        assert_eq!(check(&json!([1]), NOW).errors[0].message, "Bad Request");
    }

    #[test]
    fn limits_on_personalizations_and_recipients() {
        let many: Vec<Value> = (0..1001)
            .map(|i| json!({"to":[{"email":format!("r{i}@example.com")}]}))
            .collect();
        let v = json!({"from":{"email":"a@example.com"},"subject":"x","content":[{"type":"text/plain","value":"x"}],"personalizations":many});
        let c = check(&v, NOW);
        assert!(
            c.errors[0]
                .message
                .contains("You have provided 1001 personalizations")
        );
        let to: Vec<Value> = (0..1001)
            .map(|i| json!({"email":format!("r{i}@example.com")}))
            .collect();
        let v = json!({"from":{"email":"a@example.com"},"subject":"x","content":[{"type":"text/plain","value":"x"}],"personalizations":[{"to":to}]});
        let c = check(&v, NOW);
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
        let c = check(&v, NOW);
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
        let c = check(&v, NOW);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let from = c.mail.from.clone().unwrap();
        let first = build_message(&c.mail, &c.mail.personalizations[0], &from).unwrap();
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
        let second = build_message(&c.mail, &c.mail.personalizations[1], &from).unwrap();
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
}
