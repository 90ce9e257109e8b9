//! `mailgate doctor gmail` and `mailgate doctor oauth` (being written).

use std::path::PathBuf;
use std::time::Duration;

use crate::{DoctorError, Output, Report};

/// Google's Gmail API.
pub const GMAIL_ENDPOINT: &str = "https://gmail.googleapis.com";
/// Google's token endpoint.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The scope a sender needs.
pub const SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";

/// What `doctor gmail` probes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The service account's JSON key file.
    pub key_file: PathBuf,
    /// The user the service account acts for (`sub`).
    pub subject: String,
    /// The From address to check against the send-as addresses.
    pub from: Option<String>,
    /// The scopes to check delegation for, each on its own.
    pub scopes: Vec<String>,
    /// The Gmail API's base URL.
    pub endpoint: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// Deadline of each request.
    pub timeout: Duration,
}

/// What `doctor oauth` probes.
#[derive(Debug, Clone)]
pub struct OauthOptions {
    /// The OAuth client id.
    pub client_id: String,
    /// The OAuth client secret.
    pub client_secret: String,
    /// The user's refresh token.
    pub refresh_token: String,
    /// The From address to check against the send-as addresses.
    pub from: Option<String>,
    /// The token endpoint.
    pub token_uri: String,
    /// The Gmail API's base URL.
    pub endpoint: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// Deadline of each request.
    pub timeout: Duration,
}

/// Runs every probe of `doctor gmail`.
pub async fn run(opts: &Options, output: Output) -> Result<Report, DoctorError> {
    let _ = (opts, output);
    Err(DoctorError::Usage("`doctor gmail` is not built yet".into()))
}

/// Runs every probe of `doctor oauth`.
pub async fn run_oauth(opts: &OauthOptions, output: Output) -> Result<Report, DoctorError> {
    let _ = (opts, output);
    Err(DoctorError::Usage("`doctor oauth` is not built yet".into()))
}
