//! SMTP replies: the catalogue's text (Google's, byte for byte) followed by Mailgate's reason code,
//! decision id and, when the whole reply still fits one line, the remedy.

use mailgate_core::catalogue::{Reason, RenderArgs};
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

/// A refusal the door makes itself, before any decision (no decision id):
/// `521 5.5.2 Error: bare <LF> received [mailgate: message.bare_newline] Remedy: ...`.
pub(crate) fn refusal(reason: Reason, args: &RenderArgs) -> String {
    let (code, enhanced, text) = match reason.smtp_reply(args) {
        Some(r) => (r.code, r.enhanced, r.text),
        None => (550, "5.7.1", reason.spec().message.to_owned()),
    };
    finish(
        format!("{code} {enhanced} {text} [mailgate: {}]", reason.code()),
        reason.spec().remedy,
    )
}

/// The text of a temporary fault of the gateway itself (`store.unavailable`, `server.busy`: not
/// a decision, so no decision id): the door's SMTP `text`, the reason code and the catalogue's
/// remedy.
pub(crate) fn fault_text(reason: Reason, text: &str) -> String {
    format!(
        "{text} [mailgate: {}] Remedy: {}",
        reason.code(),
        reason.spec().remedy
    )
}

/// Appends the remedy when the whole reply still fits one line, cleans and ends the line.
fn finish(mut s: String, remedy: &str) -> String {
    let tail = format!(" Remedy: {remedy}");
    if s.len() + tail.len() <= MAX_REPLY_LINE {
        s.push_str(&tail);
    }
    clean(&mut s);
    s.push_str("\r\n");
    s
}

/// The address a relay refusal under IP trust is about: the engine's message reads
/// "<role> <address> is not allowed on the relay (...)".
fn relay_sender(message: &str) -> Option<&str> {
    let (before, _) = message.split_once(" is not allowed on the relay")?;
    before.rsplit(' ').next().filter(|a| a.contains('@'))
}

/// The reply for an engine denial:
/// `553 5.7.1 <x@y>: Sender address rejected: not owned by user alice@example.com [mailgate: sender.not_owned, decision 01J...] Remedy: ...`.
pub(crate) fn denial(d: &Denial, decision_id: &str) -> String {
    denial_about(d, decision_id, None)
}

/// Same, naming `address` (the recipient of a RCPT TO) when the object at fault is not an
/// address itself (e.g. the policy that bars it).
pub(crate) fn denial_about(d: &Denial, decision_id: &str, address: Option<&str>) -> String {
    // The relay listener's IP trust has no user: `smtp_relay.allowed_senders` is at fault, and
    // the reply speaks of the relay's clients (the catalogue's relay text).
    let relay_ip =
        d.code == Reason::SenderNotOwned && d.object_at_fault.kind == FaultKind::SmtpRelay;
    let reply = if relay_ip {
        d.code.smtp_reply_relay_ip(&d.args)
    } else {
        d.smtp()
    };
    let (code, enhanced, mut text) = match reply {
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
    } else if let Some(a) = relay_sender(&d.message).filter(|_| relay_ip) {
        text = format!("<{a}>: {text}");
    }
    // The engine's remedy (on SMTP, scope.insufficient names https://mail.google.com/ and the
    // delegation that must grant it: catalogue::SMTP_SCOPE_REMEDY).
    let remedy = d.remedy.as_str();
    finish(
        format!(
            "{code} {enhanced} {text} [mailgate: {}, decision {decision_id}]",
            d.code.code()
        ),
        remedy,
    )
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

    #[test]
    fn the_relay_refusal_names_the_address_from_the_engine_message() {
        assert_eq!(
            relay_sender(
                "From ceo@evil.test is not allowed on the relay (addresses in the organisation's domains only)"
            ),
            Some("ceo@evil.test")
        );
        assert_eq!(relay_sender("something else"), None);
    }

    #[test]
    fn refusals_carry_the_code_and_the_remedy_on_one_line() {
        let args = RenderArgs {
            detail: Some("<LF>".into()),
            ..RenderArgs::default()
        };
        let l = refusal(Reason::MessageBareNewline, &args);
        assert!(
            l.starts_with(
                "521 5.5.2 Error: bare <LF> received [mailgate: message.bare_newline] Remedy: "
            ),
            "{l}"
        );
        assert!(l.len() <= 512 && l.ends_with("\r\n"), "{l}");
        assert!(l.contains("bare_newline = \"normalize\""), "{l}");
    }
}
