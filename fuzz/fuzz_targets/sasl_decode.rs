//! AUTH decoding (`mailgate_smtp::sasl`) on arbitrary client lines.
//!
//! Every decoder runs twice: on the raw bytes (what a client can send on the wire: mostly bad
//! base64, `*`, `=`, whitespace) and on their base64 (so the fuzzer explores the mechanisms'
//! own structure: NULs, `^A` separators, `auth=Bearer`, GS2 headers). Beyond "no panic", the
//! decoders' contracts are checked: base64 round-trips, a decoded PLAIN message is exactly
//! `authzid NUL authcid NUL password` with a non-empty login, bearer tokens are non-empty and
//! trimmed, and `Debug` never shows a password or token.

#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use mailgate_smtp::sasl::{
    Bearer, Password, SaslError, decode_line, decode_oauthbearer, decode_plain, decode_text,
    decode_xoauth2,
};

fuzz_target!(|data: &[u8]| {
    // What a client sends on the wire.
    let _ = decode_all(data);

    // The same bytes as a well-formed response: the mechanisms' structure is reached.
    let encoded = STANDARD.encode(data);
    assert_eq!(decode_line(encoded.as_bytes()), Ok(data.to_vec()));
    let (plain, xoauth2, oauthbearer) = decode_all(encoded.as_bytes());
    if let Ok(p) = plain {
        let mut parts = data.split(|b| *b == 0);
        let authz = parts.next().unwrap_or_default();
        assert_eq!(parts.next(), Some(p.login.as_bytes()));
        assert_eq!(parts.next(), Some(p.password.as_bytes()));
        assert_eq!(parts.next(), None);
        assert!(authz.is_empty() || authz.eq_ignore_ascii_case(p.login.as_bytes()));
    }
    if let Ok(b) = xoauth2 {
        assert!(!b.user.is_empty());
    }
    let _ = oauthbearer;
});

/// Runs every decoder on `line` and checks what holds for any input.
fn decode_all(
    line: &[u8],
) -> (
    Result<Password, SaslError>,
    Result<Bearer, SaslError>,
    Result<Bearer, SaslError>,
) {
    let raw = decode_line(line);
    if line.trim_ascii() == b"*" {
        assert_eq!(raw, Err(SaslError::Cancelled));
    }
    match decode_text(line) {
        Ok(text) => assert_eq!(raw.as_deref(), Ok(text.as_bytes())),
        Err(SaslError::Utf8) => assert!(raw.is_ok()),
        Err(e) => assert_eq!(raw, Err(e)),
    }

    let plain = decode_plain(line);
    if let Ok(p) = &plain {
        assert!(!p.login.is_empty());
        assert!(!p.login.contains('\0') && !p.password.contains('\0'));
        assert_eq!(
            format!("{p:?}"),
            format!(
                "Password {{ login: {:?}, password: \"<redacted>\" }}",
                p.login
            )
        );
    }
    let xoauth2 = decode_xoauth2(line);
    let oauthbearer = decode_oauthbearer(line);
    for b in [&xoauth2, &oauthbearer].into_iter().flatten() {
        assert!(!b.token.is_empty());
        assert_eq!(b.token.trim(), b.token);
        assert_eq!(
            format!("{b:?}"),
            format!("Bearer {{ user: {:?}, token: \"<redacted>\" }}", b.user)
        );
    }
    // A decoder fails only with an error of its own kind; cancelling is `*` and nothing else.
    for e in [
        plain.as_ref().err(),
        xoauth2.as_ref().err(),
        oauthbearer.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    {
        assert_eq!(*e == SaslError::Cancelled, raw == Err(SaslError::Cancelled));
    }
    (plain, xoauth2, oauthbearer)
}
