//! Secrets typed into a login field.
//!
//! Users paste the wrong thing: an API key as the SMTP username, an OAuth token, a JWT, a copied
//! password hash. A login is logged and kept in decisions (`presented`, `object_at_fault`), so
//! anything in a login field that looks like a secret is replaced by a redacted form that says
//! what it looked like (`[redacted: looks like an API key]`) before it reaches a log line, a
//! stored decision or a reply. Every door that shows or keeps a login (SMTP AUTH, the consent
//! page) goes through [`redact_login`].

use std::borrow::Cow;

/// Longest login kept as typed; longer ones are no address (RFC 5321 paths are at most 256
/// octets) and are redacted.
pub const MAX_LOGIN_SHOWN: usize = 256;

/// What a login field's content looks like when it looks like a secret (`None`: a plain login).
pub fn secret_kind(s: &str) -> Option<&'static str> {
    let t = s.trim();
    if t.len() > MAX_LOGIN_SHOWN {
        return Some("too long for a login");
    }
    let lower = t.to_ascii_lowercase();
    // SendGrid-style API keys, Mailgate's own: `SG.<id>.<secret>`.
    if lower.starts_with("sg.") && t.len() > 3 {
        return Some("looks like an API key");
    }
    // Google API keys.
    if t.starts_with("AIza") && t.len() >= 30 {
        return Some("looks like an API key");
    }
    if lower.starts_with("bearer ") || lower.starts_with("basic ") {
        return Some("looks like an authorization header");
    }
    // Google OAuth access tokens (`ya29.`) and refresh tokens (`1//`).
    if t.starts_with("ya29.") || (t.starts_with("1//") && t.len() >= 20) {
        return Some("looks like an OAuth token");
    }
    if t.starts_with("eyJ") && t.matches('.').count() >= 2 {
        return Some("looks like a JWT");
    }
    if t.starts_with('$')
        && [
            "$argon2", "$2a$", "$2b$", "$2y$", "$scrypt$", "$pbkdf2", "$1$", "$5$", "$6$", "$7$",
            "$y$", "$sha1$",
        ]
        .iter()
        .any(|p| t.starts_with(p))
    {
        return Some("looks like a password hash");
    }
    if t.contains("-----BEGIN") || lower.contains("private key") {
        return Some("looks like a private key");
    }
    if !t.contains('@') && high_entropy(t) {
        return Some("looks like a secret");
    }
    None
}

/// `s` as it may be logged, kept and shown: unchanged when it looks like a login,
/// `[redacted: <what it looks like>]` when it looks like a secret.
pub fn redact_login(s: &str) -> Cow<'_, str> {
    match secret_kind(s) {
        Some(kind) => Cow::Owned(format!("[redacted: {kind}]")),
        None => Cow::Borrowed(s),
    }
}

/// A long random-looking token: at least 20 characters, no whitespace, at least 3 bits of
/// entropy per character, and letters, digits and case that change often (random strings change
/// class every second or third character; words and names rarely do).
fn high_entropy(t: &str) -> bool {
    let n = t.chars().count();
    if n < 20 || t.chars().any(char::is_whitespace) {
        return false;
    }
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Lower,
        Upper,
        Digit,
    }
    let class = |c: char| {
        if c.is_ascii_lowercase() {
            Some(Class::Lower)
        } else if c.is_ascii_uppercase() {
            Some(Class::Upper)
        } else if c.is_ascii_digit() {
            Some(Class::Digit)
        } else {
            None
        }
    };
    let mut changes = 0usize;
    let mut alnum = 0usize;
    let mut prev = None;
    for c in t.chars() {
        if let Some(k) = class(c) {
            alnum += 1;
            if prev.is_some_and(|p| p != k) {
                changes += 1;
            }
            prev = Some(k);
        }
    }
    if alnum < 16 || changes * 4 < alnum {
        return false;
    }
    entropy_bits_per_char(t) >= 3.0
}

fn entropy_bits_per_char(t: &str) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in t.bytes() {
        if let Some(c) = counts.get_mut(usize::from(b)) {
            *c += 1;
        }
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_say_what_they_looked_like() {
        let cases = [
            (
                "SG.abcdefghijklmnop.qrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTU",
                "[redacted: looks like an API key]",
            ),
            (
                "ya29.a0AfH6SMBx3-kLongAccessTokenValue_123",
                "[redacted: looks like an OAuth token]",
            ),
            (
                "1//0gLx9k2-refresh-token-value-abcdef",
                "[redacted: looks like an OAuth token]",
            ),
            (
                "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
                "[redacted: looks like a JWT]",
            ),
            (
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
                "[redacted: looks like a password hash]",
            ),
            (
                "$2b$12$abcdefghijklmnopqrstuv",
                "[redacted: looks like a password hash]",
            ),
            (
                "Bearer abc.def",
                "[redacted: looks like an authorization header]",
            ),
            (
                "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
                "[redacted: looks like an API key]",
            ),
            ("q8Zr2LmX0vB7nT4wK1yP9s", "[redacted: looks like a secret]"),
            (
                "3f786850e387550fdab836ed7e6dc881de23001b",
                "[redacted: looks like a secret]",
            ),
            (
                "-----BEGIN PRIVATE KEY-----",
                "[redacted: looks like a private key]",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(redact_login(input), want, "{input}");
            assert!(!redact_login(input).contains(input));
        }
        let long = "a".repeat(300);
        assert_eq!(redact_login(&long), "[redacted: too long for a login]");
    }

    #[test]
    fn logins_are_kept_as_typed() {
        for login in [
            "frank@example.com",
            "Frank.Example+smtp@sub.example.co.uk",
            "postmaster",
            "scanner-floor3-building7-office",
            "printer_in_room_12",
            "smtp-relay-user-for-the-printers",
            "alice",
            "",
            "SG",
            "x9@example.com",
        ] {
            assert_eq!(redact_login(login), login);
            assert!(matches!(redact_login(login), Cow::Borrowed(_)));
        }
    }
}
