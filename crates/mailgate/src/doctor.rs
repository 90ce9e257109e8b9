//! `mailgate doctor ...`: the arguments, and printing. The probes live in `mailgate-doctor`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use mailgate_doctor::{DoctorError, Output, Report, gmail, sendgrid, smtp};

/// `mailgate doctor` verbs.
#[derive(Subcommand)]
pub(crate) enum DoctorCmd {
    /// A Gmail API set-up with a service account: clock, key file, token without and with the
    /// subject for each scope (domain-wide delegation), profile (mail service), send-as
    /// addresses, a send probe, quota.
    Gmail(GmailArgs),
    /// A Gmail API set-up with a user's OAuth consent (client id, secret, refresh token).
    Oauth(OauthArgs),
    /// A SendGrid API key: scopes, IP access management, sender identity, sandbox send.
    Sendgrid(SendgridArgs),
    /// An SMTP server: TCP, banner, EHLO, TLS, AUTH, MAIL FROM and RCPT TO (then RSET: nothing
    /// is sent).
    Smtp(SmtpArgs),
}

#[derive(Args)]
pub(crate) struct Common {
    /// Machine-readable output (secrets redacted as in the text).
    #[arg(long)]
    json: bool,
    /// Extra trusted CA certificates (PEM), e.g. a private CA or a self-signed certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 20)]
    timeout: u64,
}

#[derive(Args)]
pub(crate) struct GmailArgs {
    /// The service account's JSON key file.
    #[arg(long)]
    key: PathBuf,
    /// The user to act for (the token's `sub`).
    #[arg(long)]
    subject: String,
    /// The From address to check (default: the subject).
    #[arg(long)]
    from: Option<String>,
    /// A scope to check delegation for, repeatable (default: gmail.send).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The Gmail API (default Google's; point it at a Mailgate to diagnose that).
    #[arg(long, default_value = gmail::GMAIL_ENDPOINT)]
    endpoint: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub(crate) struct OauthArgs {
    /// The OAuth client id.
    #[arg(long)]
    client_id: String,
    /// The OAuth client secret.
    #[arg(long, env = "MAILGATE_DOCTOR_CLIENT_SECRET", hide_env_values = true)]
    client_secret: String,
    /// The user's refresh token.
    #[arg(long, env = "MAILGATE_DOCTOR_REFRESH_TOKEN", hide_env_values = true)]
    refresh_token: String,
    /// The From address to check (default: the user's address).
    #[arg(long)]
    from: Option<String>,
    /// The token endpoint (default Google's).
    #[arg(long, default_value = gmail::GOOGLE_TOKEN_URI)]
    token_uri: String,
    /// The Gmail API (default Google's).
    #[arg(long, default_value = gmail::GMAIL_ENDPOINT)]
    endpoint: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub(crate) struct SendgridArgs {
    /// The API key (SG....).
    #[arg(long, env = "SENDGRID_API_KEY", hide_env_values = true)]
    key: String,
    /// The From address to check against the verified senders.
    #[arg(long)]
    from: Option<String>,
    /// The SendGrid API (default SendGrid's; point it at a Mailgate to diagnose that).
    #[arg(long, default_value = sendgrid::SENDGRID_ENDPOINT)]
    endpoint: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub(crate) struct SmtpArgs {
    /// The server, host:port (465 means implicit TLS unless --tls says otherwise).
    #[arg(long)]
    server: String,
    /// AUTH user name.
    #[arg(long)]
    user: Option<String>,
    /// AUTH password.
    #[arg(long, env = "MAILGATE_DOCTOR_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// An OAuth access token for AUTH XOAUTH2 (with --user).
    #[arg(long, env = "MAILGATE_DOCTOR_XOAUTH2_TOKEN", hide_env_values = true)]
    xoauth2_token: Option<String>,
    /// MAIL FROM.
    #[arg(long)]
    from: Option<String>,
    /// RCPT TO, repeatable.
    #[arg(long)]
    to: Vec<String>,
    /// auto (implicit on 465, else STARTTLS), starttls, implicit or none.
    #[arg(long, default_value = "auto")]
    tls: String,
    /// The EHLO name.
    #[arg(long, default_value = "mailgate-doctor.localhost")]
    ehlo: String,
    #[command(flatten)]
    common: Common,
}

/// Runs a doctor verb: prints the report (text as it goes, or JSON at the end) and returns the
/// exit status (0 all good, 3 problems found); `Err` when it could not run (exit 1).
pub(crate) fn run(cmd: DoctorCmd) -> Result<u8, DoctorError> {
    mailgate_tls::install_provider();
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| DoctorError::Usage(format!("cannot start the runtime: {e}")))?;
    let (json, report) = runtime.block_on(async {
        match cmd {
            DoctorCmd::Gmail(a) => {
                let opts = gmail::Options {
                    key_file: a.key,
                    subject: a.subject,
                    from: a.from,
                    scopes: if a.scopes.is_empty() {
                        vec![gmail::SEND_SCOPE.to_owned()]
                    } else {
                        a.scopes
                    },
                    endpoint: a.endpoint,
                    ca_file: a.common.ca_file,
                    timeout: Duration::from_secs(a.common.timeout),
                };
                let out = Output::detect(a.common.json);
                Ok::<_, DoctorError>((a.common.json, gmail::run(&opts, out).await?))
            }
            DoctorCmd::Oauth(a) => {
                let opts = gmail::OauthOptions {
                    client_id: a.client_id,
                    client_secret: a.client_secret,
                    refresh_token: a.refresh_token,
                    from: a.from,
                    token_uri: a.token_uri,
                    endpoint: a.endpoint,
                    ca_file: a.common.ca_file,
                    timeout: Duration::from_secs(a.common.timeout),
                };
                let out = Output::detect(a.common.json);
                Ok((a.common.json, gmail::run_oauth(&opts, out).await?))
            }
            DoctorCmd::Sendgrid(a) => {
                let opts = sendgrid::Options {
                    key: a.key,
                    from: a.from,
                    endpoint: a.endpoint,
                    ca_file: a.common.ca_file,
                    timeout: Duration::from_secs(a.common.timeout),
                };
                let out = Output::detect(a.common.json);
                Ok((a.common.json, sendgrid::run(&opts, out).await?))
            }
            DoctorCmd::Smtp(a) => {
                let tls = match a.tls.as_str() {
                    "auto" => smtp::TlsMode::Auto,
                    "starttls" => smtp::TlsMode::Starttls,
                    "implicit" => smtp::TlsMode::Implicit,
                    "none" => smtp::TlsMode::None,
                    other => {
                        return Err(DoctorError::Usage(format!(
                            "--tls `{other}`: use auto, starttls, implicit or none"
                        )));
                    }
                };
                let opts = smtp::Options {
                    server: a.server,
                    user: a.user,
                    password: a.password,
                    xoauth2_token: a.xoauth2_token,
                    from: a.from,
                    to: a.to,
                    tls,
                    ca_file: a.common.ca_file,
                    ehlo: a.ehlo,
                    timeout: Duration::from_secs(a.common.timeout),
                };
                let out = Output::detect(a.common.json);
                Ok((a.common.json, smtp::run(&opts, out).await?))
            }
        }
    })?;
    print_report(json, &report);
    Ok(report.exit_code())
}

fn print_report(json: bool, report: &Report) {
    if json {
        let text = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
        crate::stdout::write(format_args!("{text}\n"));
    }
    crate::stdout::flush();
}
