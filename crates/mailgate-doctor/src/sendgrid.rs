//! `mailgate doctor sendgrid` (being written).

use std::path::PathBuf;
use std::time::Duration;

use crate::{DoctorError, Output, Report};

/// What `doctor sendgrid` probes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The API key (`SG....`).
    pub key: String,
    /// The From address to check against the verified senders.
    pub from: Option<String>,
    /// The API's base URL (`https://api.sendgrid.com`, or a Mailgate).
    pub endpoint: String,
    /// Extra trusted CA certificates (PEM) for the endpoint.
    pub ca_file: Option<PathBuf>,
    /// Deadline of each request.
    pub timeout: Duration,
}

/// Runs every probe.
pub async fn run(opts: &Options, output: Output) -> Result<Report, DoctorError> {
    let _ = (opts, output);
    Err(DoctorError::Usage(
        "`doctor sendgrid` is not built yet".into(),
    ))
}
