//! SASL decoding for SMTP AUTH (RFC 4954): PLAIN (RFC 4616), LOGIN, XOAUTH2 (Google) and
//! OAUTHBEARER (RFC 7628). Pure functions over client input: every malformed input is an
//! `Err`, never a panic, and nothing here logs or displays a secret.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The mechanisms Mailgate offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `PLAIN`: authzid NUL authcid NUL password.
    Plain,
    /// `LOGIN`: user name and password on two challenge lines.
    Login,
    /// `XOAUTH2`: Google's bearer-token mechanism.
    XOAuth2,
    /// `OAUTHBEARER`: RFC 7628.
    OAuthBearer,
}

impl Mechanism {
    /// From smtp-proto's mechanism bit.
    pub fn from_bits(bits: u64) -> Option<Mechanism> {
        match bits {
            smtp_proto::AUTH_PLAIN => Some(Mechanism::Plain),
            smtp_proto::AUTH_LOGIN => Some(Mechanism::Login),
            smtp_proto::AUTH_XOAUTH2 => Some(Mechanism::XOAuth2),
            smtp_proto::AUTH_OAUTHBEARER => Some(Mechanism::OAuthBearer),
            _ => None,
        }
    }

    /// The EHLO keyword list, in Google's order.
    pub const ADVERTISED: &'static str = "LOGIN PLAIN XOAUTH2 OAUTHBEARER";
}

/// Why a SASL message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Not RFC 4648 base64.
    #[error("the response is not valid base64")]
    Base64,
    /// Not UTF-8 where text is required.
    #[error("the response is not UTF-8")]
    Utf8,
    /// The structure of the mechanism's message is wrong.
    #[error("the response is malformed for this mechanism")]
    Malformed,
    /// The client sent `*` (RFC 4954 §4).
    #[error("authentication cancelled by the client")]
    Cancelled,
}

/// A login and password (PLAIN, LOGIN). `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Password {
    /// The authentication identity.
    pub login: String,
    /// The password or API key.
    pub password: String,
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Password")
            .field("login", &self.login)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A user and bearer token (XOAUTH2, OAUTHBEARER). `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Bearer {
    /// `user=` (XOAUTH2) or `a=` (OAUTHBEARER); may be empty for OAUTHBEARER.
    pub user: String,
    /// The access token.
    pub token: String,
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bearer")
            .field("user", &self.user)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Decodes one client response line (without CRLF) from base64. `*` cancels.
pub fn decode_line(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    let line = trim_ascii(line);
    if line == b"*" {
        return Err(SaslError::Cancelled);
    }
    if line == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(line).map_err(|_| SaslError::Base64)
}

/// Decodes a line that must be base64 of UTF-8 text (the LOGIN user name and password).
pub fn decode_text(line: &[u8]) -> Result<String, SaslError> {
    String::from_utf8(decode_line(line)?).map_err(|_| SaslError::Utf8)
}

/// PLAIN: `[authzid] NUL authcid NUL passwd`. An authzid other than the authcid is refused.
pub fn decode_plain(line: &[u8]) -> Result<Password, SaslError> {
    let raw = decode_line(line)?;
    let mut parts = raw.split(|b| *b == 0);
    let (Some(authz), Some(login), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Utf8);
    let (authz, login, password) = (text(authz)?, text(login)?, text(password)?);
    if login.is_empty() || (!authz.is_empty() && !authz.eq_ignore_ascii_case(&login)) {
        return Err(SaslError::Malformed);
    }
    Ok(Password { login, password })
}

/// XOAUTH2: `user=<user>^Aauth=Bearer <token>^A^A`.
pub fn decode_xoauth2(line: &[u8]) -> Result<Bearer, SaslError> {
    let raw = String::from_utf8(decode_line(line)?).map_err(|_| SaslError::Utf8)?;
    let mut user = None;
    let mut token = None;
    for field in raw.split('\x01').filter(|f| !f.is_empty()) {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u.to_owned());
        } else if let Some(a) = field.strip_prefix("auth=") {
            token = bearer_token(a);
        }
    }
    match (user, token) {
        (Some(user), Some(token)) if !user.is_empty() => Ok(Bearer { user, token }),
        _ => Err(SaslError::Malformed),
    }
}

/// OAUTHBEARER: `n,a=<user>,^Aauth=Bearer <token>^A[host=..^Aport=..^A]^A` (RFC 7628 §3.1).
pub fn decode_oauthbearer(line: &[u8]) -> Result<Bearer, SaslError> {
    let raw = String::from_utf8(decode_line(line)?).map_err(|_| SaslError::Utf8)?;
    let (gs2, rest) = raw.split_once('\x01').ok_or(SaslError::Malformed)?;
    let mut gs2_parts = gs2.split(',');
    match gs2_parts.next() {
        Some("n" | "y") => {}
        _ => return Err(SaslError::Malformed),
    }
    let mut user = String::new();
    if let Some(a) = gs2_parts.next().and_then(|p| p.strip_prefix("a=")) {
        user = a.replace("=2C", ",").replace("=3D", "=");
    }
    let token = rest
        .split('\x01')
        .find_map(|kv| kv.strip_prefix("auth="))
        .and_then(bearer_token)
        .ok_or(SaslError::Malformed)?;
    Ok(Bearer { user, token })
}

fn bearer_token(auth: &str) -> Option<String> {
    let (scheme, token) = auth.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The XOAUTH2 failure challenge Google sends before its 535 (docs/smtp.md), base64.
pub fn xoauth2_challenge() -> String {
    STANDARD.encode(br#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#)
}

/// The OAUTHBEARER failure challenge (RFC 7628 §3.2.2), base64.
pub fn oauthbearer_challenge() -> String {
    STANDARD.encode(
        br#"{"status":"invalid_token","schemes":"Bearer","scope":"https://mail.google.com/"}"#,
    )
}

/// base64 of `s` (LOGIN prompts).
pub fn encode(s: &str) -> String {
    STANDARD.encode(s.as_bytes())
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        STANDARD.encode(s.as_bytes()).into_bytes()
    }

    #[test]
    fn plain_decodes_and_refuses_identity_changes() {
        let p = decode_plain(&b64("\0alice@example.com\0pw")).unwrap();
        assert_eq!(p.login, "alice@example.com");
        assert_eq!(p.password, "pw");
        assert!(decode_plain(&b64("alice@example.com\0alice@example.com\0pw")).is_ok());
        assert_eq!(
            decode_plain(&b64("bob@example.com\0alice@example.com\0pw")),
            Err(SaslError::Malformed)
        );
        assert_eq!(decode_plain(b"!!!"), Err(SaslError::Base64));
        assert_eq!(decode_plain(b"*"), Err(SaslError::Cancelled));
        assert_eq!(decode_plain(&b64("nonul")), Err(SaslError::Malformed));
        assert!(!format!("{p:?}").contains("pw\""));
    }

    #[test]
    fn xoauth2_and_oauthbearer_decode() {
        let x = decode_xoauth2(&b64("user=a@example.com\x01auth=Bearer ya29.tok\x01\x01")).unwrap();
        assert_eq!(
            (x.user.as_str(), x.token.as_str()),
            ("a@example.com", "ya29.tok")
        );
        assert!(!format!("{x:?}").contains("ya29"));
        assert!(decode_xoauth2(&b64("user=a@example.com\x01\x01")).is_err());
        let o = decode_oauthbearer(&b64(
            "n,a=a@example.com,\x01host=h\x01port=587\x01auth=Bearer tok\x01\x01",
        ))
        .unwrap();
        assert_eq!(
            (o.user.as_str(), o.token.as_str()),
            ("a@example.com", "tok")
        );
        assert!(decode_oauthbearer(&b64("p,a=x,\x01auth=Bearer t\x01\x01")).is_err());
    }

    #[test]
    fn challenge_is_googles_json() {
        let j = STANDARD.decode(xoauth2_challenge()).unwrap();
        assert_eq!(
            std::str::from_utf8(&j).unwrap(),
            r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#
        );
    }

    proptest::proptest! {
        #[test]
        fn decoders_are_total(input in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_plain(&input);
            let _ = decode_xoauth2(&input);
            let _ = decode_oauthbearer(&input);
            let _ = decode_text(&input);
            let enc = STANDARD.encode(&input).into_bytes();
            let _ = decode_plain(&enc);
            let _ = decode_xoauth2(&enc);
            let _ = decode_oauthbearer(&enc);
        }
    }
}
