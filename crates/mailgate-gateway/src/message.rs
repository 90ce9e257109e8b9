//! What every door does the same way with a message's header: read its From and Sender fields
//! for the engine ([`originator`]), and, before the message is stored, remove `Bcc:` (it must
//! not travel with the message) and, when the decision says so
//! (`organisation.on_unowned_from: rewrite`), replace the From header by the sender's primary
//! address, as Gmail does ([`rewrite_headers`]).

use mail_parser::{HeaderName, HeaderValue};
use mailgate_core::engine::Originator;

/// Every From and Sender field of a parsed header, in order, each with every address it names
/// (the members of groups flattened). An entry without an address (a display name alone) or a
/// field whose value is not an address list is kept as an empty address, so that the engine
/// refuses it (`message.invalid`) instead of never seeing it.
///
/// Every field counts: mail-parser's `from()` returns one field only, and a mail client shows
/// the reader another. A field whose raw value holds a control character (a bare CR, a NUL;
/// RFC 5322 allows neither) is kept as that raw value, which is no address: mail-parser reads
/// `From: ceo@x\rFrom: alice@x` as one group holding alice@x, and a program that takes the bare
/// CR for a line end sees ceo@x.
pub fn originator(message: &mail_parser::Message<'_>) -> Originator {
    let mut o = Originator::default();
    for h in message.headers() {
        let fields = match h.name {
            HeaderName::From => &mut o.from,
            HeaderName::Sender => &mut o.sender,
            _ => continue,
        };
        let raw = message
            .raw_message
            .get(h.offset_start as usize..h.offset_end as usize)
            .unwrap_or_default();
        if stray_control(raw) {
            fields.push(vec![String::from_utf8_lossy(raw).trim().to_owned()]);
        } else {
            fields.push(addresses(&h.value));
        }
    }
    o
}

/// A control character other than a tab or a line end (CRLF, or LF alone as some clients
/// write), or a CR not followed by LF.
fn stray_control(raw: &[u8]) -> bool {
    raw.iter().enumerate().any(|(i, b)| match b {
        b'\t' | b'\n' => false,
        b'\r' => raw.get(i + 1) != Some(&b'\n'),
        _ => *b < 0x20 || *b == 0x7f,
    })
}

fn addresses(v: &HeaderValue<'_>) -> Vec<String> {
    match v {
        HeaderValue::Address(a) => a
            .iter()
            .map(|x| x.address().map(|s| s.trim().to_owned()).unwrap_or_default())
            .collect(),
        // `From:` or `From: <>`: the field names nothing.
        HeaderValue::Empty => Vec::new(),
        _ => vec![String::new()],
    }
}

/// [`originator`] of the header of `raw` (a message the door built itself).
pub fn originator_of(raw: &[u8]) -> Originator {
    mail_parser::MessageParser::default()
        .parse_headers(raw)
        .map(|m| originator(&m))
        .unwrap_or_default()
}

/// The field name of a header line (`From` of `From : x`, as mail-parser reads it), or `None`
/// for a line that starts no field.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|b| *b == b':')?;
    let mut name = &line[..colon];
    while let [rest @ .., b' ' | b'\t'] = name {
        name = rest;
    }
    (!name.is_empty() && name.iter().all(u8::is_ascii_graphic)).then_some(name)
}

/// Removes `Bcc:` headers (with their continuation lines), replaces the From header with
/// `new_from` when given, and prepends `From: add_from` when given (a message without From).
///
/// The header ends at the first empty line (CRLF or bare LF), as a parser reads it; field names
/// match however they are cased and with blanks before the colon (`BCC :`), as mail-parser
/// matches them.
pub fn rewrite_headers(raw: &[u8], new_from: Option<&str>, add_from: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 64);
    if let Some(f) = add_from {
        out.extend_from_slice(format!("From: {f}\r\n").as_bytes());
    }
    let mut skipping = false;
    let mut at = 0;
    for line in raw.split_inclusive(|b| *b == b'\n') {
        if line == b"\n" || line == b"\r\n" {
            break;
        }
        at += line.len();
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if continuation {
            if !skipping {
                out.extend_from_slice(line);
            }
            continue;
        }
        let name = field_name(line);
        let is = |n: &[u8]| name.is_some_and(|x| x.eq_ignore_ascii_case(n));
        skipping = is(b"bcc");
        if is(b"from")
            && let Some(f) = new_from
        {
            out.extend_from_slice(format!("From: {f}\r\n").as_bytes());
            skipping = true;
            continue;
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(raw.get(at..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcc_is_removed_and_from_rewritten() {
        let raw = b"From: a@x.com\r\nBcc: secret@y.com,\r\n  other@y.com\r\nTo: b@y.com\r\n\r\nBcc: stays in body\r\n";
        let out = rewrite_headers(raw, Some("p@x.com"), None);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "From: p@x.com\r\nTo: b@y.com\r\n\r\nBcc: stays in body\r\n"
        );
    }

    #[test]
    fn a_missing_from_is_added() {
        let out = rewrite_headers(b"To: b@y.com\r\n\r\nhi", None, Some("a@x.com"));
        assert_eq!(out, b"From: a@x.com\r\nTo: b@y.com\r\n\r\nhi");
    }

    /// mail-parser reads `BCC :` and `from\t:` as Bcc and From: so does the rewrite, and the
    /// header ends at the first empty line however lines end.
    #[test]
    fn field_names_match_as_the_parser_reads_them() {
        let raw = b"from\t: a@x.com\nBCC : hidden@y.com\nTo: b@y.com\n\nFrom: body@x.com\r\n\r\nBcc: body\r\n";
        let out = rewrite_headers(raw, Some("p@x.com"), None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "From: p@x.com\r\nTo: b@y.com\n\nFrom: body@x.com\r\n\r\nBcc: body\r\n"
        );
        let parsed = mail_parser::MessageParser::default()
            .parse_headers(&raw[..])
            .unwrap();
        assert!(parsed.bcc().is_some() && parsed.from().is_some());
        // A message that is all header keeps everything but what is removed.
        assert_eq!(
            rewrite_headers(b"Bcc: x@y.com\r\nTo: b@y.com", None, None),
            b"To: b@y.com"
        );
    }

    #[test]
    fn every_from_and_sender_field_and_address_is_read() {
        let o = |raw: &[u8]| originator_of(raw);
        let v = |xs: &[&[&str]]| -> Vec<Vec<String>> {
            xs.iter()
                .map(|f| f.iter().map(|s| s.to_string()).collect())
                .collect()
        };
        let two = o(b"From: ceo@example.com\r\nFrom: alice@example.com\r\n\r\nhi");
        assert_eq!(two.from, v(&[&["ceo@example.com"], &["alice@example.com"]]));
        let list = o(b"From: Alice <alice@example.com>, ceo@example.com\r\nSender: alice@example.com\r\n\r\n");
        assert_eq!(list.from, v(&[&["alice@example.com", "ceo@example.com"]]));
        assert_eq!(list.sender, v(&[&["alice@example.com"]]));
        let group = o(b"FROM : team: a@x.com, b@x.com;, c@x.com\r\n\r\n");
        assert_eq!(group.from, v(&[&["a@x.com", "b@x.com", "c@x.com"]]));
        // A bare name is kept as an entry without address; `<>` and an empty group name nothing.
        assert_eq!(o(b"From: Chief Executive\r\n\r\n").from, v(&[&[""]]));
        assert_eq!(o(b"From: <>\r\n\r\n").from, v(&[&[]]));
        assert_eq!(o(b"From: undisclosed:;\r\n\r\n").from, v(&[&[]]));
        assert_eq!(o(b"To: b@y.com\r\n\r\nFrom: body@x.com\r\n").from, v(&[]));
        // A bare CR or a NUL in the field: kept raw, which the engine refuses as no address.
        for raw in [
            &b"From: ceo@x.com\rFrom: alice@x.com\r\n\r\n"[..],
            b"From: ceo@x.com\x00From: alice@x.com\r\n\r\n",
        ] {
            let from = o(raw).from;
            assert_eq!(from.len(), 1, "{from:?}");
            assert!(from[0][0].starts_with("ceo@x.com"), "{from:?}");
            assert!(!mailgate_core::engine::plausible_address(&from[0][0]));
        }
        // Folding and bare-LF messages are fine.
        assert_eq!(
            o(b"From: Alice\r\n <alice@x.com>\r\n\r\n").from,
            v(&[&["alice@x.com"]])
        );
        assert_eq!(
            o(b"From: alice@x.com\nTo: b@y.com\n\n").from,
            v(&[&["alice@x.com"]])
        );
        assert_eq!(o(b"").from, v(&[]));
    }
}
