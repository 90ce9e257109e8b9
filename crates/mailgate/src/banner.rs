//! What `mailgate serve` prints once it listens: every endpoint for people, then stable
//! `mailgate: listening ...` lines for scripts and tests.

use std::io::Write;
use std::path::Path;

use crate::config::Config;
use crate::serve::Bound;

/// Prints the banner in one piece.
pub(crate) fn print_banner(config: &Config, bound: &Bound, demo: bool, credentials: Option<&Path>) {
    use std::fmt::Write as _;
    // Written in one piece, and a closed standard output does not stop the server.
    let mut b = String::new();
    let http = bound.http;
    let mode = if demo { " (demo mode)" } else { "" };
    let _ = writeln!(b, "Mailgate {}{mode}", env!("CARGO_PKG_VERSION"));
    let store = config.store();
    let _ = match &store {
        crate::config::StoreLocation::Sqlite(path) => {
            writeln!(b, "  store               SQLite {}", path.display())
        }
        crate::config::StoreLocation::Postgres(_) => {
            writeln!(b, "  store               PostgreSQL {}", store.shown())
        }
    };
    let _ = writeln!(
        b,
        "  HTTP API            http://{http}   (plain HTTP, loopback only: a development listener)"
    );
    match bound.https {
        Some(a) => {
            let _ = writeln!(
                b,
                "  HTTPS API           https://{a}   (TLS 1.2 minimum, HTTP/1.1 and HTTP/2)"
            );
        }
        None => {
            let _ = writeln!(
                b,
                "  HTTPS API           off (set https.cert and https.key)"
            );
        }
    }
    let _ = writeln!(
        b,
        "  Gmail API           http://{http}/gmail/v1/users/me/messages/send  (api_endpoint http://{http})"
    );
    let _ = writeln!(
        b,
        "  OAuth token URL     {}/token   (sign-in: http://{http}/o/oauth2/auth)",
        config.public_url
    );
    let _ = writeln!(b, "  health              http://{http}/healthz");
    let _ = writeln!(
        b,
        "  admin API           http://{http}/mailgate/v1/  (Authorization: Bearer <admin token>)"
    );
    match bound.smtps {
        Some(a) => {
            let _ = writeln!(
                b,
                "  SMTP submission     {}   (STARTTLS required before AUTH and MAIL)",
                bound.smtp_submission
            );
            let _ = writeln!(b, "  SMTPS               {a}   (implicit TLS)");
        }
        None => {
            let _ = writeln!(
                b,
                "  SMTP submission     {}   (no certificate: STARTTLS unavailable, so every send is refused; set https.cert and https.key)",
                bound.smtp_submission
            );
            let _ = writeln!(
                b,
                "  SMTPS               off (set https.cert and https.key)"
            );
        }
    }
    let _ = writeln!(
        b,
        "  SMTP relay          {}   (IP allowlist and/or AUTH, as the directory's smtp_relay says)",
        bound.smtp_relay
    );
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let _ = writeln!(
            b,
            "  TLS certificate     {} (key {})",
            cert.display(),
            key.display()
        );
    }
    if let Some(c) = credentials {
        let _ = writeln!(
            b,
            "  demo organisation   docs/examples/org.yaml (example.com verified, example.net not)"
        );
        let _ = writeln!(b, "  demo credentials    {}", c.display());
        let _ = match &store {
            crate::config::StoreLocation::Sqlite(_) => writeln!(
                b,
                "  try                 mailgate --data-dir {} user list",
                config.data_dir.display()
            ),
            crate::config::StoreLocation::Postgres(_) => writeln!(
                b,
                "  try                 mailgate --database-url {} user list",
                store.shown()
            ),
        };
    }
    // Stable lines for scripts and tests.
    if let Some(a) = bound.https {
        let _ = writeln!(b, "mailgate: listening https={a}");
    }
    if let Some(a) = bound.smtps {
        let _ = writeln!(b, "mailgate: listening smtps={a}");
    }
    let _ = writeln!(b, "mailgate: listening smtp={}", bound.smtp_submission);
    let _ = writeln!(b, "mailgate: listening smtp_relay={}", bound.smtp_relay);
    let _ = writeln!(b, "mailgate: listening http={http}");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b.as_bytes()).and_then(|()| out.flush());
}
