//! Delivery status notifications (RFC 3464), built with mail-builder: a `multipart/report` with a
//! human-readable part, the `message/delivery-status` part, and the original message's header
//! (`text/rfc822-headers`). They go to the envelope sender from the null sender `<>`, through
//! the same queue as any other message.

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::mime::{BodyPart, MimePart};

/// One recipient that could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecipient {
    /// The recipient.
    pub recipient: String,
    /// RFC 3463 status (`5.1.1`, `4.4.7`).
    pub status: String,
    /// The smarthost's name and host, when one answered.
    pub remote_mta: Option<String>,
    /// The upstream reply, verbatim (or why Mailgate gave up).
    pub diagnostic: String,
}

/// What a DSN reports.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// Our host name (Reporting-MTA, and the From address's domain).
    pub reporting_mta: &'a str,
    /// The original message's id in Mailgate.
    pub message_id: &'a str,
    /// When the original was accepted (Unix seconds).
    pub arrival_secs: i64,
    /// When this report is made (Unix seconds).
    pub now_secs: i64,
    /// The envelope sender the report goes to.
    pub to: &'a str,
    /// The failed recipients.
    pub failed: &'a [FailedRecipient],
    /// The original message (only its header is returned).
    pub original: &'a [u8],
}

/// The enhanced status of an upstream reply (`550 5.1.1 ...` gives `5.1.1`), or a default.
pub fn status_of(reply: &str, permanent: bool) -> String {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(esc) = words.next() {
        let parts: Vec<&str> = esc.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && (esc.starts_with('4') || esc.starts_with('5'))
        {
            return esc.to_owned();
        }
    }
    match code.as_bytes().first() {
        Some(b'5') => "5.0.0".into(),
        Some(b'4') if !permanent => "4.0.0".into(),
        _ => "4.4.7".into(),
    }
}

/// The header of a message (up to the first empty line).
fn header_of(raw: &[u8]) -> &[u8] {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| p + 1))
        .unwrap_or(raw.len());
    raw.get(..end).unwrap_or(raw)
}

/// Builds the DSN message.
pub fn build(input: &DsnInput<'_>) -> std::io::Result<Vec<u8>> {
    let mut human = String::from(
        "This is the mail system at Mailgate.\r\n\r\n\
         Your message could not be delivered to one or more recipients.\r\n\r\n",
    );
    for f in input.failed {
        human.push_str(&format!("<{}>: {}\r\n", f.recipient, f.diagnostic));
    }
    let mut status = format!(
        "Reporting-MTA: dns; {}\r\nX-Mailgate-Message-ID: {}\r\nArrival-Date: {}\r\n",
        input.reporting_mta,
        input.message_id,
        mail_builder::headers::date::Date::new(input.arrival_secs).to_rfc822()
    );
    for f in input.failed {
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\n",
            f.recipient, f.status
        ));
        if let Some(mta) = &f.remote_mta {
            status.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        // Diagnostic-Code is one header line: fold nothing, drop line breaks.
        let diag = f.diagnostic.replace(['\r', '\n'], " ");
        status.push_str(&format!("Diagnostic-Code: smtp; {diag}\r\n"));
    }
    let headers = String::from_utf8_lossy(header_of(input.original)).into_owned();
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        BodyPart::Multipart(vec![
            MimePart::new(ContentType::new("text/plain"), human),
            MimePart::new(
                ContentType::new("message/delivery-status"),
                BodyPart::Binary(status.into_bytes().into()),
            )
            .transfer_encoding("7bit"),
            MimePart::new(
                ContentType::new("text/rfc822-headers"),
                BodyPart::Binary(headers.into_bytes().into()),
            )
            .transfer_encoding("8bit"),
        ]),
    );
    MessageBuilder::new()
        .from(Address::new_address(
            Some("Mail Delivery System"),
            format!("MAILER-DAEMON@{}", input.reporting_mta),
        ))
        .to(input.to)
        .subject("Undelivered Mail Returned to Sender")
        .date(input.now_secs)
        .header(
            "Auto-Submitted",
            mail_builder::headers::raw::Raw::new("auto-replied"),
        )
        .body(report)
        .write_to_vec()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn status_comes_from_the_reply() {
        assert_eq!(status_of("550 5.1.1 no such user", true), "5.1.1");
        assert_eq!(status_of("554 rejected", true), "5.0.0");
        assert_eq!(status_of("451 4.3.0 try later", true), "4.3.0");
        assert_eq!(status_of("connection refused", true), "4.4.7");
    }

    #[test]
    fn a_dsn_is_a_delivery_status_report() {
        let raw = build(&DsnInput {
            reporting_mta: "mailgate.test",
            message_id: "abc",
            arrival_secs: 1_700_000_000,
            now_secs: 1_700_000_100,
            to: "alice@example.com",
            failed: &[FailedRecipient {
                recipient: "bob@example.org".into(),
                status: "5.1.1".into(),
                remote_mta: Some("upstream.test".into()),
                diagnostic: "550 5.1.1 no such user".into(),
            }],
            original: b"Subject: hello\r\nFrom: alice@example.com\r\n\r\nsecret body\r\n",
        })
        .unwrap();
        let text = String::from_utf8(raw.clone()).unwrap();
        assert!(text.contains("multipart/report"), "{text}");
        assert!(
            text.contains("report-type=\"delivery-status\"")
                || text.contains("report-type=delivery-status"),
            "{text}"
        );
        assert!(text.contains("Final-Recipient: rfc822; bob@example.org"));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"));
        assert!(text.contains("Subject: hello"));
        assert!(!text.contains("secret body"), "only the header is returned");
        let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
        assert_eq!(
            parsed.subject(),
            Some("Undelivered Mail Returned to Sender")
        );
    }
}
