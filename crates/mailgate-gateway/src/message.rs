//! Header changes every door applies the same way before a message is stored: `Bcc:` removed (it
//! must not travel with the message) and, when the decision says so
//! (`organisation.on_unowned_from: rewrite`), the From header replaced by the sender's primary
//! address, as Gmail does.

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Removes `Bcc:` headers (with their continuation lines), replaces the From header with
/// `new_from` when given, and prepends `From: add_from` when given (a message without From).
pub fn rewrite_headers(raw: &[u8], new_from: Option<&str>, add_from: Option<&str>) -> Vec<u8> {
    let header_end = find(raw, b"\r\n\r\n")
        .map(|i| i + 2)
        .or_else(|| find(raw, b"\n\n").map(|i| i + 1))
        .unwrap_or(raw.len());
    let (head, body) = raw.split_at(header_end);
    let mut out = Vec::with_capacity(raw.len() + 64);
    if let Some(f) = add_from {
        out.extend_from_slice(format!("From: {f}\r\n").as_bytes());
    }
    let mut skipping = false;
    for line in head.split_inclusive(|b| *b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if continuation {
            if !skipping {
                out.extend_from_slice(line);
            }
            continue;
        }
        let lower = String::from_utf8_lossy(line.get(..line.len().min(6)).unwrap_or_default())
            .to_ascii_lowercase();
        skipping = lower.starts_with("bcc:");
        if lower.starts_with("from:")
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
    out.extend_from_slice(body);
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
}
