//! Reading captured messages: a one-line summary (time, from, to, subject) and the parsed form
//! (every header as written, and the MIME parts) for `GET /mailgate/v1/captured/{id}` and
//! `mailgate captured show`.

use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde::Serialize;
use serde_json::{Value, json};

/// What a listing shows of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Header From (as written), if any.
    pub from: Option<String>,
    /// Header To addresses.
    pub to: Vec<String>,
    /// Subject, decoded.
    pub subject: Option<String>,
}

fn addresses(a: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    a.map(|a| {
        a.iter()
            .filter_map(|x| x.address().map(str::to_owned))
            .collect()
    })
    .unwrap_or_default()
}

/// The summary of a message (or of its head: the header is enough).
pub fn summary(raw: &[u8]) -> Summary {
    let Some(m) = MessageParser::default().parse_headers(raw) else {
        return Summary::default();
    };
    Summary {
        from: addresses(m.from()).into_iter().next(),
        to: addresses(m.to()),
        subject: m.subject().map(str::to_owned),
    }
}

/// The parsed message: `{"headers": [{"name", "value"}], "subject", "from", "to", "cc", "date",
/// "message_id", "parts": [{"index", "content_type", "size", "filename", "text"}]}`. Text parts
/// carry their decoded text; other parts only their type and size.
pub fn parsed(raw: &[u8]) -> Value {
    let Some(m) = MessageParser::default().parse(raw) else {
        return json!({"error": "the message does not parse as RFC 5322"});
    };
    let headers: Vec<Value> = m
        .headers()
        .iter()
        .map(|h| {
            let start = h.offset_start as usize;
            let end = h.offset_end as usize;
            let value = raw
                .get(start..end)
                .map(|v| String::from_utf8_lossy(v).trim().to_owned())
                .unwrap_or_default();
            json!({"name": h.name.as_str(), "value": value})
        })
        .collect();
    let parts: Vec<Value> = m
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ct = p
                .content_type()
                .map(|c| match c.subtype() {
                    Some(sub) => format!("{}/{}", c.ctype(), sub),
                    None => c.ctype().to_owned(),
                })
                .unwrap_or_else(|| "text/plain".to_owned());
            let text = match &p.body {
                PartType::Text(t) | PartType::Html(t) => Some(t.to_string()),
                _ => None,
            };
            json!({
                "index": i,
                "content_type": ct,
                "size": p.len(),
                "filename": p.attachment_name(),
                "text": text,
            })
        })
        .collect();
    json!({
        "subject": m.subject(),
        "from": addresses(m.from()).into_iter().next(),
        "to": addresses(m.to()),
        "cc": addresses(m.cc()),
        "date": m.date().map(|d| d.to_rfc3339()),
        "message_id": m.message_id(),
        "headers": headers,
        "parts": parts,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const RAW: &[u8] = b"From: Alice <alice@example.com>\r\nTo: bob@example.org, carol@example.org\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf\r\n\r\nJVBER\r\n--b--\r\n";

    #[test]
    fn summary_and_parsed_form() {
        let s = summary(RAW);
        assert_eq!(s.from.as_deref(), Some("alice@example.com"));
        assert_eq!(s.to, vec!["bob@example.org", "carol@example.org"]);
        assert_eq!(s.subject.as_deref(), Some("Grüße"));
        let p = parsed(RAW);
        assert_eq!(p["subject"], "Grüße");
        assert_eq!(p["headers"][0]["name"], "From");
        assert_eq!(p["headers"][0]["value"], "Alice <alice@example.com>");
        let parts = p["parts"].as_array().unwrap();
        assert!(parts.iter().any(|x| x["text"] == "hello"));
        assert!(parts.iter().any(|x| x["filename"] == "x.pdf"));
    }

    #[test]
    fn garbage_does_not_panic() {
        let _ = summary(b"\xff\xfe");
        let _ = parsed(b"");
    }
}
