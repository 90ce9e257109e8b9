//! SMTP replies: the catalogue's text (Google's, byte for byte) followed by Mailgate's reason code,
//! decision id and, when the whole reply still fits one line, the remedy.

use mailgate_core::catalogue::Reason;
use mailgate_core::engine::{Denial, FaultKind};

/// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with CRLF.
const MAX_REPLY_LINE: usize = 510;

/// One reply line with CRLF; control characters inside `text` (CR, LF, NUL, ...) become spaces.
pub(crate) fn line(code: u16, enhanced: &str, text: &str) -> String {
    let mut s = format!("{code} {enhanced} {text}");
    clean(&mut s);
    s.push_str("\r\n");
    s
}

/// RFC 5321 §4.2: reply text is printable (and tab); client text echoed in a reply (a rejected
/// parameter, an address) could carry anything.
fn is_unprintable(c: char) -> bool {
    c.is_ascii_control() && c != '\t'
}

fn clean(s: &mut String) {
    if s.contains(is_unprintable) {
        *s = s.replace(is_unprintable, " ");
    }
    if s.len() > MAX_REPLY_LINE {
        let mut cut = MAX_REPLY_LINE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// The reply for an engine denial:
/// `553 5.7.1 <x@y>: Sender address rejected: not owned by user alice@example.com [mailgate: sender.not_owned, decision 01J...] Remedy: ...`.
pub(crate) fn denial(d: &Denial, decision_id: &str) -> String {
    denial_about(d, decision_id, None)
}

/// Same, naming `address` (the recipient of a RCPT TO) when the object at fault is not an
/// address itself (e.g. the policy that bars it).
pub(crate) fn denial_about(d: &Denial, decision_id: &str, address: Option<&str>) -> String {
    let (code, enhanced, mut text) = match d.smtp() {
        Some(r) => (r.code, r.enhanced, r.text),
        None => (550, "5.7.1", d.message.clone()),
    };
    if matches!(
        d.object_at_fault.kind,
        FaultKind::Address | FaultKind::Recipient
    ) {
        text = format!("<{}>: {text}", d.object_at_fault.id);
    } else if let Some(a) = address.filter(|_| d.code == Reason::PolicyRecipientRestricted) {
        text = format!("<{a}>: {text}");
    }
    if d.code == Reason::SenderNotOwned
        && let Some(caller) = &d.args.caller
    {
        text.push(' ');
        text.push_str(caller);
    }
    let mut s = format!(
        "{code} {enhanced} {text} [mailgate: {}, decision {decision_id}]",
        d.code.code()
    );
    let remedy = format!(" Remedy: {}", d.remedy);
    if s.len() + remedy.len() <= MAX_REPLY_LINE {
        s.push_str(&remedy);
    }
    clean(&mut s);
    s.push_str("\r\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_single_and_bounded() {
        let l = line(250, "2.0.0", &format!("a\r\nb{}", "x".repeat(600)));
        assert!(l.ends_with("\r\n"));
        assert_eq!(l.matches("\r\n").count(), 1);
        assert!(l.len() <= 512);
        // Found by fuzz/fuzz_targets/smtp_session.rs: a rejected parameter echoed a ^A.
        let l = line(555, "5.5.4", "Unsupported parameter SI\u{1}Z\0\u{7f}\tx.");
        assert_eq!(l, "555 5.5.4 Unsupported parameter SI Z  \tx.\r\n");
    }
}
