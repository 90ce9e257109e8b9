//! `mailgate doctor smtp` (being written).

use std::path::PathBuf;
use std::time::Duration;

use crate::{DoctorError, Output, Report};

/// How TLS is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Implicit TLS on port 465, STARTTLS elsewhere.
    Auto,
    /// STARTTLS after EHLO.
    Starttls,
    /// TLS from the first byte (SMTPS).
    Implicit,
    /// No TLS at all (to show what a server says to a plaintext client).
    None,
}

/// What `doctor smtp` probes.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port`.
    pub server: String,
    /// AUTH user name.
    pub user: Option<String>,
    /// AUTH password.
    pub password: Option<String>,
    /// An OAuth access token for AUTH XOAUTH2 (with `user`).
    pub xoauth2_token: Option<String>,
    /// `MAIL FROM`.
    pub from: Option<String>,
    /// `RCPT TO`, each.
    pub to: Vec<String>,
    /// TLS mode.
    pub tls: TlsMode,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// The EHLO name.
    pub ehlo: String,
    /// Deadline of each exchange.
    pub timeout: Duration,
}

/// Runs every probe.
pub async fn run(opts: &Options, output: Output) -> Result<Report, DoctorError> {
    let _ = (opts, output);
    Err(DoctorError::Usage("`doctor smtp` is not built yet".into()))
}
